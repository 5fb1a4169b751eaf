"""Shared fixtures: the real data in ../shared (CI has it; missing is a failure, never a skip), a
synthetic Aariz-format set, and a tiny start checkpoint trained once per test session."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The clusters the tests start themselves (`ray start`, ray.cluster_utils.Cluster) are on 127.0.0.1, and their clients
# reach them there: Ray reads this when first imported, and without it takes 127.0.0.1 for the host's address. A local
# sweep needs none of it (search.init_ray; test_security.py runs one without).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"  # every Ray of the suite asks for the session's token (_ray_tmpdir)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TINY = {"model": "hrnet_w18_small_v2", "image_size": (64, 64), "batch_size": 4}
ISBI_COPIES = ROOT / "docs" / "isbi2015" / "copies.txt"  # the archive's second copies (docs/duplicates.md)


@pytest.fixture(scope="session", autouse=True)
def _ray_tmpdir() -> Path:
    """Every Ray this session starts (in-process, CLI subprocesses, `ray start`) keeps its session folders, logs
    and trial working folders in one private folder, removed at the end: the suite leaves nothing in /tmp/ray.
    Short and directly under /tmp, since Ray's unix socket paths must stay short. The session's Ray token is kept
    there too (RAY_AUTH_TOKEN_PATH, as a cluster's nodes and drivers share one; README "On a cluster"), not in
    ~/.ray, and a token of your own in RAY_AUTH_TOKEN is not used."""
    import secrets
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(d)
    token = d / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory) -> Path:
    """Every test process and subprocess caches decoded images in a private folder."""
    d = tmp_path_factory.mktemp("cache")
    os.environ["TUNE_LANDMARKS_CACHE"] = str(d)
    return d


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real data missing: {path} (../shared/data must sit beside the repository; CI has it)")
    return path


@pytest.fixture(scope="session")
def isbi_root() -> Path:
    return _need(SHARED / "isbi2015")


def _subset(isbi_root: Path, dst: Path, rows: dict[str, int]) -> Path:
    """The real ISBI layout with only the first rows of each split (the images are the real files)."""
    dst.mkdir()
    (dst / "images").symlink_to(isbi_root / "images")
    for split, n in rows.items():
        names = None  # the senior file's first n images, taken from both annotators' files
        for who in ("senior", "junior"):
            lines = (isbi_root / f"{split}_{who}.csv").read_text().splitlines()
            names = names or {ln.split(",")[0] for ln in lines[1:n + 1]}
            rows_kept = [ln for ln in lines[1:] if ln.split(",")[0] in names]
            (dst / f"{split}_{who}.csv").write_text("\n".join([lines[0], *rows_kept]) + "\n")
    return dst


@pytest.fixture(scope="session")
def isbi_small(isbi_root, tmp_path_factory) -> Path:
    return _subset(isbi_root, tmp_path_factory.mktemp("isbi") / "isbi2015", {"train": 8, "test1": 4})


@pytest.fixture(scope="session")
def isbi_model(isbi_small, tmp_path_factory) -> Path:
    """A 19-landmark model trained just enough to exist (predict and the refinement cascade are about plumbing
    here, not accuracy): shared by the predict and refine tests as their start model."""
    from tune_landmarks.config import TrainConfig
    from tune_landmarks.run import train

    out = tmp_path_factory.mktemp("isbi_model")
    train(TrainConfig(dataset_path=str(isbi_small), epochs=1, max_steps_per_epoch=2, lr=1e-3, out=str(out),
                      progress=False, **TINY))
    return out / "best.pt"


REFINED = ["Go", "Ar"]  # the landmarks the ISBI cascade refines
# a crop per landmark: Go 48 mm at 0.5 mm/px (96 px), Ar 32 mm at 0.6 mm/px (64 px, 38.4 mm)
CROP = {"refine_model": "resnet18", "refine_mm_per_px": "Ar=0.6,default=0.5", "refine_crop_mm": "Go=48,default=32"}


@pytest.fixture(scope="session")
def isbi_refine(isbi_small, isbi_model, tmp_path_factory) -> Path:
    """A refinement cascade on `isbi_model`, by `tune-landmarks finetune --mode refine` as a user runs it (the refine
    and DICOM tests predict with it)."""
    out = tmp_path_factory.mktemp("isbi_refine_run")
    cli("finetune", "--dataset_path", isbi_small, "--resume", isbi_model, "--mode", "refine", "--difficult",
        ",".join(REFINED), "--refine-model", CROP["refine_model"], "--refine-mm-per-px", CROP["refine_mm_per_px"],
        "--refine-crop-mm", CROP["refine_crop_mm"], "--epochs", 1, "--max-steps-per-epoch", 2, "--batch_size", 4,
        "--no-progress", "--out", out, check=True)
    return out / "best.pt"


@pytest.fixture(scope="session")
def aariz_meta() -> Path:
    return _need(SHARED / "aariz")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from tune_landmarks.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "Aariz", num_images=20, seed=1, size=160)


@pytest.fixture(scope="session")
def start_ckpt(synth_root, tmp_path_factory) -> Path:
    """A start model: a few epochs on all landmarks (what `tune-landmarks train` makes)."""
    from tune_landmarks.config import TrainConfig
    from tune_landmarks.run import train

    out = tmp_path_factory.mktemp("start")
    train(TrainConfig(dataset_path=str(synth_root), epochs=6, lr=3e-3, out=str(out), progress=False, **TINY))
    return out / "best.pt"


TINY_SPACE = """\
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
mode: {type: fixed, value: masked}
difficult_threshold: {type: uniform, low: 0.1, high: 5.0}
"""


def run_sweep(tmp: Path, space: str, synth_root: Path, start_ckpt: Path, name: str, arms: list[str], seed: int,
              **settings) -> Path:
    """A real sweep on the synthetic set from the tiny start model: 2 trials per arm, 3 epochs, 2 at a time (unless
    `settings` say otherwise); selection on the valid split, verdict on the test split. Returns the experiment."""
    import ray

    from tune_landmarks.config import TrainConfig
    from tune_landmarks.experiment import SweepSettings
    from tune_landmarks.search import run_search

    (tmp / "space.yaml").write_text(space)
    base = TrainConfig(dataset_path=str(synth_root), resume=str(start_ckpt), epochs=3, progress=False, **TINY)
    chosen = SweepSettings(**{"name": name, "storage": str(tmp / "sweeps"), "num_samples": 2, "max_concurrent": 2,
                              "cpus_per_trial": 1, "arms": arms, "seed": seed} | settings)
    try:
        assert run_search(str(tmp / "space.yaml"), base, chosen) == 0
    finally:
        ray.shutdown()
    return tmp / "sweeps" / name


@pytest.fixture(scope="session")
def tiny_sweep(synth_root, start_ckpt, tmp_path_factory) -> Path:
    """One real finished sweep shared by the export, report and resume tests (read-only for them): the arms
    masked and all (run_sweep)."""
    return run_sweep(tmp_path_factory.mktemp("tiny_sweep"), TINY_SPACE, synth_root, start_ckpt, "tiny", ["masked", "all"], 1)


@pytest.fixture
def copy_synth(synth_root, tmp_path) -> Path:
    """A private, writable copy of the synthetic set (for tests that damage it)."""
    dst = tmp_path / "Aariz"
    shutil.copytree(synth_root, dst)
    return dst


def cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "tune_landmarks", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def journal_study(journal: Path, name: str):
    """A sweep arm's Optuna study (`SWEEP.ARM`) read from an Optuna journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def epochs_reported(result_json: str | bytes) -> list[int]:
    """The epochs a Ray trial reported, in order, from its result.json (one JSON line per report)."""
    text = result_json.decode() if isinstance(result_json, bytes) else result_json
    return [json.loads(ln)["epoch"] for ln in text.splitlines() if ln.strip()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_BUCKET = "bucket"


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory) -> dict[str, str]:
    """A real S3-compatible server for the session: moto in server mode on 127.0.0.1 and a free port, with one
    bucket, S3_BUCKET. Returns the standard environment a process needs to use it (AWS_ENDPOINT_URL and dummy
    credentials; AWS_EC2_METADATA_DISABLED keeps the AWS client from asking the instance-metadata address).
    Nothing beyond 127.0.0.1 is contacted. The server is stopped by its pid at the end."""
    import socket
    import time

    import pyarrow.fs as pafs

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def s3_fs(env: dict[str, str]):
    """A pyarrow filesystem on the s3_env server, for a test's own look into the bucket."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                             secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])


def processes_where(field: int, value: int) -> list[int]:
    """Pids whose /proc stat field `field` (after the command name: 1 ppid, 3 session id) equals `value`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value:
            out.append(int(stat.parent.name))
    return out
