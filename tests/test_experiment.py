"""Where an experiment is and what sweep.json holds, through pyarrow.fs, without Ray, Optuna or torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tune_landmarks.config import TrainConfig
from tune_landmarks.experiment import SWEEP_FILE, Experiment, Sweep, SweepSettings, trial_config
from tune_landmarks.storage import storage_uri


def _sweep(**settings) -> Sweep:
    return Sweep(SweepSettings(name="s1", epochs=3, arm_samples={"all": 4}, **settings),
                 TrainConfig(dataset_path="/data", lr=1e-4, epochs=3), "space.yaml",
                 {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, {"A": 1.0, "B": 3.0}, ["A", "B"],
                 {"val": {"spec": "train:0.2", "image_ids": ["a"]}, "test": {"spec": "test1", "image_ids": ["b"]}},
                 ["a note"])


def test_sweep_round_trips_and_derives_its_figures(tmp_path):
    exp = Experiment(str(tmp_path / "s1"))
    sweep = _sweep()
    exp.save_sweep(sweep)
    back = exp.load_sweep()
    assert back == sweep and back.start_mre == 2.0 and back.total_trials == 20 + 4  # masked 20, all 4
    assert back.search_space().get("lr").high == 1e-3
    assert not list(tmp_path.glob("s1/.*")), "a temporary file was left behind"


def test_the_resource_policy_is_recorded_and_older_sweeps_ran_fixed(tmp_path):
    import json

    exp = Experiment(str(tmp_path / "s1"))
    exp.save_sweep(_sweep())
    assert exp.load_sweep().settings.resource_policy == "distribute"  # the default, as written
    assert not exp.load_sweep().settings.reuses_actors  # Ray's rule for resizable trials
    d = json.loads((tmp_path / "s1" / SWEEP_FILE).read_text())
    del d["settings"]["resource_policy"]  # a sweep.json of the version before the option
    (tmp_path / "s1" / SWEEP_FILE).write_text(json.dumps(d))
    old = exp.load_sweep().settings
    assert old.resource_policy == "fixed" and old.reuses_actors  # what that version ran: a resume keeps it
    with pytest.raises(ValueError, match=r"^The value of `resource_policy` is 'even', but must be one of distribute, "
                                         r"fixed\.$"):
        SweepSettings(name="s", resource_policy="even").validate()
    with pytest.raises(ValueError, match=r"The value of `cpus_per_trial` is 0.5, but must be a whole number"):
        SweepSettings(name="s", cpus_per_trial=0.5).validate()
    SweepSettings(name="s", cpus_per_trial=0.5, resource_policy="fixed").validate()


def test_the_same_experiment_by_path_file_uri_and_name(tmp_path, monkeypatch):
    Experiment(str(tmp_path / "store" / "s1")).save_sweep(_sweep())
    monkeypatch.chdir(tmp_path)
    by_path = Experiment.find(str(tmp_path / "store" / "s1"))
    by_uri = Experiment.find(f"file://{tmp_path}/store/s1")
    by_name = Experiment.find("s1", storage="store")
    by_relative = Experiment.find("store/s1")
    assert {e.uri for e in (by_path, by_uri, by_name, by_relative)} == {str(tmp_path / "store" / "s1")}
    assert by_name.local == tmp_path / "store" / "s1" and by_name.name == "s1"
    assert by_name.storage == str(tmp_path / "store")
    assert storage_uri("store") == str(tmp_path / "store") and storage_uri("s3://b/x") == "s3://b/x"


def test_missing_and_foreign_experiments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope: no such experiment \(looked for {tmp_path}/nope\)"):
        Experiment.find(str(tmp_path / "nope"))
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"not a tune-landmarks experiment \(no {SWEEP_FILE} in {tmp_path}/foreign\)"):
        Experiment.find(str(tmp_path / "foreign"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SWEEP_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path}/bad/{SWEEP_FILE}: not a readable {SWEEP_FILE}"):
        Experiment.find(str(tmp_path / "bad")).load_sweep()


def test_tables_and_files_read_back_through_the_filesystem_layer(tmp_path):
    import pyarrow as pa

    exp = Experiment(str(tmp_path / "s1"))
    exp.write_table("trials.parquet", pa.table({"trial_id": ["a", "b"]}))
    assert exp.read_table("trials").column("trial_id").to_pylist() == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="epochs.parquet: missing; `tune-landmarks resume"):
        exp.read_table("epochs")
    os.makedirs(tmp_path / "s1" / "trial_x" / "checkpoint_000000")
    assert exp.listdir("trial_x") == ["checkpoint_000000"] and exp.listdir("none") == []
    assert exp.local_file("trials.parquet") == Path(exp.path("trials.parquet"))


def test_trial_config_is_the_base_then_the_sample(tmp_path):
    cfg = trial_config(TrainConfig(dataset_path="/data", lr=1e-4, epochs=3), {"lr": 2e-4, "arm": "all"}, tmp_path)
    assert cfg.lr == 2e-4 and cfg.epochs == 3 and cfg.out == str(tmp_path / "run") and not cfg.progress
