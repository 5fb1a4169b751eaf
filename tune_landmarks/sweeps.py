"""The sweep commands: `tune-landmarks search` starts a sweep, `tune-landmarks resume EXPERIMENT` continues an
interrupted one without losing work or early-stopping decisions. The driver itself is search.py's, imported when a
command runs, so registering the commands costs no Ray import.

On resume, Ray restores the trials (each continues from its last checkpoint) and the searcher (the Optuna study
goes on; orphans of a hard kill are failed, see search.ArmSearch). Ray does not restore ASHA's rungs:
they are rebuilt from the recorded results (search.replay_rungs) before anything runs. A sweep tracked in
MLflow continues its runs (tracking.py: the trial -> run map is kept in the experiment).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .config import DEFAULT_STORAGE, TrainConfig
from .experiment import JOURNAL_FILE, RESOURCE_POLICIES, SWEEP_FILE, TERMINAL, Experiment, Sweep, experiment_uri
from .options import add_experiment_options, add_run_options, budgets, flag, names
from .stages import run_config
from .storage import LEASE_TIMEOUT_S, DriverLease

log = logging.getLogger(__name__)


def resume(experiment: str, storage: str = DEFAULT_STORAGE, restart_errored: bool = False,
           address: str | None = None, lease_timeout: float = LEASE_TIMEOUT_S) -> int:
    """Continue the sweep as its one driver: the experiment's lease (storage.DriverLease) is taken first, so a second
    `resume` (or a `search` of the same name) refuses before anything is read or Ray starts; held to the end."""
    exp = Experiment.find(experiment, storage)
    with DriverLease(exp.uri, exp.fs, exp.root, "resume", lease_timeout) as lease:
        return _resume(exp, lease, restart_errored, address)


def _resume(exp: Experiment, lease: DriverLease, restart_errored: bool, address: str | None) -> int:
    from ray import tune

    from . import ray_adapter
    from .ray_setup import driver_console
    from .results import collect, unfinished
    from .search import build_tuner, finish, init_ray, journal_path, replay_rungs
    from .tracking import Tracker, connect

    sweep = exp.load_sweep()
    check_roles(sweep)
    if not tune.Tuner.can_restore(exp.uri):
        raise FileNotFoundError(f"{exp}: has {SWEEP_FILE} but no Ray experiment state to restore "
                                "(was the sweep killed before its first trial started?)")
    trials = collect(exp)
    errored = [t for t in trials if t.status == "ERROR"]
    if len(trials) >= sweep.total_trials and all(t.status in TERMINAL for t in trials) \
            and not (restart_errored and errored):
        log.info(f"{exp}: finished ({len(trials)} trials, {len(errored)} errored); nothing to resume.\n"
                 f"export the best trial with: tune-landmarks export {exp} --out DIR")
        return 0
    first = experiment_uri(sweep.settings.storage, sweep.settings.name)
    generated = ray_adapter.saved_trials_created(exp)  # saved apart from the trial list: trust the lower count
    created = len(trials) if generated is None else min(len(trials), generated)
    if first != exp.uri and created < sweep.total_trials:
        raise ValueError(f"{exp}: this sweep was run at {first} and has {sweep.total_trials - created} trial(s) "
                         "still to start, which Ray 2.60 would create at that location (its saved trial generator "
                         f"keeps it) and fail: move the experiment back to {first} and resume it there")
    for line in damaged_restarts(exp, trials):
        log.warning(line)
    # the sweep's own settings, except where it now lives
    sweep.settings.storage, sweep.settings.name = exp.storage, exp.name
    if exp.local is None:  # the study goes on from the journal in the experiment's storage (search.journal_path)
        exp.pull_growing(JOURNAL_FILE, journal_path(exp))
    if sweep.settings.mlflow:  # the same runs, continued; the tracking server must answer before Ray starts
        Tracker(exp, connect(sweep.settings.mlflow)).open(sweep)
    init_ray(address or sweep.settings.address, sweep.base.resume)
    tuner, scheduler = build_tuner(sweep, restore=True, restart_errored=restart_errored)
    n = replay_rungs(scheduler, trials)
    log.info(f"resuming {exp}: {unfinished(sweep, trials)} of {sweep.total_trials} trials unfinished; "
             f"ASHA rungs rebuilt from {n} recorded results; resource policy {sweep.settings.resource_policy}")
    with driver_console(exp):
        tuner.fit()
        return finish(exp, sweep, lease)


def damaged_restarts(exp: Experiment, trials: list[Any]) -> list[str]:
    """For each trial resume will restore whose latest kept checkpoint is not the bytes recorded when it was written:
    the epoch it continues from instead (search._restore_from does it in the trial)."""
    from .results import checkpoint_damage, kept_checkpoints, latest_intact

    out = []
    for t in trials:
        kept = kept_checkpoints(exp, t.trial_id) if t.status not in TERMINAL else {}
        if not kept:
            continue
        epoch = max(kept)
        why = checkpoint_damage(exp, kept[epoch][1])
        if why:
            found = latest_intact(exp, t.trial_id, epoch)
            out.append(f"trial {t.trial_id}: the checkpoint of epoch {epoch} is damaged ({why}); "
                       + (f"it continues from epoch {found[0]}, its latest intact checkpoint" if found else
                          "no earlier intact checkpoint was kept: it will fail (resume --restart-errored restarts it)"))
    return out


def check_roles(sweep: Sweep) -> None:
    """The images of every role are the ones sweep.json recorded (carving is deterministic, so they are unless
    the dataset changed); a resumed sweep must not select or judge on other images than it started with."""
    from .read import describe, load_roles

    b = sweep.base
    now = load_roles(describe(b.dataset_path, b.format), b.train_split, b.val_split, b.test_split, b.annotator,
                     b.skip_bad, skip_images=b.skip_images).ids()
    for role, recorded in sweep.roles.items():
        ids = now.get(role, {}).get("image_ids", [])
        if sorted(ids) != sorted(recorded["image_ids"]):
            raise ValueError(f"{b.dataset_path}: the {role} split {recorded['spec']!r} now holds {len(ids)} images, "
                             f"not the {len(recorded['image_ids'])} the sweep recorded: the dataset changed; start a "
                             "new sweep")


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--name", required=True, help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="local/shared path or pyarrow URI (s3://, gs://)")
    p.add_argument("--arms", default="masked,all", type=names,
                   help="arms searched alike and compared by the verdict: masked, weighted, all, refine (the refinement "
                        "stage; give its own ranges in the space's `arms: refine:` section) (default masked,all)")
    p.add_argument(*flag("num_samples"), type=int, default=20, dest="num_samples",
                   help="trials per arm (the same for every arm: the fair comparison)")
    p.add_argument(*flag("arm_samples"), type=budgets, default={}, dest="arm_samples", metavar="ARM=N,...",
                   help="a different budget for some arms (fewer trials: a less certain verdict for that arm)")
    p.add_argument(*flag("arm_epochs"), type=budgets, default={}, dest="arm_epochs", metavar="ARM=N,...",
                   help="other epochs per trial for some arms (e.g. refine=30: a refinement epoch costs a fraction of "
                        "a fine-tuning epoch; the verdict prints each arm's epochs and training time)")
    p.add_argument(*flag("max_concurrent"), type=int, default=4, dest="max_concurrent")
    p.add_argument(*flag("gpus_per_trial"), type=float, default=None, dest="gpus_per_trial",
                   help="fractional shares a GPU; default 1 where CUDA is available, else 0")
    p.add_argument(*flag("cpus_per_trial"), type=float, default=1.0, dest="cpus_per_trial")
    p.add_argument(*flag("resource_policy"), choices=RESOURCE_POLICIES, default="distribute",
                   dest="resource_policy",
                   help="distribute (default): cores that finished trials leave go to the trials still running (a "
                        "trial restarts from its checkpoint at its new size); fixed: every trial keeps "
                        "--cpus-per-trial")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument(*flag("max_failures"), type=int, default=0, dest="max_failures")
    p.add_argument(*flag("reduction_factor"), type=float, default=2.0, dest="reduction_factor")
    p.add_argument(*flag("grace_period"), type=int, default=None, dest="grace_period",
                   help="ASHA's first rung (default: the largest warmup in the space, at least 1)")
    p.add_argument(*flag("arm_grace_period"), type=budgets, default={}, dest="arm_grace_period", metavar="ARM=N,...",
                   help="another first rung for some arms (e.g. refine=5: a crop network trained from scratch is not "
                        "judged at its first epochs)")
    p.add_argument(*flag("keep_checkpoints"), type=int, default=2, dest="keep_checkpoints")
    p.add_argument("--mlflow", metavar="URI",
                   help="track the sweep in MLflow at this tracking URI: a parent run, a run per trial, the verdict "
                        "(needs pip install 'tune_landmarks[mlflow]'; credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)")


def _lease_option(p: argparse.ArgumentParser) -> None:
    """--lease-timeout: this run's patience with another driver; recorded nowhere (each driver's own)."""
    p.add_argument(*flag("lease_timeout"), type=float, default=LEASE_TIMEOUT_S, dest="lease_timeout", metavar="S",
                   help="take over the experiment from another driver whose heartbeat is older than S seconds (default "
                        f"{LEASE_TIMEOUT_S:g}; one whose process is gone from this host at once)")


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
                             arm_grace_period=args.arm_grace_period,
                             keep_checkpoints=args.keep_checkpoints, resource_policy=args.resource_policy,
                             mlflow=args.mlflow)
    return run_search(args.space, base, settings, args.lease_timeout)


def cmd_resume(args: argparse.Namespace) -> int:
    return resume(args.experiment, args.storage, args.restart_errored, args.address, args.lease_timeout)


def register_cli(sub: Any) -> None:
    s = sub.add_parser("search", help="Ray Tune + Optuna sweep of fine-tuning trials")
    _sweep_options(s)
    _lease_option(s)
    add_run_options(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("resume", help="continue an interrupted sweep (trials, Optuna study, ASHA rungs)")
    add_experiment_options(s)
    s.add_argument(*flag("restart_errored"), action="store_true", dest="restart_errored",
                   help="re-run failed trials from scratch (default: they resume from their last checkpoint)")
    s.add_argument("--address", help="Ray cluster address (default: the sweep's, else a local Ray)")
    _lease_option(s)
    s.set_defaults(func=cmd_resume)
