"""bench_sweep_scale: what the sweep driver costs per result at 20, 100 and 300 trials (issue 20 section 5).

Real sweeps (`tune-landmarks search`, each a new process with its own local Ray) of the smallest model the suite
trains (tests/conftest.py's TINY: hrnet_w18_small_v2 at 64 px, batch 4) on a synthetic set, one training step per
epoch (`--max_steps_per_epoch 1`): the trials cost next to nothing, so what grows with the sweep is the DRIVER (Ray
Tune's controller, the searcher and Optuna's journal, the callbacks, the tables). For each size, measured on the
driver process alone (the `search` process itself; Ray's GCS, raylet and trial workers are other processes):

- its CPU seconds (utime + stime of the process's own threads, /proc/PID/stat fields 14-15, which leave out its
  children), read every 0.5 s while it runs and once more when it has exited but is not yet reaped (a zombie still
  shows its final times), per reported result: over the whole command, and over the middle of the sweep (between the
  samples at which 10 % and 90 % of the final results were in, counted as lines of the trials' result.json, which the
  driver writes as each result arrives), which leaves out the fixed costs of start-up
  (reading the data, scoring the start model, starting Ray) and of the end (tables, the verdict) that a larger sweep
  spreads over more results and so would hide a per-result cost that grows;
- its peak RSS (VmHWM of /proc/PID/status, sampled every 0.5 s: the high-water mark, so a sample misses nothing
  before it);
- the Optuna journal's size in bytes, the number of results (lines of the trials' result.json, which the driver
  writes) and of (trial, epoch) rows in epochs.parquet;
- the wall seconds of `tune-landmarks resume` of the finished sweep (a no-op), `verdict` and `report`, each a new
  process as a user runs it.

Why /proc and not the child's rusage: os.wait4's rusage adds the descendants the driver reaped (Ray's GCS and raylet,
which `ray.shutdown` stops and waits for), so it would charge Ray's own processes to the driver; psutil is not a
dependency of the project and reads the same /proc files.

Every sweep is then checked as tests/test_resume.py checks a resumed one: every Ray trial appears once in its arm's
Optuna study (orphans of a hard kill aside), no study trial is left RUNNING, every (trial, epoch) once in
epochs.parquet and each trial's rows are its epochs 1..n. One more sweep of `--interrupt` trials (default: the
largest size) is interrupted twice: SIGINT to the driver once a third of its expected results are in, `resume`,
then SIGKILL of the driver and its whole process group (its Ray: a crashed machine, as the suite does) at two
thirds, and `resume` again to the end; the same checks must hold.

What grows (measured with this script, py-spy and cProfile; BENCHMARKS.md "At a glance"): Ray 2.60's experiment-state
snapshot. Each one writes every trial's state (JSON holding, among the rest, Ray's running statistics of each of the
~60 numbers a result reports) and copies the whole driver staging folder, five logger files a trial (result.json,
progress.csv, params.json, params.pkl, TensorBoard events), to the experiment, so it costs in proportion to the trials
so far. Ray forces one whenever a trial has reported `CheckpointConfig(num_to_keep)` (--keep-checkpoints, 2)
checkpoints since the last, i.e. every few results whatever TUNE_GLOBAL_CHECKPOINT_S says, so the cost per result
grows with the sweep. `--keep-checkpoints 4` (more than the 3 epochs: no forced snapshot) shows the sweep without them.

`--repeats` (5) runs the smallest size that many times (its middle is a few CPU seconds, so one run is noisy); the
larger sizes run once. Each measured sweep's kept checkpoints (about 50 MB each, 25 GB at 300 trials) are deleted
once its resume, verdict, report and checks are done.

    python scripts/bench_sweep_scale.py                   # --trials 20 100 300 --epochs 3; record to BENCHMARKS.md
    python scripts/bench_sweep_scale.py --smoke-test      # one 2-trial sweep, no interrupts; records nothing
    python scripts/bench_sweep_scale.py --trials 20 100 --profile   # drivers under cProfile (slower; no record)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _bench

ROOT = _bench.ROOT
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPACE = """\
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.1, high: 5.0}
"""


# ---------------------------------------------------------------- the driver process, read from /proc

def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of the process's own threads, not its children's; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of proc(5))


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) of the process's live threads (a thread that has ended is no longer listed;
    its time stays in the process's own total)."""
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(stat.parent.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def proc_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) in MB; None for a zombie or a process that is gone."""
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Driver:
    """One `search` or `resume` process as measured: exit code, wall seconds, CPU samples (wall clock, CPU s)."""

    what: str
    code: int
    wall: float
    cpu: float
    peak_mb: float
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (seconds since start, CPU s, results)
    signalled: str = ""
    wait4_cpu: float = float("nan")  # os.wait4's rusage: the driver plus the descendants it reaped
    threads: dict[str, float] = field(default_factory=dict)  # CPU s by thread: "main", live threads by name, "ended"

    def thread_text(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.threads.items(), key=lambda kv: -kv[1]) if v >= 0.05)

    def per_result_between(self, lo: float, hi: float) -> tuple[float, int]:
        """Driver CPU seconds per result from the first sample with a `lo` share of the final results to the first
        with a `hi` share (the middle of the sweep), and the results in between."""
        final = self.samples[-1][2] if self.samples else 0
        a = next((s for s in self.samples if s[2] >= lo * final), None)
        b = next((s for s in self.samples if s[2] >= hi * final), None)
        if a is None or b is None or b[2] <= a[2]:
            return float("nan"), 0
        return (b[1] - a[1]) / (b[2] - a[2]), b[2] - a[2]

    def first_result_s(self) -> float:
        return next((t for t, _, n in self.samples if n > 0), float("nan"))


def run_driver(cmd: list[str], env: dict[str, str], log: Path, what: str, exp: Path | None = None,
               stop_at: int | None = None, how: str = "") -> Driver:
    """Run the command in its own session, sampling its CPU and peak RSS every 0.5 s; with `stop_at`, send it
    SIGINT (how="int") or SIGKILL its process group (how="kill") once the experiment holds that many results."""
    print(f"[{what}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    samples: list[tuple[float, float, int]] = []
    peak, cpu, signalled = 0.0, 0.0, ""
    counter = ResultCounter(exp)
    tids: dict[int, tuple[str, float]] = {}
    try:
        while True:
            done = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # exited, not yet reaped
            tids |= thread_cpu(proc.pid)
            c, m = proc_cpu(proc.pid), proc_hwm_mb(proc.pid)
            n = counter.count()
            if c is not None:
                cpu = c
                samples.append((time.perf_counter() - t0, c, n))
            peak = max(peak, m or 0.0)
            if done is not None:
                break
            if stop_at is not None and not signalled and n >= stop_at:
                if how == "int":
                    os.kill(proc.pid, signal.SIGINT)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and all of its Ray, as a crash would
                signalled = f"{'SIGINT' if how == 'int' else 'SIGKILL'} at {n} results"
                print(f"[{what}] {signalled}", flush=True)
            time.sleep(0.5)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    _, status, usage = os.wait4(proc.pid, 0)  # reaps it; its rusage adds the descendants it reaped
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if how == "kill" and signalled:
        time.sleep(2)  # Ray's processes of the killed group are gone before the resume starts its own
    with open(log.with_suffix(".samples.jsonl"), "a") as f:  # (seconds, driver CPU s, results) of each sample
        f.write(json.dumps({"what": what, "samples": samples}) + "\n")
    threads = {"main": tids.pop(proc.pid, ("", 0.0))[1]}
    for name, t in tids.values():
        threads[name] = threads.get(name, 0.0) + t
    threads["ended threads (and the last 0.5 s)"] = cpu - sum(threads.values())
    return Driver(what, code, time.perf_counter() - t0, cpu, peak, samples, signalled,
                  usage.ru_utime + usage.ru_stime, threads)


def timed_cli(args: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Wall seconds and exit code of one `tune-landmarks` command as a new process."""
    cmd = [sys.executable, "-m", "tune_landmarks", *args]
    t = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    return time.perf_counter() - t, code


# ---------------------------------------------------------------- what the experiment holds

class ResultCounter:
    """Results the driver has received so far: the lines of the trials' result.json files, which the driver writes
    (Ray's JSON logger callback) as each result comes in; a file is read again only when its size changed."""

    def __init__(self, exp: Path | None):
        self.exp, self.seen = exp, {}

    def count(self) -> int:
        if self.exp is None:
            return 0
        for f in self.exp.glob("trial_*/result.json"):
            try:
                size = f.stat().st_size
                if self.seen.get(f, (-1, 0))[0] != size:
                    self.seen[f] = (size, f.read_bytes().count(b"\n"))
            except OSError:
                continue
        return sum(n for _, n in self.seen.values())


def check_once(exp: Path, name: str, arms: list[str], total: int) -> dict[str, Any]:
    """The suite's resume checks (tests/test_resume.py): each Ray trial once in its arm's Optuna study, no study trial
    left RUNNING, each (trial, epoch) once in epochs.parquet and a trial's rows its epochs 1..n. Raises when one fails;
    returns what it counted."""
    import optuna
    import pyarrow.parquet as pq
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
    storage = JournalStorage(JournalFileBackend(str(exp / "optuna_journal.log")))
    ids, orphans, running = [], 0, 0
    for arm in arms:
        for t in optuna.load_study(study_name=f"{name}.{arm}", storage=storage).trials:
            running += t.state == optuna.trial.TrialState.RUNNING
            if t.user_attrs.get("orphan"):
                orphans += 1
            else:
                ids.append(t.user_attrs.get("ray_trial_id"))
    problems = []
    if len(trials) != total or not set(trials.status) <= {"TERMINATED", "ERROR"}:
        problems.append(f"{len(trials)} trials of {total}, statuses {sorted(set(trials.status))}")
    if sorted(ids) != sorted(trials.trial_id):
        problems.append(f"the studies hold {len(ids)} trials ({len(set(ids))} distinct), Ray {len(trials)}")
    if running:
        problems.append(f"{running} study trials left RUNNING")
    pairs = list(zip(epochs.trial_id, epochs.epoch))
    if len(pairs) != len(set(pairs)):
        problems.append(f"{len(pairs) - len(set(pairs))} (trial, epoch) rows twice in epochs.parquet")
    done = dict(zip(trials.trial_id, trials.epochs_done))
    for tid, group in epochs.groupby("trial_id"):
        if sorted(int(e) for e in group.epoch) != list(range(1, done.get(tid, -1) + 1)):
            problems.append(f"trial {tid}: epochs {sorted(group.epoch)} vs epochs_done {done.get(tid)}")
    if problems:
        raise SystemExit(f"{exp}: " + "; ".join(problems[:5]))
    reported = {}
    for f in exp.glob("trial_*/result.json"):
        for ln in f.read_text().splitlines():
            key = (f.parent.name, json.loads(ln)["epoch"])
            reported[key] = reported.get(key, 0) + 1
    return {"trials": len(trials), "study_trials": len(ids), "orphans": orphans, "epoch_rows": len(epochs),
            "errored": int((trials.status == "ERROR").sum()),
            "result_lines_again": sum(n - 1 for n in reported.values())}


# ---------------------------------------------------------------- one size

@dataclass
class Size:
    n: int
    search: Driver
    results: int
    journal_bytes: int
    fit_cpu_per_result: float
    fit_results: int
    first_result_s: float
    resume_s: float
    verdict_s: float
    report_s: float
    checked: dict[str, Any]
    stretches: list[float]  # CPU s/result in the stretches 10-30, 30-50, 50-70 and 70-90 % of the results
    run: int = 0


def search_cmd(args: Any, space: Path, dataset: Path, start: Path, storage: Path, name: str, n: int) -> list[str]:
    arms = args.arms.split(",")
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(space), "--dataset_path", str(dataset),
           "--resume", str(start), "--name", name, "--storage", str(storage),
           "--num-samples", str(n // len(arms)), "--arms", args.arms, "--max-concurrent", str(args.max_concurrent),
           "--cpus-per-trial", str(args.cpus_per_trial), "--gpus-per-trial", "0",
           "--resource-policy", args.resource_policy, "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--model", args.model, "--image_size", str(args.image_size), str(args.image_size),
           "--batch_size", str(args.batch_size), "--max_steps_per_epoch", "1", "--no-progress",
           "--keep-checkpoints", str(args.keep_checkpoints)]
    if args.profile:  # the same command under cProfile (its own overhead: never a record)
        cmd[1:3] = ["-m", "cProfile", "-o", str(storage / f"{name}.prof"), "-m", "tune_landmarks"]
    return cmd


def measure(args: Any, n: int, space: Path, dataset: Path, start: Path, work: Path, env: dict[str, str],
            run: int = 0) -> Size:
    storage = work / "sweeps"
    storage.mkdir(exist_ok=True)
    name = f"scale-{n}" + (f"-run{run + 1}" if run else "")
    exp, log = fresh(storage, name)
    drv = run_driver(search_cmd(args, space, dataset, start, storage, name, n), env, log, f"{n} trials", exp)
    if drv.code != 0:
        raise SystemExit(f"the {n}-trial sweep failed (exit {drv.code}): see {log}")
    results = ResultCounter(exp).count()
    fit_cpu, fit_results = drv.per_result_between(0.1, 0.9)
    first = drv.first_result_s()
    resume_s, c1 = timed_cli(["resume", str(exp)], env, log)
    verdict_s, c2 = timed_cli(["verdict", str(exp)], env, log)
    report_s, c3 = timed_cli(["report", str(exp), "--out", str(work / f"report-{name}")], env, log)
    if (c1, c2, c3) != (0, 0, 0):
        raise SystemExit(f"resume/verdict/report of the {n}-trial sweep exited {c1}/{c2}/{c3}: see {log}")
    checked = check_once(exp, name, args.arms.split(","), n)
    drop_checkpoints(exp)
    stretches = [drv.per_result_between(a, a + 0.2)[0] for a in (0.1, 0.3, 0.5, 0.7)]
    size = Size(n, drv, results, (exp / "optuna_journal.log").stat().st_size, fit_cpu, fit_results, first,
                resume_s, verdict_s, report_s, checked, stretches, run)
    print(f"[{name}] {results} results; driver {drv.cpu:.1f} CPU s in {drv.wall:.1f} s "
          f"({drv.cpu / max(results, 1):.3f} s/result, mid-sweep {fit_cpu:.3f} s/result), peak RSS "
          f"{drv.peak_mb:.0f} MB; journal {size.journal_bytes} B; resume {resume_s:.1f} s, verdict {verdict_s:.1f} s, "
          f"report {report_s:.1f} s; wait4 rusage (driver + reaped descendants) {drv.wait4_cpu:.1f} CPU s; {checked}\n"
          f"  driver CPU s by thread: {drv.thread_text()}; CPU s/result in the stretches 10-30/30-50/50-70/70-90 % of "
          f"results: {' / '.join(f'{x:.3f}' for x in stretches)}", flush=True)
    if args.profile:
        print_profile(storage / f"{name}.prof", n)
    return size


def print_profile(path: Path, n: int, top: int = 30) -> None:
    import pstats

    for key in ("tottime", "cumulative"):
        print(f"\n[{n} trials] cProfile of the driver's main thread, top {top} by {key}:")
        pstats.Stats(str(path)).sort_stats(key).print_stats(top)


def interrupted(args: Any, n: int, space: Path, dataset: Path, start: Path, work: Path,
                env: dict[str, str], expected: int) -> tuple[list[Driver], dict[str, Any]]:
    """A sweep of n trials: SIGINT at a third of `expected` results, resume, SIGKILL at two thirds, resume to the end."""
    storage = work / "sweeps"
    storage.mkdir(exist_ok=True)
    name = f"interrupted-{n}"
    exp, log = fresh(storage, name)
    runs = [run_driver(search_cmd(args, space, dataset, start, storage, name, n), env, log, f"{n} trials, interrupted",
                       exp, expected // 3, "int")]
    if runs[0].code != 130:
        raise SystemExit(f"SIGINT: search exited {runs[0].code}, not 130: see {log}")
    resume = [sys.executable, "-m", "tune_landmarks", "resume", str(exp)]
    runs.append(run_driver(resume, env, log, "resume 1", exp, (2 * expected) // 3, "kill"))
    if not runs[1].signalled:
        raise SystemExit(f"the first resume ended (exit {runs[1].code}) before {(2 * expected) // 3} results: see {log}")
    runs.append(run_driver(resume, env, log, "resume 2", exp))
    if runs[2].code != 0:
        raise SystemExit(f"the second resume exited {runs[2].code}: see {log}")
    checked = check_once(exp, name, args.arms.split(","), n)
    drop_checkpoints(exp)
    return runs, checked


def fresh(storage: Path, name: str) -> tuple[Path, Path]:
    """The experiment and log paths of a sweep of this script, emptied of an earlier run's (a kept --workdir)."""
    import shutil

    exp, log = storage / name, storage / f"{name}.log"
    shutil.rmtree(exp, ignore_errors=True)
    log.unlink(missing_ok=True)
    log.with_suffix(".samples.jsonl").unlink(missing_ok=True)
    return exp, log


def drop_checkpoints(exp: Path) -> None:
    """Remove a measured sweep's kept checkpoints (about 50 MB each, two per trial: 25 GB at 300 trials) once its
    resume, verdict, report and checks are done, so the sizes do not add up on disk."""
    import shutil

    for d in exp.glob("trial_*/checkpoint_*"):
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- main

def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, nargs="+", default=[20, 100, 300], help="sweep sizes (trials in all arms)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--arms", default="masked,all")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--resource-policy", default="fixed", choices=("fixed", "distribute"),
                   help="fixed reuses actors; distribute starts a process per trial (8.8 s each here)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="search's --keep-checkpoints (Ray's num_to_keep)")
    p.add_argument("--interrupt", type=int, default=None,
                   help="trials of the sweep interrupted twice (default: the largest --trials; 0: none)")
    p.add_argument("--profile", action="store_true", help="run the drivers under cProfile and print the top entries "
                                                          "(measures nothing: no record)")
    p.add_argument("--model", default="hrnet_w18_small_v2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-images", type=int, default=20, help="synthetic set size (60/20/20 %% train/valid/test)")
    p.add_argument("--synth-size", type=int, default=128, help="synthetic image width in pixels")
    p.add_argument("--start-epochs", type=int, default=2)
    p.add_argument("--start-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    smoke = {"trials": [2], "epochs": 2, "interrupt": 0, "num_images": 12, "synth_size": 96, "start_epochs": 1}
    args = _bench.parse(p, smoke)
    arms = args.arms.split(",")
    if any(n % len(arms) for n in args.trials):
        p.error(f"--trials: each size must divide among the {len(arms)} arms")
    args.trials = sorted(args.trials)
    interrupt = args.trials[-1] if args.interrupt is None else args.interrupt
    if args.profile:
        args.record, interrupt = None, 0
        args.smoke_test = True  # a profiled run's numbers carry cProfile's cost: printed, never recorded
    device = _bench.setup(args)
    with _bench.workdir(args) as work:
        dataset = _bench.synthetic_data(work, args).resolve()
        args.max_steps = 0  # the start model trains on whole epochs (_bench.config reads it)
        start = _bench.start_checkpoint(args, dataset, work).resolve()
        space = work / "space.yaml"
        space.write_text(SPACE)
        env = {**os.environ, "TUNE_LANDMARKS_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
        t_all = time.perf_counter()
        runs_small = 1 if args.smoke_test else args.repeats  # the smallest size's middle is a few seconds: noisy
        sizes = [measure(args, args.trials[0], space, dataset, start, work, env, r) for r in range(runs_small)]
        sizes += [measure(args, n, space, dataset, start, work, env) for n in args.trials[1:]]
        runs, int_check = [], {}
        if interrupt:
            expected = next((s.results * interrupt / s.n for s in sizes if s.n == interrupt), sizes[-1].results)
            runs, int_check = interrupted(args, interrupt, space, dataset, start, work, env, int(expected))
            print(f"[interrupted] {[(r.what, r.code, r.signalled) for r in runs]}; {int_check}", flush=True)
        total_wall = time.perf_counter() - t_all

    small = [x for x in sizes if x.n == args.trials[0]]
    rec = _bench.Record("bench_sweep_scale: the sweep driver's cost per result at 20 to 300 trials", args, device,
                        repeats=f"the smallest size {len(small)} times (median), each larger size once, smallest "
                                "first; CPU and RSS of the driver process alone")
    rec.value("settings", f"{args.model} at {args.image_size}px, batch {args.batch_size}, 1 training step per epoch, "
                          f"{args.epochs} epochs, ASHA (reduction 2); arms {args.arms} (trials split evenly); "
                          f"{args.max_concurrent} trials at a time, {args.cpus_per_trial:g} CPU each, resource policy "
                          f"{args.resource_policy} (actors reused), --keep-checkpoints {args.keep_checkpoints}; synthetic "
                          f"set of {args.num_images} images; {os.cpu_count()} cores; all sweeps took "
                          f"{total_wall / 60:.1f} min")
    rec.table(["trials", "results", "driver wall s", "driver CPU s", "CPU s/result (whole command)",
               "CPU s/result (10-90 % of results)", "peak RSS MB", "journal bytes", "first result s",
               "resume s (no-op)", "verdict s", "report s"],
              [[f"{x.n}" + (f" (run {x.run + 1})" if len(small) > 1 and x.n == small[0].n else ""), x.results,
                x.search.wall, x.search.cpu, x.search.cpu / max(x.results, 1), x.fit_cpu_per_result,
                round(x.search.peak_mb), x.journal_bytes, x.first_result_s, x.resume_s, x.verdict_s, x.report_s]
               for x in sizes])
    rec.table(["trials", "CPU s/result, results 10-30 %", "30-50 %", "50-70 %", "70-90 %", "driver CPU s by thread"],
              [[f"{x.n}" + (f" (run {x.run + 1})" if len(small) > 1 and x.n == small[0].n else ""), *x.stretches,
                x.search.thread_text()] for x in sizes])
    hi = sizes[-1]
    lo_fit = _bench.median([x.fit_cpu_per_result for x in small])
    lo_whole = _bench.median([x.search.cpu / max(x.results, 1) for x in small])
    mid = hi.fit_cpu_per_result / lo_fit
    rec.ratio("driver CPU s/result largest/smallest", mid,
              (f"{hi.n} vs {small[0].n} trials (median of {len(small)}), mid-sweep (results 10-90 %); goal <= 1.5"
               + (" (met)" if mid <= 1.5 else " (NOT met)")) if hi.n != small[0].n else "one size only")
    rec.ratio("driver CPU s/result whole command largest/smallest", (hi.search.cpu / max(hi.results, 1)) / lo_whole,
              "start-up and the end (tables, verdict) included: fixed costs a larger sweep spreads thinner")
    rec.ratio("journal bytes per trial largest/smallest",
              (hi.journal_bytes / hi.n) / (small[0].journal_bytes / small[0].n), "~1: the Optuna journal grows linearly")
    rec.value("checks", "; ".join(f"{x.n} trials: each of {x.checked['trials']} Ray trials once in the studies "
                                  f"({x.checked['orphans']} orphans), {x.checked['epoch_rows']} (trial, epoch) rows "
                                  f"once each, {x.checked['errored']} errored" for x in sizes if x.run == 0))
    if runs:
        rec.table(["interrupted sweep", "exit", "signal", "driver wall s", "driver CPU s", "peak RSS MB"],
                  [[r.what, r.code, r.signalled or "-", r.wall, r.cpu, round(r.peak_mb)] for r in runs])
        rec.value("interrupt check", f"passed: {int_check['trials']} Ray trials, each once in its arm's Optuna study "
                                     f"({int_check['orphans']} orphans of the kill failed), none left RUNNING; "
                                     f"{int_check['epoch_rows']} (trial, epoch) rows in epochs.parquet, each once; "
                                     f"{int_check['result_lines_again']} epochs reported again after the kill "
                                     f"(result.json), {int_check['errored']} errored")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
