"""The sweep's searcher and scheduler without a Ray cluster: arms searched alike, orphan failing after a hard
kill, and ASHA rung replay, on real OptunaSearch/ASHAScheduler objects and a real Optuna journal."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from conftest import journal_study

from tune_landmarks.experiment import SweepSettings
from tune_landmarks.results import TrialRecord
from tune_landmarks.space import space_from_dict

SPACE = {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
         "warmup_epochs": {"type": "int", "low": 0, "high": 1},
         "difficult_threshold": {"type": "uniform", "low": 0.5, "high": 3.0},
         "mode": {"type": "fixed", "value": "masked"}}


@pytest.fixture
def space():
    return space_from_dict(SPACE, "space.yaml")


def _settings(**kw) -> SweepSettings:
    """Settings whose scheduler is the per-arm ASHA itself (`fixed`; `distribute` wraps it, see test_resources.py)."""
    return SweepSettings(**{"name": "s", "num_samples": 3, "epochs": 4, "seed": 0, "arms": ["masked", "all"],
                            "grace_period": 1, "reduction_factor": 2, "resource_policy": "fixed"} | kw)


def test_arms_take_turns_each_with_its_own_study_and_space(space, tmp_path):
    from tune_landmarks.search import ARM_KEY, make_searcher

    searcher = make_searcher(space, _settings(arm_samples={"all": 2}), tmp_path / "j.log")
    given = [searcher.suggest(f"t{i}") for i in range(5)]
    assert [p[ARM_KEY] for p in given] == ["masked", "all", "masked", "all", "masked"]  # in turn, to each budget
    assert searcher.suggest("t5") == "FINISHED"
    for p in given:
        assert p["mode"] == p[ARM_KEY] and 1e-5 <= p["lr"] <= 1e-3 and 0 <= p["warmup_epochs"] <= 1
    masked = [p for p in given if p[ARM_KEY] == "masked"]
    plain = [p for p in given if p[ARM_KEY] == "all"]
    assert all(0.5 <= p["difficult_threshold"] <= 3.0 for p in masked)
    assert not any("difficult_threshold" in p for p in plain)  # what the arm cannot use is not searched for it
    assert len({p["lr"] for p in masked}) == 3 and len({p["lr"] for p in plain}) == 2
    for i in range(5):
        searcher.on_trial_complete(f"t{i}", {"best_val_mre": 1.0 + i, "training_iteration": 4})
    for arm, ids in (("masked", ["t0", "t2", "t4"]), ("all", ["t1", "t3"])):
        study = journal_study(tmp_path / "j.log", f"s.{arm}")
        assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ids
        assert [t.value for t in study.trials] == [1.0 + int(i[1]) for i in ids]  # each told only its own


def test_an_arm_that_cannot_be_searched_is_refused(space):
    from tune_landmarks.space import SpaceError

    searched_mode = space_from_dict(SPACE | {"mode": {"type": "categorical", "choices": ["masked", "weighted"]}}, "s.yaml")
    with pytest.raises(SpaceError, match=r"s.yaml: `mode` is searched, but --arms chooses it"):
        searched_mode.for_arm("masked")
    with pytest.raises(SpaceError, match=r"arm 'half' is not one of masked, weighted, all, refine"):
        space.for_arm("half")
    with pytest.raises(ValueError, match=r"The value of `arms` is \['masked', 'half'\], but must be distinct names"):
        _settings(arms=["masked", "half"]).validate()
    with pytest.raises(ValueError, match=r"The value of `arm_samples` is \{'weighted': 2\}"):
        _settings(arm_samples={"weighted": 2}).validate()


def test_restore_fails_the_orphans_of_a_hard_kill(space, tmp_path):
    from tune_landmarks.search import make_searcher

    journal = tmp_path / "j.log"
    searcher = make_searcher(space, _settings(arms=["masked"]), journal)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"best_val_mre": 2.0})
    searcher.suggest("b")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's last saved searcher state
    searcher.suggest("c")  # asked after it, then the driver is killed: RUNNING in the journal forever
    restored = make_searcher(space, _settings(arms=["masked"]), journal)
    restored.restore(str(tmp_path / "searcher.pkl"))
    by_id = {t.user_attrs["ray_trial_id"]: t for t in journal_study(journal, "s.masked").trials}
    assert by_id["c"].state == optuna.trial.TrialState.FAIL and by_id["c"].user_attrs["orphan"]
    assert by_id["b"].state == optuna.trial.TrialState.RUNNING and "orphan" not in by_id["b"].user_attrs
    assert by_id["a"].state == optuna.trial.TrialState.COMPLETE
    assert restored.fail_orphans() == 0  # idempotent


def _record(tid: str, values: list[float], t0: float, arm: str = "masked") -> TrialRecord:
    epochs = [{"epoch": i + 1, "training_iteration": i + 1, "timestamp": t0 + i, "val_mre": v}
              for i, v in enumerate(values)]
    return TrialRecord(tid, "TERMINATED", arm, {}, "", epochs, "")


def test_rung_replay_from_recorded_events(space):
    from ray.tune.schedulers import TrialScheduler

    from tune_landmarks.search import make_scheduler, replay_rungs

    trials = [_record("a", [2.0, 1.5, 1.4, 1.3], 0), _record("b", [2.5, 2.4], 1), _record("c", [1.8, 1.7], 2),
              _record("d", [2.2, 2.0], 3, arm="all")]
    fresh = make_scheduler(space, _settings())
    bracket, other = fresh.by_arm["masked"]._brackets[0], fresh.by_arm["all"]._brackets[0]
    assert all(not r for _, r in bracket._rungs)  # what Ray gives a restored sweep
    assert replay_rungs(fresh, trials) == 10  # every recorded epoch, each into its own arm's rungs
    rungs = dict(bracket._rungs)
    assert rungs[1] == {"a": -2.0, "b": -2.5, "c": -1.8} and dict(other._rungs)[1] == {"d": -2.2}
    assert rungs[2] == {"a": -1.5, "b": -2.4, "c": -1.7} and dict(other._rungs)[2] == {"d": -2.0}
    # a resumed trial below the first rung's cut-off stops; one above it continues; with empty rungs it would not
    assert bracket.on_result(SimpleNamespace(trial_id="late"), 1, -3.0) == TrialScheduler.STOP
    assert bracket.on_result(SimpleNamespace(trial_id="good"), 1, -1.0) == TrialScheduler.CONTINUE
    empty = make_scheduler(space, _settings()).by_arm["masked"]._brackets[0]
    assert empty.on_result(SimpleNamespace(trial_id="late"), 1, -3.0) == TrialScheduler.CONTINUE


def test_each_arm_is_cut_by_its_own_rungs_only():
    """A much better arm (the refinement stage, say) must not stop the other arm's trials at the first rung."""
    from ray.tune.schedulers import TrialScheduler

    from tune_landmarks.experiment import METRIC
    from tune_landmarks.search import ARM_KEY, make_scheduler

    space = space_from_dict(SPACE, "space.yaml")
    sched = make_scheduler(space, _settings(arms=["masked", "refine"]))

    def trial(tid: str, arm: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, config={ARM_KEY: arm})

    results = [("r1", "refine", 1.0), ("r2", "refine", 1.1), ("m1", "masked", 2.0), ("m2", "masked", 2.1),
               ("m3", "masked", 1.9)]
    decisions = {}
    for tid, arm, mre in results:
        sched.on_trial_add(None, trial(tid, arm))
        decisions[tid] = sched.on_trial_result(None, trial(tid, arm), {"training_iteration": 1, METRIC: mre})
    assert decisions["m3"] == TrialScheduler.CONTINUE  # the best masked trial goes on, though refine is far ahead
    assert decisions["m2"] == TrialScheduler.STOP and decisions["r2"] == TrialScheduler.STOP  # each arm's own cut


def test_adapter_refuses_another_ray_version(monkeypatch):
    import ray

    from tune_landmarks import ray_adapter

    ray_adapter.check_versions.cache_clear()
    monkeypatch.setattr(ray, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"private attributes of ray 2\.60\.0, but this environment has ray 9\.9\.9"):
        ray_adapter.check_versions()
    ray_adapter.check_versions.cache_clear()


def test_the_refine_arm_searches_its_own_section_and_only_it_the_crop_options(tmp_path):
    from tune_landmarks.search import ARM_KEY, make_searcher

    space = space_from_dict(SPACE | {"refine_offset_scale": {"type": "uniform", "low": 1.0, "high": 2.0},
                                     "arms": {"refine": {"lr": {"type": "loguniform", "low": 1e-3, "high": 5e-3}}}},
                            "space.yaml")
    searcher = make_searcher(space, _settings(arms=["masked", "refine"], num_samples=2), tmp_path / "j.log")
    given = [searcher.suggest(f"t{i}") for i in range(4)]
    refine = [p for p in given if p[ARM_KEY] == "refine"]
    masked = [p for p in given if p[ARM_KEY] == "masked"]
    assert len(refine) == len(masked) == 2
    assert all(1e-3 <= p["lr"] <= 5e-3 and 1.0 <= p["refine_offset_scale"] <= 2.0 for p in refine)
    assert all(1e-5 <= p["lr"] <= 1e-3 and "refine_offset_scale" not in p for p in masked)


def test_arm_epochs_set_each_arms_trials_and_rungs(space):
    from tune_landmarks.config import TrainConfig
    from tune_landmarks.experiment import Sweep
    from tune_landmarks.search import make_scheduler

    settings = _settings(arms=["masked", "refine"], arm_epochs={"refine": 16}).validate()
    sched = make_scheduler(space, settings)
    assert sched.by_arm["masked"]._max_t == 4 and sched.by_arm["refine"]._max_t == 16
    assert [m for m, _ in sched.by_arm["refine"]._brackets[0]._rungs] == [16, 8, 4, 2, 1]
    sweep = Sweep(settings, TrainConfig(epochs=4, resume="start.pt"), "s.yaml", SPACE, {}, [])
    assert sweep.trial_config({"mode": "refine", "arm": "refine"}, "t").epochs == 16
    assert sweep.trial_config({"mode": "masked", "arm": "masked"}, "t").epochs == 4
    with pytest.raises(ValueError, match=r"The value of `arm_epochs` is \{'all': 8\}, but must be epochs >= 1 for arms"):
        _settings(arms=["masked"], arm_epochs={"all": 8}).validate()
    with pytest.raises(ValueError, match=r"The value of `arm_epochs` is \{'masked': 0\}"):
        _settings(arm_epochs={"masked": 0}).validate()


def test_the_searcher_limits_concurrency_itself_and_a_restored_one_is_not_stuck(space, tmp_path):
    """Ray's ConcurrencyLimiter saves its live trials; restored from a state older than the trial list, it waits for
    ever on a trial that already finished. ArmSearch takes the limit itself and never saves its live set."""
    from ray.tune.search import ConcurrencyLimiter

    from tune_landmarks.search import make_searcher

    searcher = make_searcher(space, _settings(), tmp_path / "j.log")
    limiter = ConcurrencyLimiter(searcher, max_concurrent=2)  # what tune.run wraps it in for --max-concurrent 2
    assert all(isinstance(limiter.suggest(t), dict) for t in ("t0", "t1"))
    assert limiter.suggest("t2") is None  # two at a time
    assert not limiter.live_trials  # the limit is the searcher's: the limiter keeps (and saves) no live set
    searcher.on_trial_complete("t0", {"best_val_mre": 1.0, "training_iteration": 4})
    assert isinstance(limiter.suggest("t2"), dict)
    searcher.save(str(tmp_path / "state.pkl"))  # t1 and t2 live when the state was saved
    restored = make_searcher(space, _settings(), tmp_path / "j.log")
    restored.set_max_concurrency(2)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.live == set()  # not waiting on t1/t2, which may have finished since
    assert isinstance(restored.suggest("t3"), dict)


def test_a_trial_the_study_finished_after_rays_last_snapshot_is_not_told_again(space, tmp_path):
    """The journal is written at once, Ray's state at its snapshots: a driver killed in between restores a trial
    the study has finished as unfinished, Ray runs it on, and its next result must not crash the resumed sweep
    (optuna's UpdateFinishedTrialError, seen in test_resume's SIGKILL test). The study keeps its first value."""
    from tune_landmarks.search import make_searcher

    journal = tmp_path / "j.log"
    searcher = make_searcher(space, _settings(arms=["masked"]), journal)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_result("a", {"best_val_mre": 3.0, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's last snapshot: a and b running
    searcher.on_trial_complete("a", {"best_val_mre": 2.5, "training_iteration": 1})  # ASHA stopped a; then the kill
    restored = make_searcher(space, _settings(arms=["masked"]), journal)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.open_in_study("a") is None and restored.open_in_study("b") is not None
    restored.on_trial_result("a", {"best_val_mre": 2.0, "training_iteration": 2})  # a runs on from its checkpoint
    restored.on_trial_complete("a", {"best_val_mre": 1.5, "training_iteration": 3})
    restored.on_trial_result("b", {"best_val_mre": 2.2, "training_iteration": 1})
    restored.on_trial_complete("b", {"best_val_mre": 2.2, "training_iteration": 1})
    by_id = {t.user_attrs["ray_trial_id"]: t for t in journal_study(journal, "s.masked").trials}
    assert by_id["a"].value == 2.5 and by_id["a"].intermediate_values == {1: 3.0}
    assert by_id["b"].value == 2.2 and by_id["b"].state == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_a_sweep_name_that_is_not_one_folder_is_refused(name):
    """The name is a folder of the storage (and Ray's experiment name): '..' would put the sweep beside it."""
    with pytest.raises(ValueError, match=rf"The value of `name` is {name!r}, but must be a non-empty name without '/'"):
        _settings(name=name).validate()


def test_a_restored_searcher_works_on_the_journal_where_the_experiment_now_is(space, tmp_path):
    """Ray's saved searcher state holds the Optuna study on the journal path of the first run; after the experiment
    moved, the restored searcher asks, is told and marks orphans in the moved journal, and the old path stays gone."""
    from tune_landmarks.search import make_searcher

    old, new = tmp_path / "a" / "j.log", tmp_path / "b" / "j.log"
    old.parent.mkdir()
    searcher = make_searcher(space, _settings(arms=["masked"]), old)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"best_val_mre": 2.0})
    searcher.suggest("b")
    searcher.save(str(tmp_path / "searcher.pkl"))
    new.parent.mkdir()
    old.rename(new)
    old.parent.rmdir()
    restored = make_searcher(space, _settings(arms=["masked"]), new)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("b", {"best_val_mre": 1.8, "training_iteration": 1})
    restored.on_trial_complete("b", {"best_val_mre": 1.5, "training_iteration": 1})
    assert isinstance(restored.suggest("c"), dict)
    by_id = {t.user_attrs["ray_trial_id"]: t for t in journal_study(new, "s.masked").trials}
    assert by_id["a"].value == 2.0 and by_id["b"].value == 1.5 and by_id["b"].intermediate_values == {1: 1.8}
    assert by_id["c"].state == optuna.trial.TrialState.RUNNING and not old.parent.exists()


def test_an_arms_own_grace_period_sets_its_first_rung_only():
    """`--arm-grace-period refine=4`: the refine arm's trials are first compared at epoch 4, the other arm's at the
    sweep's first rung; bad values are one message before anything runs."""
    from tune_landmarks.search import make_scheduler

    space = space_from_dict(SPACE, "space.yaml")
    sched = make_scheduler(space, _settings(arms=["masked", "refine"], epochs=8, arm_grace_period={"refine": 4}))
    assert [m for m, _ in sched.by_arm["refine"]._brackets[0]._rungs][-1] == 4
    assert [m for m, _ in sched.by_arm["masked"]._brackets[0]._rungs][-1] == 1
    with pytest.raises(ValueError, match=r"`arm_grace_period` is \{'all': 2\}, but must be epochs >= 1 for arms of"):
        _settings(arms=["masked", "refine"], arm_grace_period={"all": 2}).validate()
