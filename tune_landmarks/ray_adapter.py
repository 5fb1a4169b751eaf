"""The few private attributes of Ray Tune and Optuna this tool still needs, in one place.

Ray saves neither ASHA's rungs nor a way to reach a restored Tuner's scheduler and callbacks, restores a
ResourceChangingScheduler that refuses the trials it resized, and has no public way to keep a local Ray on 127.0.0.1
once it is imported; OptunaSearch exposes neither the Optuna trial behind a Ray trial nor its study, and restores
them on the storage path they were saved with; Optuna has no public call that marks a trial that is not the caller's.
Everything here was written against the versions below, and refuses to run on others with a message that says so,
instead of failing somewhere deep inside a sweep.
"""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.schedulers import ResourceChangingScheduler

WRITTEN_FOR = {"ray": "2.60.0", "optuna": "5.0.0"}


@cache
def check_versions() -> None:
    """Raise a clear error when the installed Ray or Optuna is not the release this adapter was written for."""
    import optuna
    import ray

    found = {"ray": ray.__version__, "optuna": optuna.__version__}
    wrong = {k: v for k, v in found.items() if v != WRITTEN_FOR[k]}
    if wrong:
        raise RuntimeError("tune_landmarks/ray_adapter.py reaches into private attributes of "
                           + ", ".join(f"{k} {WRITTEN_FOR[k]}" for k in wrong) + ", but this environment has "
                           + ", ".join(f"{k} {v}" for k, v in wrong.items())
                           + "; install the pinned versions (pyproject.toml) or update the adapter")


def local_ray_on_loopback() -> None:
    """Make the local Ray this process starts next listen on 127.0.0.1 alone. The listeners of a Ray node (GCS,
    raylet, the driver's and each worker's gRPC server, the runtime-env agent; without the dashboard its agent opens
    none) follow the node's address: 127.0.0.1 keeps them there, the host's address puts most on every interface. Ray
    takes the host's unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER was 0 when `ray` was first imported
    (ray_constants.ENABLE_RAY_CLUSTER), and `ray.init(_node_ip_address="127.0.0.1")` does not help: Ray swaps a
    loopback address given there for the host's. So the constant is set for this process, whenever Ray was imported,
    and the variable for the processes Ray starts (the runtime-env agent asks for the node's address itself)."""
    import ray._private.ray_constants as ray_constants

    check_versions()
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def optuna_trial(searcher: Any, trial_id: str) -> Any:
    """The optuna.Trial an OptunaSearch asked for Ray trial `trial_id` (kept after it is told its result)."""
    check_versions()
    return searcher._ot_trials[trial_id]


def optuna_numbers(searcher: Any) -> set[int]:
    """Numbers of the Optuna trials an OptunaSearch (as saved or restored) knows of."""
    check_versions()
    return {t.number for t in searcher._ot_trials.values()}


def optuna_study(searcher: Any) -> Any:
    check_versions()
    return searcher._ot_study


def restore_optuna(searcher: Any, checkpoint_path: str, journal: Path) -> None:
    """OptunaSearch.restore, kept on the storage the searcher was built with: the saved state holds its study, and
    the study's Optuna trials, on the journal at the path of the first run, which is gone when the experiment has
    moved since. The study and those trials are reattached to the same study in the current storage (the sampler,
    with its random state, stays the saved one)."""
    import optuna

    check_versions()
    storage = searcher._storage
    searcher.restore(checkpoint_path)
    saved = searcher._ot_study
    study = optuna.load_study(study_name=saved.study_name, storage=storage, sampler=saved.sampler, pruner=saved.pruner)
    searcher._storage, searcher._ot_study = storage, study
    try:
        searcher._ot_trials = {tid: optuna.trial.Trial(study, t._trial_id) for tid, t in searcher._ot_trials.items()}
    except KeyError as exc:  # the journal lacks a trial the saved searcher asked for: not this experiment's journal
        raise ValueError(f"{journal}: older than Ray's saved searcher state for study {saved.study_name!r} "
                         f"({exc.args[0] if exc.args else exc}); was the experiment copied with a stale journal?") from None


def set_trial_user_attr(study: Any, frozen: Any, key: str, value: Any) -> None:
    """A user attribute on a trial this process did not ask for (Optuna's public calls only reach the trials
    a process holds as optuna.Trial objects)."""
    check_versions()
    study._storage.set_trial_user_attr(frozen._trial_id, key, value)


def asha_record(scheduler: Any, trial_id: str, iteration: int, value: float) -> str:
    """Feed one result into the (single) bracket of an ASHAScheduler, as on_trial_result would, without
    needing a live Trial; returns the bracket's decision."""
    check_versions()
    bracket = scheduler._brackets[0]
    return bracket.on_result(SimpleNamespace(trial_id=trial_id), int(iteration), scheduler._metric_op * float(value))


class RestorableResourceChanging(ResourceChangingScheduler):
    """Ray's ResourceChangingScheduler, restorable by a resumed sweep. Ray keeps the scheduler only as pickled when
    the sweep started (tuner.pkl), while each trial's resized share is saved with the trial: the restored scheduler
    would take the first restored trial's share as every trial's base and refuse the others ("doesn't support trials
    with varying base resources"). Here the base is the sweep's own (`base_resources`: --cpus-per-trial,
    --gpus-per-trial), and a trial added with another share is one it resized."""

    def __init__(self, base_scheduler: Any, policy: Any, base_resources: dict[str, float]):
        check_versions()
        super().__init__(base_scheduler, policy)
        self._base_trial_resources = PlacementGroupFactory([base_resources])

    def on_trial_add(self, tune_controller: Any, trial: Any, **kwargs: Any) -> Any:
        if trial.placement_group_factory != self._base_trial_resources:
            self._reallocated_trial_ids.add(trial.trial_id)
        return super().on_trial_add(tune_controller, trial, **kwargs)

    def choose_trial_to_run(self, tune_controller: Any, **kwargs: Any) -> Any:
        """Before a paused trial restarts at its new size, the experiment's storage is brought up to date: the
        restarting trial's loggers copy its result.json back from the storage over the driver's own copy, and a
        copy older than the results since Ray's last snapshot loses them (seen on ISBI: the trial's first epoch
        was missing from result.json and from every table)."""
        if any(t.status != t.RUNNING for t in self._trials_to_reallocate):
            tune_controller.checkpoint(force=True, wait=True)
        return super().choose_trial_to_run(tune_controller, **kwargs)


def base_scheduler(scheduler: Any) -> Any:
    """The scheduler inside a ResourceChangingScheduler (`--resource-policy distribute`), else `scheduler` itself:
    Ray gives the wrapped one no public name."""
    check_versions()
    return scheduler._base_scheduler if isinstance(scheduler, ResourceChangingScheduler) else scheduler


def saved_trials_created(exp: Any) -> int | None:
    """How many trials Ray's saved trial generator had created (its newest search_gen_state file in the experiment
    `exp`), or None when there is none. Ray saves it apart from its trial list, so the two can be of different
    snapshots after a crash in the middle of an upload."""
    import pickle

    check_versions()
    saved = sorted(n for n in exp.listdir() if n.startswith("search_gen_state-"))
    return int(pickle.loads(exp.read_bytes(saved[-1]))["counter"]) if saved else None


def restored_configs(tuner: Any) -> tuple[Any, Any]:
    """The TuneConfig and RunConfig a restored Tuner will use: unpickled with the experiment, so their searcher,
    scheduler and callbacks are the objects of the first run, built for where the experiment was then."""
    check_versions()
    return tuner._local_tuner._tune_config, tuner._local_tuner._run_config
