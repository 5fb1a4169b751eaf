"""The `tune-landmarks` command line. Run options come from TrainConfig's fields (YAML defaults via
--config, then flags; `--image_size` and `--image-size` both work, as in the workflow being replaced).

Library modules log; this module decides what reaches the console (`-q` warnings only, `-v` everything,
Ray's own lines included). Each subcommand's module keeps its heavy imports (torch, Ray) inside its
functions, so `tune-landmarks --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from . import check, compare, demo, evaluate, export, import_model, predict, report, resume, stages, synth
from .config import TrainConfig
from .experiment import RESOURCE_POLICIES
from .options import add_run_options, budgets, names
from .stages import run_config


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--name", required=True, help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default="./sweeps", help="local/shared path or pyarrow URI (s3://, gs://)")
    p.add_argument("--arms", default="masked,all", type=names,
                   help="arms searched alike and compared by the verdict: masked, weighted, all, refine (the refinement "
                        "stage; give its own ranges in the space's `arms: refine:` section) (default masked,all)")
    p.add_argument("--num-samples", "--num_samples", type=int, default=20, dest="num_samples",
                   help="trials per arm (the same for every arm: the fair comparison)")
    p.add_argument("--arm-samples", "--arm_samples", type=budgets, default={}, dest="arm_samples", metavar="ARM=N,...",
                   help="a different budget for some arms (fewer trials: a less certain verdict for that arm)")
    p.add_argument("--arm-epochs", "--arm_epochs", type=budgets, default={}, dest="arm_epochs", metavar="ARM=N,...",
                   help="other epochs per trial for some arms (e.g. refine=30: a refinement epoch costs a fraction of "
                        "a fine-tuning epoch; the verdict prints each arm's epochs and training time)")
    p.add_argument("--max-concurrent", "--max_concurrent", type=int, default=4, dest="max_concurrent")
    p.add_argument("--gpus-per-trial", "--gpus_per_trial", type=float, default=None, dest="gpus_per_trial",
                   help="fractional shares a GPU; default 1 where CUDA is available, else 0")
    p.add_argument("--cpus-per-trial", "--cpus_per_trial", type=float, default=1.0, dest="cpus_per_trial")
    p.add_argument("--resource-policy", "--resource_policy", choices=RESOURCE_POLICIES, default="distribute",
                   dest="resource_policy",
                   help="distribute (default): cores that finished trials leave go to the trials still running (a "
                        "trial restarts from its checkpoint at its new size); fixed: every trial keeps "
                        "--cpus-per-trial")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--max-failures", "--max_failures", type=int, default=0, dest="max_failures")
    p.add_argument("--reduction-factor", "--reduction_factor", type=float, default=2.0, dest="reduction_factor")
    p.add_argument("--grace-period", "--grace_period", type=int, default=None, dest="grace_period",
                   help="ASHA's first rung (default: the largest warmup in the space, at least 1)")
    p.add_argument("--keep-checkpoints", "--keep_checkpoints", type=int, default=2, dest="keep_checkpoints")
    p.add_argument("--mlflow", metavar="URI",
                   help="track the sweep in MLflow at this tracking URI: a parent run, a run per trial, the verdict "
                        "(needs pip install 'tune_landmarks[mlflow]'; credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)")


def cmd_search(args: argparse.Namespace) -> int:
    from .experiment import SweepSettings
    from .search import run_search

    base = run_config(args, TrainConfig(mode="masked"))
    gpus = args.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    settings = SweepSettings(name=args.name, storage=args.storage, num_samples=args.num_samples,
                             max_concurrent=args.max_concurrent, gpus_per_trial=gpus,
                             cpus_per_trial=args.cpus_per_trial, address=args.address,
                             epochs=base.epochs, seed=base.seed,
                             arms=args.arms, arm_samples=args.arm_samples, arm_epochs=args.arm_epochs,
                             max_failures=args.max_failures,
                             reduction_factor=args.reduction_factor, grace_period=args.grace_period,
                             keep_checkpoints=args.keep_checkpoints, resource_policy=args.resource_policy,
                             mlflow=args.mlflow)
    return run_search(args.space, base, settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune-landmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (debug lines, Ray's own)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES[:5]:
        module.register_cli(sub)
    s = sub.add_parser("search", help="Ray Tune + Optuna sweep of fine-tuning trials")
    _sweep_options(s)
    add_run_options(s)
    s.set_defaults(func=cmd_search)
    for module in SUBCOMMAND_MODULES[5:]:
        module.register_cli(sub)
    return p


# Every subcommand's module, in the order `--help` lists them; each adds its own with `register_cli(sub)`.
SUBCOMMAND_MODULES = (synth, check, stages, evaluate, import_model, demo, resume, export, predict, report, compare)


class _ConsoleHandler(logging.Handler):
    """Information to stdout as plain lines (it is the program's output); warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: this tool's information; -v: debug lines, Ray's included."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger(__package__)
    pkg.handlers[:] = [handler]
    pkg.setLevel(level)
    pkg.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # DatasetError, CheckpointError, SpaceError too
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
