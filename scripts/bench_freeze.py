"""Freezing the stem and the first N HRNet stages: step-time ratio vs no freezing, and the accuracy each
level reaches on the same short masked fine-tune from the same start checkpoint.

Why: `--freeze-stages` is offered as a speed knob; it is only worth it if the step gets clearly faster
while the difficult landmarks still improve. Step times are timed directly (levels interleaved within
each repeat); the fine-tunes are real `run.train` runs on a synthetic set, from a start model trained
first inside this script.

    python scripts/bench_freeze.py                  # record to BENCHMARKS.md
    python scripts/bench_freeze.py --smoke-test     # seconds; records nothing
"""
from __future__ import annotations

import _bench
import torch

from tune_landmarks.landmarks import AARIZ, WORKFLOW_DIFFICULT, symbols
from tune_landmarks.loss import landmark_weights
from tune_landmarks.model import create_model


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p)
    p.add_argument("--levels", nargs="+", type=int, default=[0, 1, 2, 3], help="freeze_stages values (0 first)")
    args = _bench.parse(p, _bench.FINETUNE_SMOKE | {"levels": [0, 3]})
    if args.levels[0] != 0:
        p.error("--levels must start with 0 (the reference)")
    device = _bench.setup(args)
    rec = _bench.Record("bench_freeze: freeze_stages speed and accuracy", args, device)

    # step time, directly: one model per level, same initial weights and batch, masked loss as fine-tuning uses
    syms = symbols(AARIZ)
    w = landmark_weights(syms, list(WORKFLOW_DIFFICULT), "masked", 2.5)
    x, kps = _bench.random_batch(args.batch_size, args.image_size, len(syms), device)
    torch.manual_seed(args.seed)
    ref = create_model(args.model, len(syms)).state_dict()
    steps = {}
    for n in args.levels:
        m = create_model(args.model, len(syms))
        m.load_state_dict(ref)
        m.to(device)
        if device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        frozen = m.freeze(n)
        steps[f"freeze {n}"] = _bench.make_step(m, x, kps, w, frozen=frozen)
    times = _bench.interleaved(steps, args.repeats, device)

    # accuracy: the same fine-tune at every level
    with _bench.finetune_setup(args) as (work, dataset, start, data, n_steps):
        runs = {n: _bench.masked_finetune(args, dataset, work, start, f"freeze{n}", data=data, freeze_stages=n)
                for n in args.levels}
    start_diff = float("nan")
    first = runs[args.levels[0]]
    if first.start_per_landmark:
        start_diff = sum(first.start_per_landmark[s] for s in first.difficult) / len(first.difficult)
    rows = []
    for n in args.levels:
        r, key = runs[n], f"freeze {n}"
        loop = _bench.loop_step_seconds(r.history, n_steps)
        rows.append([n, _bench.median(times[key]), _bench.paired_ratio(times, key, "freeze 0"), loop,
                     r.best.mre, r.best.mre_difficult, r.best.mre_difficult - start_diff, r.best_epoch])
    rec.value("settings", f"{args.model} at {args.image_size}px, batch {args.batch_size}; fine-tune: masked on the "
                          f"workflow's 12, {args.epochs} epochs, lr {args.lr:g}, {n_steps} steps/epoch, "
                          f"{len(data.train)} train / {len(data.val)} val synthetic images; start model "
                          f"{args.start_epochs} epochs; start difficult MRE {_bench.fmt(start_diff)} mm")
    rec.table(["freeze_stages", "s/step (direct)", "step / freeze 0 (paired)", "s/step in run.train (epochs 2+)",
               "best val MRE mm", "difficult MRE mm", "difficult change mm", "best epoch"], rows)
    for n in args.levels[1:]:
        rec.ratio(f"step freeze{n}/freeze0", _bench.paired_ratio(times, f"freeze {n}", "freeze 0"),
                  "direct step time, median of per-repeat ratios")
        rec.value(f"delta best val MRE freeze{n}-freeze0", runs[n].best.mre - runs[0].best.mre, "mm; > 0 is worse")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
