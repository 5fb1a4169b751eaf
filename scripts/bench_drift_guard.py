"""The drift guard: how far the landmarks left out of a masked loss drift, and how much the difficult ones
improve, with distillation off vs on (--distill-weight) and with frozen BatchNorm statistics (--bn-eval),
all from the same start checkpoint; and what each costs per training step.

Why: masking the loss to 12 landmarks lets the other 17 drift (nothing pulls them back; BatchNorm
statistics shift too). Distillation to the start model and bn_eval are the guards; this shows whether
they hold the drift down without giving back the difficult landmarks' gain, and at what step cost (the
teacher's forward pass). Step times come from each run's history (train_seconds / steps, epochs 2+).

    python scripts/bench_drift_guard.py                  # record to BENCHMARKS.md
    python scripts/bench_drift_guard.py --smoke-test     # seconds; records nothing
"""
from __future__ import annotations

from typing import Any

import _bench


def _at_best(res: Any) -> dict[str, Any]:
    """The history entry of the best epoch (lowest val MRE: what a sweep keeps)."""
    return res.history[res.best_epoch - 1]


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p)
    p.add_argument("--distill-weight", type=float, default=1.0, help="the guard's teacher weight")
    args = _bench.parse(p, _bench.FINETUNE_SMOKE)
    repeats = _bench.history_repeats(args, p)
    device = _bench.setup(args)
    variants = {"plain": {}, "distill": {"distill_weight": args.distill_weight}, "bn_eval": {"bn_eval": True},
                "distill+bn_eval": {"distill_weight": args.distill_weight, "bn_eval": True}}
    with _bench.finetune_setup(args) as (work, dataset, start, data, n_steps):
        runs, failed = {}, {}
        for k, kw in variants.items():
            try:
                runs[k] = _bench.masked_finetune(args, dataset, work, start, k.replace("+", "_"), data=data, **kw)
            except FloatingPointError as exc:  # a finding to record, not a reason to lose the other arms
                failed[k] = str(exc)
                print(f"{k}: FAILED: {exc}")
    if "plain" not in runs:
        raise SystemExit(f"the reference fine-tune failed: {failed['plain']}")
    plain = runs["plain"]
    start_pl = plain.start_per_landmark or {}
    start_diff = sum(start_pl[s] for s in plain.difficult) / len(plain.difficult) if start_pl else float("nan")
    step = {k: _bench.loop_step_seconds(r.history, n_steps)
            for k, r in runs.items()}
    rec = _bench.Record("bench_drift_guard: distillation and bn_eval vs drift", args, device, repeats=repeats)
    rec.value("settings", f"{args.model} at {args.image_size}px, batch {args.batch_size}; masked on the workflow's "
                          f"{len(plain.difficult)} from one start model ({args.start_epochs} epochs), {args.epochs} "
                          f"epochs, lr {args.lr:g}, {n_steps} steps/epoch, {len(data.train)} train / {len(data.val)} "
                          f"val synthetic images; start difficult MRE {_bench.fmt(start_diff)} mm, start MRE "
                          f"{_bench.fmt(sum(start_pl.values()) / max(1, len(start_pl)))} mm")
    rows = []
    for k, r in runs.items():
        b, last = _at_best(r), r.history[-1]
        rows.append([k, r.best_epoch, b["val_mre"], b["val_mre_difficult"] - start_diff, b["max_drift"],
                     b["mean_drift"], last["max_drift"], last["mean_drift"], step[k], step[k] / step["plain"]])
    rec.table(["variant", "best epoch", "val MRE mm", "difficult change mm", "max drift mm", "mean drift mm",
               "max drift, last epoch", "mean drift, last epoch", "s/step (median, epochs 2+)", "step / plain"], rows)
    for k in ("distill", "bn_eval", "distill+bn_eval"):
        if k in failed:
            rec.value(f"ratio step {k}/plain", "n/a", f"the run failed: {failed[k]}")
            continue
        rec.ratio(f"step {k}/plain", step[k] / step["plain"],
                  "median s/step of each run's epochs 2+ (runs in sequence, not interleaved)")
        rec.value(f"delta max drift {k}-plain", _at_best(runs[k])["max_drift"] - _at_best(plain)["max_drift"],
                  "mm at the best epoch; < 0: the guard holds the untrained landmarks closer to the start")
    if failed:
        rec.note("a failed run is a package finding: adaptive wing is used for the distillation term with the "
                 "teacher's raw heatmaps as targets; where a teacher value exceeds awing_alpha the exponent "
                 "alpha - target is negative and the loss is inf at zero difference (student == teacher, e.g. "
                 "at the first step with --bn-eval)")
    rec.note("drift = untrained landmark's val MRE minus its start MRE (> 0 got worse); difficult change < 0 is "
             "the gain the fine-tune is for")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
