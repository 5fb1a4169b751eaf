"""A user's own training script for model.py on ISBI 2015 (docs/own_model.md): a plain PyTorch loop, no
tune_landmarks in the loop. Images are read grey, stretched to 256 x 256 (area), replicated to 3 channels and
scaled to [-1, 1]; targets are Gaussians at (x / W, y / H) of the map; the loss is MSE on the sigmoid heatmaps plus
L1 on their soft-argmax; the checkpoint is saved as such scripts save theirs (a Namespace beside the weights).

It trains on ISBI's `train` less the 30 images tune_landmarks selects on (train:0.2), so that no image the sweep
chooses or judges on was ever trained on by this model; test1 is never read.

    python docs/own_model/train_plain.py --isbi ../shared/data/isbi2015 --out study/own/checkpoint_best_256.pth
    python docs/own_model/train_plain.py --smoke-test
"""
import argparse
import csv
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import HRNetLandmarkModel  # noqa: E402

SIZE = 256


def read_csv(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))[1:]
    return {Path(r[0]).stem: np.array([float(v) for v in r[1:]]).reshape(19, 2) for r in rows if r}


def load(isbi, ids):
    senior, junior = read_csv(isbi / "train_senior.csv"), read_csv(isbi / "train_junior.csv")
    xs, units = [], []
    for i in ids:
        img = cv2.imread(str(isbi / "images" / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        xs.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
        units.append(np.ceil((senior[i] + junior[i]) / 2) / np.array([w, h]))
    return np.stack(xs), np.stack(units).astype(np.float32)


def to_input(grey):
    x = torch.from_numpy(grey).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.5


def augment(grey, units, rng):
    """A random shift, scale and rotation of each image and its points."""
    out, pts = np.empty_like(grey), units.copy()
    for n in range(len(grey)):
        m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), rng.uniform(-8, 8), rng.uniform(0.9, 1.1))
        m[:, 2] += rng.uniform(-0.05, 0.05, 2) * SIZE
        out[n] = cv2.warpAffine(grey[n], m, (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT)
        p = units[n] * SIZE
        pts[n] = (p @ m[:, :2].T + m[:, 2]) / SIZE
    return out, pts


def soft_argmax(p):
    h, w = p.shape[-2:]
    mass = p.sum((2, 3))
    return torch.stack([(p.sum(2) * torch.arange(w)).sum(-1) / mass / (w - 1),
                        (p.sum(3) * torch.arange(h)).sum(-1) / mass / (h - 1)], -1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isbi", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--smoke-test", action="store_true")
    a = p.parse_args()
    if a.smoke_test:
        import tempfile

        a.isbi = Path(__file__).resolve().parents[3] / "shared" / "data" / "isbi2015"
        a.out, a.epochs = Path(tempfile.mkdtemp()) / "smoke.pth", 1
    from tune_landmarks.read import describe, load_roles  # only to leave out the images the sweep selects on

    roles = load_roles(describe(a.isbi), with_test=False)
    ids = [r.image_id for r in roles.train.records][: 8 if a.smoke_test else None]
    grey, units = load(a.isbi, ids)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = HRNetLandmarkModel(19, 32)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = a.epochs * math.ceil(len(ids) / 8)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.05)
    grid = torch.arange(SIZE).float()
    t0 = time.time()
    for epoch in range(a.epochs):
        net.train()
        order, losses = rng.permutation(len(ids)), []
        for b in range(0, len(ids), 8):
            g, u = augment(grey[order[b:b + 8]], units[order[b:b + 8]], rng)
            u = torch.from_numpy(u)
            c = u * (SIZE - 1)
            target = torch.exp(-((grid.view(1, 1, 1, -1) - c[..., 0, None, None]) ** 2
                                 + (grid.view(1, 1, -1, 1) - c[..., 1, None, None]) ** 2) / (2 * 3.0 ** 2))
            heat = torch.sigmoid(net(to_input(g)))
            loss = ((heat - target) ** 2).mean() * 1000 + (soft_argmax(heat) - u).abs().mean() * 100
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{a.epochs} loss {np.mean(losses):.4f} ({time.time() - t0:.0f} s)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": a.epochs,
                "args": argparse.Namespace(model="hrnet", image_size=[SIZE, SIZE], lr=2e-3, epochs=a.epochs)}, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
