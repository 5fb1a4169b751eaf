"""Sweeps tracked in MLflow (`search --mlflow URI`, tracking.py) against a real `mlflow server` on loopback with a
sqlite store: the parent run, a run per trial with its parameters, arm, per-epoch metrics and best checkpoint, the
same runs continued by `resume` after a SIGINT, the verdict and the export on the parent run; credentials never
stored; a missing client or an unreachable server refused before any work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET, cli, free_port, s3_fs
from test_resume import _stop_when_saved

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage reports: nothing beyond 127.0.0.1

SPACE = """
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.05, high: 20.0}
mode: {type: fixed, value: masked}
"""
SAMPLES, EPOCHS = 2, 3  # one arm (masked), one trial at a time


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server for the module: `mlflow server` on 127.0.0.1 and a free port, runs in sqlite,
    artifacts in a folder of its own (served through it). Stopped, with its worker, by its process group at the end."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no background job workers on 2 cores; the server's temporary files (its database's init lock) in its folder
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TMPDIR": str(d)}
    with open(d / "server.log", "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _launch(synth_root: Path, start_ckpt: Path, tmp_path: Path, name: str, mlflow: str) -> subprocess.Popen:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tune_landmarks", "search", "--space", str(space), "--dataset_path", str(synth_root),
           "--resume", str(start_ckpt), "--name", name, "--storage", str(tmp_path / "store"), "--arms", "masked",
           "--num-samples", str(SAMPLES), "--max-concurrent", "1", "--epochs", str(EPOCHS), "--grace-period", "1",
           "--batch_size", "4", "--resource-policy", "fixed", "--mlflow", mlflow]
    with open(tmp_path / "search.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _runs(client, name: str) -> tuple[object, dict[str, object]]:
    """The sweep's parent run, and its trials' runs by trial id (each trial at most once, checked)."""
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    ids = [r.data.tags["trial_id"] for r in children]
    assert len(ids) == len(set(ids)), ids  # no trial has two runs
    return parents[0], {r.data.tags["trial_id"]: r for r in children}


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_sweep_interrupted_resumed_and_exported_in_mlflow(mlflow_server, synth_root, start_ckpt, tmp_path):
    from mlflow import MlflowClient

    from tune_landmarks.experiment import Experiment
    from tune_landmarks.export import checkpoint_for_epoch, export
    from tune_landmarks.results import EPOCH_SCALARS

    name = "tracked"
    exp = tmp_path / "store" / name
    port = mlflow_server.rsplit(":", 1)[1]
    proc = _launch(synth_root, start_ckpt, tmp_path, name, f"http://tl-user:tl-secret@127.0.0.1:{port}")
    _stop_when_saved(proc, exp, 1)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=180)
    out = (tmp_path / "search.log").read_text()
    assert proc.returncode == 130, out[-3000:]
    client = MlflowClient(mlflow_server)
    parent, before = _runs(client, name)
    assert parent.info.run_name == name and parent.info.status == "KILLED"
    assert parent.data.params["arms"] == '["masked"]' and parent.data.tags["sweep_uri"] == str(exp)
    assert before and any(r.info.status == "KILLED" for r in before.values())  # a trial left running is continued
    epochs_before = {t: len(_history(client, r.info.run_id, "epoch")) for t, r in before.items()}

    p = cli("resume", exp, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    parent_after, after = _runs(client, name)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
    assert sorted(after) == sorted(trials.trial_id) and len(trials) == SAMPLES
    assert all(after[t].info.run_id == r.info.run_id for t, r in before.items())  # the same runs, continued
    assert any(len(_history(client, after[t].info.run_id, "epoch")) > n for t, n in epochs_before.items())
    where = Experiment(str(exp))
    for row in trials.itertuples():
        run = after[row.trial_id]
        assert run.info.status == "FINISHED" and run.info.run_name == f"masked {row.trial_id}"
        assert run.data.tags["arm"] == run.data.params["arm"] == "masked"
        assert run.data.params["lr"] == str(row.param_lr)
        assert run.data.params["difficult_threshold"] == str(row.param_difficult_threshold)
        mine = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        assert len(mine) == row.epochs_done
        for key in EPOCH_SCALARS:  # every column of the epochs table, epoch by epoch, each epoch once
            want = [(int(e), v) for e, v in zip(mine.epoch, mine[key]) if v == v and v is not None]
            got = _history(client, run.info.run_id, key)
            assert [s for s, _ in got] == [s for s, _ in want], (row.trial_id, key)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12), (row.trial_id, key)
        best = where.uri_of(checkpoint_for_epoch(where, row.trial_id, int(row.best_epoch)))
        assert run.data.tags["best_checkpoint"] == best

    verdict = json.loads((exp / "verdict.json").read_text())
    metrics = parent_after.data.metrics
    for r in verdict["comparisons"]:
        if r["is_group"]:
            key = f"verdict.{r['a'].removeprefix('best ')}_vs_{r['b']}.{r['group']}"
            assert metrics[f"{key}.mean_difference_mm"] == pytest.approx(r["mean_difference_mm"])
            assert metrics[f"{key}.ci_low_mm"] == pytest.approx(r["ci_low_mm"])
            assert metrics[f"{key}.ci_high_mm"] == pytest.approx(r["ci_high_mm"])
    assert metrics["selection.start.mre_mm"] == pytest.approx(verdict["selection_mre_mm"]["start"])
    assert parent_after.data.tags["verdict"] == verdict["sentences"][0]
    assert parent_after.data.tags["winner.masked"] == verdict["arms"]["masked"]["trial_id"]
    local = client.download_artifacts(parent.info.run_id, "verdict.json", str(tmp_path))
    assert Path(local).read_text() == (exp / "verdict.json").read_text()

    sweep = json.loads((exp / "sweep.json").read_text())
    assert sweep["settings"]["mlflow"] == mlflow_server  # stored without the credentials given
    leaked = [f for f in exp.rglob("*") if f.is_file() and b"tl-secret" in f.read_bytes()]
    assert not leaked and "tl-secret" not in out + p.stdout + p.stderr

    model = export(exp, tmp_path / "model", force=True)
    parent_export = client.get_run(parent.info.run_id)
    assert parent_export.data.tags["exported_model"] == str(model)
    trial = parent_export.data.tags["exported_trial"]
    assert client.get_run(after[trial].info.run_id).data.tags["exported_model"] == str(model)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, f"export/{model.name}")}
    assert {f"export/{model.name}/model.json", f"export/{model.name}/verification.json"} <= logged

    # `tune-landmarks verdict` again, with another bootstrap: the parent run carries the new numbers
    v = cli("verdict", exp, "--bootstrap", "200", "--seed", "7")
    assert v.returncode == 0, v.stderr[-2000:]
    again = json.loads((exp / "verdict.json").read_text())
    assert again["bootstrap"] == 200 and again["seed"] == 7
    r = next(r for r in again["comparisons"] if r["is_group"])
    key = f"verdict.{r['a'].removeprefix('best ')}_vs_{r['b']}.{r['group']}"
    assert client.get_run(parent.info.run_id).data.metrics[f"{key}.ci_low_mm"] == pytest.approx(r["ci_low_mm"])


@pytest.mark.slow
def test_the_run_map_is_kept_in_object_storage_too(mlflow_server, s3_env, monkeypatch):
    """An s3:// sweep keeps its trial -> run map in its bucket: another process (here a second Tracker) finds the
    same parent run, the same trial runs and the epochs they hold."""
    from tune_landmarks.config import TrainConfig
    from tune_landmarks.experiment import MLFLOW_FILE, Experiment, Sweep, SweepSettings
    from tune_landmarks.tracking import Tracker

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    storage = f"s3://{S3_BUCKET}/tracked"
    sweep = Sweep(SweepSettings(name="remote", storage=storage, mlflow=mlflow_server), TrainConfig(resume="start.pt"),
                  "space.yaml", {}, {}, [])
    exp = Experiment.at(storage, "remote")
    config = {"arm": "masked", "lr": 0.001}
    first = Tracker(exp, mlflow_server)
    first.open(sweep)
    first.log_epochs("t1", config, [{"epoch": 1, "val_mre": 0.9, "difficult": "S,Go"}])
    assert s3_fs(s3_env).get_file_info(f"{S3_BUCKET}/tracked/remote/{MLFLOW_FILE}").size > 0
    again = Tracker(exp, mlflow_server)
    assert (again.experiment_id, again.parent, again.runs) == (first.experiment_id, first.parent, first.runs)
    again.log_epochs("t1", config, [{"epoch": 1, "val_mre": 0.8}, {"epoch": 2, "val_mre": 0.7}])
    history = _history(first.client, first.runs["t1"], "val_mre")
    assert history == [(1, 0.9), (2, 0.7)]  # epoch 1, reported again, logged once


def test_credentials_are_taken_out_of_the_uri():
    from tune_landmarks.tracking import public_uri

    assert public_uri("http://lab:s%40cret@10.0.0.5:5000/mlflow") == ("http://10.0.0.5:5000/mlflow", "lab", "s@cret")
    assert public_uri("https://token@tracking.example.org") == ("https://tracking.example.org", "token", None)
    for uri in ("http://127.0.0.1:5000", "databricks", "file:///srv/mlruns"):
        assert public_uri(uri) == (uri, None, None)


def test_sweep_json_before_the_option_loads_untracked():
    from dataclasses import asdict

    from tune_landmarks.config import TrainConfig
    from tune_landmarks.experiment import Sweep, SweepSettings

    old = asdict(Sweep(SweepSettings(name="old"), TrainConfig(), "space.yaml", {}, {}, []))
    del old["settings"]["mlflow"]
    assert Sweep.from_json(json.dumps(old), "sweep.json").settings.mlflow is None


def test_mlflow_missing_says_how_to_install_it(monkeypatch):
    from tune_landmarks.tracking import connect

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ValueError) as err:
        connect("http://127.0.0.1:5000")
    assert str(err.value) == "--mlflow needs MLflow's client, which is not installed: pip install 'tune_landmarks[mlflow]'"


def test_an_unreachable_tracking_server_stops_search_before_any_work(tmp_path):
    port = free_port()
    p = cli("search", "--space", tmp_path / "space.yaml", "--name", "x", "--storage", tmp_path / "store",
            "--dataset_path", tmp_path / "data", "--gpus-per-trial", "0", "--mlflow", f"http://u:pw@127.0.0.1:{port}")
    assert p.returncode == 1 and p.stderr == (f"error: --mlflow http://127.0.0.1:{port}: the tracking server does not "
                                              "answer (Connection refused)\n"), p.stderr
    assert not (tmp_path / "store").exists()


def test_runs_without_mlflow_never_import_it():
    code = ("import sys, tune_landmarks.cli, tune_landmarks.search, tune_landmarks.tracking; "
            "assert 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
