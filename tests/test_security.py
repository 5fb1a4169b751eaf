"""A local sweep opens no door (issue 20 §6). Started as a new user starts it, the console command from an environment
with none of the suite's Ray settings, every listening socket of the sweep's processes (the driver, Ray's GCS,
raylet, agents and workers) is on loopback, and a client that lacks the token Ray made for it is refused by the GCS;
and Ray's switch set the other way does not move it off loopback. Real processes; the sockets are read with `ss`, as
the issue saw them."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY_SPACE, processes_where

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}

# A Ray client of the sweep's GCS: exit 3 with the reason when it is refused.
CLIENT = """
import sys
import ray
try:
    ray.init(address=sys.argv[1])
except ConnectionError as exc:
    print(type(exc.__cause__).__name__, exc.__cause__)
    sys.exit(3)
"""


def _session(sid: int) -> set[int]:
    """The processes of session `sid`: what the sweep started, daemonised or not."""
    return set(processes_where(3, sid))


def _listeners(pids: set[int]) -> set[tuple[str, int, str]]:
    """(process name, pid, local address) of every listening TCP socket and bound UDP socket of `pids`."""
    out = set()
    for line in subprocess.run(["ss", "-H", "-l", "-n", "-t", "-u", "-p"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+),', line):
            if int(pid) in pids:
                out.add((name, int(pid), line.split()[4]))
    return out


def _host(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host of an `ss` local address ("[::ffff:127.0.0.1]:41053", "127.0.0.1%lo:53"); None for `*`, any."""
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host == "*":
        return None
    ip = ipaddress.ip_address(host)
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_alone_and_refuses_a_client_without_its_token(synth_root, start_ckpt,
                                                                                        tmp_path):
    for d in ("home", "stranger", "tmp"):
        (tmp_path / d).mkdir()
    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    ray_tmp = tempfile.mkdtemp(prefix="s", dir=os.environ["RAY_TMPDIR"])  # conftest: short, removed at the end
    # a plain shell's environment: no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, RAY_AUTH_MODE or token; its own HOME (where
    # Ray keeps the token it makes), temp folders and image cache, so that nothing is left behind
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
             "RAY_TMPDIR": ray_tmp, "TUNE_LANDMARKS_CACHE": os.environ["TUNE_LANDMARKS_CACHE"],
             "NO_ALBUMENTATIONS_UPDATE": "1"}
    exp = tmp_path / "store" / "open"
    cmd = [str(Path(sys.executable).parent / "tune-landmarks"), "search", "--space", str(tmp_path / "space.yaml"),
           "--dataset_path", str(synth_root), "--resume", str(start_ckpt), "--name", "open",
           "--storage", str(tmp_path / "store"), "--arms", "masked", "--num-samples", "1", "--max-concurrent", "1",
           "--epochs", "1000", "--max-steps-per-epoch", "1", "--resource-policy", "fixed"]  # runs until killed
    # clients on this host, the token withheld and a wrong one; each reaches 127.0.0.1 as given (without the switch
    # Ray would dial the host's address, and be refused for that instead) and tries once
    client = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "stranger"), "RAY_TMPDIR": ray_tmp,
              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_NUM_REDIS_GET_RETRIES": "1"}
    strangers = {"no token": client, "a wrong token": client | {"RAY_AUTH_MODE": "token",
                                                                "RAY_AUTH_TOKEN": secrets.token_hex(32)}}
    log = tmp_path / "search.log"
    seen: set[tuple[str, int, str]] = set()
    clients: dict[str, subprocess.Popen] = {}
    with open(log, "w") as out:
        sweep = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:  # every listener of the sweep's processes, from Ray's start until a trial has reported
            assert sweep.poll() is None, f"search ended early:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial result in time:\n{log.read_text()[-3000:]}"
            seen |= _listeners(_session(sweep.pid))
            gcs = [addr for name, _, addr in seen if name == "gcs_server"]
            if not clients and gcs and any(name == "raylet" for name, _, _ in seen):  # the GCS serves
                for who, env in strangers.items():
                    with open(tmp_path / f"{who}.log", "w") as said:
                        clients[who] = subprocess.Popen([sys.executable, "-c", CLIENT,
                                                         f"127.0.0.1:{gcs[0].rsplit(':', 1)[1]}"],
                                                        stdout=said, stderr=subprocess.STDOUT, env=env)
            results = [r.read_text() for r in exp.glob("trial_*/result.json")]
            if any("\n" in r for r in results) and clients and all(c.poll() is not None for c in clients.values()):
                break
            time.sleep(0.3)
        trial_pid = json.loads(next(r for r in results if "\n" in r).splitlines()[0])["pid"]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)  # the driver and all of its Ray
        sweep.wait(timeout=30)
        for c in clients.values():
            if c.poll() is None:
                c.kill()
            c.wait(timeout=30)
        deadline = time.time() + 30  # Ray's workers see their raylet gone and exit on their own, writing as they go
        while (left := _session(sweep.pid)) and time.time() < deadline:
            time.sleep(0.5)
    listing = "\n".join(f"{name} (pid {pid}): {addr}" for name, pid, addr in sorted(seen))
    print(listing)  # what was seen, in the test's output (pytest -rP)
    assert not [row for row in seen if _host(row[2]) not in LOOPBACK], f"listening beyond loopback:\n{listing}"
    names = {name for name, _, _ in seen}
    # not vacuous: the driver, Ray's GCS and raylet, and the trial's own process were seen listening
    assert {"tune-landmarks", "gcs_server", "raylet"} <= names and trial_pid in {pid for _, pid, _ in seen}, listing
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()  # Ray's token for a local Ray, made on its own
    for who, c in clients.items():
        said = (tmp_path / f"{who}.log").read_text()
        assert c.returncode == 3 and "AuthenticationError" in said and "token is missing or incorrect" in said, \
            (who, c.returncode, said[-2000:])
    assert not left, f"processes of the sweep left: {left}"


def test_a_local_sweeps_ray_takes_loopback_for_its_node_whatever_the_environment():
    """Even with Ray's switch set the other way before Ray was imported, the local Ray the sweep starts next takes
    127.0.0.1 for its node's address, and so do the processes it starts."""
    code = ("import os, ray; from tune_landmarks import ray_adapter; ray_adapter.local_ray_on_loopback(); "
            "print(ray.util.get_node_ip_address(), os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    assert p.returncode == 0 and p.stdout.split() == ["127.0.0.1", "0"], p.stdout + p.stderr[-2000:]
