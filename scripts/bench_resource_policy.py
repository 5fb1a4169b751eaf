"""bench_resource_policy: one sweep under `--resource-policy fixed` and again under `distribute` (issue 23).

Each sweep is the real command (`tune-landmarks search`, a new process with its own local Ray) with the same seed,
space, arms and budget; by default docs/isbi2015.md section 5 (`--arms masked,all,refine --arm-epochs refine=30`,
5 trials per arm, 2 at a time, 1 CPU each) from a start checkpoint you give. Reported from the sweeps' own records:
- wall time of the whole command (reading and caching the images, each sweep into its own empty cache, scoring
  the start model, the trials, the tables and the verdict on test1);
- the cores-busy share: the CPU seconds the trial processes spent (each epoch's `cpu_seconds`, from the trial's
  process clock) over cores x the command's wall time (the driver's own CPU and a trial's start before its first
  epoch are not counted, so the share is a lower bound);
- the trials' resizes (driver.log) and each policy's winners on the verdict split, with their intervals;
- the refine arm's per-epoch cost, split into training, validation (the cascade on the selection split),
  checkpoint (last.pt and metrics.parquet) and the rest of Ray's result-to-result time (the report: the checkpoint
  handed to Ray's storage, the result's way to the driver), epochs 2+ (the first carries the trial's start).
`--smoke-test` runs two tiny sweeps on a synthetic set (a start model trained here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _bench

ROOT = _bench.ROOT
SMOKE_SPACE = """\
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.1, high: 5.0}
arms:
  refine:
    lr: {type: loguniform, low: 1.0e-3, high: 3.0e-3}
    refine_crop_mm: {type: fixed, value: 4.8}
    refine_mm_per_px: {type: fixed, value: 0.15}
"""


def run_sweep(args, space: Path, dataset: Path, start: Path, storage: Path, policy: str) -> tuple[Path, float, int]:
    """`tune-landmarks search` as a user runs it; returns the experiment, the command's wall seconds, its exit code."""
    name = f"{args.name}-{policy}"
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(space), "--dataset_path", str(dataset),
           "--resume", str(start), "--name", name, "--storage", str(storage), "--num-samples", str(args.num_samples),
           "--max-concurrent", str(args.max_concurrent), "--cpus-per-trial", "1", "--epochs", str(args.epochs),
           "--arms", args.arms, "--batch_size", str(args.batch_size), "--seed", str(args.seed),
           "--resource-policy", policy, "--gpus-per-trial", "0",
           "--allow-duplicates"]  # as recorded: both policies on the same images, ISBI's copies included (docs/duplicates.md)
    if args.arm_epochs:
        cmd += ["--arm-epochs", args.arm_epochs]
    if args.max_steps:
        cmd += ["--max_steps_per_epoch", str(args.max_steps)]
    env = {**os.environ, "TUNE_LANDMARKS_CACHE": str(storage.parent / f"cache-{policy}")}  # cold for each: alike
    print(f"[{policy}] {' '.join(cmd[2:])}", flush=True)
    t = time.perf_counter()
    with open(storage / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return storage / name, time.perf_counter() - t, code


def winners(exp: Path) -> list[list]:
    """Each arm's winner against the start model on the verdict split: all landmarks and the difficult set."""
    v = json.loads((exp / "verdict.json").read_text())
    rows = []
    for c in v["comparisons"]:
        if c["is_group"] and c["b"] == "start" and c["group"] in ("difficult", "all"):
            rows.append([c["a"], c["group"], c["b_mre_mm"], c["a_mre_mm"],
                         f"{c['mean_difference_mm']:+.3f} [{c['ci_low_mm']:+.3f}, {c['ci_high_mm']:+.3f}]"])
    return rows


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(_bench.SHARED_DATA / "isbi2015"))
    p.add_argument("--start", help="start checkpoint (docs/isbi2015.md section 1); trained here under --smoke-test")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "isbi_cpu.yaml"))
    p.add_argument("--arms", default="masked,all,refine")
    p.add_argument("--arm-epochs", default="refine=30")
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="fixed,distribute")
    p.add_argument("--name", default="policy")
    smoke = {"arms": "refine", "arm_epochs": "refine=2", "num_samples": 1, "epochs": 2, "batch_size": 2, "max_steps": 1}
    p.add_argument("--model", default="hrnet_w18_small_v2", help="(--smoke-test) the start model's architecture")
    p.add_argument("--image-size", type=int, default=64, help="(--smoke-test)")
    p.add_argument("--num-images", type=int, default=12, help="(--smoke-test)")
    p.add_argument("--synth-size", type=int, default=96, help="(--smoke-test)")
    p.add_argument("--start-epochs", type=int, default=1, help="(--smoke-test)")
    p.add_argument("--start-lr", type=float, default=3e-3, help="(--smoke-test)")
    args = _bench.parse(p, smoke)
    if not args.smoke_test and not args.start:
        p.error("--start START_CHECKPOINT is needed (docs/isbi2015.md section 1 trains it)")
    device = _bench.setup(args)
    with _bench.workdir(args) as work:
        dataset, space, start = Path(args.dataset).resolve(), Path(args.space).resolve(), args.start
        if args.smoke_test:
            dataset = _bench.synthetic_data(work, args).resolve()
            start = _bench.start_checkpoint(args, dataset, work)
            space = work / "space.yaml"
            space.write_text(SMOKE_SPACE)
        storage = work / "sweeps"
        storage.mkdir(exist_ok=True)
        runs = {pol: run_sweep(args, space, dataset, Path(start).resolve(), storage, pol)
                for pol in args.policies.split(",")}
        import pyarrow.parquet as pq

        cores = os.cpu_count() or 1
        rec = _bench.Record("bench_resource_policy: --resource-policy fixed vs distribute", args, device,
                            repeats="one sweep per policy, the same seed, fixed first")
        rec.value("settings", f"{dataset.name}: arms {args.arms}, {args.num_samples} trials each, "
                              f"{args.epochs} epochs ({args.arm_epochs or 'all arms alike'}), {args.max_concurrent} at "
                              f"a time, 1 CPU each to start, batch {args.batch_size}, seed {args.seed}; {cores} cores")
        rows, walls, overhead = [], {}, {}
        for pol, (exp, wall, code) in runs.items():
            if code != 0:
                raise SystemExit(f"the {pol} sweep failed (exit {code}): see {storage / (exp.name + '.log')}")
            ep = pq.read_table(exp / "epochs.parquet").to_pandas()
            busy = float(ep.cpu_seconds.sum())
            resized = (exp / "driver.log").read_text().count(" CPUs for its last ")
            walls[pol] = wall
            rows.append([pol, wall / 60, len(ep), busy / 60, busy / (cores * wall), resized,
                         int((ep.threads > 1).sum())])
            refine = ep[(ep.arm == "refine") & (ep.epoch >= 2)]
            if len(refine):
                rest = refine.time_this_iter_s - refine.epoch_seconds - refine.checkpoint_seconds
                parts = {"train": refine.train_seconds, "validate": refine.validate_seconds,
                         "checkpoint": refine.checkpoint_seconds, "report and the rest": rest}
                whole = float(refine.time_this_iter_s.median())
                overhead[pol] = [[pol, k, float(v.median()), float(v.median()) / whole] for k, v in parts.items()]
                overhead[pol].append([pol, "result to result (Ray's time_this_iter_s)", whole, 1.0])
        rec.table(["policy", "wall min", "epochs run", "busy core-min", "cores-busy share", "resizes",
                   "epochs on > 1 thread"], rows)
        if "fixed" in walls and "distribute" in walls:
            rec.ratio("wall distribute/fixed", walls["distribute"] / walls["fixed"], "the whole search command")
        if overhead:
            rec.table(["policy", "refine epoch, epochs 2+", "median s", "share of the epoch"],
                      [r for rs in overhead.values() for r in rs])
        rec.table(["policy", "winner", "landmarks", "start mm", "winner mm", "winner - start [95 % CI]"],
                  [[pol, *r] for pol, (exp, _, _) in runs.items() for r in winners(exp)])
    _bench.emit(rec)


if __name__ == "__main__":
    main()
