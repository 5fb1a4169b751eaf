"""Interrupting and resuming sweeps with real processes and real signals (SIGINT, SIGKILL), and the
ASHA rung replay that Ray does not do itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import cli, epochs_reported, journal_study

SPACE = """
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
awing_omega: {type: uniform, low: 8.0, high: 20.0}
difficult_threshold: {type: uniform, low: 0.05, high: 20.0}
mode: {type: fixed, value: masked}
"""
SAMPLES, EPOCHS = 3, 3  # trials per arm (masked and all)


def _launch(synth_root, start_ckpt, tmp_path, name) -> subprocess.Popen:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(space), "--dataset_path", str(synth_root),
           "--resume", str(start_ckpt), "--name", name, "--storage", str(tmp_path / "store"), "--num-samples",
           str(SAMPLES), "--max-concurrent", "1", "--epochs", str(EPOCHS), "--grace-period", "1", "--batch_size", "4",
           "--resource-policy", "fixed"]  # not the default: resume must keep what the sweep recorded
    with open(tmp_path / "search.log", "w") as log:  # a file, not a pipe nobody reads while the sweep runs
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def saved_epochs(exp: Path) -> dict[str, int]:
    """Trial id -> epochs reported, as Ray's newest saved experiment state in the experiment has them: what a resume
    restores (every epoch reports a checkpoint, so a trial with an epoch there continues from a checkpoint). Empty
    while no state is saved or the file is being written."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (ValueError, KeyError, OSError):
        return {}
    return {json.loads(t[0])["trial_id"]: int((json.loads(t[1]).get("last_result") or {}).get("training_iteration") or 0)
            for t in trials}


def _finished_in_journal(exp: Path) -> set[str]:
    """Ray trial ids of the trials the sweep's Optuna studies have finished (told a value or failed)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(exp / "optuna_journal.log")))
    return {t.user_attrs.get("ray_trial_id") for name in optuna.get_all_study_names(storage)
            for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.is_finished()}


def _stop_when_saved(proc: subprocess.Popen, exp: Path, n: int, timeout: float = 400) -> set[str]:
    """Freeze the driver (SIGSTOP) at a moment when Ray's saved state knows a checkpoint of `n` trials (not merely
    when the checkpoints are written: the state naming them is saved later, TUNE_GLOBAL_CHECKPOINT_S) and every
    trial the Optuna journal has finished (the journal is written at once: a trial asked and finished after the
    last save would be in the study but never in Ray's list). Returns the trials with a saved checkpoint; the
    caller interrupts or kills the frozen driver (SIGCONT lets it go on)."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            assert proc.poll() is None, f"search ended early:\n{(exp.parent.parent / 'search.log').read_text()[-3000:]}"
            os.kill(proc.pid, signal.SIGSTOP)
            saved = saved_epochs(exp)
            known = {t for t, epochs in saved.items() if epochs >= 1}
            if len(known) >= n and (exp / "optuna_journal.log").is_file() and _finished_in_journal(exp) <= set(saved):
                return {f"trial_{t}" for t in known}
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.5)
        raise AssertionError("Ray's saved state knew no checkpoints in time")
    except BaseException:  # leave no frozen or orphaned sweep behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def _check_complete(exp: Path, name: str, had_checkpoint: set[str]) -> None:
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    assert len(trials) == 2 * SAMPLES  # both arms' trials
    assert set(trials.status) <= {"TERMINATED", "ERROR"} and (trials.status == "TERMINATED").all()
    for d in had_checkpoint:  # a trial that had a checkpoint continued from it: epoch 1 was not redone
        reported = epochs_reported((exp / d / "result.json").read_text())
        assert reported.count(1) == 1, (d, reported)
    studies = [journal_study(exp / "optuna_journal.log", f"{name}.{arm}") for arm in ("masked", "all")]
    live = [t for study in studies for t in study.trials if not t.user_attrs.get("orphan")]
    ids = [t.user_attrs["ray_trial_id"] for t in live]
    assert sorted(ids) == sorted(trials.trial_id)  # each Ray trial once
    assert all(t.state != optuna.trial.TrialState.RUNNING for study in studies for t in study.trials)
    sweep = json.loads((exp / "sweep.json").read_text())
    verdict = json.loads((exp / "verdict.json").read_text())  # judged on the images recorded at the start
    assert verdict["image_ids"] == sweep["roles"]["test"]["image_ids"] and verdict["split"] == "test"
    epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
    assert set(epochs.trial_id) == set(trials[trials.epochs_done > 0].trial_id)
    from tune_landmarks.experiment import Experiment
    from tune_landmarks.storage import sweep_scratch

    assert not sweep_scratch(Experiment(str(exp)).uri).exists()  # the killed driver's trials' too, known to Ray or not


@pytest.mark.slow
def test_sigint_exits_130_with_the_resume_command_then_resume_finishes(synth_root, start_ckpt, tmp_path):
    exp = tmp_path / "store" / "int"
    proc = _launch(synth_root, start_ckpt, tmp_path, "int")
    had = _stop_when_saved(proc, exp, 2)
    os.kill(proc.pid, signal.SIGINT)  # delivered when it goes on
    os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=180)
    out = (tmp_path / "search.log").read_text()
    assert proc.returncode == 130, out[-3000:]
    assert f"trials unfinished — resume with: tune-landmarks resume {exp}" in out
    before = pq.read_table(exp / "trials.parquet").to_pandas()
    stopped = before[before.stopped_early]
    moved = tmp_path / "elsewhere" / "int"  # Ray would create the trials still to start where the sweep was first run
    moved.parent.mkdir()
    exp.rename(moved)
    listing = sorted(p.relative_to(moved) for p in moved.rglob("*"))
    refused = cli("resume", moved)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: {moved}: this sweep was run at {exp} and has {2 * SAMPLES - len(before)} trial(s) still to start, "
        "which Ray 2.60 would create at that location (its saved trial generator keeps it) and fail: move the "
        f"experiment back to {exp} and resume it there"), refused.stderr
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == listing and not exp.exists()  # nothing done
    moved.rename(exp)
    p = cli("resume", exp, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ASHA rungs rebuilt from" in p.stdout and "resource policy fixed" in p.stdout  # kept, not the default
    after = pq.read_table(exp / "trials.parquet").to_pandas().set_index("trial_id")
    for _, row in stopped.iterrows():  # a trial stopped before the interruption is not resumed
        assert after.loc[row.trial_id, "epochs_done"] == row.epochs_done
    _check_complete(exp, "int", had)
    again = cli("resume", exp)
    assert again.returncode == 0 and "finished" in again.stdout and "tune-landmarks export" in again.stdout


@pytest.mark.slow
def test_sigkill_of_the_driver_then_resume(synth_root, start_ckpt, tmp_path):
    exp = tmp_path / "store" / "kill"
    proc = _launch(synth_root, start_ckpt, tmp_path, "kill")
    had = _stop_when_saved(proc, exp, 2)
    os.killpg(proc.pid, signal.SIGKILL)  # the frozen driver and all of its Ray: the machine "crashed"
    proc.wait(timeout=30)
    time.sleep(2)
    p = cli("resume", exp, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_complete(exp, "kill", had)


def test_resume_refuses_missing_and_foreign_directories(tmp_path):
    p = cli("resume", tmp_path / "nope")
    assert p.returncode == 1 and "no such experiment" in p.stderr
    (tmp_path / "foreign").mkdir()
    p = cli("resume", tmp_path / "foreign")
    assert p.returncode == 1 and f"not a tune-landmarks experiment (no sweep.json in {tmp_path / 'foreign'}" in p.stderr


@pytest.mark.slow
def test_asha_replay_rebuilds_the_rungs(tiny_sweep):
    finished = tiny_sweep
    from tune_landmarks.experiment import load_sweep
    from tune_landmarks.ray_adapter import base_scheduler
    from tune_landmarks.results import collect
    from tune_landmarks.search import make_scheduler, replay_rungs

    sweep = load_sweep(finished)
    trials = collect(finished)
    assert sweep.settings.resource_policy == "distribute"  # the default: ASHA inside ResourceChangingScheduler
    wrapped = make_scheduler(sweep.search_space(), sweep.settings)
    fresh = base_scheduler(wrapped)
    assert all(not r for s in fresh.by_arm.values() for _, r in s._brackets[0]._rungs)  # what Ray gives: empty rungs
    n = replay_rungs(wrapped, trials)
    searched = [t for t in trials if t.arm == "masked"]  # each arm's trials enter its own rungs
    assert {t.arm for t in trials} == {"masked", "all"}
    assert n == sum(len(t.epochs) for t in trials) > 0
    rungs = dict(fresh.by_arm["masked"]._brackets[0]._rungs)
    assert not {t.trial_id for t in trials if t.arm == "all"} & {tid for r in rungs.values() for tid in r}
    for t in searched:
        for e in t.epochs:
            if e["epoch"] in rungs:
                assert rungs[e["epoch"]][t.trial_id] == pytest.approx(-e["val_mre"])
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    first = min(rungs)
    worst = max(-v for v in rungs[first].values())
    best = min(-v for v in rungs[first].values())
    bracket = fresh.by_arm["masked"]._brackets[0]
    # a resumed trial below the rung's cut-off is stopped, one above it continues
    assert bracket.on_result(SimpleNamespace(trial_id="late-bad"), first, -(worst + 1.0)) == TrialScheduler.STOP
    assert bracket.on_result(SimpleNamespace(trial_id="late-good"), first, -(best - 1.0)) == TrialScheduler.CONTINUE
    empty = base_scheduler(make_scheduler(sweep.search_space(), sweep.settings)).by_arm["masked"]._brackets[0]
    assert empty.on_result(SimpleNamespace(trial_id="late-bad"), first, -(worst + 1.0)) == TrialScheduler.CONTINUE
