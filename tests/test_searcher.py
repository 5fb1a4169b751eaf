"""The sweep's searcher and scheduler without a Ray cluster: the control arm, orphan failing after a hard
kill, and ASHA rung replay, on real OptunaSearch/ASHAScheduler objects and a real Optuna journal."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

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
    return SweepSettings(**{"name": "s", "num_samples": 4, "epochs": 4, "seed": 0, "control_trials": 2,
                            "grace_period": 1, "reduction_factor": 2} | kw)


def _study(journal, name="s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def test_control_arm_first_then_optuna_and_controls_never_told(space, tmp_path):
    from tune_landmarks.search import CONTROL_KEY, control_configs, make_searcher

    controls = control_configs(space, 2)
    searcher = make_searcher(space, _settings(), tmp_path / "j.log", controls)
    first, second = searcher.suggest("c1"), searcher.suggest("c2")
    assert first[CONTROL_KEY] and second[CONTROL_KEY] and first["mode"] == second["mode"] == "all"
    assert {first["seed"], second["seed"]} == {0, 1}  # control repeats differ by seed
    assert not {"difficult_threshold", "difficult", "distill_weight"} & set(first)
    assert first["lr"] == pytest.approx(1e-4)  # the space's geometric centre
    sampled = [searcher.suggest(f"t{i}") for i in range(3)]
    assert all(CONTROL_KEY not in p and p["mode"] == "masked" for p in sampled)
    assert all(1e-5 <= p["lr"] <= 1e-3 and 0.5 <= p["difficult_threshold"] <= 3.0 for p in sampled)
    assert len({p["lr"] for p in sampled}) == 3
    for tid in ("c1", "c2", "t0", "t1"):
        searcher.on_trial_complete(tid, {"best_val_mre": 1.0, "training_iteration": 4})
    study = _study(tmp_path / "j.log")
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ["t0", "t1", "t2"]  # no control in the study
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]


def test_restore_fails_the_orphans_of_a_hard_kill(space, tmp_path):
    from tune_landmarks.search import make_searcher

    journal = tmp_path / "j.log"
    searcher = make_searcher(space, _settings(control_trials=0), journal, [])
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"best_val_mre": 2.0})
    searcher.suggest("b")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's last saved searcher state
    searcher.suggest("c")  # asked after it, then the driver is killed: RUNNING in the journal forever
    restored = make_searcher(space, _settings(control_trials=0), journal, [])
    restored.restore(str(tmp_path / "searcher.pkl"))
    by_id = {t.user_attrs["ray_trial_id"]: t for t in _study(journal).trials}
    assert by_id["c"].state == optuna.trial.TrialState.FAIL and by_id["c"].user_attrs["orphan"]
    assert by_id["b"].state == optuna.trial.TrialState.RUNNING and "orphan" not in by_id["b"].user_attrs
    assert by_id["a"].state == optuna.trial.TrialState.COMPLETE
    assert restored.fail_orphans() == 0  # idempotent


def _record(tid: str, values: list[float], t0: float, control: bool = False) -> TrialRecord:
    epochs = [{"epoch": i + 1, "training_iteration": i + 1, "timestamp": t0 + i, "val_mre": v}
              for i, v in enumerate(values)]
    return TrialRecord(tid, "TERMINATED", control, {}, "", epochs, "")


def test_rung_replay_from_recorded_events(space):
    from ray.tune.schedulers import TrialScheduler

    from tune_landmarks.search import make_scheduler, replay_rungs

    trials = [_record("a", [2.0, 1.5, 1.4, 1.3], 0), _record("b", [2.5, 2.4], 1), _record("c", [1.8, 1.7], 2),
              _record("ctl", [0.1, 0.1, 0.1, 0.1], 3, control=True)]
    fresh = make_scheduler(space, _settings())
    bracket = fresh._brackets[0]
    assert all(not r for _, r in bracket._rungs)  # what Ray gives a restored sweep
    assert replay_rungs(fresh, trials) == 8  # every searched epoch, none of the control's
    rungs = dict(bracket._rungs)
    assert rungs[1] == {"a": -2.0, "b": -2.5, "c": -1.8} and rungs[2] == {"a": -1.5, "b": -2.4, "c": -1.7}
    assert all("ctl" not in r for r in rungs.values())
    # a resumed trial below the first rung's cut-off stops; one above it continues; with empty rungs it would not
    assert bracket.on_result(SimpleNamespace(trial_id="late"), 1, -3.0) == TrialScheduler.STOP
    assert bracket.on_result(SimpleNamespace(trial_id="good"), 1, -1.0) == TrialScheduler.CONTINUE
    empty = make_scheduler(space, _settings())._brackets[0]
    assert empty.on_result(SimpleNamespace(trial_id="late"), 1, -3.0) == TrialScheduler.CONTINUE


def test_adapter_refuses_another_ray_version(monkeypatch):
    import ray

    from tune_landmarks import ray_adapter

    ray_adapter.check_versions.cache_clear()
    monkeypatch.setattr(ray, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"private attributes of ray 2\.60\.0, but this environment has ray 9\.9\.9"):
        ray_adapter.check_versions()
    ray_adapter.check_versions.cache_clear()
