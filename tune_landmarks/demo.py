"""`make demo`: synthetic Aariz-format data -> a small start model -> a sweep of three arms (masked and all-landmark
fine-tuning, the refinement stage) -> the verdict -> the best trial exported -> the report.
Minutes on 2 CPU cores; `--smoke-test` makes every step tiny."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .experiment import SweepSettings

log = logging.getLogger(__name__)

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"
ARMS = ("masked", "all", "refine")


def run_demo(workdir: str | Path, smoke: bool = False) -> int:
    from .run import train
    from .search import run_search
    from .synth import make_synthetic

    t0 = time.perf_counter()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    n, size, img, start_epochs, epochs, samples = (16, 192, 64, 2, 2, 1) if smoke else (48, 320, 128, 20, 6, 5)
    data = work / ("data-smoke" if smoke else "data")
    if not (data / "cephalogram_machine_mappings.csv").is_file():
        log.info(f"[1/4] synthetic Aariz-format dataset: {n} images -> {data}")
        make_synthetic(data, num_images=n, seed=0, size=size)
    else:
        log.info(f"[1/4] reusing the synthetic dataset in {data}")
    cache = str(work / "cache")
    start_dir = work / ("start-smoke" if smoke else "start")
    if not (start_dir / "best.pt").is_file():
        log.info(f"[2/4] training a start model (hrnet_w18_small_v2, {img}x{img}, {start_epochs} epochs, all landmarks)")
        train(TrainConfig(dataset_path=str(data), model="hrnet_w18_small_v2", image_size=(img, img), epochs=start_epochs,
                          batch_size=8, lr=2e-3, out=str(start_dir), cache_dir=cache, threads=2))
    else:
        log.info(f"[2/4] reusing the start model {start_dir / 'best.pt'}")
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    log.info(f"[3/4] sweep {name}: arms {', '.join(ARMS)}, {samples} trials each, ASHA, {epochs} epochs each; "
             "selection on the valid split, verdict on the test split")
    base = TrainConfig(dataset_path=str(data), model="hrnet_w18_small_v2", image_size=(img, img), batch_size=8,
                       resume=str(start_dir / "best.pt"), cache_dir=cache, mode="masked", epochs=epochs)
    settings = SweepSettings(name=name, storage=str(work / "sweeps"), num_samples=samples, max_concurrent=2,
                             cpus_per_trial=1, epochs=epochs, seed=0, arms=list(ARMS))
    code = run_search(str(SPACE), base, settings)
    exp = work / "sweeps" / name
    if code == 0:
        code = _after(exp, work)
    log.info(f"demo finished in {time.perf_counter() - t0:.0f} s; experiment: {exp}")
    return code


def _after(exp: Path, work: Path) -> int:
    """Export the best trial (when one improved on the start model: otherwise say so, as export does) and
    write the report."""
    from .export import export
    from .report import report

    log.info("[4/4] export and report")
    try:
        export(exp, work / "export")
        log.info(f"exported model: {work / 'export'}")
    except ValueError as exc:
        log.info(f"export: {exc}")
    report(exp, work / "report")
    log.info(f"report: {work / 'report' / 'index.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.workdir, smoke=args.smoke_test)


def register_cli(sub: Any) -> None:
    s = sub.add_parser("demo", help="synthetic data -> start model -> sweep -> best trial (CPU, minutes)")
    s.add_argument("--workdir", default="demo_run")
    s.add_argument("--smoke-test", "--smoke_test", action="store_true", dest="smoke_test", help="tiny and fast")
    s.set_defaults(func=cmd_demo)
