"""Mixed precision: step time of bf16 autocast vs fp32 on CPU (fp16 and bf16 vs fp32 on CUDA), and the
accuracy difference after the same short fine-tune (same start checkpoint, same seed) with and without
`--mixed-precision`.

Why: `--mixed-precision` is offered for speed; on a CPU without native bf16 matrix units autocast can
be slower than fp32, and heatmap regression may lose sub-pixel accuracy in low precision. Both are
measured here in one run (precisions interleaved within each repeat).

    python scripts/bench_amp.py                  # record to BENCHMARKS.md
    python scripts/bench_amp.py --smoke-test     # seconds; records nothing
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
    args = _bench.parse(p, _bench.FINETUNE_SMOKE)
    device = _bench.setup(args)
    rec = _bench.Record("bench_amp: autocast vs fp32", args, device)

    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
        if not torch.cuda.is_bf16_supported():
            del dtypes["bf16"]
    syms = symbols(AARIZ)
    torch.manual_seed(args.seed)
    model = create_model(args.model, len(syms)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = _bench.shared_optimiser(model)
    x, kps = _bench.random_batch(args.batch_size, args.image_size, len(syms), device)
    w = landmark_weights(syms, list(WORKFLOW_DIFFICULT), "masked", 2.5)
    steps = {k: _bench.make_step(model, x, kps, w, opt, amp_dtype=d) for k, d in dtypes.items()}
    times = _bench.interleaved(steps, args.repeats, device)
    del model, opt, steps

    with _bench.finetune_setup(args) as (work, dataset, start, data, n_steps):
        runs = {amp: _bench.masked_finetune(args, dataset, work, start, f"amp{int(amp)}", data=data, mixed_precision=amp)
                for amp in (False, True)}
    amp_name = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    rec.value("settings", f"{args.model} at {args.image_size}px, batch {args.batch_size}; fine-tune: masked on the "
                          f"workflow's 12, {args.epochs} epochs, lr {args.lr:g}, seed {args.seed}, {n_steps} "
                          f"steps/epoch, {len(data.train)} train / {len(data.val)} val synthetic images; run.train's "
                          f"--mixed-precision on this device is {amp_name}")
    rec.table(["precision", "s/step (median)", "step / fp32 (paired)"],
              [[k, _bench.median(times[k]), _bench.paired_ratio(times, k, "fp32")] for k in dtypes])
    rows = []
    for amp, r in runs.items():
        loop = _bench.loop_step_seconds(r.history, n_steps)
        rows.append(["--mixed-precision" if amp else "fp32", r.best.mre, r.best.mre_difficult, r.last.mre,
                     r.best_epoch, loop])
    rec.table(["fine-tune", "best val MRE mm", "difficult MRE mm", "last val MRE mm", "best epoch",
               "s/step in run.train (epochs 2+)"], rows)
    for k in dtypes:
        if k != "fp32":
            rec.ratio(f"step {k}/fp32", _bench.paired_ratio(times, k, "fp32"),
                      "direct step time, median of per-repeat ratios; < 1 is faster")
    rec.value(f"delta best val MRE {amp_name}-fp32", runs[True].best.mre - runs[False].best.mre, "mm; > 0 is worse")
    rec.value(f"delta difficult MRE {amp_name}-fp32", runs[True].best.mre_difficult - runs[False].best.mre_difficult,
              "mm")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
