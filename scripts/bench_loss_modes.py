"""Step time and peak memory of the loss modes: masked (the workflow's 12 of 29 landmarks) vs weighted
(difficult x2.5) vs all, per model and input size.

Why: the hand-tuned workflow claims masking makes fine-tuning "~40% faster". In `run.train` the modes
differ only in the per-landmark weight vector (the network still predicts, and backpropagates through,
all 29 heatmaps), so the claim is checked here as the ratio masked/all measured in the same run, modes
interleaved within each repeat. A fourth arm, `masked_sliced`, computes the loss on the 12 heatmaps
only: the most any restructuring of the masked loss could save.

    python scripts/bench_loss_modes.py                       # record to BENCHMARKS.md
    python scripts/bench_loss_modes.py --smoke-test          # seconds; records nothing
"""
from __future__ import annotations

import _bench
import torch

from tune_landmarks.landmarks import AARIZ, WORKFLOW_DIFFICULT, symbols
from tune_landmarks.loss import landmark_weights

MODES = ("all", "weighted", "masked", "masked_sliced")


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["hrnet_w18_small_v2", "hrnet_w32"])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 768], help="square input sizes")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--difficult-weight", type=float, default=2.5)
    p.add_argument("--max-seconds-per-step", type=float, default=60.0,
                   help="skip a size (and the larger ones) whose probe step takes longer")
    args = _bench.parse(p, {"models": ["hrnet_w18_small_v2"], "sizes": [64], "batch_size": 2})
    device = _bench.setup(args)
    syms = symbols(AARIZ)
    hard = [i for i, s in enumerate(syms) if s in WORKFLOW_DIFFICULT]
    weights = {m: landmark_weights(syms, list(WORKFLOW_DIFFICULT), m.removesuffix("_sliced"), args.difficult_weight)
               for m in MODES}
    mem = _bench.PeakMemory(device)
    rec = _bench.Record("bench_loss_modes: step time by loss mode", args, device)
    rec.value("settings", f"batch {args.batch_size}, {len(syms)} landmarks, masked/weighted on the workflow's "
                          f"{len(hard)} ({', '.join(WORKFLOW_DIFFICULT)}), weighted x{args.difficult_weight:g}; "
                          f"step = targets + forward + adaptive wing + backward + clip + AdamW")
    rows, ratios, skipped = [], [], []
    for name in args.models:
        model, opt = _bench.model_for_steps(name, len(syms), device)
        for size in sorted(args.sizes):
            x, kps = _bench.random_batch(args.batch_size, size, len(syms), device)
            steps = {m: _bench.make_step(model, x, kps, weights[m], opt, channels=hard if m.endswith("_sliced") else None)
                     for m in MODES}
            if _bench.probe_fails(steps["all"], device, f"{name} at {size}", args.max_seconds_per_step, skipped):
                break
            times = _bench.interleaved(steps, args.repeats, device)
            peaks = {}
            for m in MODES:
                mem.reset()
                steps[m]()
                peaks[m] = mem.read_mb()
            for m in MODES:
                rows.append([name, size, m, _bench.median(times[m]), peaks[m],
                             _bench.paired_ratio(times, m, "all")])
            ratios.append((name, size, times))
            print(f"{name} {size}px: " + ", ".join(f"{m} {_bench.median(times[m]):.3f}s" for m in MODES))
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.table(["model", "size", "mode", "s/step (median)", f"peak MB ({mem.kind})", "time / all (paired median)"],
              rows)
    for name, size, times in ratios:
        for m in ("masked", "weighted", "masked_sliced"):
            rec.ratio(f"{m}/all {name} {size}px", _bench.paired_ratio(times, m, "all"),
                      "step time, median of per-repeat ratios; < 1 means faster than all")
    if ratios:
        r = [_bench.paired_ratio(t, "masked", "all") for _, _, t in ratios]
        rec.note(f"the claim 'masked is ~40% faster' predicts masked/all ~0.6; measured {min(r):.3f}..{max(r):.3f}")
    for s in skipped:
        rec.note(f"skipped {s}")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
