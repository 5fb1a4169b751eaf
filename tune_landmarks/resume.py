"""`tune-landmarks resume EXPERIMENT`: continue an interrupted sweep without losing work or
early-stopping decisions.

Ray restores the trials (each continues from its last checkpoint) and the searcher (the Optuna study
goes on; orphans of a hard kill are failed, see search.ControlArm). Ray does not restore ASHA's rungs:
they are rebuilt from the recorded results (search.replay_rungs) before anything runs.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .experiment import DEFAULT_STORAGE, SWEEP_FILE, TERMINAL, Experiment

log = logging.getLogger(__name__)


def resume(experiment: str, storage: str = DEFAULT_STORAGE, restart_errored: bool = False,
           address: str | None = None) -> int:
    from ray import tune

    from .results import collect, unfinished
    from .search import build_tuner, finish, init_ray, replay_rungs

    exp = Experiment.find(experiment, storage)
    sweep = exp.load_sweep()
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
    # the sweep's own settings, except where it now lives
    sweep.settings.storage, sweep.settings.name = exp.storage, exp.name
    init_ray(address or sweep.settings.address)
    tuner, scheduler = build_tuner(sweep, restore=True, restart_errored=restart_errored)
    n = replay_rungs(scheduler, trials)
    log.info(f"resuming {exp}: {unfinished(sweep, trials)} of {sweep.total_trials} trials unfinished; "
             f"ASHA rungs rebuilt from {n} recorded results")
    tuner.fit()
    return finish(exp, sweep)


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
