"""`tune-landmarks resume EXPERIMENT`: continue an interrupted sweep without losing work or
early-stopping decisions.

Ray restores the trials (each continues from its last checkpoint) and the searcher (the Optuna study
goes on; orphans of a hard kill are failed, see search.ControlArm). Ray does not restore ASHA's rungs:
they are rebuilt from the recorded results (search.replay_rungs) before anything runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def resolve_experiment(experiment: str, storage: str = "./sweeps") -> str:
    """A path (or URI) to an experiment, or a name under --storage; a clear error if it is neither."""
    if "://" in experiment:
        return experiment
    for cand in (Path(experiment), Path(storage) / experiment):
        if cand.is_dir():
            return str(cand.resolve())
    raise FileNotFoundError(f"{experiment}: no such experiment (looked for the path and for {Path(storage) / experiment})")


def resume(experiment: str, storage: str = "./sweeps", restart_errored: bool = False, address: str | None = None) -> int:
    from ray import tune

    from .results import TERMINAL, collect, finish, load_sweep
    from .search import build_tuner, init_ray, replay_rungs

    exp = resolve_experiment(experiment, storage)
    sweep = load_sweep(exp)  # a foreign directory fails here, with its name
    if not tune.Tuner.can_restore(exp):
        raise FileNotFoundError(f"{exp}: has {Path('sweep.json')} but no Ray experiment state to restore "
                                "(was the sweep killed before its first trial started?)")
    trials = collect(exp)
    total = sweep.settings.num_samples + len(sweep.controls)
    errored = [t for t in trials if t.status == "ERROR"]
    if len(trials) >= total and all(t.status in TERMINAL for t in trials) and not (restart_errored and errored):
        print(f"{exp}: finished ({len(trials)} trials, {len(errored)} errored); nothing to resume.\n"
              f"export the best trial with: tune-landmarks export {exp} --out DIR")
        return 0
    # the sweep's own settings, except where this command says otherwise
    sweep.settings.storage = str(Path(exp).parent) if "://" not in exp else exp.rsplit("/", 1)[0]
    sweep.settings.name = Path(exp).name if "://" not in exp else exp.rsplit("/", 1)[1]
    init_ray(address or sweep.settings.address)
    tuner, scheduler = build_tuner(sweep, restore=True, restart_errored=restart_errored)
    n = replay_rungs(scheduler, trials)
    unfinished = total - sum(t.status in TERMINAL for t in trials)
    print(f"resuming {exp}: {unfinished} of {total} trials unfinished; ASHA rungs rebuilt from {n} recorded results")
    tuner.fit()
    return finish(exp, sweep)


def _cmd(args: argparse.Namespace) -> int:
    return resume(args.experiment, args.storage, args.restart_errored, args.address)


def register_cli(sub: Any) -> None:
    s = sub.add_parser("resume", help="continue an interrupted sweep (trials, Optuna study, ASHA rungs)")
    s.add_argument("experiment", help="experiment path, or a name under --storage")
    s.add_argument("--storage", default="./sweeps")
    s.add_argument("--restart-errored", "--restart_errored", action="store_true", dest="restart_errored",
                   help="re-run failed trials from scratch (default: they resume from their last checkpoint)")
    s.add_argument("--address", help="Ray cluster address (default: the sweep's, else a local Ray)")
    s.set_defaults(func=_cmd)
