"""What running a fine-tune as a Ray Tune trial costs: the epoch time inside a trial vs the same epoch in
`run.train` called directly (goal ratio <= 1.03, epochs 2+), the time from the command's start to the
first trial's first result, and the wall time of the same sweep with and without actor reuse.

Why: every sweep trial is `run.train` plus Ray's reporting and checkpoint handling, inside a worker
process beside Ray's own processes; on a small machine that could eat into every epoch. Actor reuse
(TuneConfig reuse_actors, SweepSettings.reuse_actors) should save a process start and the imports of
torch/timm per trial after the first.

    python scripts/bench_ray_overhead.py                  # record to BENCHMARKS.md
    python scripts/bench_ray_overhead.py --smoke-test     # about a minute; records nothing
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _bench

from tune_landmarks.config import TrainConfig
from tune_landmarks.experiment import SweepSettings, trial_config
from tune_landmarks.landmarks import WORKFLOW_DIFFICULT
from tune_landmarks.run import train
from tune_landmarks.search import init_ray


def cli_flags(cfg: TrainConfig) -> list[str]:
    """The `tune-landmarks` run flags that reproduce `cfg` (every field that differs from the default)."""
    out: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        v, default = getattr(cfg, f.name), TrainConfig().__getattribute__(f.name)
        if v == default or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(v, tuple):
            out += [flag, *map(str, v)]
        elif isinstance(v, list):
            out += [flag, ",".join(map(str, v))]
        else:
            out += [flag, str(v)]
    return out


def first_result_via_cli(space: Path, base: TrainConfig, storage: Path, threads: int, gpus: float) -> tuple[float, float]:
    """Launch the real `tune-landmarks search` (one trial, one epoch) and watch its experiment folder:
    seconds from the launch to the first trial's first result.json line, and to the command's exit."""
    name = "first-result"
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(space), "--name", name,
           "--storage", str(storage), "--num-samples", "1", "--max-concurrent", "1", "--cpus-per-trial", str(threads),
           "--gpus-per-trial", str(gpus), "--arms", "masked", "--grace-period", "1",
           *cli_flags(dataclasses.replace(base, epochs=1))]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = float("nan")
    while proc.poll() is None:
        if math.isnan(first) and any(f.stat().st_size > 0 for f in (storage / name).glob("*/result.json")):
            first = time.perf_counter() - t0
        time.sleep(0.1)
    total = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"tune-landmarks search failed (exit {proc.returncode}):\n{out[-4000:]}")
    return first, total


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p)
    p.add_argument("--trials", type=int, default=3, help="identical trials per sweep (sequential)")
    args = _bench.parse(p, _bench.FINETUNE_SMOKE | {"trials": 2})
    repeats = _bench.history_repeats(args, p)
    if args.trials < 2:
        p.error("--trials must be >= 2 (actor reuse starts with the second trial)")
    can_choose = "reuse_actors" in SweepSettings.__dataclass_fields__
    device = _bench.setup(args)
    with _bench.workdir(args) as work:
        dataset = _bench.synthetic_data(work, args)
        start = _bench.start_checkpoint(args, dataset, work)
        space = work / "one_point.yaml"  # every trial the same configuration: a sampled lr with one choice
        space.write_text(f"lr: {{type: categorical, choices: [{args.lr!r}]}}\nmode: {{type: fixed, value: masked}}\n")
        base = _bench.config(args, dataset.resolve(), work, epochs=args.epochs, lr=args.lr, mode="masked",
                             difficult=list(WORKFLOW_DIFFICULT), resume=str(start.resolve()))

        # direct: the trial's own config, run in this process with the same per-epoch callback shape
        marks: list[float] = []
        direct_cfg = trial_config(base, {"lr": args.lr}, str(work / "direct"))
        direct = train(direct_cfg, callback=lambda m, c: marks.append(time.perf_counter()),
                       scratch=work / "direct" / "scratch")
        intervals = [b - a for a, b in itertools.pairwise(marks)]

        gpus = 1.0 if device.type == "cuda" else 0.0
        first, cli_total = first_result_via_cli(space, base, work / "sweeps", args.threads, gpus)
        t = time.perf_counter()
        init_ray(None)
        ray_init = time.perf_counter() - t
        common: dict[str, Any] = {"storage": str(work / "sweeps"), "num_samples": args.trials, "max_concurrent": 1,
                                  "cpus_per_trial": args.threads, "gpus_per_trial": gpus, "epochs": args.epochs,
                                  "seed": args.seed, "arms": ["masked"], "grace_period": args.epochs,
                                  "resource_policy": "fixed"}  # `distribute` never reuses actors (resources.py)
        arms = {"reuse": True, "no reuse": False} if can_choose else {"reuse": True}
        results = {}
        for arm, reuse in arms.items():
            extra = {"reuse_actors": reuse} if can_choose else {}
            results[arm] = _bench.sweep(space, base, name=f"overhead-{arm.replace(' ', '-')}", **common, **extra)
    for arm, (trials, _, code) in results.items():
        if code != 0 or any(t_.status != "TERMINATED" for t_ in trials):
            raise SystemExit(f"the {arm} sweep did not finish cleanly (exit {code}): "
                             + ", ".join(f"{t_.trial_id} {t_.status} {t_.error}" for t_ in trials))
    trials, wall, _ = results["reuse"]
    in_trial = [float(e["epoch_seconds"]) for t_ in trials for e in t_.epochs[1:]]
    iter_s = [float(e["time_this_iter_s"]) for t_ in trials for e in t_.epochs[1:]]
    d_epoch = _bench.median(_bench.after_first(direct.history, "epoch_seconds"))
    d_interval = _bench.median(intervals)

    rec = _bench.Record("bench_ray_overhead: a Ray trial vs run.train", args, device, repeats=repeats)
    rec.value("settings", f"{args.model} at {args.image_size}px, batch {args.batch_size}; masked fine-tune, "
                          f"{args.epochs} epochs, {args.trials} identical trials per sweep, 1 at a time, "
                          f"{args.threads} CPUs per trial; direct run first, with the trial's own config and a scratch folder")
    rec.table(["where", "epoch_seconds (median, epochs 2+)", "result-to-result s (median, epochs 2+)"],
              [["run.train directly", d_epoch, d_interval],
               ["Ray trial (reuse arm, all trials)", _bench.median(in_trial), _bench.median(iter_s)]])
    rec.ratio("trial/direct epoch_seconds", _bench.median(in_trial) / d_epoch,
              "run.train's own epoch timer inside a trial vs directly; goal <= 1.03"
              + (" (met)" if _bench.median(in_trial) / d_epoch <= 1.03 else " (NOT met)"))
    rec.ratio("trial/direct per-epoch wall", _bench.median(iter_s) / d_interval,
              "Ray's time_this_iter_s vs the interval between run.train callbacks: adds reporting and "
              "checkpoint handling")
    rec.value("command start to first result", first,
              f"s: `tune-landmarks search` (1 trial, 1 epoch) launched as a new process until its trial's first "
              f"result.json line (polled every 0.1 s); the command took {cli_total:.1f} s in all; for scale, one "
              f"epoch in run.train takes {d_epoch:.1f} s and ray.init in this process took {ray_init:.1f} s")
    if can_choose:
        wall2 = results["no reuse"][1]
        rows = [[arm, w, (w - results["reuse"][1]) / (args.trials - 1)] for arm, (_, w, _) in results.items()]
        rec.table(["actors", "sweep wall s", "extra s per trial after the first"], rows)
        rec.ratio("sweep wall no-reuse/reuse", wall2 / wall,
                  f"the same {args.trials}-trial sweep; each arm once, reuse first")
    else:
        rec.value("ratio sweep wall no-reuse/reuse", "n/a",
                  "SweepSettings has no reuse_actors field: add it (see scripts/bench_ray_overhead.py)")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
