"""Sweep-level subcommands (search, resume, export, predict, report, compare, demo), registered into
the CLI parser by cli.build_parser."""
from __future__ import annotations

import argparse
from typing import Any


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--name", required=True, help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default="./sweeps", help="local/shared path or pyarrow URI (s3://, gs://)")
    p.add_argument("--num-samples", "--num_samples", type=int, default=20, dest="num_samples",
                   help="searched trials (the control arm comes on top)")
    p.add_argument("--max-concurrent", "--max_concurrent", type=int, default=4, dest="max_concurrent")
    p.add_argument("--gpus-per-trial", "--gpus_per_trial", type=float, default=None, dest="gpus_per_trial",
                   help="fractional shares a GPU; default 1 where CUDA is available, else 0")
    p.add_argument("--cpus-per-trial", "--cpus_per_trial", type=float, default=1.0, dest="cpus_per_trial")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--control-trials", "--control_trials", type=int, default=1, dest="control_trials",
                   help="same-budget control trials fine-tuning all landmarks")
    p.add_argument("--no-control", action="store_const", const=0, dest="control_trials", help="no control arm")
    p.add_argument("--max-failures", "--max_failures", type=int, default=0, dest="max_failures")
    p.add_argument("--reduction-factor", "--reduction_factor", type=float, default=2.0, dest="reduction_factor")
    p.add_argument("--grace-period", "--grace_period", type=int, default=None, dest="grace_period",
                   help="ASHA's first rung (default: the largest warmup in the space, at least 1)")
    p.add_argument("--keep-checkpoints", "--keep_checkpoints", type=int, default=2, dest="keep_checkpoints")


def cmd_search(args: argparse.Namespace) -> int:
    from .cli import run_config
    from .config import TrainConfig
    from .search import SweepSettings, run_search

    base = run_config(args, TrainConfig(mode="masked"))
    gpus = args.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    settings = SweepSettings(name=args.name, storage=args.storage, num_samples=args.num_samples,
                             max_concurrent=args.max_concurrent, gpus_per_trial=gpus,
                             cpus_per_trial=args.cpus_per_trial, address=args.address,
                             epochs=base.epochs, seed=base.seed,
                             control_trials=args.control_trials, max_failures=args.max_failures,
                             reduction_factor=args.reduction_factor, grace_period=args.grace_period,
                             keep_checkpoints=args.keep_checkpoints)
    return run_search(args.space, base, settings)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, smoke=args.smoke_test)


# Modules that add their own subcommand with `register_cli(sub)`; each keeps heavy imports inside
# its command function so `tune-landmarks --help` stays fast.
PLUGGED = ("resume", "export", "predict", "report", "compare")


def register(sub: Any) -> None:
    import importlib

    from .cli import add_run_options

    s = sub.add_parser("search", help="Ray Tune + Optuna sweep of fine-tuning trials")
    _sweep_options(s)
    add_run_options(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("demo", help="synthetic data -> start model -> sweep -> best trial (CPU, minutes)")
    s.add_argument("--workdir", default="demo_run")
    s.add_argument("--smoke-test", "--smoke_test", action="store_true", dest="smoke_test", help="tiny and fast")
    s.set_defaults(func=cmd_demo)

    for name in PLUGGED:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        mod.register_cli(sub)
