"""`--resource-policy distribute`: the share each trial should hold (ShareIdleCPUs, on plain trial records), and a
real two-trial Ray sweep in which one trial ends early and the other runs on with the freed core."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import TINY_SPACE, run_sweep

from tune_landmarks.experiment import ARM_KEY, SweepSettings
from tune_landmarks.resources import PROCESS_START_SECONDS, ShareIdleCPUs

EPOCHS = 36  # the long trial's: ~20 s of work left after its first epoch, enough to pay for a ~8 s restart here


def _trial(tid: str, cpus: int = 1, arm: str = "all") -> SimpleNamespace:
    pgf = SimpleNamespace(required_resources={"CPU": cpus, "GPU": 0})
    return SimpleNamespace(trial_id=tid, placement_group_factory=pgf, config={ARM_KEY: arm})


def _policy(max_concurrent: int = 2, total: int = 4, gpus: float = 0.0) -> ShareIdleCPUs:
    return ShareIdleCPUs(1, gpus, max_concurrent, total, {"masked": 4, "all": 20}, ARM_KEY)


def test_the_share_counts_the_trials_still_to_start():
    p = _policy()
    a, b = _trial("a"), _trial("b")
    assert p.target(a, [a, b], 2, cpus=2, gpus=0) == 1  # two side by side on two cores
    assert p.target(a, [a], 3, cpus=2, gpus=0) == 1  # b ended, but a trial is still to start: its core stays free
    assert p.target(a, [a], 4, cpus=2, gpus=0) == 2  # the budget is spent: the tail takes both cores
    assert [p.target(t, [a, b], 4, cpus=5, gpus=0) for t in (a, b)] == [3, 2]  # the remainder to the earlier trial
    wide = _policy(max_concurrent=2, total=10)
    assert wide.target(a, [a, b], 2, cpus=16, gpus=0) == 8  # --max-concurrent 2 on 16 cores: 8 each all along
    shared_gpu = _policy(max_concurrent=4, total=10, gpus=0.5)
    assert shared_gpu.target(a, [a, b], 2, cpus=8, gpus=1) == 4  # half a GPU each: two fit, whatever the CPUs


def test_a_trial_grows_only_when_its_epochs_left_pay_for_the_restart():
    p = _policy()
    a = _trial("a")
    first = {"training_iteration": 1, "iterations_since_restore": 1, "time_this_iter_s": 9.0, "epoch_seconds": 6.0}
    assert p.decide(a, first, [a], 4, cpus=2, gpus=0) == 2  # 19 epochs x 6 s x 1/2 x 3/4 saved against ~6 s
    assert p.restart_seconds() == pytest.approx(PROCESS_START_SECONDS + 3.0)  # its own start, measured
    late = {"training_iteration": 18, "iterations_since_restore": 5, "time_this_iter_s": 6.0, "epoch_seconds": 6.0}
    assert p.decide(a, late, [a], 4, cpus=2, gpus=0) is None  # 2 epochs left: 4.5 s saved, not worth ~6 s
    grown = _trial("a", cpus=2)
    assert p.decide(grown, late, [grown, _trial("c")], 3, cpus=2, gpus=0) == 1  # a new trial: give the core back
    assert p.decide(grown, late, [grown], 4, cpus=2, gpus=0) is None  # already at its share


def test_a_restored_sweep_takes_back_the_trials_it_resized():
    """Ray restores a sweep's scheduler as pickled when it started and each trial with the share it had: the restored
    scheduler must take the sweep's base share as the base, and a trial with another share as one it resized
    (Ray's own would take the first restored trial's share as everyone's and refuse the rest)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from tune_landmarks.search import make_scheduler
    from tune_landmarks.space import space_from_dict

    settings = SweepSettings(name="s", num_samples=2, epochs=4, arms=["masked", "all"]).validate()
    sched = make_scheduler(space_from_dict({"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, "s.yaml"), settings)

    def restored(tid: str, cpus: int, arm: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, config={ARM_KEY: arm}, placement_group_factory=PlacementGroupFactory(
            [{"CPU": cpus, "GPU": 0.0}]))

    for t in (restored("grown", 2, "all"), restored("plain", 1, "masked")):  # the grown one first, as Ray may add it
        sched.on_trial_add(None, t)
    assert sched.base_trial_resources == PlacementGroupFactory([{"CPU": 1.0, "GPU": 0.0}])


@pytest.mark.slow
def test_a_trial_takes_the_core_a_finished_trial_leaves(synth_root, start_ckpt, tmp_path, caplog):
    """Two trials side by side on the two cores Ray has here: the masked one ends after 1 epoch, the other has
    epochs left and moves to both cores (a restart from its checkpoint) and records 2 threads from then on."""
    with caplog.at_level(logging.INFO, logger="tune_landmarks"):  # the driver's INFO lines into driver.log, as the CLI
        exp = run_sweep(tmp_path, TINY_SPACE, synth_root, start_ckpt, "share", ["masked", "all"], 0, num_samples=1,
                        arm_epochs={"masked": 1, "all": EPOCHS}, grace_period=1)
    epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
    short, long = (epochs[epochs.arm == arm].sort_values("epoch") for arm in ("masked", "all"))
    assert list(short.threads) == [1] and len(long) == EPOCHS
    assert long.threads.iloc[0] == 1 and long.threads.iloc[-1] == 2, list(long.threads)
    assert list(long.threads) == sorted(long.threads)  # it grew once and never went back
    assert list(long.epoch) == list(range(1, EPOCHS + 1))  # each epoch once: the restart continued from its checkpoint
    assert (long.cpu_seconds > 0).all() and (long.checkpoint_seconds > 0).all()
    grown = [ln for ln in (exp / "driver.log").read_text().splitlines() if "CPUs for its last" in ln]
    assert len(grown) == 1 and "1 -> 2 CPUs for its last" in grown[0], grown
