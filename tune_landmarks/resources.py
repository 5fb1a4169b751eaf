"""How the trials of a sweep share the machine (`search --resource-policy`).

`fixed`: every trial holds `--cpus-per-trial` from start to end, so at the tail of a sweep, when no trial is left
to start, the cores of the finished ones stay idle while the last trials run on their share.

`distribute`: Ray Tune's ResourceChangingScheduler around the per-arm ASHA, with `ShareIdleCPUs` deciding. A trial
Ray resizes pauses after its report and continues from that checkpoint in a process of the new size; the trial
reads its share at each epoch boundary (`trial_threads`) and sets its torch threads. Ray's own
DistributeResources hands out whatever is free at the moment a result arrives: mid-sweep, between a trial's end
and its successor's start, that grows a trial only to shrink it at its next report (two restarts, each a process
start and a data load), and a grown trial waiting for its larger share can keep a new trial's core idle. So the
share here counts the trials still to come: it is the cluster's CPUs over the trials that will run side by side
(`--max-concurrent`, the trials left in the budget, what fits), and a trial grows only when the epochs it has left
would save more than a restart costs (a process start plus the trials' own measured start; the saving assumes
three quarters of a linear speed-up). GPUs are not redistributed: a trial trains on one device, and a larger
share of it would only keep the next trial off it.
"""
from __future__ import annotations

import logging
import math
import statistics
from typing import Any

log = logging.getLogger(__name__)
# A new trial process before the trial's own code runs: 2.8 s here (tests/test_resources.py's sweep: 8.0 s from the
# last result before a resize to the first after it, of which 5.2 s the restarted trial's own first iteration).
PROCESS_START_SECONDS = 3.0
SCALING = 0.75  # the share of a linear speed-up assumed for more threads (conv nets on CPU: 1.5 x, not 2 x, on 2)


class ShareIdleCPUs:
    """ResourceChangingScheduler's `resources_allocation_function` for `--resource-policy distribute` (module
    docstring). `epochs`: each arm's epochs per trial; `total_trials`: the sweep's whole budget."""

    def __init__(self, cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int, total_trials: int,
                 epochs: dict[str, int], arm_key: str):
        self.base_cpus, self.gpus = max(1, int(cpus_per_trial)), gpus_per_trial
        self.max_concurrent, self.total_trials = max_concurrent, total_trials
        self.epochs, self.arm_key = epochs, arm_key
        self.startup: dict[str, float] = {}  # trial id -> seconds its (re)start took before its first epoch

    def restart_seconds(self) -> float:
        """What a resize costs the trial: a process start, then what the trials' own (re)starts took before their
        first epoch (reading the data, building the model, loading the checkpoint)."""
        return PROCESS_START_SECONDS + (statistics.median(self.startup.values()) if self.startup else 0.0)

    def target(self, trial: Any, live: list[Any], created: int, cpus: float, gpus: float) -> int:
        """The CPUs `trial` should hold: an even share of the cluster's CPUs among the trials that will run side by
        side now that `created` of the budget's trials exist (the earliest-created trials get a remainder)."""
        fits = math.floor(cpus / self.base_cpus)
        if self.gpus > 0:
            fits = min(fits, math.floor(gpus / self.gpus + 1e-9))
        side_by_side = max(1, min(self.max_concurrent, fits, len(live) + max(0, self.total_trials - created)))
        ranked = [t.trial_id for t in live][:side_by_side]
        if trial.trial_id not in ranked:
            return self.base_cpus
        spare = max(0, math.floor(cpus) - side_by_side * self.base_cpus)
        return self.base_cpus + spare // side_by_side + (1 if ranked.index(trial.trial_id) < spare % side_by_side else 0)

    def decide(self, trial: Any, result: dict[str, Any], live: list[Any], created: int, cpus: float,
               gpus: float) -> int | None:
        """The CPUs `trial` should move to after `result`, or None to keep what it has."""
        it = int(result.get("training_iteration") or 0)
        if result.get("iterations_since_restore") == 1:  # a process start, the data and the model, then one epoch
            self.startup[trial.trial_id] = max(0.0, float(result.get("time_this_iter_s") or 0.0)
                                               - float(result.get("epoch_seconds") or 0.0))
        have = int(trial.placement_group_factory.required_resources.get("CPU", self.base_cpus))
        want = self.target(trial, live, created, cpus, gpus)
        if want == have:
            return None
        if want < have:
            log.info(f"trial {trial.trial_id}: {have} -> {want} CPUs (trials still to start need them)")
            return want
        left = self.epochs.get(trial.config.get(self.arm_key), 0) - it
        per_epoch = result.get("time_this_iter_s" if result.get("iterations_since_restore", 0) > 1 else "epoch_seconds")
        saved, cost = left * float(per_epoch or 0.0) * (1 - have / want) * SCALING, self.restart_seconds()
        if saved <= cost:  # a restart is worth it only when its epochs left save more
            return None
        log.info(f"trial {trial.trial_id}: {have} -> {want} CPUs for its last {left} epochs (a restart costs ~{cost:.0f} s)")
        return want

    def __call__(self, tune_controller: Any, trial: Any, result: dict[str, Any], scheduler: Any) -> Any:
        import ray
        from ray.tune.execution.placement_groups import PlacementGroupFactory

        total = ray.cluster_resources()
        trials, live = tune_controller.get_trials(), set(tune_controller.get_live_trials())
        want = self.decide(trial, result, [t for t in trials if t in live], len(trials),  # live, in creation order
                           total.get("CPU", 0.0), total.get("GPU", 0.0))
        return None if want is None else PlacementGroupFactory([{"CPU": want, "GPU": self.gpus}])


def make(base_scheduler: Any, cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int, total_trials: int,
         epochs: dict[str, int], arm_key: str) -> Any:
    """`base_scheduler` (the per-arm ASHA) inside Ray's ResourceChangingScheduler with ShareIdleCPUs."""
    from .ray_adapter import RestorableResourceChanging

    policy = ShareIdleCPUs(cpus_per_trial, gpus_per_trial, max_concurrent, total_trials, epochs, arm_key)
    return RestorableResourceChanging(base_scheduler, policy, {"CPU": cpus_per_trial, "GPU": gpus_per_trial})


def trial_threads() -> int:
    """The torch threads a trial should use: the CPUs Ray gives it now (at least 1)."""
    from ray import tune

    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    return max(1, int(cpus))
