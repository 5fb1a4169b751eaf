"""Your own model: one step of tune_landmarks' loop on an imported model against the plain loop's step on it.

The model is docs/own_model/model.py (a hand-written HRNet-style class, stride-1 logits read with a sigmoid), imported
with a spec as `import-model` does. Three steps on the same random batch, interleaved within each repeat:
- `plain loop`: what the user's own script runs (3-channel [-1, 1] input, sigmoid, MSE on Gaussians at x / W, Adam);
- `tune_landmarks`: run.train_step on the imported model (the same forward through the model interface, targets on
  the device, adaptive wing on the activated heatmaps, masked to the workflow's difficult landmarks, AdamW, clip);
  and the same with `--loss mse` (the plain loop's loss), to tell the loss's cost from the rest;
- `built-in`: run.train_step on the built-in --builtin model at the same size (stride-4 heatmaps).
fp32, and bf16 autocast for the two tool steps on CUDA. Peak memory per step (CUDA: max allocated).

Why: the imported model must cost what the user's own loop costs, not more; and the comparison with the built-in
model says what a stride-1 output costs at the workflow's sizes.

    python scripts/bench_imported.py --image-size 256
    python scripts/bench_imported.py --smoke-test
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import _bench
import torch

from tune_landmarks.build import from_checkpoint
from tune_landmarks.imported import import_model
from tune_landmarks.landmarks import ISBI2015, WORKFLOW_DIFFICULT, symbols
from tune_landmarks.loss import landmark_weights
from tune_landmarks.model import read_checkpoint

OWN = _bench.ROOT / "docs" / "own_model"


def imported(size: int, device: torch.device, work: Path) -> torch.nn.Module:
    """docs/own_model's class at `size`, imported through its spec (random weights, seeded)."""
    spec = (OWN / "spec.yaml").read_text().replace("size: [256, 256]", f"size: [{size}, {size}]")
    (work / "model.py").write_text((OWN / "model.py").read_text())
    (work / "spec.yaml").write_text(spec)
    import sys

    sys.path.insert(0, str(work))
    try:
        from model import HRNetLandmarkModel
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(0)
    torch.save({"model_state_dict": HRNetLandmarkModel(19, 32).state_dict()}, work / "ckpt.pth")
    folder = import_model(work / "ckpt.pth", work / "spec.yaml", work / f"imported-{size}")
    return from_checkpoint(read_checkpoint(folder), folder).to(device)


def plain_step(net: torch.nn.Module, x: torch.Tensor, kps: torch.Tensor) -> callable:
    """The user's own loop on its own copy of the network."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-6)
    size = x.shape[-1]
    grid = torch.arange(size, device=x.device).float()

    def step() -> float:  # targets and normalisation per batch, as the tool's step does them
        c = kps / size * (size - 1)
        target = torch.exp(-((grid.view(1, 1, 1, -1) - c[..., 0, None, None]) ** 2
                             + (grid.view(1, 1, -1, 1) - c[..., 1, None, None]) ** 2) / (2 * 2.0 ** 2))
        loss = ((torch.sigmoid(net((x.expand(-1, 3, -1, -1) - 0.5) / 0.5)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    net.train()
    return step


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--builtin", default="hrnet_w32")
    args = _bench.parse(p, {"image_size": 64, "batch_size": 2, "builtin": "hrnet_w18_small_v2"})
    device = _bench.setup(args)
    syms = symbols(ISBI2015)
    weights = landmark_weights(syms, [s for s in WORKFLOW_DIFFICULT if s in syms], "masked", 2.5)
    x, kps = _bench.random_batch(args.batch_size, args.image_size, len(syms), device)
    rec = _bench.Record("bench_imported: your own model's step through tune_landmarks vs its plain loop", args, device)
    with tempfile.TemporaryDirectory() as tmp:
        model = imported(args.image_size, device, Path(tmp))
    import copy

    plain = copy.deepcopy(model.net)
    builtin, opt = _bench.model_for_steps(args.builtin, len(syms), device)
    steps = {"plain loop": plain_step(plain, x, kps),
             "tune_landmarks": _bench.make_step(model, x, kps, weights),
             "tune_landmarks --loss mse": _bench.make_step(model, x, kps, weights, loss="mse"),
             "built-in": _bench.make_step(builtin, x, kps, weights, opt)}
    if device.type == "cuda":
        steps["tune_landmarks bf16"] = _bench.make_step(model, x, kps, weights, amp_dtype=torch.bfloat16)
        steps["built-in bf16"] = _bench.make_step(builtin, x, kps, weights, opt, amp_dtype=torch.bfloat16)
    times = _bench.interleaved(steps, args.repeats, device)
    mem, peaks = _bench.PeakMemory(device), {}
    for name, step in steps.items():
        mem.reset()
        step()
        peaks[name] = mem.read_mb()
    rec.value("settings", f"docs/own_model HRNetLandmarkModel (width 32, sigmoid, stride 1) imported at "
                          f"{args.image_size}px, batch {args.batch_size}, 19 landmarks; tool steps masked to the "
                          f"workflow's difficult landmarks present in ISBI; built-in: {args.builtin}; memory: {mem.kind}")
    rec.table(["step", "s/step (median)", "step / plain loop (paired)", "peak MB"],
              [[n, _bench.median(times[n]), _bench.paired_ratio(times, n, "plain loop"), peaks[n]] for n in steps])
    rec.ratio("tune_landmarks / plain loop", _bench.paired_ratio(times, "tune_landmarks", "plain loop"),
              "the same model and batch; > 1: the tool's step costs more")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
