"""Shared plumbing for scripts/bench_*.py: flags, timing, medians, the machine record, BENCHMARKS.md.

Why one module: every benchmark must time the same way (CUDA synchronised, modes interleaved within
each repeat so machine drift cancels), describe the machine the same way, and append records in one
format. `make_step` times `run.train_step` itself, with run.train's own objective, optimiser (AdamW over its
parameter groups), schedule, loss scaler and clip, so a step timed here is exactly the step a trial takes.
Records of `--smoke-test` runs never go to BENCHMARKS.md (they measure nothing), only to `--record`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _k, _v in (("NO_ALBUMENTATIONS_UPDATE", "1"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402  (after the environment defaults above)

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------- flags

def parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark has; a script adds its own and passes its smoke values to `parse`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke-test", action="store_true", help="run tiny (seconds): checks the script, measures nothing")
    p.add_argument("--record", help="append the record here (default: BENCHMARKS.md; a smoke test only prints "
                                    "unless --record is given)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported; >= 5, smoke 2)")
    p.add_argument("--workdir", help="keep data, checkpoints and sweeps here (default: a temporary folder)")
    return p


def add_finetune_args(p: argparse.ArgumentParser, epochs: int = 6) -> None:
    """Flags of the benchmarks that fine-tune from a start checkpoint trained inside the script."""
    p.add_argument("--model", default="hrnet_w32")
    p.add_argument("--image-size", type=int, default=256, help="square network input")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-images", type=int, default=60, help="synthetic set size (60/20/20 %% train/valid/test)")
    p.add_argument("--synth-size", type=int, default=320, help="synthetic image width in pixels")
    p.add_argument("--start-epochs", type=int, default=15, help="epochs of the start model (all landmarks)")
    p.add_argument("--start-lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=epochs, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning lr")
    p.add_argument("--max-steps", type=int, default=0, help="max steps per epoch (0 = whole epoch)")
    p.add_argument("--seed", type=int, default=0)


FINETUNE_SMOKE = {"model": "hrnet_w18_small_v2", "image_size": 64, "batch_size": 2, "num_images": 12,
                  "synth_size": 96, "start_epochs": 1, "start_lr": 3e-3, "epochs": 3, "max_steps": 1}


def parse(p: argparse.ArgumentParser, smoke: dict[str, Any], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse; under --smoke-test the script's tiny values become the defaults (explicit flags still win).
    Smoke runs default to 1 thread: on a busy 2-core machine two OpenMP threads spin-waiting for each
    other made `bench_amp.py --smoke-test` take 203 s instead of 12 s."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv:
        p.set_defaults(repeats=2, threads=1, **smoke)
    args = p.parse_args(argv)
    if not args.smoke_test and args.repeats < 5:
        p.error(f"--repeats {args.repeats}: a record needs the median of at least 5 repeats")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    record_target(args)  # fail before any work if the target is refused
    return args


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, show run.train's log lines (epoch summaries), resolve --device as run.train does
    (cuda must exist when asked for)."""
    from tune_landmarks.device import resolve_device

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"--device {args.device}: {exc}") from None


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """--workdir if given (kept), else a temporary folder removed at the end."""
    if args.workdir:
        p = Path(args.workdir).resolve()
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        yield Path(d)


# ---------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call, with CUDA work finished on both sides."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant once per repeat, rotating the order every repeat, so slow drift of a shared
    machine (and any first-in-the-round effect) falls on every variant alike."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(timed(variants[n], device))
    return out


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of num/den measured in the same repeat (paired, so drift cancels)."""
    return median([a / b for a, b in zip(times[num], times[den]) if b > 0])


# ---------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of a stretch of work: torch.cuda.max_memory_allocated on CUDA; on CPU the process's
    peak RSS (VmHWM) after resetting it through /proc/self/clear_refs, or, where that is refused,
    ru_maxrss (the whole process's lifetime peak, which only ever grows). `kind` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated"
        else:
            self.kind = "peak RSS (VmHWM, reset per measurement)" if self._reset_hwm() else \
                "ru_maxrss (process lifetime peak)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind.startswith("peak RSS"):
            self._reset_hwm()

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind.startswith("peak RSS"):
            for ln in Path("/proc/self/status").read_text().splitlines():
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the record

def machine(device: torch.device) -> str:
    """CPU model, cores, torch threads, GPU, and the load when the benchmark started (a shared box)."""
    cpu = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name") and cpu == (platform.processor() or "unknown CPU"):
                cpu = ln.split(":", 1)[1].strip()
            if ln.startswith("flags"):
                flags = set(ln.split(":", 1)[1].split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        torch.cuda.get_device_name(0) + " (unused)" if torch.cuda.is_available() else "none")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}; {os.cpu_count()} logical CPUs ({usable} usable); {'/'.join(simd) or 'no avx2'}; "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads; GPU: {gpu}; device {device}; "
            f"load average {load} at start")


def command() -> str:
    """The command as typed, the script path relative to the repository when it lies inside it."""
    argv = list(sys.argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    return "python " + shlex.join(argv)


def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], check=False, cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"git {head or 'unknown'}" + (" + uncommitted changes" if dirty else "")


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


@dataclass
class Record:
    """One benchmark's entry: machine, command, settings, a table, the ratios and notes."""

    title: str
    args: argparse.Namespace
    device: torch.device
    lines: list[str] = field(default_factory=list)
    repeats: str = ""  # what the medians are over, when not --repeats timed repeats

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.lines += [""] if self.lines and self.lines[-1] else []
        self.lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
        self.lines.append("")

    def ratio(self, name: str, value: float, how: str, digits: int = 3) -> None:
        """A ratio measured in this run; `how` says what it is the ratio of."""
        self.lines.append(f"- ratio {name}: {fmt(value, digits)} ({how})")

    def value(self, name: str, value: Any, how: str = "") -> None:
        self.lines.append(f"- {name}: {fmt(value)}" + (f" ({how})" if how else ""))

    def note(self, text: str) -> None:
        self.lines.append(f"- note: {text}")

    def text(self) -> str:
        head = [f"## {self.title} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                f"- machine: {machine(self.device)}",
                f"- command: `{command()}`",
                f"- code: {code_version()}",
                f"- repeats: {self.repeats or f'median of {self.args.repeats} timed repeats'}"
                + ("; SMOKE TEST: tiny settings, the numbers measure nothing" if self.args.smoke_test else "")]
        return "\n".join(head + self.lines) + "\n"


def record_target(args: argparse.Namespace) -> Path | None:
    """Where the record goes: --record, else BENCHMARKS.md for a real run, nowhere for a smoke test.
    A smoke test is refused BENCHMARKS.md even when asked (its numbers are not measurements)."""
    target = Path(args.record).resolve() if args.record else (None if args.smoke_test else BENCHMARKS_MD)
    if args.smoke_test and target is not None and target == BENCHMARKS_MD.resolve():
        raise SystemExit(f"--smoke-test never records to {BENCHMARKS_MD.name}; give another --record path")
    return target


def emit(rec: Record) -> None:
    """Print the record and append it to its target."""
    text = rec.text()
    print("\n" + text)
    target = record_target(rec.args)
    if target is None:
        print("(smoke test: not recorded; pass --record PATH to keep it)")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    new = not target.exists()
    with open(target, "a") as f:
        if new and target == BENCHMARKS_MD.resolve():
            f.write("# Benchmarks\n\nAppended by `scripts/bench_*.py` (each record says the machine and the command "
                    "that reproduces it). Ratios measured within one run are the numbers to compare.\n\n")
        f.write(text + "\n")
    print(f"recorded to {target}")


# ---------------------------------------------------------------- the training step and the fine-tunes

def random_batch(batch: int, size: int, k: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images and keypoints inside the frame: the step's cost does not depend on their content."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, size, size, generator=g)
    kps = (0.1 + 0.8 * torch.rand(batch, k, 2, generator=g)) * size
    return x.to(device), kps.to(device)


def sliced(model: Any, channels: Sequence[int]) -> Any:
    """A model whose output is only some landmarks' heatmaps, so the loss is computed on those alone."""
    from tune_landmarks.model import LandmarkModel

    class Sliced(LandmarkModel):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.num_landmarks = model, len(channels)
            self.idx = torch.tensor(list(channels), device=next(model.parameters()).device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).index_select(1, self.idx)

    return Sliced()


def step_config() -> Any:
    """What a timed step runs with: TrainConfig's defaults (adaptive wing, sigma, clip, weight decay) at a
    fine-tuning lr."""
    from tune_landmarks.config import TrainConfig

    return TrainConfig(lr=1e-6)


def shared_optimiser(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """run.train's optimiser and lr schedule for `model` (build it after freezing, as run.train does), for
    several step functions to share: one optimiser state in memory, whichever variant steps it."""
    from tune_landmarks.run import build_optimizer, build_scheduler

    opt = build_optimizer(model, step_config())
    return opt, build_scheduler(opt, step_config(), steps=1)


def make_step(model: torch.nn.Module, x: torch.Tensor, kps: torch.Tensor, weights: torch.Tensor,
              optimiser: tuple[torch.optim.Optimizer, Any] | None = None, amp_dtype: torch.dtype | None = None,
              frozen: Sequence[str] = (), bn_eval: bool = False, channels: Sequence[int] | None = None,
              loss: str = "adaptive_wing") -> Callable[[], float]:
    """One call = one `run.train_step` on the batch (x, kps), with the Objective, optimiser, schedule, scaler
    and clip that run.train builds from `step_config()`; returns the loss. `weights` is the loss mode
    (landmark_weights); `amp_dtype` the autocast dtype (None = fp32); `frozen`/`bn_eval` as model.train_mode
    takes them (set once, as run.train does once per epoch); `optimiser` from `shared_optimiser`, else its own.

    `channels` (not what run.train does) computes the targets and the loss for those heatmaps only: the most
    a masked loss could save by skipping the zero-weight landmarks instead of multiplying them by 0. `loss`: the
    run's --loss."""
    from tune_landmarks.run import Objective, Optimisation, train_step

    cfg = step_config()
    cfg.loss = loss
    opt, sched = optimiser or shared_optimiser(model)
    optim = Optimisation.create(opt, sched, x.device, amp_dtype, cfg.grad_clip)
    model.train_mode(list(frozen), bn_eval)
    if channels is not None:
        model, kps, weights = sliced(model, channels), kps[:, list(channels)], weights[list(channels)]
    objective = Objective.from_config(cfg, weights)
    frame = torch.ones(x.shape[0], 3, device=x.device)  # scale 1: the built-in model's targets do not depend on it
    return lambda: train_step(model, x, kps, frame, objective, optim)


def model_for_steps(name: str, k: int, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A seeded model (channels_last on CUDA, as training places it) and its shared optimiser, for make_step."""
    from tune_landmarks.model import create_model

    torch.manual_seed(0)
    model = create_model(name, k).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, shared_optimiser(model)


def probe_fails(step: Callable[[], Any], device: torch.device, what: str, limit: float, skipped: list[str]) -> bool:
    """Run `step` once and time it once more: True (with the reason in `skipped`) when it runs out of GPU memory
    or takes longer than `limit` seconds, so the caller skips this size and the larger ones."""
    try:
        step()
        probe = timed(step, device)
    except torch.cuda.OutOfMemoryError:
        skipped.append(f"{what}: out of GPU memory")
        return True
    if probe > limit:
        skipped.append(f"{what} and above: probe step {probe:.1f} s > --max-seconds-per-step {limit:g}")
        return True
    return False


def synthetic_data(work: Path, args: argparse.Namespace) -> Path:
    """The synthetic Aariz-format set of --num-images at --synth-size (reused inside --workdir)."""
    from tune_landmarks.synth import make_synthetic

    root = work / f"synth-{args.num_images}-{args.synth_size}-s{args.seed}"
    if (root / "cephalogram_machine_mappings.csv").is_file():
        return root
    return make_synthetic(root, num_images=args.num_images, seed=args.seed, size=args.synth_size)


def config(args: argparse.Namespace, dataset: Path, work: Path, **kw: Any):
    """A TrainConfig from the benchmark's flags (no progress bar, its own cache, the same threads and device)."""
    from tune_landmarks.config import TrainConfig

    base = {"dataset_path": str(dataset), "model": args.model, "image_size": (args.image_size, args.image_size),
            "batch_size": args.batch_size, "cache_dir": str(work / "cache"), "device": args.device,
            "threads": args.threads, "max_steps_per_epoch": args.max_steps, "seed": args.seed, "progress": False,
            # a benchmark compares its arms on the same images; ISBI's own copies across train and test1
            # (docs/duplicates.md) touch every arm alike, and the records predate the check
            "allow_duplicates": True}
    return TrainConfig(**(base | kw))


def start_checkpoint(args: argparse.Namespace, dataset: Path, work: Path) -> Path:
    """Train the start model once (all landmarks, --start-epochs): every fine-tune of a benchmark starts
    from this same file, so the arms differ only in what the benchmark varies."""
    from tune_landmarks.run import train

    out = work / f"start-{args.model}-{args.image_size}-e{args.start_epochs}"
    if not (out / "best.pt").is_file():
        t = time.perf_counter()
        train(config(args, dataset, work, epochs=args.start_epochs, lr=args.start_lr, out=str(out), mode="all"))
        print(f"start model: {args.start_epochs} epochs in {time.perf_counter() - t:.1f} s -> {out / 'best.pt'}")
    return out / "best.pt"


def masked_finetune(args: argparse.Namespace, dataset: Path, work: Path, start: Path, name: str, data: Any = None,
                    **kw: Any):
    """The workflow's fine-tune (loss masked to its twelve difficult landmarks) from `start`, with overrides."""
    from tune_landmarks.landmarks import WORKFLOW_DIFFICULT
    from tune_landmarks.run import train

    cfg = config(args, dataset, work, **({"epochs": args.epochs, "lr": args.lr, "mode": "masked",
                                          "difficult": list(WORKFLOW_DIFFICULT), "resume": str(start),
                                          "out": str(work / name)} | kw))
    t = time.perf_counter()
    res = train(cfg, data=data)
    print(f"{name}: {cfg.epochs} epochs in {time.perf_counter() - t:.1f} s, best val MRE {res.best.mre:.3f} mm")
    return res


@contextlib.contextmanager
def finetune_setup(args: argparse.Namespace) -> Iterator[tuple[Path, Path, Path, Any, int]]:
    """The fine-tune benchmarks' shared set-up: (work, dataset, start checkpoint, cached data, steps/epoch)."""
    from tune_landmarks.run import prepare_data, steps_per_epoch

    with workdir(args) as work:
        dataset = synthetic_data(work, args)
        start = start_checkpoint(args, dataset, work)
        data = prepare_data(config(args, dataset, work), progress=False)
        yield work, dataset, start, data, steps_per_epoch(len(data.train), args.batch_size, args.max_steps)


def loop_step_seconds(history: list[dict[str, Any]], n_steps: int) -> float:
    """Median seconds per training step inside run.train, over every epoch but the first."""
    return median([t / n_steps for t in after_first(history, "train_seconds")])


def history_repeats(args: argparse.Namespace, p: argparse.ArgumentParser) -> str:
    """Times read from run.train's history are medians over epochs 2..E: a record needs >= 5 of them."""
    if not args.smoke_test and args.epochs < 6:
        p.error(f"--epochs {args.epochs}: times come from epochs 2..E, a record needs >= 5 of them (--epochs >= 6)")
    return f"median over epochs 2..{args.epochs} ({args.epochs - 1} values) of each run"


def after_first(history: list[dict[str, Any]], key: str) -> list[float]:
    """A per-epoch value for every epoch but the first (which pays one-off costs)."""
    return [float(h[key]) for h in history[1:]]


def sweep(space: Path, base: Any, **settings: Any) -> tuple[list[Any], float, int]:
    """One real `search.run_search` (Ray Tune + Optuna + ASHA); returns its trials as `results.collect`
    reads them back from the experiment, the wall seconds of the whole call, and its exit code."""

    from tune_landmarks.experiment import Experiment, SweepSettings
    from tune_landmarks.results import collect
    from tune_landmarks.search import run_search

    s = SweepSettings(**settings)
    t = time.perf_counter()
    code = run_search(str(space), base, s)
    wall = time.perf_counter() - t
    return collect(Experiment.at(s.storage, s.name)), wall, code
