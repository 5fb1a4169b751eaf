"""ASHA early stopping: the same small sweep with ASHA and without it (grace period = epochs, which leaves
ASHA a single rung at the last epoch: it stops nothing), comparing the epochs spent and the best val MRE
reached (goal: within 2% of the best with <= 40% of the epochs).

Why: ASHA is what makes a 50-trial sweep affordable; it is only worth it if what it stops would not
have become the best trial. Both sweeps use the same seeded sampler, one trial at a time, so up to
Optuna's startup count (10 trials, sampled independently of results) they run the same configurations;
the record says whether they did.

    python scripts/bench_early_stopping.py                  # record to BENCHMARKS.md
    python scripts/bench_early_stopping.py --smoke-test     # a minute or two; records nothing
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import _bench

from tune_landmarks.search import init_ray


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p, epochs=8)
    p.set_defaults(model="hrnet_w18_small_v2", image_size=128)
    p.add_argument("--space", default=str(_bench.ROOT / "search_spaces" / "demo.yaml"))
    p.add_argument("--samples", type=int, default=8, help="searched trials per sweep")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA's first rung (epochs)")
    p.add_argument("--reduction-factor", type=float, default=2.0)
    p.add_argument("--max-concurrent", type=int, default=1, help="1 keeps ASHA's decisions reproducible")
    args = _bench.parse(p, _bench.FINETUNE_SMOKE | {"samples": 1, "epochs": 2})
    if args.grace_period >= args.epochs:
        p.error("--grace-period must be < --epochs, or the ASHA arm stops nothing either")
    device = _bench.setup(args)
    with _bench.workdir(args) as work:
        dataset = _bench.synthetic_data(work, args)
        start = _bench.start_checkpoint(args, dataset, work)
        base = _bench.config(args, dataset.resolve(), work, epochs=args.epochs, lr=args.lr, mode="masked",
                             resume=str(start.resolve()))
        common: dict[str, Any] = {"storage": str(work / "sweeps"), "num_samples": args.samples,
                                  "max_concurrent": args.max_concurrent, "cpus_per_trial": args.threads,
                                  "gpus_per_trial": 1.0 if device.type == "cuda" else 0.0, "epochs": args.epochs,
                                  "seed": args.seed, "arms": ["masked"], "reduction_factor": args.reduction_factor}
        arms = {"asha": args.grace_period, "no asha": args.epochs}
        t = time.perf_counter()
        init_ray(None)  # once, before both arms, so neither pays for starting Ray
        ray_init = time.perf_counter() - t
        out = {arm: _bench.sweep(Path(args.space), base, name=f"es-{arm.replace(' ', '-')}",
                                 grace_period=g, **common) for arm, g in arms.items()}
    stats = {}
    for arm, (trials, wall, code) in out.items():
        bad = [t for t in trials if t.status != "TERMINATED"]
        if code != 0 or bad:
            raise SystemExit(f"sweep {arm} did not finish cleanly (exit {code}): "
                             + ", ".join(f"{t.trial_id} {t.status} {t.error}" for t in bad))
        best = min((t for t in trials if t.best), key=lambda t: t.best["val_mre"])
        stats[arm] = {"epochs": sum(len(t.epochs) for t in trials), "best": float(best.best["val_mre"]),
                      "best_trial": best.trial_id, "stopped": sum(len(t.epochs) < args.epochs for t in trials),
                      "wall": wall, "params": sorted(json.dumps(t.params, sort_keys=True) for t in trials)}
    same = stats["asha"]["params"] == stats["no asha"]["params"]
    a, n = stats["asha"], stats["no asha"]
    rec = _bench.Record("bench_early_stopping: ASHA vs no early stopping", args, device,
                        repeats="one sweep per arm (each trial's best is its best epoch)")
    rec.value("settings", f"space {_rel(args.space)}, {args.samples} trials x {args.epochs} epochs, ASHA grace "
                          f"{args.grace_period} rf {args.reduction_factor:g}, {args.max_concurrent} at a time; "
                          f"{args.model} at {args.image_size}px, batch {args.batch_size}; start model "
                          f"{args.start_epochs} epochs on a synthetic set of {args.num_images}; base mode masked, "
                          f"difficult set as the space picks it")
    rec.table(["arm", "epochs spent", "trials stopped early", "best val MRE mm", "best trial", "sweep wall s"],
              [[k, s["epochs"], s["stopped"], s["best"], s["best_trial"], s["wall"]] for k, s in stats.items()])
    r_ep, r_best = a["epochs"] / n["epochs"], a["best"] / n["best"]
    rec.ratio("epochs asha/no-asha", r_ep, "goal <= 0.40" + (" (met)" if r_ep <= 0.40 else " (NOT met)"))
    rec.ratio("best val MRE asha/no-asha", r_best, "goal <= 1.02" + (" (met)" if r_best <= 1.02 else " (NOT met)"))
    rec.ratio("sweep wall asha/no-asha", a["wall"] / n["wall"],
              f"whole run_search calls, each once, ASHA first; Ray was started before both ({ray_init:.1f} s)")
    rec.value("same configurations in both arms", "yes" if same else "no",
              "the sets of configurations the seeded sampler proposed" + ("" if same else
                                                                  ": the arms differ in more than early stopping"))
    _bench.emit(rec)


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(_bench.ROOT)) if p.is_relative_to(_bench.ROOT) else str(p)


if __name__ == "__main__":
    main()
