"""Your own model: a hand-written model class in the user's own model.py, trained by the user's own plain PyTorch
loop, saved the way their script saves it, imported with a spec, then fine-tuned, searched, refined, exported and
predicted with by this tool."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import cli

from tune_landmarks.config import TrainConfig
from tune_landmarks.infer import evaluate_checkpoint
from tune_landmarks.read import describe, load_split

SIZE = (64, 64)  # width, height the user's model sees

# The user's own files: model.py imports its own blocks.py (an extra file), module names of its own, logits
# upsampled to the input resolution (stride 1), and a coordinate-regression network.
BLOCKS_PY = '''
import torch.nn as nn


def conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
'''
MODEL_PY = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks import conv_bn


class HRNetLandmarkModel(nn.Module):
    """Two branches fused, heatmap logits upsampled to the input size."""

    def __init__(self, num_landmarks=29, width=16):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 2), conv_bn(width, width, 1))
        self.transition1 = nn.ModuleList([conv_bn(width, width, 1), conv_bn(width, 2 * width, 2)])
        self.fuse = conv_bn(3 * width, width, 1)
        self.final_layers = nn.Conv2d(width, num_landmarks, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.stem(x)
        hi, lo = self.transition1[0](y), self.transition1[1](y)
        y = self.fuse(torch.cat([hi, F.interpolate(lo, size=hi.shape[-2:], mode="bilinear", align_corners=False)], 1))
        return F.interpolate(self.final_layers(y), size=(h, w), mode="bilinear", align_corners=False)


class CoordNet(nn.Module):
    """Direct regression: (B, K, 2) logits of x / W and y / H."""

    def __init__(self, num_landmarks=29, width=16):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, width, 2), conv_bn(width, 2 * width, 2), conv_bn(2 * width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.regressor = nn.Linear(2 * width * 16, 2 * num_landmarks)
        self.k = num_landmarks

    def forward(self, x):
        return self.regressor(self.pool(self.features(x)).flatten(1)).view(-1, self.k, 2)


def not_a_module(**kwargs):
    return {"weights": 1}
'''
HEATMAP_SPEC = """\
code: model.py
extra_files: [blocks.py]
class: HRNetLandmarkModel
kwargs: {num_landmarks: 29, width: 16}
landmarks: aariz
input:
  size: [64, 64]
  resize: stretch
  interpolation: area
  channels: 3
  mean: [0.5, 0.5, 0.5]
  std: [0.5, 0.5, 0.5]
output:
  kind: heatmap
  activation: sigmoid
  decode: soft-argmax
"""
COORDS_SPEC = HEATMAP_SPEC.replace("HRNetLandmarkModel", "CoordNet").replace("kind: heatmap", "kind: coords").replace(
    "decode: soft-argmax", "coords: unit")


# ---------------------------------------------------------------- the user's own script

def user_image(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """The user's preprocessing, exactly as the spec says: grey, stretched to 64 x 64 (area), 3 channels, [-1, 1]."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    x = cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return (np.repeat(x[None], 3, 0) - 0.5) / 0.5, (img.shape[1], img.shape[0])


def user_batch(records) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images, ground truth normalised as x / W and y / H, and each image's (W, H)."""
    xs, units, sizes = [], [], []
    for r in records:
        x, (w, h) = user_image(r.image_path)
        xs.append(x)
        units.append(r.keypoints / np.array([w, h]))
        sizes.append((w, h))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(units)).float(), np.array(sizes, np.float64)


def soft_argmax(p: torch.Tensor) -> torch.Tensor:
    """The user's decoding: expectation over the whole map, u = sum p j / (w - 1) / sum p."""
    h, w = p.shape[-2:]
    mass = p.sum((2, 3))
    u = (p.sum(2) * torch.arange(w)).sum(-1) / mass / (w - 1)
    v = (p.sum(3) * torch.arange(h)).sum(-1) / mass / (h - 1)
    return torch.stack([u, v], -1)


def user_train_and_score(root: Path, work: Path, kind: str) -> tuple[Path, float]:
    """The user's own plain training loop (a few steps) and evaluation on `valid`; the checkpoint saved as their
    script saves it (a Namespace beside the weights). Returns the checkpoint and the loop's own MRE in mm."""
    sys.path.insert(0, str(work))
    try:
        import importlib

        user = importlib.import_module("model")
        importlib.reload(user)
        torch.manual_seed(0)
        net = user.HRNetLandmarkModel(29, 16) if kind == "heatmap" else user.CoordNet(29, 16)
    finally:
        sys.path.remove(str(work))
    info = describe(root)
    train = load_split(info, "train", "mean").records
    x, units, _ = user_batch(train)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ys, xs_ = torch.arange(SIZE[1]).float(), torch.arange(SIZE[0]).float()
    net.train()
    for step in range(60):
        idx = torch.arange(step * 4, step * 4 + 4) % len(train)
        out = net(x[idx])
        if kind == "heatmap":
            c = units[idx] * torch.tensor([SIZE[0] - 1, SIZE[1] - 1])
            target = torch.exp(-((xs_.view(1, 1, 1, -1) - c[..., 0, None, None]) ** 2
                                 + (ys.view(1, 1, -1, 1) - c[..., 1, None, None]) ** 2) / (2 * 2.0 ** 2))
            loss = ((torch.sigmoid(out) - target) ** 2).mean() * 100
        else:
            loss = (torch.sigmoid(out) - units[idx]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    valid = load_split(info, "valid", "mean").records
    x, _, sizes = user_batch(valid)
    net.eval()
    with torch.no_grad():
        out = torch.sigmoid(net(x))
        unit = soft_argmax(out) if kind == "heatmap" else out
    pred = unit.double().numpy() * sizes[:, None, :]
    spacing = np.array([r.spacing_mm for r in valid])[:, None]
    err = np.linalg.norm(pred - np.stack([r.keypoints for r in valid]), axis=-1) * spacing
    ckpt = work / f"checkpoint_best_{kind}.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 60,
                "args": argparse.Namespace(model="hrnet", image_size=[64, 64], lr=3e-3)}, ckpt)
    return ckpt, float(err.mean())


@pytest.fixture(scope="module")
def user_work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("user_project")
    (work / "blocks.py").write_text(BLOCKS_PY)
    (work / "model.py").write_text(MODEL_PY)
    (work / "heatmap.yaml").write_text(HEATMAP_SPEC)
    (work / "coords.yaml").write_text(COORDS_SPEC)
    return work


@pytest.fixture(scope="module")
def user_heatmap(user_work, synth_root) -> tuple[Path, float]:
    return user_train_and_score(synth_root, user_work, "heatmap")


@pytest.fixture(scope="module")
def imported_heatmap(user_work, user_heatmap, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "hrnet"
    cli("import-model", user_heatmap[0], "--spec", user_work / "heatmap.yaml", "--out", out, "--trust-pickle", check=True)
    return out


# ---------------------------------------------------------------- import

@pytest.mark.slow
def test_import_reproduces_the_users_own_mre_and_refuses_pickle_without_the_flag(user_work, user_heatmap, synth_root,
                                                                                 tmp_path):
    ckpt, own_mre = user_heatmap
    refused = cli("import-model", ckpt, "--spec", user_work / "heatmap.yaml", "--out", tmp_path / "no")
    assert refused.returncode == 1 and not (tmp_path / "no").exists()
    assert refused.stderr == (f"error: {ckpt}: not a weights-only checkpoint: it holds pickled Python objects (reading "
                              "them runs code from the file); pass --trust-pickle if you trust it\n")
    p = cli("import-model", ckpt, "--spec", user_work / "heatmap.yaml", "--out", tmp_path / "m", "--trust-pickle",
            "--dataset_path", synth_root, "--split", "valid", check=True)
    assert "\x1b" not in p.stdout + p.stderr
    ev = evaluate_checkpoint(tmp_path / "m", synth_root, "valid")
    assert ev.summary.mre == pytest.approx(own_mre, abs=1e-3)
    assert f"MRE {ev.summary.mre:.3f} mm" in p.stdout and "SDR@2" in p.stdout
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    arch = meta["arch"]
    assert meta["format_version"] == 1 and arch["kind"] == "imported" and arch["spec"]["class"] == "HRNetLandmarkModel"
    assert set(arch["code"]["files"]) == {"model.py", "blocks.py"} and arch["source"]["sha256"]
    code = tmp_path / "m" / arch["code"]["dir"]
    assert (code / "model.py").read_text() == MODEL_PY
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "final_layers.weight" in weights and "stem.0.0.weight" in weights  # the user's own names
    (code / "model.py").write_text(MODEL_PY + "\n# edited\n")  # a changed code copy is refused
    bad = cli("evaluate", "--checkpoint", tmp_path / "m", "--dataset_path", synth_root, "--split", "valid")
    assert bad.returncode == 1 and "model.py: changed since the model was imported" in bad.stderr


@pytest.mark.slow
def test_a_coordinate_regression_model_imports_and_scores_as_its_loop(user_work, synth_root, tmp_path):
    ckpt, own_mre = user_train_and_score(synth_root, user_work, "coords")
    p = cli("import-model", ckpt, "--spec", user_work / "coords.yaml", "--out", tmp_path / "c", "--trust-pickle", check=True)
    assert "imported" in p.stdout
    ev = evaluate_checkpoint(tmp_path / "c", synth_root, "valid")
    assert ev.summary.mre == pytest.approx(own_mre, abs=1e-3)
    res = _finetune(synth_root, tmp_path / "c", tmp_path / "ft", epochs=1, max_steps_per_epoch=2, mode="all")
    assert np.isfinite(res.best.mre)  # L1 in mm on the coordinates trains


@pytest.mark.parametrize("edit, message", [
    (lambda s: s + "colour: grey\n", "unknown key `colour`"),
    (lambda s: s.replace("model.py", "missing.py"), "code file 'missing.py'"),
    (lambda s: s.replace("class: HRNetLandmarkModel", "class: not_a_module"), "not a torch.nn.Module"),
    (lambda s: s.replace("landmarks: aariz", "landmarks: isbi"), "the output has K = 29 landmarks, the spec lists 19"),
    (lambda s: s.replace("kind: heatmap", "kind: coords"), "output kind coords needs shape (B, K, 2)"),
    (lambda s: s.replace("size: [64, 64]", "size: [64, 4]"), "`input.size` is [64, 4], but must be"),
    (lambda s: s.replace("resize: stretch", "resize: crop"), "`input.resize` is 'crop', but must be one of"),
    (lambda s: s.replace("channels: 3", "channels: 1").replace("[0.5, 0.5, 0.5]", "0.5"),
     "a forward on a blank 64 x 64 image failed"),
])
def test_bad_specs_are_one_message_naming_the_file(user_work, user_heatmap, tmp_path, edit, message, capsys):
    from tune_landmarks.cli import main

    spec = user_work / f"bad-{abs(hash(message))}.yaml"
    spec.write_text(edit(HEATMAP_SPEC))
    assert main(["import-model", str(user_heatmap[0]), "--spec", str(spec), "--out", str(tmp_path / "m"),
                 "--trust-pickle"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert (str(spec) in err or "model.py" in err) and not (tmp_path / "m").exists()


def test_weights_that_do_not_fit_list_their_keys(user_work, user_heatmap, tmp_path):
    sd = torch.load(user_heatmap[0], weights_only=False)["model_state_dict"]
    sd["extra.weight"] = torch.zeros(1)
    del sd["final_layers.bias"]
    sd = {f"module.{k}": v for k, v in sd.items()}  # DataParallel's prefix is stripped
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    p = cli("import-model", tmp_path / "w.pth", "--spec", user_work / "heatmap.yaml", "--out", tmp_path / "m")
    assert p.returncode == 1 and "1 missing (final_layers.bias); 1 unexpected (extra.weight)" in p.stderr, p.stderr


# ---------------------------------------------------------------- fine-tuning, export, predict

def _finetune(root: Path, start: Path, out: Path, **kw):
    from tune_landmarks.stages import train_any

    cfg = TrainConfig(dataset_path=str(root), resume=str(start), out=str(out), progress=False, batch_size=4,
                      **({"epochs": 3, "lr": 1e-3, "mode": "masked"} | kw))
    return train_any(cfg)


@pytest.mark.slow
def test_masked_finetune_of_the_imported_model_lowers_the_difficult_landmarks(imported_heatmap, synth_root, tmp_path):
    start = evaluate_checkpoint(imported_heatmap, synth_root, "valid")
    worst = sorted(start.summary.per_landmark, key=lambda s: -start.summary.per_landmark[s])[:4]
    res = _finetune(synth_root, imported_heatmap, tmp_path / "ft", difficult=worst, epochs=4, lr=2e-3)
    before = np.mean([start.summary.per_landmark[s] for s in worst])
    assert res.best.mre_difficult < before, (res.best.mre_difficult, before)
    assert res.start_per_landmark == pytest.approx(start.summary.per_landmark, abs=1e-9)  # the same decoding
    # exported as a folder with its code copy; moved, it predicts with nothing else
    p = cli("export", "--checkpoint", res.out / "best.pt", "--out", tmp_path / "exp", check=True)
    assert "exported" in p.stdout
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(tmp_path / "exp", moved)
    shutil.rmtree(res.out)
    images = [r.image_path for r in load_split(describe(synth_root), "valid", "mean").records[:2]]
    p = cli("predict", *images, "--model", moved, "--out", tmp_path / "pred", check=True)
    ev = evaluate_checkpoint(moved, synth_root, "valid")
    got = json.loads((tmp_path / "pred" / f"{images[0].stem}.json").read_text())
    xy = np.array([[lm["value"]["x"], lm["value"]["y"]] for lm in got["landmarks"]])
    assert np.abs(xy - ev.pred[0]).max() < 1e-3 and ev.summary.mre == pytest.approx(res.best.mre, abs=1e-6)


@pytest.mark.slow
def test_refine_stage_on_the_imported_model_keeps_the_others_bit_identical(imported_heatmap, synth_root, tmp_path):
    from tune_landmarks.refine import train_refine

    cfg = TrainConfig(dataset_path=str(synth_root), resume=str(imported_heatmap), out=str(tmp_path / "r"), progress=False,
                      mode="refine", difficult=["Go", "Ar"], epochs=1, max_steps_per_epoch=2, batch_size=4,
                      refine_mm_per_px=0.15, refine_crop_mm=9.6, refine_model="hrnet_w18_small")
    res = train_refine(cfg)
    start = evaluate_checkpoint(imported_heatmap, synth_root, "valid")
    ev = evaluate_checkpoint(res.out / "best.pt", synth_root, "valid")
    others = [i for i, s in enumerate(ev.symbols) if s not in ("Go", "Ar")]
    assert np.array_equal(ev.pred[:, others], start.pred[:, others])
    assert not np.array_equal(ev.pred[:, [14, 11]], start.pred[:, [14, 11]])


# ---------------------------------------------------------------- a sweep of it, killed and resumed

SPACE = """\
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.5, high: 3.0}
arms:
  refine:
    lr: {type: fixed, value: 3.0e-3}
    sigma: {type: fixed, value: 1.5}
    refine_mm_per_px: {type: fixed, value: 0.15}
    refine_crop_mm: {type: fixed, value: 9.6}
    refine_model: {type: fixed, value: hrnet_w18_small}
"""


@pytest.mark.slow
def test_a_sweep_of_the_imported_model_is_killed_resumed_exported_and_predicts_after_a_move(imported_heatmap, synth_root,
                                                                                           tmp_path):
    from test_resume import _stop_when_saved

    (tmp_path / "space.yaml").write_text(SPACE)
    exp = tmp_path / "store" / "own"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(tmp_path / "space.yaml"), "--dataset_path",
           str(synth_root), "--resume", str(imported_heatmap), "--name", "own", "--storage", str(tmp_path / "store"),
           "--arms", "masked,refine", "--num-samples", "1", "--max-concurrent", "1", "--epochs", "2",
           "--grace-period", "2", "--batch_size", "4", "--max-steps-per-epoch", "3"]
    with open(tmp_path / "search.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    _stop_when_saved(proc, exp, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    p = cli("resume", exp, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    verdict = json.loads((exp / "verdict.json").read_text())
    assert set(verdict["arms"]) == {"masked", "refine"}
    p = cli("export", exp, "--arm", "refine", "--force", "--out", tmp_path / "cascade")
    assert p.returncode == 0, p.stderr[-3000:]
    moved = tmp_path / "moved" / "cascade"
    moved.parent.mkdir()
    shutil.move(tmp_path / "cascade", moved)
    images = [r.image_path for r in load_split(describe(synth_root), "test", "mean").records[:2]]
    p = cli("predict", *images, "--model", moved, "--out", tmp_path / "pred", "--pixel-size", "0.1")
    assert p.returncode == 0, p.stderr[-3000:]
    start = evaluate_checkpoint(imported_heatmap, synth_root, "test")
    ev = evaluate_checkpoint(moved, synth_root, "test")
    refined = json.loads((moved / "model.json").read_text())["refine"]["refined"]
    others = [i for i, s in enumerate(ev.symbols) if s not in refined]
    assert np.array_equal(ev.pred[:, others], start.pred[:, others])


def test_code_travels_as_a_package_when_its_folder_is_not_on_this_node(imported_heatmap, tmp_path, monkeypatch):
    """A trial on another node of a Ray cluster finds the code copy where runtime_env py_modules put it: on sys.path,
    under its package name (the recorded folder does not exist there); the sha256 checks still apply."""
    from tune_landmarks.build import read_arch
    from tune_landmarks.imported import build, code_dir

    arch = read_arch(imported_heatmap)
    shipped = tmp_path / "worker_modules"
    shutil.copytree(arch["code"]["dir"], shipped / arch["code"]["package"])
    monkeypatch.syspath_prepend(str(shipped))
    remote = arch | {"code": arch["code"] | {"dir": str(tmp_path / "not" / "on" / "this" / "node")}}
    assert code_dir(remote["code"]) == shipped / arch["code"]["package"]
    assert build(remote).num_landmarks == 29


@pytest.mark.parametrize("output, shape, tol", [
    ({"kind": "heatmap", "decode": "dark"}, (1, 2, 24, 32), 0.1),  # stride 2, the tool's centre-aligned frame
    ({"kind": "heatmap", "decode": "soft-argmax"}, (1, 2, 24, 32), 0.05),  # u = sum p j / (w - 1), x = u W
    ({"kind": "coords", "coords": "unit"}, (1, 2, 2), 1e-4),
    ({"kind": "coords", "coords": "pixels"}, (1, 2, 2), 1e-4),
])
def test_each_outputs_targets_decode_back_to_the_points(output, shape, tol):
    """What an imported model is trained towards (targets) is what it decodes back to: in every output convention
    the points come back in the cached input frame (an image scaled by 0.3 x 0.25, pixel centres aligned)."""
    from tune_landmarks.imported import ImportedModel, parse_spec

    spec = parse_spec({"code": "m.py", "class": "X", "landmarks": ["A", "B"], "input": {"size": [64, 48]},
                       "output": output}, "spec.yaml")
    model = ImportedModel(torch.nn.Identity(), spec, {"code": {"entry": "m.py"}})
    kps = torch.tensor([[[20.3, 17.8], [40.6, 25.1]]])
    frame = torch.tensor([[0.3, 0.25, 0.1]])
    target = model.targets(torch.zeros(shape), kps, frame, (64, 48), 1.5)
    pred = target if output["kind"] == "heatmap" else target[..., :2]
    assert (model.decode(pred, frame, (64, 48), "argmax", 1.5) - kps).abs().max() < tol
    if output["kind"] == "coords":  # the loss's mm per unit: x_orig = x_corner / s, mm = px x spacing
        px = (64, 48) if output["coords"] == "unit" else (1, 1)
        assert torch.allclose(target[0, 0, 2:], torch.tensor([px[0] * 0.1 / 0.3, px[1] * 0.1 / 0.25]))


def test_letterbox_keeps_the_aspect_pads_right_and_bottom_and_inverts_exactly():
    from tune_landmarks.cache import resize, to_original, to_target

    img = np.random.default_rng(0).integers(1, 255, (100, 200), dtype=np.uint8)
    out, scale = resize(img, (64, 64), "letterbox", "area")
    assert out.shape == (64, 64) and np.allclose(scale, [0.32, 0.32])
    assert (out[32:] == 0).all() and (out[:32] > 0).all()  # content on top, zeros below
    pts = np.array([[150.0, 80.0], [0.0, 99.0]])
    assert np.allclose(to_original(to_target(pts, scale), scale), pts)
