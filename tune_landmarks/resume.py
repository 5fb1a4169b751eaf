"""`tune-landmarks resume EXPERIMENT`: continue an interrupted sweep without losing work or
early-stopping decisions.

Ray restores the trials (each continues from its last checkpoint) and the searcher (the Optuna study
goes on; orphans of a hard kill are failed, see search.ArmSearch). Ray does not restore ASHA's rungs:
they are rebuilt from the recorded results (search.replay_rungs) before anything runs. A sweep tracked in
MLflow continues its runs (tracking.py: the trial -> run map is kept in the experiment).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .experiment import DEFAULT_STORAGE, SWEEP_FILE, TERMINAL, Experiment, Sweep, experiment_uri

log = logging.getLogger(__name__)


def resume(experiment: str, storage: str = DEFAULT_STORAGE, restart_errored: bool = False,
           address: str | None = None) -> int:
    from ray import tune

    from . import ray_adapter
    from .ray_setup import driver_console
    from .results import collect, unfinished
    from .search import build_tuner, finish, init_ray, journal_path, replay_rungs
    from .tracking import Tracker, connect

    exp = Experiment.find(experiment, storage)
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
    # the sweep's own settings, except where it now lives
    sweep.settings.storage, sweep.settings.name = exp.storage, exp.name
    if exp.local is None:  # the study goes on from the journal in the experiment's storage (search.journal_path)
        exp.pull_journal(journal_path(exp))
    if sweep.settings.mlflow:  # the same runs, continued; the tracking server must answer before Ray starts
        Tracker(exp, connect(sweep.settings.mlflow)).open(sweep)
    init_ray(address or sweep.settings.address, sweep.base.get("resume"))
    tuner, scheduler = build_tuner(sweep, restore=True, restart_errored=restart_errored)
    n = replay_rungs(scheduler, trials)
    log.info(f"resuming {exp}: {unfinished(sweep, trials)} of {sweep.total_trials} trials unfinished; "
             f"ASHA rungs rebuilt from {n} recorded results; resource policy {sweep.settings.resource_policy}")
    with driver_console(exp):
        tuner.fit()
        return finish(exp, sweep)


def check_roles(sweep: Sweep) -> None:
    """The images of every role are the ones sweep.json recorded (carving is deterministic, so they are unless
    the dataset changed); a resumed sweep must not select or judge on other images than it started with."""
    from .read import describe, load_roles

    b = sweep.base
    now = load_roles(describe(b["dataset_path"], b.get("format")), b.get("train_split"), b.get("val_split"),
                     b.get("test_split"), b.get("annotator", "mean"), b.get("skip_bad", False)).ids()
    for role, recorded in sweep.roles.items():
        ids = now.get(role, {}).get("image_ids", [])
        if sorted(ids) != sorted(recorded["image_ids"]):
            raise ValueError(f"{b['dataset_path']}: the {role} split {recorded['spec']!r} now holds {len(ids)} images, "
                             f"not the {len(recorded['image_ids'])} the sweep recorded: the dataset changed; start a "
                             "new sweep")


def _cmd(args: argparse.Namespace) -> int:
    return resume(args.experiment, args.storage, args.restart_errored, args.address)


def register_cli(sub: Any) -> None:
    s = sub.add_parser("resume", help="continue an interrupted sweep (trials, Optuna study, ASHA rungs)")
    s.add_argument("experiment", help="experiment path or URI, or a name under --storage")
    s.add_argument("--storage", default=DEFAULT_STORAGE)
    s.add_argument("--restart-errored", "--restart_errored", action="store_true", dest="restart_errored",
                   help="re-run failed trials from scratch (default: they resume from their last checkpoint)")
    s.add_argument("--address", help="Ray cluster address (default: the sweep's, else a local Ray)")
    s.set_defaults(func=_cmd)
