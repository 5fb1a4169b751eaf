"""An experiment: what `sweep.json` holds, the names of its files and folders, and where it lives.

Everything that only reads an experiment (results, export, report, resume, compare) imports this module,
never the Ray driver (search.py), so reading `sweep.json` needs neither Ray, Optuna nor torch. Locations go
through `pyarrow.fs`, the file-system layer Ray itself uses, so a local folder, a `file://` URI and an
`s3://`/`gs://` bucket are found, read and written the same way.

Layout of an experiment `<storage>/<name>/`:
    sweep.json            what the sweep was asked to do (base config, settings, space, start errors)
    optuna_journal.log    the Optuna study (open it with `optuna-dashboard optuna_journal.log`)
    trial_<id>/           Ray's trial folders, each with result.json and up to `keep` checkpoints
    trials.parquet, epochs.parquet, landmarks.parquet   written at the end (and by resume)
    mlflow_runs.jsonl     with `--mlflow`: the sweep's MLflow experiment, parent run and trial -> run map (tracking.py)
    driver.lease          while a driver (search, resume) runs: which one (storage.py: one driver per experiment)
"""
from __future__ import annotations

import json
import os
import posixpath
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from .config import DEFAULT_STORAGE, rule_error

if TYPE_CHECKING:
    import pyarrow as pa

    from .config import TrainConfig
    from .space import SearchSpace

SWEEP_FILE = "sweep.json"
JOURNAL_FILE = "optuna_journal.log"
TABLES = {"trials": "trials.parquet", "epochs": "epochs.parquet", "landmarks": "landmarks.parquet"}
ARM_KEY = "arm"  # the key of a trial's config that names its arm (masked, weighted, all, refine)
ARMS = ("masked", "weighted", "all", "refine")
DEFAULT_ARMS = ("masked", "all")
VERDICT_FILES = {"json": "verdict.json", "table": "verdict.parquet"}
METRIC = "val_mre"  # what ASHA compares at each rung and what "best epoch" means
TERMINAL = ("TERMINATED", "ERROR")
MLFLOW_FILE = "mlflow_runs.jsonl"  # tracking.py: resume continues the same MLflow runs (Ray keeps its map in memory)
RESOURCE_POLICIES = ("distribute", "fixed")


def trial_dirname(trial_id: str) -> str:
    """A trial's folder name (Ray's default repeats every parameter)."""
    return f"trial_{trial_id}"


@dataclass
class SweepSettings:
    name: str
    storage: str = DEFAULT_STORAGE
    num_samples: int = 20
    max_concurrent: int = 4
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    address: str | None = None
    epochs: int | None = None
    seed: int = 0
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    arm_samples: dict[str, int] = field(default_factory=dict)  # an arm's budget when not num_samples
    arm_epochs: dict[str, int] = field(default_factory=dict)  # an arm's epochs per trial when not epochs
    max_failures: int = 0
    reduction_factor: float = 2.0
    grace_period: int | None = None  # default: max(1, ceil(largest warmup in the space))
    keep_checkpoints: int = 2
    reuse_actors: bool = True  # False starts a fresh trial process per trial (scripts/bench_ray_overhead.py)
    # distribute: cores a finished trial leaves go to the trials still running (resources.py); fixed: each trial keeps
    # --cpus-per-trial. sweep.json files written before the option existed ran fixed (from_json).
    resource_policy: str = "distribute"
    # the MLflow tracking URI the sweep logs to (tracking.py), without credentials; None: not tracked (and in
    # sweep.json files written before the option existed)
    mlflow: str | None = None

    def validate(self) -> SweepSettings:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise rule_error(name, getattr(self, name), rule)

        need(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
             "a non-empty name without '/', other than '.' and '..'")
        need(self.num_samples >= 1, "num_samples", ">= 1")
        need(bool(self.arms) and len(set(self.arms)) == len(self.arms) and set(self.arms) <= set(ARMS), "arms",
             f"distinct names from {', '.join(ARMS)}")
        need(set(self.arm_samples) <= set(self.arms) and all(n >= 1 for n in self.arm_samples.values()),
             "arm_samples", "a budget >= 1 for arms of --arms")
        need(set(self.arm_epochs) <= set(self.arms) and all(n >= 1 for n in self.arm_epochs.values()),
             "arm_epochs", "epochs >= 1 for arms of --arms")
        need(self.max_concurrent >= 1, "max_concurrent", ">= 1")
        need(self.gpus_per_trial >= 0, "gpus_per_trial", ">= 0")
        need(self.cpus_per_trial > 0, "cpus_per_trial", "> 0")
        need(self.epochs is None or self.epochs >= 1, "epochs", ">= 1")
        need(self.max_failures >= 0, "max_failures", ">= 0")
        need(self.reduction_factor > 1, "reduction_factor", "> 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        need(self.resource_policy in RESOURCE_POLICIES, "resource_policy", f"one of {', '.join(RESOURCE_POLICIES)}")
        need(self.resource_policy == "fixed" or float(self.cpus_per_trial).is_integer(), "cpus_per_trial",
             "a whole number of CPUs with --resource-policy distribute (fixed takes fractions)")
        return self

    @property
    def reuses_actors(self) -> bool:
        """Whether Ray reuses a trial's process for the next trial: not under `distribute`, where a trial whose share
        changes restarts from its last checkpoint in a process of the new size (Ray's ResourceChangingScheduler)."""
        return self.reuse_actors and self.resource_policy == "fixed"

    def budget(self, arm: str) -> int:
        """Trials an arm gets (the same for every arm unless --arm-samples says otherwise)."""
        return self.arm_samples.get(arm, self.num_samples)

    @property
    def total_trials(self) -> int:
        return sum(self.budget(arm) for arm in self.arms)

    def epochs_of(self, arm: str) -> int | None:
        """Epochs a trial of `arm` runs (--epochs unless --arm-epochs says otherwise: a refinement epoch costs a
        fraction of a fine-tuning epoch, so equal epochs are not equal compute; the verdict prints both)."""
        return self.arm_epochs.get(arm, self.epochs)


@dataclass
class Sweep:
    """What `sweep.json` holds: enough to rebuild the trainable, searcher and scheduler on resume, and to
    read the sweep's results without re-deriving anything."""

    settings: SweepSettings
    base: dict[str, Any]  # the run options every trial starts from (TrainConfig.to_dict())
    space_path: str
    space: dict[str, Any]  # the parsed search space (space.SearchSpace.to_dict()), after any clipping
    start_errors: dict[str, float]  # the start checkpoint's per-landmark MRE on the selection split
    symbols: list[str]
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)  # read.Roles.ids(): spec and image ids per role
    notes: list[str] = field(default_factory=list)

    @property
    def start(self) -> str:
        """What the trials start from: the start checkpoint, or (a refine-only sweep) the start detector's predictions."""
        return self.base.get("resume") or self.base["start_predictions"]

    @property
    def start_mre(self) -> float:
        """The start checkpoint's validation MRE (all landmarks have the same images, so the mean of means)."""
        return statistics.fmean(self.start_errors.values())

    @property
    def total_trials(self) -> int:
        return self.settings.total_trials

    def trial_config(self, sampled: dict[str, Any], trial_dir: str | Path) -> TrainConfig:
        cfg = trial_config(self.base, sampled, trial_dir)
        cfg.epochs = self.settings.epochs_of(cfg.mode) or cfg.epochs  # a trial's arm is its mode
        return cfg

    def search_space(self) -> SearchSpace:
        from .space import space_from_dict

        return space_from_dict(self.space, self.space_path)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> Sweep:
        try:
            d = json.loads(text)
            return cls(settings=SweepSettings(**{"resource_policy": "fixed"} | d.pop("settings")), **d)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{source}: not a readable {SWEEP_FILE} of this version ({exc})") from None


def trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_dir: str | Path) -> TrainConfig:
    """The single-run config a trial runs: the sweep's base, then the sampled parameters."""
    from .config import from_dict

    params = {k: v for k, v in sampled.items() if k != ARM_KEY}
    cfg = from_dict(params, from_dict(base), source="trial parameters")
    cfg.out = str(Path(trial_dir) / "run")
    cfg.progress = False
    return cfg


def experiment_uri(storage: str, name: str) -> str:
    """The experiment `name` under `storage`, as Experiment.at names it (computed without opening the storage)."""
    return f"{storage_uri(storage).rstrip('/')}/{name}"


def storage_uri(storage: str) -> str:
    """Ray needs an absolute path or a URI (a relative path fails with 'URI has empty scheme')."""
    if storage.startswith("file://"):
        return storage.removeprefix("file://")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


class Experiment:
    """One experiment's location: `uri` is what Ray takes (an absolute local path or a URI), `fs` and
    `root` what pyarrow.fs reads and writes with."""

    def __init__(self, uri: str):
        self.uri = storage_uri(str(uri)).rstrip("/")
        self._copies: Any = None  # local_file's temporary folder (a tempfile.TemporaryDirectory), made on first use
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{uri}: not a usable experiment location ({exc})") from None

    def __repr__(self) -> str:
        return f"Experiment({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def at(cls, storage: str, name: str) -> Experiment:
        return cls(experiment_uri(storage, name))

    @classmethod
    def of(cls, experiment: Experiment | str | Path) -> Experiment:
        return experiment if isinstance(experiment, Experiment) else cls(str(experiment))

    @classmethod
    def find(cls, experiment: str | Path, storage: str | None = None) -> Experiment:
        """EXPERIMENT as given (a path or a URI), else as a name under `storage` (default ./sweeps): the first
        that holds a sweep.json. A clear error naming every place looked at otherwise."""
        text = str(experiment)
        tried = [cls(text)]
        if "://" not in text and not Path(text).is_absolute():
            tried.append(cls.at(storage or DEFAULT_STORAGE, text))
        for exp in tried:
            exp.check_storage()  # object storage: endpoint, credentials and bucket, one clear line each
            if exp.exists(SWEEP_FILE):
                return exp
        places = " or ".join(e.uri for e in tried)
        if not any(e.exists() for e in tried):
            raise FileNotFoundError(f"{text}: no such experiment (looked for {places})")
        raise FileNotFoundError(f"{text}: not a tune-landmarks experiment (no {SWEEP_FILE} in {places})")

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)

    @property
    def storage(self) -> str:
        return posixpath.dirname(self.uri)

    @property
    def local(self) -> Path | None:
        """The folder on this machine, or None for object storage."""
        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def path(self, *parts: str) -> str:
        """A path inside the experiment, for `self.fs`."""
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A path inside the experiment as Ray and `pyarrow.fs.FileSystem.from_uri` take it."""
        return posixpath.join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound
        except OSError:
            return False

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def read_bytes(self, *parts: str) -> bytes:
        """A whole file. A random-access file, not a stream: pyarrow's S3 stream reads a 52 MB checkpoint in 8.2 s on
        the loopback server, the file in 0.13 s."""
        with self.fs.open_input_file(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def local_file(self, *parts: str) -> Path:
        """A file of the experiment on this machine (torch and Optuna's journal read local files): itself when
        the experiment is local, else a copy in a temporary folder that lives as long as this object (a
        checkpoint is 50 MB and more; nothing is left behind in /tmp)."""
        if self.local is not None:
            return self.local.joinpath(*parts)
        if self._copies is None:
            import tempfile

            self._copies = tempfile.TemporaryDirectory(prefix="tl-fetch-")
        dest = Path(self._copies.name).joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read_bytes(*parts))
        return dest

    def listdir(self, *parts: str) -> list[str]:
        """Names of the folders and files directly inside a folder of the experiment (none if it is missing)."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def write_bytes(self, rel: str, data: bytes | str) -> str:
        """Write a file whole: locally a temporary sibling renamed into place; on object storage an upload,
        which becomes visible only once complete. Either way no reader sees half a file."""
        data = data.encode() if isinstance(data, str) else data
        if self.local is not None:
            from .atomic import write_bytes

            return str(write_bytes(self.local / rel, data))
        self.fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)
        return self.uri_of(rel)

    def write_table(self, rel: str, table: pa.Table) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_bytes(rel, sink.getvalue().to_pybytes())

    def read_table(self, key: str) -> pa.Table:
        """One of the sweep's TABLES; a clear error naming the command that writes it when missing."""
        import pyarrow.parquet as pq

        if not self.exists(TABLES[key]):
            raise FileNotFoundError(f"{self.uri_of(TABLES[key])}: missing; `tune-landmarks resume {self.uri}` "
                                    "writes the sweep's tables")
        return pq.read_table(self.path(TABLES[key]), filesystem=self.fs)

    def load_sweep(self) -> Sweep:
        if not self.exists(SWEEP_FILE):
            raise FileNotFoundError(f"{self.uri}: not a tune-landmarks experiment ({SWEEP_FILE} is missing)")
        return Sweep.from_json(self.read_text(SWEEP_FILE), self.uri_of(SWEEP_FILE))

    def save_sweep(self, sweep: Sweep) -> str:
        return self.write_bytes(SWEEP_FILE, sweep.to_json())

    def check_storage(self) -> None:
        """Before a command reads or writes anything: on object storage, that credentials are configured, the
        endpoint answers and the bucket exists; each problem a StorageError of one line. A local experiment
        needs no check (its folder is made when it is written)."""
        if self.local is not None:
            return
        bucket = self.root.split("/", 1)[0]
        endpoint = None
        if isinstance(self.fs, pafs.S3FileSystem):
            problem = _s3_credentials_problem()
            if problem:
                raise StorageError(f"{self.uri}: {problem}")
            endpoint, source = _s3_endpoint(self.uri)
            if endpoint and (why := _unreachable(endpoint)):
                raise StorageError(f"{self.uri}: cannot reach the S3 endpoint {endpoint} (from {source}): {why}")
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"{self.uri}: {_storage_problem(exc)}") from None
        if info.type == pafs.FileType.NotFound:
            at = f" at {endpoint}" if endpoint else ""
            raise StorageError(f"{self.uri}: the bucket {bucket!r} does not exist{at}; create it first "
                               "(tune-landmarks never creates buckets)")

    def push_journal(self, local: Path) -> bool:
        """Upload the local working copy of a remote experiment's Optuna journal, whole (object storage has no
        appends; the journal is small). Returns whether anything was uploaded."""
        if self.local is not None or not local.is_file():
            return False
        self.write_bytes(JOURNAL_FILE, local.read_bytes())
        return True

    def pull_journal(self, local: Path, name: str = JOURNAL_FILE) -> Path:
        """Before a remote experiment is resumed: make `local` its journal (or another file that only grows,
        driver.log). The stored file, unless `local` already extends it (this machine ran the sweep and appended
        after the last upload, or its driver was killed before uploading; a copy that starts with the stored
        bytes is the newer one)."""
        stored = self.read_bytes(name) if self.exists(name) else b""
        mine = local.read_bytes() if local.is_file() else b""
        if not local.is_file() or not mine.startswith(stored):
            from .atomic import write_bytes

            write_bytes(local, stored)
        return local

    def trial_dir(self, trial_id: str) -> str:
        """A trial's folder inside this experiment (so a moved or copied experiment reads its own copies)."""
        return self.uri_of(trial_dirname(trial_id))


def load_sweep(experiment: Experiment | str | Path) -> Sweep:
    return Experiment.of(experiment).load_sweep()


# ---------------------------------------------------------------- object storage: checks and the journal's copy

class StorageError(ValueError):
    """An experiment location that cannot be used (credentials, endpoint, bucket): one line naming it."""


def _local_copies(kind: str, uri: str) -> Path:
    """This machine's folder of `kind` for the experiment at `uri`: named by a digest of the URI alone, so it is the
    same in every process and on every machine, and two experiments (whatever their names) never share one."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"tune_landmarks-{kind}" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def journal_copy(uri: str, name: str = JOURNAL_FILE) -> Path:
    """Where a remote experiment's Optuna journal (or its driver.log) is worked on locally: Optuna's journal and
    a log handler need a file they can append to; object storage has none. Ray saves the journal's path with the
    searcher, so a resume on another machine finds the journal at the same path, and a resume on this machine
    finds the log a killed driver could not upload."""
    return _local_copies("journals", uri) / name


def sweep_scratch(uri: str) -> Path:
    """Where the trials of the experiment at `uri` keep the files they write for themselves (trial_scratch), on the
    node each runs on; ray_setup.ScratchCleanup removes it when the sweep ends."""
    return _local_copies("trials", uri)


def trial_scratch(uri: str, trial_id: str) -> Path:
    """A sweep trial's own files (each epoch's last.pt until Ray has stored it, a restored trial's start). Not in
    its trial folder: Ray uploads that folder with every snapshot of the experiment. Named by the experiment's URI
    and the trial id alone, so the driver can remove the folder of a trial that Ray ended when it ran on the
    driver's node."""
    return sweep_scratch(uri) / trial_id


def _s3_credentials_problem() -> str | None:
    """What is missing from the standard AWS environment, or None when credentials are configured (or an
    instance role may supply them: then the probe of the bucket tells)."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return None
    if key or secret:
        given, missing = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key else ("AWS_SECRET_ACCESS_KEY",
                                                                                    "AWS_ACCESS_KEY_ID")
        return f"incomplete AWS credentials: {given} is set but {missing} is not"
    if any(env.get(v) for v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return None
    if Path(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().is_file():
        return None
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return None  # an instance role may supply them
    return ("no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE "
            "with a credentials file)")


def _s3_endpoint(uri: str) -> tuple[str | None, str]:
    """The endpoint pyarrow will use for an s3:// URI, and where that comes from (None: AWS's own)."""
    from urllib.parse import parse_qs, urlparse

    query = parse_qs(urlparse(uri).query)
    if query.get("endpoint_override"):
        return query["endpoint_override"][0], "the URI's endpoint_override"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, "AWS"


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to the endpoint fails, or None when it opens (pyarrow's own client would retry an
    unreachable endpoint for a long while before saying so)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _storage_problem(exc: OSError) -> str:
    """An S3/GCS client error as what to check."""
    text = str(exc)
    if any(k in text for k in ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
                               "SignatureDoesNotMatch")):
        return "the credentials in the environment are not valid for this storage"
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "Forbidden", "403")):
        return "access denied with the credentials in the environment"
    if any(k in text for k in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve")):
        return f"cannot reach the storage's endpoint ({text.splitlines()[0]})"
    return f"storage not usable ({text.splitlines()[0] if text else type(exc).__name__})"
