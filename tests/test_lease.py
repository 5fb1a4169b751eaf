"""One driver per experiment: the lease `search` and `resume` take in the experiment's storage (storage.py), on local
disk and on a real S3 server (moto on 127.0.0.1), with real files, real processes and real signals."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import optuna
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET, cli, journal_study, s3_fs

from tune_landmarks.experiment import Experiment
from tune_landmarks.storage import LEASE_FILE, DriverLease, Holder, LeaseHeld, LeaseLost

HOST = socket.gethostname()
HELD = re.compile(r"(?P<exp>\S+): another driver runs this experiment \(host (?P<host>\S+), pid (?P<pid>\d+), "
                  r"`(?P<command>search|resume)` since \S+, last heartbeat (?P<age>\d+) s ago\); one driver per "
                  r"experiment: wait for it to end or stop it \(its lease is taken over once its heartbeat is older "
                  r"than --lease-timeout, (?P<timeout>[\d.]+) s\)")
SPACE = """
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 0.05, high: 20.0}
"""
HOLDER = """
import sys, time
from tune_landmarks.experiment import Experiment
from tune_landmarks.storage import DriverLease
exp = Experiment(sys.argv[1])
try:
    with DriverLease(exp.uri, exp.fs, exp.root, "resume", timeout=60, interval=float(sys.argv[2])):
        print("held", flush=True)
        time.sleep(120)
except KeyboardInterrupt:  # what the lease's heartbeat sends when another driver took the lease over
    print("stopped", flush=True)
    sys.exit(130)
"""


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, monkeypatch) -> tuple[str, dict[str, str]]:
    """An experiment's location (a fresh one per test) and the environment a process needs to reach it."""
    if request.param == "local":
        return str(tmp_path / "exp"), {}
    env = request.getfixturevalue("s3_env")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{S3_BUCKET}/lease/{tmp_path.name}", env


def _lease(uri: str, command: str = "resume", **kw) -> DriverLease:
    exp = Experiment(uri)
    return DriverLease(exp.uri, exp.fs, exp.root, command, **kw)


def _lease_bytes(uri: str) -> bytes | None:
    """The lease file as it is in the storage, read with pyarrow.fs as any reader would (None: there is none)."""
    exp = Experiment(uri)
    return exp.read_bytes(LEASE_FILE) if exp.exists(LEASE_FILE) else None


@contextmanager
def _logged() -> Iterator[list[str]]:
    """The storage module's log lines (its own handler: the package logger may not propagate to pytest's)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tune_landmarks.storage")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _holder(uri: str, env: dict[str, str], interval: float = 10.0) -> subprocess.Popen:
    """Another driver: a process that takes the lease, renews it every `interval` s and holds it; returns once held."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(interval)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _age(uri: str) -> float:
    return Holder(**json.loads(_lease_bytes(uri))).age()


# ---------------------------------------------------------------- the lease itself (no Ray)

def _race(leases: list[DriverLease]) -> list[str]:
    """Every lease's driver tries to take it at the same moment, each from its own thread: "took" or the refusal."""
    start, results = threading.Barrier(len(leases)), []

    def take(lease: DriverLease) -> None:
        start.wait()
        try:
            lease.acquire()
            results.append("took")
        except LeaseHeld as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_of_drivers_racing_for_the_lease_exactly_one_takes_it(where):
    uri, _ = where
    for round_ in range(3):
        at = f"{uri}/r{round_}"
        leases = [_lease(at) for _ in range(8)]
        results = _race(leases)
        assert results.count("took") == 1, results
        for refused in (r for r in results if r != "took"):
            m = HELD.fullmatch(refused)
            assert m and (m["exp"], m["host"], int(m["pid"])) == (Experiment(at).uri, HOST, os.getpid())
        assert sum(lease.release() for lease in leases) == 1 and _lease_bytes(at) is None


def test_the_lease_file_says_who_drives_and_its_heartbeat_moves(where):
    uri, _ = where
    before = time.time()
    name = f"{Experiment(uri).name}/{LEASE_FILE}"
    with _lease(uri, "search", timeout=1.0, interval=0.2):
        if uri.startswith("s3://"):  # the object itself, where a user (or another tool) finds it
            assert s3_fs(where[1]).get_file_info(f"{S3_BUCKET}/lease/{name}").type == pafs.FileType.File
        else:
            assert Path(uri, LEASE_FILE).is_file()
        first = json.loads(_lease_bytes(uri))
        time.sleep(0.7)
        later = json.loads(_lease_bytes(uri))
    assert set(first) == {"host", "pid", "command", "started", "heartbeat", "token"}
    assert (first["host"], first["pid"], first["command"]) == (HOST, os.getpid(), "search")
    assert before - 1 <= datetime.fromisoformat(first["started"]).timestamp() <= time.time()
    assert later["started"] == first["started"] and later["token"] == first["token"]
    assert later["heartbeat"] > first["heartbeat"]  # renewed by the daemon thread
    assert _lease_bytes(uri) is None  # released on the way out


def test_a_stale_heartbeat_is_taken_over_and_the_old_driver_stops(where):
    uri, env = where
    holder = _holder(uri, env, interval=0.5)
    try:
        os.kill(holder.pid, signal.SIGSTOP)  # a driver that stopped beating (a frozen process, a cut network)
        with pytest.raises(LeaseHeld) as refused:
            _lease(uri, timeout=30, interval=1).acquire()
        m = HELD.fullmatch(str(refused.value))
        assert m and (m["host"], int(m["pid"]), m["timeout"]) == (HOST, holder.pid, "30")
        while _age(uri) <= 2.5:
            time.sleep(0.1)
        taker = _lease(uri, timeout=2.5, interval=1)
        with _logged() as lines:
            taker.acquire()
        assert len(lines) == 1 and re.fullmatch(
            rf"{re.escape(Experiment(uri).uri)}: taking over the lease of host {HOST}, pid {holder.pid}: its last "
            r"heartbeat is \d+ s old \(--lease-timeout 2.5 s\)", lines[0]), lines
        os.kill(holder.pid, signal.SIGCONT)  # its next renewal finds the lease taken: it stops, leaving ours alone
        out, err = holder.communicate(timeout=30)
        assert holder.returncode == 130 and out.strip() == "stopped", (out, err)
        assert f"another driver took over this experiment (host {HOST}, pid {os.getpid()}); stopping this driver" \
            in err
        assert json.loads(_lease_bytes(uri))["token"] == taker.mine.token
        assert taker.release() and _lease_bytes(uri) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_dead_drivers_lease_on_this_host_is_taken_over_at_once(where):
    uri, env = where
    holder = _holder(uri, env)
    holder.kill()  # kill -9: nothing released
    holder.wait()
    t0 = time.perf_counter()
    taker = _lease(uri)  # the default --lease-timeout, 60 s: not waited for
    with _logged() as lines:
        taker.acquire()
    assert time.perf_counter() - t0 < 5
    assert lines == [f"{Experiment(uri).uri}: taking over the lease of host {HOST}, pid {holder.pid}: that process is "
                     "no longer running"]
    assert json.loads(_lease_bytes(uri))["pid"] == os.getpid()
    assert taker.release()


def test_a_driver_releases_only_its_own_lease(where):
    uri, _ = where
    first = _lease(uri, timeout=0.4, interval=0.2)
    first.acquire()
    time.sleep(0.5)
    second = _lease(uri, timeout=0.4, interval=0.2)  # first's heartbeat is older than 0.4 s: taken over
    second.acquire()
    assert not first.release()  # no longer its own: left alone
    assert json.loads(_lease_bytes(uri))["token"] == second.mine.token
    time.sleep(0.5)
    third = _lease(uri, timeout=0.4, interval=0.2)
    third.acquire()
    with pytest.raises(LeaseLost, match=rf"another driver took over this experiment \(host {HOST}, pid {os.getpid()}\)"):
        second.renew()  # what its heartbeat thread finds
    with pytest.raises(LeaseLost, match="this driver stopped without writing the tables"):
        second.check()  # what `finish` asks before it writes
    assert not second.release() and json.loads(_lease_bytes(uri))["token"] == third.mine.token
    assert third.release() and _lease_bytes(uri) is None and not third.release()


# ---------------------------------------------------------------- the commands refuse in one line, before Ray

def test_resume_refuses_while_another_driver_runs(where):
    uri, env = where
    Experiment(uri).write_bytes("sweep.json", "{}")  # resume looks no further than that before the lease
    holder = _holder(uri, env)
    try:
        t0 = time.perf_counter()
        p = cli("resume", uri, env=env)
        assert p.returncode == 1 and p.stdout == "", p.stdout + p.stderr
        m = HELD.fullmatch(p.stderr.removeprefix("error: ").removesuffix("\n"))
        assert m and (m["exp"], m["host"], int(m["pid"]), m["command"], m["timeout"]) == (
            Experiment(uri).uri, HOST, holder.pid, "resume", "60"), p.stderr
        assert time.perf_counter() - t0 < 30
        p = cli("resume", uri, "--lease-timeout", "5", env=env)
        assert p.returncode == 1 and p.stderr == ("error: The value of `lease_timeout` is 5.0, but must be >= 20 "
                                                  "(twice the heartbeat interval, 10 s).\n"), p.stderr
        assert json.loads(_lease_bytes(uri))["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_search_refuses_while_another_driver_runs_and_writes_nothing(synth_root, start_ckpt, tmp_path):
    exp = Experiment(str(tmp_path / "store" / "x"))  # a new sweep's name, taken by a driver that got there first
    holder = _holder(exp.uri, {})
    try:
        (tmp_path / "space.yaml").write_text(SPACE)
        p = cli("search", "--space", tmp_path / "space.yaml", "--dataset_path", synth_root, "--resume", start_ckpt,
                "--name", "x", "--storage", tmp_path / "store", "--epochs", "1", "--batch_size", "4")
        err = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(err) == 1, p.stderr
        m = HELD.fullmatch(err[0].removeprefix("error: "))
        assert m and (m["exp"], int(m["pid"])) == (exp.uri, holder.pid), p.stderr
        assert "Ray" not in p.stdout + p.stderr and exp.listdir() == [LEASE_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- two resumes of one interrupted sweep

SAMPLES, EPOCHS = 2, 1  # one trial at a time, interrupted at Ray's first saved state: the resume has both to run


def _files(exp: Experiment) -> list[str]:
    sel = pafs.FileSelector(exp.root, recursive=True, allow_not_found=True)
    return [i.path for i in exp.fs.get_file_info(sel) if i.type == pafs.FileType.File]


@pytest.mark.slow
def test_two_resumes_of_an_interrupted_sweep_one_drives_it(where, synth_root, start_ckpt, tmp_path):
    uri, env = where
    exp = Experiment(uri)
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tune_landmarks"]
    with open(tmp_path / "search.log", "w") as log:
        search = subprocess.Popen(
            [*cmd, "search", "--space", str(tmp_path / "space.yaml"), "--dataset_path", str(synth_root), "--resume",
             str(start_ckpt), "--name", exp.name, "--storage", exp.storage, "--arms", "masked", "--num-samples",
             str(SAMPLES), "--max-concurrent", "1", "--epochs", str(EPOCHS), "--grace-period", str(EPOCHS), "--seed",
             "0", "--batch_size", "4", "--resource-policy", "fixed"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(f.rsplit("/", 1)[-1].startswith("experiment_state-") for f in _files(exp)):
            assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            assert time.time() < deadline, "Ray saved no experiment state in time"
            time.sleep(0.3)
        os.kill(search.pid, signal.SIGINT)  # Ctrl-C: the interrupted path, which releases the lease
        search.wait(timeout=180)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
    out = (tmp_path / "search.log").read_text()
    assert search.returncode == 130 and "trials unfinished — resume with" in out, out[-3000:]
    assert not exp.exists(LEASE_FILE)

    logs = [tmp_path / f"resume{i}.log" for i in (0, 1)]
    with ExitStack() as files:
        procs = [subprocess.Popen([*cmd, "resume", uri], stdout=files.enter_context(open(f, "w")),
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
                 for f in logs]  # started together
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    codes = sorted(p.returncode for p in procs)
    texts = [f.read_text() for f in logs]
    assert codes == [0, 1], texts
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    refused = texts[loser].splitlines()
    assert len(refused) == 1, texts[loser]  # one line, before Ray started: nothing else
    m = HELD.fullmatch(refused[0].removeprefix("error: "))
    assert m and (m["exp"], m["host"], int(m["pid"]), m["command"]) == (exp.uri, HOST, procs[winner].pid, "resume")
    assert f"{SAMPLES} trials: {SAMPLES} finished" in texts[winner], texts[winner][-3000:]
    assert not exp.exists(LEASE_FILE)

    # what a single driver leaves: each trial once in the study and in the tables, each epoch once
    trials = pq.read_table(exp.path("trials.parquet"), filesystem=exp.fs).to_pandas()
    assert len(trials) == SAMPLES and (trials.status == "TERMINATED").all()
    epochs = pq.read_table(exp.path("epochs.parquet"), filesystem=exp.fs).to_pandas()
    assert sorted(map(tuple, epochs[["trial_id", "epoch"]].to_numpy().tolist())) == sorted(
        (t, e) for t in trials.trial_id for e in range(1, EPOCHS + 1))
    study = journal_study(exp.local_file("optuna_journal.log"), f"{exp.name}.masked")
    live = [t for t in study.trials if not t.user_attrs.get("orphan")]
    assert sorted(t.user_attrs["ray_trial_id"] for t in live) == sorted(trials.trial_id)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in live)
    assert sorted(f.rsplit("/", 2)[-2] for f in _files(exp) if f.endswith("/result.json")) == sorted(
        f"trial_{t}" for t in trials.trial_id)  # no trial of a second driver
