"""Sweeps with real Ray and real Optuna: tables, early stopping, the control arm, a failing trial,
a real `ray start --head` cluster, and search-space validation before Ray starts."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import TINY, cli, free_port, journal_study

from tune_landmarks.config import TrainConfig
from tune_landmarks.space import SpaceError, load_space

SPACE = """
lr: {type: categorical, choices: [0.003, 1.0e+30]}   # 1e30 makes a trial diverge (NaN) on purpose
warmup_epochs: {type: int, low: 0, high: 1}
awing_omega: {type: uniform, low: 8.0, high: 20.0}
difficult_threshold: {type: uniform, low: 0.05, high: 20.0}
mode: {type: fixed, value: masked}
"""


@pytest.fixture(scope="module")
def sweep(synth_root, start_ckpt, tmp_path_factory):
    """One real sweep: 4 trials in each of the arms masked and all, 4 epochs, ASHA from epoch 1; one trial at a time,
    so the order in which trials reach each rung, and so what ASHA stops, does not depend on timing."""
    import ray

    from tune_landmarks.experiment import SweepSettings
    from tune_landmarks.search import run_search

    tmp = tmp_path_factory.mktemp("sweep")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    base = TrainConfig(dataset_path=str(synth_root), resume=str(start_ckpt), epochs=4, progress=False, **TINY)
    settings = SweepSettings(name="s1", storage=str(tmp / "store"), num_samples=4, max_concurrent=1, cpus_per_trial=1,
                             seed=2, arms=["masked", "all"], grace_period=1, reduction_factor=2,  # 1 lr=1e30 per arm
                             resource_policy="fixed")  # one trial at a time: nothing to share, actors reused
    ray_tmp, saved = tempfile.mkdtemp(prefix="s", dir=os.environ["RAY_TMPDIR"]), os.environ["RAY_TMPDIR"]
    os.environ["RAY_TMPDIR"] = ray_tmp  # this sweep's own Ray folders (session, trial working folders)
    given = (dataclasses.replace(base), dataclasses.replace(settings))
    try:
        code = run_search(str(space), base, settings)
    finally:
        ray.shutdown()
        os.environ["RAY_TMPDIR"] = saved
    assert (base, settings) == given  # prepare_sweep makes new objects; the caller's stay as given
    return code, tmp / "store" / "s1", Path(ray_tmp)


@pytest.mark.slow
def test_sweep_tables_early_stopping_and_journal(sweep):
    code, exp, _ = sweep
    assert code == 0
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    assert len(trials) == 8
    assert {"trial_id", "status", "arm", "difficult", "epochs_done", "stopped_early", "best_epoch",
            "best_val_mre", "best_val_mre_difficult", "best_max_drift", "param_lr", "error"} <= set(trials.columns)
    ok = trials[trials.status == "TERMINATED"]
    assert len(ok) >= 4
    assert ok.stopped_early.sum() >= 1 and (ok.epochs_done < 4).sum() >= 1  # ASHA stopped at least one early
    epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
    assert len(epochs) == trials.epochs_done.sum()
    assert {"trial_id", "epoch", "val_mre", "val_mre_difficult", "max_drift", "sdr_2mm", "epoch_seconds",
            "peak_memory_mb"} <= set(epochs.columns)
    lms = pq.read_table(exp / "landmarks.parquet").to_pandas()
    assert len(lms) == 29 * trials.best_epoch.notna().sum()
    assert {"symbol", "start_mre_mm", "best_mre_mm", "change_mm", "difficult"} <= set(lms.columns)
    for arm in ("masked", "all"):
        journal = journal_study(exp / "optuna_journal.log", f"s1.{arm}").trials
        mine = trials[trials.arm == arm]
        assert len(journal) == len(mine) == 4
        assert sorted(t.user_attrs["ray_trial_id"] for t in journal) == sorted(mine.trial_id)
        assert all(t.state != optuna.trial.TrialState.RUNNING for t in journal)


@pytest.mark.slow
def test_a_finished_sweep_leaves_only_the_checkpoints_ray_stores(sweep):
    """Trials stopped by ASHA, failed trials and finished ones: no trial's scratch folder is left (its last epoch's
    checkpoint, which Ray's stop of the trial process can leave behind), nothing of the trials' in Ray's own
    folders, and every checkpoint left is one Ray stores, at most --keep-checkpoints (2) per trial."""
    from tune_landmarks.experiment import Experiment
    from tune_landmarks.storage import sweep_scratch

    _, exp, ray_tmp = sweep
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    assert set(trials.status) == {"TERMINATED", "ERROR"} and trials.stopped_early.any()
    assert not sweep_scratch(Experiment(str(exp)).uri).exists()  # not one trial's folder
    assert list(ray_tmp.glob("ray/session_*")), "the sweep's Ray did not keep its folders under ray_tmp"
    stored = sorted(exp.rglob("*.pt"))
    assert stored and all(p.parent.name.startswith("checkpoint_") for p in stored), stored
    per_trial = [len(list(t.glob("checkpoint_*/checkpoint.pt"))) for t in exp.glob("trial_*")]
    assert max(per_trial) == 2, per_trial
    assert list(ray_tmp.rglob("*.pt")) == []


@pytest.mark.slow
def test_arms_are_tuned_alike_and_judged_on_unseen_images(tiny_sweep):
    import json

    exp = tiny_sweep
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    for arm in ("masked", "all"):
        mine = trials[trials.arm == arm]
        assert len(mine) == 2 and (mine.param_mode == arm).all()
        assert mine.param_lr.nunique() == 2  # each arm searched its own learning rates
    assert trials[trials.arm == "all"].param_difficult_threshold.isna().all()
    sweep = json.loads((exp / "sweep.json").read_text())
    roles = sweep["roles"]
    assert (roles["val"]["spec"], roles["test"]["spec"]) == ("valid", "test")
    assert not set(roles["val"]["image_ids"]) & set(roles["test"]["image_ids"])
    verdict = json.loads((exp / "verdict.json").read_text())
    assert verdict["split"] == "test" and verdict["image_ids"] == roles["test"]["image_ids"]
    pairs = {(r["a"], r["b"]) for r in verdict["comparisons"]}
    assert pairs == {("best masked", "start"), ("best all", "start"), ("best masked", "best all")}
    heads = [r for r in verdict["comparisons"] if r["is_group"]]
    assert {r["group"] for r in heads} >= {"all"} and all(r["ci_low_mm"] <= r["mean_difference_mm"] <= r["ci_high_mm"]
                                                          for r in heads)
    assert verdict["sentences"][0].startswith("Verdict: ")
    assert pq.read_table(exp / "verdict.parquet").num_rows == len(verdict["comparisons"])
    # what the data's integrity rested on, recorded with the verdict and in sweep.json's run options
    assert (verdict["skip_images"], verdict["allow_duplicates"]) == ([], False)
    assert (sweep["base"]["skip_images"], sweep["base"]["allow_duplicates"]) == ([], False)


@pytest.mark.slow
def test_verdict_equals_compare_run_by_hand(tiny_sweep, synth_root, start_ckpt, tmp_path):
    import json

    verdict = json.loads((tiny_sweep / "verdict.json").read_text())
    arm = verdict["arms"]["masked"]
    ckpt = next(d / "checkpoint.pt" for d in (tiny_sweep / f"trial_{arm['trial_id']}").glob("checkpoint_*")
                if json.loads((d / "epoch.json").read_text())["epoch"] == arm["epoch"])
    cli("compare", start_ckpt, ckpt, "--dataset_path", synth_root, "--split", "test", "--bootstrap",
        verdict["bootstrap"], "--seed", verdict["seed"], "--out", tmp_path, check=True)  # its own difficult set
    by_hand = {r["landmark"]: r for r in pq.read_table(tmp_path / "compare.parquet").to_pylist()}
    mine = [r for r in verdict["comparisons"] if (r["a"], r["b"]) == ("best masked", "start")]
    assert verdict["difficult"] and len(mine) == len(by_hand)
    for r in mine:
        h = by_hand[r["group"]]
        assert (r["mean_difference_mm"], r["ci_low_mm"], r["ci_high_mm"]) == pytest.approx(
            (h["diff_mm"], h["diff_low_mm"], h["diff_high_mm"]), abs=1e-9)
        assert r["sdr_difference_pp"] == pytest.approx(h["sdr_diff_pp"], abs=1e-9)


@pytest.mark.slow
def test_diverging_trial_errors_and_the_sweep_goes_on(sweep):
    _, exp, _ = sweep
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    bad = trials[trials.status == "ERROR"]
    assert len(bad) >= 1
    assert (bad.param_lr == 1e30).all()
    assert bad.error.str.contains("FloatingPointError: loss at epoch 1 step").all(), bad.error.tolist()
    assert (trials[trials.param_lr == 1e30].status == "ERROR").all()


@pytest.mark.slow
def test_search_joins_a_real_cluster(synth_root, start_ckpt, tmp_path):
    """`ray start --head` on 127.0.0.1 with free ports, `search --address`, then stop exactly that cluster."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="c", dir=os.environ["RAY_TMPDIR"])  # conftest: short, removed at the end
    port = free_port()
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
           "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every port on 127.0.0.1 only
    head = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, head.stdout.read()
            time.sleep(1)
        time.sleep(3)
        space = tmp_path / "space.yaml"
        space.write_text("lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\n")
        p = cli("search", "--space", space, "--dataset_path", synth_root, "--resume", start_ckpt, "--name", "c1",
                "--storage", tmp_path / "store", "--num-samples", "2", "--max-concurrent", "2", "--arms", "all",
                "--epochs", "1", "--address", f"127.0.0.1:{port}", "--model", "hrnet_w18_small_v2",
                "--image_size", "64", "64", "--batch_size", "4")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "Started a local Ray instance" not in p.stdout + p.stderr
        assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{port}" in p.stdout + p.stderr
        trials = pq.read_table(tmp_path / "store" / "c1" / "trials.parquet").to_pandas()
        assert len(trials) == 2 and (trials.status == "TERMINATED").all()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its cluster down with it
        head.wait(timeout=60)
    deadline = time.time() + 30  # that cluster is gone (its GCS may close its port a moment after `ray start`)
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.time() < deadline, f"port {port} still answers 30 s after the cluster was stopped"
        time.sleep(0.5)


@pytest.mark.parametrize("text,message", [
    ("bogus: {type: uniform, low: 0, high: 1}", "`bogus`: unknown option"),
    ("lr: {type: uniform, low: 1.0, high: 0.5}", "`lr`: low (1.0) must be < high (0.5)"),
    ("lr: {type: loguniform, low: 0, high: 0.1}", "`lr`: a log range needs low > 0"),
    ("lr: {type: gaussian, low: 0, high: 1}", "`lr`: type 'gaussian' is not one of"),
    ("epochs: {type: uniform, low: 1, high: 5}", "`epochs`: set by the search command"),
    ("batch_size: {type: uniform, low: 1, high: 5}", "`batch_size`: option is an integer; use type int"),
    ("mode: {type: categorical, choices: [masked, half]}", "`mode`: The value of `mode`"),
    ("lr: {type: int, low: 0.5, high: 3}", "`lr`: The value of `low` is 0.5, but must be an integer."),
    ("loss: {type: uniform, low: 0, high: 1}", "`loss`: option is not numeric"),
    ("lr: {type: uniform, low: 1.0e-4, choices: [1]}", "`lr`: key(s) choices do not belong to type uniform"),
    ("lr: 0.1", "`lr`: must be a mapping with `type`"),
    ("mode: {type: fixed, value: masked}", "nothing to search"),
    ("lr: [unclosed", "cannot read YAML"),
])
def test_invalid_spaces_name_file_and_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text + "\n")
    with pytest.raises(SpaceError) as e:
        load_space(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_invalid_space_fails_before_ray_starts(synth_root, start_ckpt, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: {type: loguniform, low: -1, high: 0.1}\n")
    t0 = time.perf_counter()
    p = cli("search", "--space", f, "--dataset_path", synth_root, "--resume", start_ckpt, "--name", "x",
            "--storage", tmp_path / "store")
    assert p.returncode == 1 and f"{f}: `lr`: a log range needs low > 0" in p.stderr
    assert "Ray" not in p.stdout + p.stderr and not (tmp_path / "store").exists()
    assert time.perf_counter() - t0 < 60


def test_shipped_spaces_are_valid():
    root = Path(__file__).resolve().parent.parent / "search_spaces"
    files = sorted(root.glob("*.yaml"))
    assert {"difficult_only.yaml", "weighted_vs_masked.yaml", "demo.yaml"} <= {f.name for f in files}
    for f in files:
        space = load_space(f)
        assert space.searched
