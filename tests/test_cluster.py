"""Cluster-grade sweeps with real processes: an experiment on S3 (a moto server on 127.0.0.1) searched, killed,
resumed, exported and reported from its URI and compared with the same sweep on local storage; bad storage
refused in one line before anything runs; a worker node of a two-node Ray cluster killed mid-trial; and the
console a sweep prints. Nothing beyond 127.0.0.1 is contacted."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET, cli, epochs_reported, free_port, journal_study, processes_where, s3_fs

SPACE = """
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.05, high: 20.0}
"""
SAMPLES, EPOCHS = 3, 2
NOISE = ("Checkpoint successfully created", "Experiment state snapshotting has been triggered")


def _search_args(space: Path, synth_root: Path, start_ckpt: Path, name: str, storage: str, *more: str) -> list[str]:
    return ["search", "--space", str(space), "--dataset_path", str(synth_root), "--resume", str(start_ckpt),
            "--name", name, "--storage", storage, "--arms", "masked", "--num-samples", str(SAMPLES),
            "--max-concurrent", "1", "--epochs", str(EPOCHS), "--grace-period", str(EPOCHS), "--seed", "0",
            "--batch_size", "4", "--resource-policy", "fixed", *more]  # one trial at a time: actors reused


def _space(tmp_path: Path) -> Path:
    (tmp_path / "space.yaml").write_text(SPACE)
    return tmp_path / "space.yaml"


# ---------------------------------------------------------------- bad storage: one line, nothing written

@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "missing credentials"])
@pytest.mark.parametrize("command", ["search", "resume", "export", "report", "verdict"])
def test_bad_storage_is_one_line_before_anything_runs(case, command, s3_env, synth_root, start_ckpt, tmp_path,
                                                      monkeypatch, capsys):
    import ray

    from tune_landmarks.cli import main
    from tune_landmarks.experiment import JOURNAL_FILE
    from tune_landmarks.storage import working_copy

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    bucket, expected = S3_BUCKET, ""
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        expected = "cannot reach the S3 endpoint http://127.0.0.1:"
    elif case == "missing bucket":
        bucket, expected = "no-such-bucket", "the bucket 'no-such-bucket' does not exist"
    else:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        expected = "no AWS credentials in the environment"
    storage = f"s3://{bucket}/bad"
    uri = f"{storage}/x"
    args = {"search": _search_args(_space(tmp_path), synth_root, start_ckpt, "x", storage),
            "resume": ["resume", uri], "export": ["export", uri, "--out", str(tmp_path / "out")],
            "report": ["report", uri, "--out", str(tmp_path / "out")], "verdict": ["verdict", uri]}[command]
    import tune_landmarks.search  # noqa: F401  (imported before the clock: a cold import of Ray Tune is slow)

    t0 = time.perf_counter()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {uri}: ") and expected in err[0], err
    assert time.perf_counter() - t0 < 60
    assert not ray.is_initialized()  # before any trial could start
    listed = s3_fs(s3_env).get_file_info(pafs.FileSelector(f"{S3_BUCKET}/bad", recursive=True, allow_not_found=True))
    assert listed == [] and not working_copy(uri, JOURNAL_FILE).exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the console's settings

@pytest.mark.parametrize("flag,v,ray_verbose", [([], 0, 1), (["-v"], 1, 3), (["-q"], -1, 0)])
def test_verbosity_sets_rays_console(flag, v, ray_verbose, tmp_path, monkeypatch):
    """-v gives Ray back its defaults (every line, verbose 3); the default and -q keep trial processes' INFO lines
    (the per-epoch "Checkpoint successfully created") off the console through Ray's worker_process_setup_hook."""
    import logging

    from tune_landmarks import cli, ray_setup
    from tune_landmarks.experiment import Experiment

    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "5")  # unset again afterwards
    monkeypatch.setattr(optuna.logging, "set_verbosity", lambda level: None)
    pkg = logging.getLogger("tune_landmarks")
    saved = pkg.level, pkg.handlers[:], pkg.propagate
    try:
        cli.configure_logging(len(flag) if flag == ["-v"] else -len(flag))
        assert ray_setup.verbosity() == v
        init = ray_setup.ray_init_options(v)
        assert ("runtime_env" in init) == (v <= 0) and init["log_to_driver"]
        if v <= 0:
            assert init["runtime_env"] == {"worker_process_setup_hook": ray_setup.quiet_worker_console}
        opts = ray_setup.run_config_options(Experiment(str(tmp_path / "x")), tmp_path / "j.log", {"masked": 3}, v)
        assert opts["verbose"] == ray_verbose
        assert [type(c).__name__ for c in opts["callbacks"]] == (["StorageSync", "ScratchCleanup"] if v < 0 else
                                                                   ["TrialLines", "StorageSync", "ScratchCleanup"])
    finally:
        pkg.setLevel(saved[0])
        pkg.handlers[:], pkg.propagate = saved[1], saved[2]
    ray_logger = logging.getLogger("ray")
    handler = logging.StreamHandler()
    ray_logger.addHandler(handler)
    try:
        ray_setup.quiet_worker_console()
        assert handler.level == logging.WARNING
    finally:
        ray_logger.removeHandler(handler)


def test_scratch_cleanup_removes_only_what_has_ended(tmp_path, monkeypatch):
    """The driver's callback removes an ended trial's scratch folder (complete or failed), not a running trial's,
    the whole sweep's folder at the end, and never another experiment's, even one of the same name."""
    import tempfile
    from types import SimpleNamespace

    from tune_landmarks.ray_setup import ScratchCleanup
    from tune_landmarks.storage import sweep_scratch, trial_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine, other = "/data/a/sweeps/s", "/data/b/sweeps/s"  # the same sweep name in two storages
    for uri, tid in ((mine, "t1"), (mine, "t2"), (mine, "t3"), (other, "t1")):
        trial_scratch(uri, tid).mkdir(parents=True)
        (trial_scratch(uri, tid) / "last.pt").write_bytes(b"x")
    cleanup = ScratchCleanup(mine)
    cleanup.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))
    cleanup.on_trial_error(0, [], SimpleNamespace(trial_id="t2"))
    assert [p.name for p in sweep_scratch(mine).iterdir()] == ["t3"] and trial_scratch(other, "t1").is_dir()
    cleanup.on_experiment_end([])
    assert not sweep_scratch(mine).exists() and (trial_scratch(other, "t1") / "last.pt").is_file()
    assert sweep_scratch(mine).parent == sweep_scratch(other).parent == tmp_path / "tune_landmarks-trials"


# ---------------------------------------------------------------- S3 end to end, and the console

def _s3_files(env: dict, prefix: str) -> list[str]:
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return [i.path for i in s3_fs(env).get_file_info(sel) if i.type == pafs.FileType.File]


def _read_s3(env: dict, path: str) -> bytes:
    with s3_fs(env).open_input_stream(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def local_reference(synth_root, start_ckpt, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The sweep the S3 test repeats, on local storage, run as a user runs it (its console is checked too)."""
    tmp = tmp_path_factory.mktemp("local_ref")
    p = cli(*_search_args(_space(tmp), synth_root, start_ckpt, "ref", str(tmp / "store")), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp / "store" / "ref", p


def _assert_readable_console(out: str, trials: int) -> None:
    for noise in NOISE:
        assert noise not in out, f"{noise!r} reached the console:\n{out[-3000:]}"
    assert "Number of trials:" in out and "difficult_threshold" in out and "val_mre" in out  # Ray's table
    finished = [ln for ln in out.splitlines() if ln.startswith("trial ") and (" finished: " in ln or " failed " in ln)]
    assert len(finished) == trials, finished  # one line per finished trial
    assert f"{trials} trials: {trials} finished" in out  # the summary


@pytest.mark.slow
def test_console_shows_the_table_one_line_per_trial_and_the_summary(local_reference):
    exp, p = local_reference
    out = p.stdout + p.stderr
    _assert_readable_console(out, SAMPLES)
    # what the console leaves out of the driver's lines stays in the experiment
    driver = (exp / "driver.log").read_text()
    assert "Total run time" in driver and f"{SAMPLES} trials: {SAMPLES} finished" in driver


def _ray_state(env: dict, prefix: str) -> tuple[dict[str, int], dict, dict] | None:
    """The experiment state Ray would restore from the bucket: trial id -> epochs reported (each with its
    checkpoint), the search generator's state (trials created), the searcher's state (None: not there yet)."""
    import pickle

    files = _s3_files(env, prefix)
    newest = {kind: max((f for f in files if f.rsplit("/", 1)[-1].startswith(kind)), default=None)
              for kind in ("experiment_state-", "search_gen_state-", "searcher-state-")}
    if None in newest.values():
        return None
    state = json.loads(_read_s3(env, newest["experiment_state-"]))
    trials = {json.loads(t[0])["trial_id"]: int((json.loads(t[1]).get("last_result") or {}).get("training_iteration") or 0)
              for t in state["trial_data"]}
    return (trials, pickle.loads(_read_s3(env, newest["search_gen_state-"])),
            pickle.loads(_read_s3(env, newest["searcher-state-"])))


def _kill_between_snapshots(proc: subprocess.Popen, env: dict, prefix: str) -> set[str]:
    """kill -9 the driver's process group at a moment when the state files in the bucket are of one snapshot
    that knows a checkpoint of some trial; returns the trial folders whose checkpoint that state knows.

    Ray uploads its experiment state as several objects one after the other (trial list, search generator,
    searcher); a kill between two of them leaves a trial list and a searcher state of different snapshots. Ray's
    ConcurrencyLimiter then waited for ever on a trial the restored list had finished (seen with this test before
    it froze the driver); the sweep's searcher now limits concurrency itself and saves no live set
    (test_searcher.py covers that path). This test is about a crashed machine, not that race: the driver is frozen
    (SIGSTOP), the stored state checked to be of one snapshot, its trials' result.json files to hold every epoch it
    knows (they are uploaded in the same sync, after it or before), and killed frozen; if an upload was under way,
    it is let go on for a moment and checked again."""
    def results_uploaded(trials: dict[str, int]) -> bool:
        files = set(_s3_files(env, prefix))
        return all(f"{prefix}/trial_{t}/result.json" in files
                   and len(epochs_reported(_read_s3(env, f"{prefix}/trial_{t}/result.json"))) >= n
                   for t, n in trials.items() if n >= 1)

    for _ in range(200):
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGSTOP)
        got = _ray_state(env, prefix)
        if got is not None:
            trials, gen, searcher = got
            known = set(searcher.get("arm_of", trials) if isinstance(searcher, dict) else trials)
            if gen["counter"] == len(trials) and known == set(trials) and max(trials.values(), default=0) >= 1 \
                    and results_uploaded(trials):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return {f"trial_{t}" for t, epochs in trials.items() if epochs >= 1}
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
    raise AssertionError("the stored Ray state never settled")


@pytest.mark.slow
def test_s3_sweep_killed_resumed_exported_and_reported_from_its_uri(s3_env, local_reference, synth_root, start_ckpt,
                                                                    tmp_path):
    from safetensors.torch import load_file

    from tune_landmarks.model import read_checkpoint
    from tune_landmarks.storage import working_copy

    uri = f"s3://{S3_BUCKET}/sweeps/s3kill"
    prefix = f"{S3_BUCKET}/sweeps/s3kill"
    env = {**os.environ, **s3_env, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "search.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tune_landmarks",
                                 *_search_args(_space(tmp_path), synth_root, start_ckpt, "s3kill", f"s3://{S3_BUCKET}/sweeps")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not any(p.endswith("/checkpoint.pt") for p in _s3_files(s3_env, prefix)):
        assert proc.poll() is None, f"search ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no checkpoint in S3 in time"
        time.sleep(0.5)
    had = _kill_between_snapshots(proc, s3_env, prefix)  # the driver and all of its Ray: a crashed machine
    time.sleep(2)

    p = cli("resume", uri, env=s3_env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for noise in NOISE:
        assert noise not in p.stdout + p.stderr
    assert f"{SAMPLES} trials: {SAMPLES} finished" in p.stdout

    files = _s3_files(s3_env, prefix)
    assert {f"{prefix}/{f}" for f in ("sweep.json", "trials.parquet", "epochs.parquet", "landmarks.parquet",
                                      "optuna_journal.log", "verdict.json", "driver.log")} <= set(files)
    # the killed driver never uploaded its log; the resume on this machine took up its local copy, then removed it
    killed, _ = _read_s3(s3_env, f"{prefix}/driver.log").decode().split("Restoring the run from", 1)
    assert "INFO" in killed, killed[-2000:]
    assert not working_copy(uri, "driver.log").exists()
    trials = pq.read_table(f"{prefix}/trials.parquet", filesystem=s3_fs(s3_env)).to_pandas()
    # an epoch a trial reported after the last state Ray saved is run again on resume (Ray restores the trial
    # from the checkpoint that state names) and appears twice in its result.json; the tables hold it once
    ep = pq.read_table(f"{prefix}/epochs.parquet", filesystem=s3_fs(s3_env)).to_pandas()
    assert not ep.duplicated(["trial_id", "epoch"]).any()
    assert len(trials) == SAMPLES and (trials.status == "TERMINATED").all()
    assert (ep.groupby("trial_id").epoch.nunique() == EPOCHS).all()
    for d in had:  # a trial that had a checkpoint continued from it: epoch 1 was not redone
        assert epochs_reported(_read_s3(s3_env, f"{prefix}/{d}/result.json")).count(1) == 1, d
    journal = tmp_path / "journal.log"
    journal.write_bytes(_read_s3(s3_env, f"{prefix}/optuna_journal.log"))
    study = journal_study(journal, "s3kill.masked")
    live = [t for t in study.trials if not t.user_attrs.get("orphan")]
    assert sorted(t.user_attrs["ray_trial_id"] for t in live) == sorted(trials.trial_id)  # each Ray trial once
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)

    # the same configurations as the local sweep on the same seed, with the same results, epoch by epoch
    ref_dir, _ = local_reference
    ref = pq.read_table(ref_dir / "trials.parquet").to_pandas()
    ref_ep = pq.read_table(ref_dir / "epochs.parquet").to_pandas()
    key = ["param_lr", "param_difficult_threshold"]
    a, b = trials.sort_values("param_lr"), ref.sort_values("param_lr")
    np.testing.assert_allclose(a[key].to_numpy(float), b[key].to_numpy(float), rtol=1e-12)
    for (_, x), (_, y) in zip(a.iterrows(), b.iterrows()):
        vx = ep[ep.trial_id == x.trial_id].sort_values("epoch").val_mre.to_numpy()
        vy = ref_ep[ref_ep.trial_id == y.trial_id].sort_values("epoch").val_mre.to_numpy()
        np.testing.assert_allclose(vx, vy, atol=1e-6)

    out = tmp_path / "export"
    p = cli("export", uri, "--out", out, "--force", env=s3_env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"]["experiment"] == uri and meta["source"]["checkpoint"].startswith(uri + "/trial_")
    assert json.loads((out / "verification.json").read_text())["passed"]
    # the exported weights are the local sweep's weights of the same configuration at the same epoch
    twin = b.iloc[[abs(r.param_lr - meta["hyperparameters"]["lr"]) < 1e-15 for r in b.itertuples()].index(True)]
    kept = [c for c in (ref_dir / f"trial_{twin.trial_id}").glob("checkpoint_*")
            if json.loads((c / "epoch.json").read_text())["epoch"] == meta["epoch"]]
    assert kept, f"the local twin kept no checkpoint of epoch {meta['epoch']}"
    mine, theirs = load_file(str(out / "model.safetensors")), read_checkpoint(kept[0] / "checkpoint.pt")["model"]
    assert mine.keys() == theirs.keys()
    assert max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine) <= 1e-6

    p = cli("report", uri, "--out", tmp_path / "report", "--bootstrap", "100", env=s3_env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "history.png").is_file()


# ---------------------------------------------------------------- a worker node lost mid-trial

def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    return processes_where(1, pid)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_worker_node_lost_mid_trial_the_sweep_finishes(synth_root, start_ckpt, tmp_path, monkeypatch):
    """A head and a worker node (ray.cluster_utils.Cluster, both on 127.0.0.1), one CPU each, two trials at a
    time: one trial runs on each node. The worker node is killed by its raylet's PID (and the trial process it
    started) once its trial has a checkpoint; the trial continues from that checkpoint on the head
    (--max-failures), and the study and the tables hold every trial once."""
    from ray.cluster_utils import Cluster

    # node death noticed within seconds, not the default half minute; every port on 127.0.0.1 only
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_health_check_period_ms": "500",
                 "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}.items():
        monkeypatch.setenv(k, v)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        raylet = worker.all_processes["raylet"][0].process.pid
        store = tmp_path / "store"
        exp = store / "lost"
        args = _search_args(_space(tmp_path), synth_root, start_ckpt, "lost", str(store), "--address", cluster.address,
                            "--max-failures", "2")
        args[args.index("--max-concurrent") + 1] = "2"
        args[args.index("--epochs") + 1] = args[args.index("--grace-period") + 1] = "4"
        log = tmp_path / "search.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tune_landmarks", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                                    start_new_session=True)
        victim, deadline = None, time.time() + 300
        while victim is None:  # the trial whose process the worker node's raylet started, once it has a checkpoint
            assert proc.poll() is None, f"search ended early:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no trial with a checkpoint on the worker node in time"
            for d in exp.glob("trial_*"):
                lines = (d / "result.json").read_text().splitlines() if (d / "result.json").is_file() else []
                pid = json.loads(lines[-1])["pid"] if lines else None
                running = lines and not json.loads(lines[-1]).get("done") and len(lines) <= 2  # of 4 epochs
                if running and _parent(pid) == raylet and list(d.glob("checkpoint_*/checkpoint.pt")):
                    victim = d
            if victim is None:
                time.sleep(0.3)
        for pid in [raylet, *_children(raylet)]:  # the node: its raylet and the processes it started
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
        out = log.read_text()
    finally:
        if "proc" in locals() and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    assert len(trials) == SAMPLES and (trials.status == "TERMINATED").all(), trials
    # the trial(s) the driver saw lost (result.json, read above, can lag a trial by an epoch; its process may
    # already run the next trial): each finished all its epochs, and continued from its checkpoint if it had one
    lost = {tid: int(n) for tid, n in re.findall(r"trial (\w+) \(masked\) lost after (\d+) epoch", out)}
    assert lost, out[-3000:]
    for tid, n in lost.items():
        epochs = epochs_reported((exp / f"trial_{tid}" / "result.json").read_bytes())
        assert sorted(set(epochs)) == [1, 2, 3, 4] and (n == 0 or epochs.count(1) == 1), (tid, n, epochs)
        assert f"trial {tid} (masked) finished" in out, out[-3000:]
    ep = pq.read_table(exp / "epochs.parquet").to_pandas()
    assert (ep.groupby("trial_id").epoch.nunique() == 4).all() and set(ep.trial_id) == set(trials.trial_id)
    study = journal_study(exp / "optuna_journal.log", "lost.masked")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(trials.trial_id)  # each once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
