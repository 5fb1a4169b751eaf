"""Where and how bytes go: a storage location (a local folder, `file://`, `s3://`, `gs://`), read and written
through `pyarrow.fs`, the file-system layer Ray itself uses; the checks that object storage is usable; this
machine's working copies of remote files; and the driver's lease of an experiment. What the files of an
experiment are and mean is experiment.py's.

The lease: one driver per experiment. `search` and `resume` drive a sweep: they write Ray's state, the Optuna
journal, the tables and the checkpoints. Two of them at once (a cron job and a person, two login nodes) would both
write all of it, and one read the other's half-written files. So a driver first takes the experiment's lease, `driver.lease` in
its storage (a small JSON file: host, pid, command, start and heartbeat times, a token of its own), renews the
heartbeat every 10 s from a daemon thread while it runs, and deletes the lease when it ends (on Ctrl-C and errors
too). A second driver refuses in one line naming the holder, before Ray starts, unless the holder's process is gone
from this host (taken over at once: kill -9 then resume stays immediate) or its heartbeat is older than
`--lease-timeout` (taken over, saying so). A driver that finds at a renewal that the lease is no longer its own
stops (SIGINT to itself: the sweep's interrupted path) and writes no tables.

`export`, `verdict` and `report` take no lease: they read the sweep's records, and what they write (`verdict`'s
verdict.json and verdict.parquet, each whole; the exported folder outside the experiment) is no driver state.

Taking the lease is one create-if-absent write, renewing and taking over one compare-and-swap against the version
read:
- local disk: a complete temporary file hard-linked into place (link(2) fails if the name exists: atomic like
  O_CREAT|O_EXCL, and no reader ever sees half a lease); replacing is a temporary file renamed into place after
  re-reading the holder, so two takeovers within the microseconds between that read and the rename can both
  succeed; the next renewal (10 s) finds the loser, which stops;
- S3: conditional requests through botocore (pyarrow.fs has none): PutObject with `If-None-Match: *` to take,
  `If-Match: <ETag>` to renew or take over, DeleteObject with `If-Match` to release;
- other pyarrow file systems (gs://, ...): look, then write: two drivers started within the same second can both
  take the lease there; the next renewal finds the loser, which stops.

Clocks: a heartbeat's age is this machine's clock minus the time the holder wrote; hosts that share an experiment
need clocks that agree to well within the timeout (NTP).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import socket
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from .config import rule_error

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


class StorageError(ValueError):
    """A storage location that cannot be used (credentials, endpoint, bucket): one line naming it."""


def storage_uri(storage: str) -> str:
    """Ray needs an absolute path or a URI (a relative path fails with 'URI has empty scheme')."""
    if storage.startswith("file://"):
        return storage.removeprefix("file://")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


class Storage:
    """A location: `uri` is what Ray takes (an absolute local path or a URI), `fs` and `root` what pyarrow.fs
    reads and writes with. Knows bytes and files, not what they mean (experiment.Experiment does)."""

    def __init__(self, uri: str):
        self.uri = storage_uri(str(uri)).rstrip("/")
        self._copies: Any = None  # local_file's temporary folder (a tempfile.TemporaryDirectory), made on first use
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{uri}: not a usable storage location ({exc})") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def local(self) -> Path | None:
        """The folder on this machine, or None for object storage."""
        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def path(self, *parts: str) -> str:
        """A path inside this location, for `self.fs`."""
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A path inside this location as Ray and `pyarrow.fs.FileSystem.from_uri` take it."""
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
        """A file of this location on this machine (torch and Optuna's journal read local files): itself when
        the location is local, else a copy in a temporary folder that lives as long as this object (a
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
        """Names of the folders and files directly inside a folder here (none if it is missing)."""
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

    def check_storage(self) -> None:
        """Before a command reads or writes anything: on object storage, that credentials are configured, the
        endpoint answers and the bucket exists; each problem a StorageError of one line. A local folder
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

    def upload(self, name: str, local: Path) -> bool:
        """Upload `local`, the working copy of a remote location's file `name` (working_copy: Optuna's journal, the
        driver's log), whole: object storage has no appends, and these files are small. Returns whether anything was
        uploaded (nothing for a local location: the file is there)."""
        if self.local is not None or not local.is_file():
            return False
        self.write_bytes(name, local.read_bytes())
        return True

    def pull_growing(self, name: str, local: Path) -> Path:
        """Before a remote experiment is resumed: make `local` its copy of `name`, a file that only grows (the
        journal, driver.log). The stored file, unless `local` already extends it (this machine ran the sweep and appended
        after the last upload, or its driver was killed before uploading; a copy that starts with the stored
        bytes is the newer one)."""
        stored = self.read_bytes(name) if self.exists(name) else b""
        mine = local.read_bytes() if local.is_file() else b""
        if not local.is_file() or not mine.startswith(stored):
            from .atomic import write_bytes

            write_bytes(local, stored)
        return local


# ---------------------------------------------------------------- this machine's working copies

def _local_copies(kind: str, uri: str) -> Path:
    """This machine's folder of `kind` for the experiment at `uri`: named by a digest of the URI alone, so it is the
    same in every process and on every machine, and two experiments (whatever their names) never share one."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"tune_landmarks-{kind}" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def working_copy(uri: str, name: str) -> Path:
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


# ---------------------------------------------------------------- object storage: is it usable

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


# ---------------------------------------------------------------- the lease

LEASE_FILE = "driver.lease"
HEARTBEAT_S = 10.0  # how often a driver renews its lease
LEASE_TIMEOUT_S = 60.0  # default --lease-timeout: a lease whose heartbeat is older is taken over


class LeaseHeld(ValueError):
    """Another driver holds the experiment's lease: one line naming it (the command line exits 1)."""


class LeaseLost(ValueError):
    """This driver's lease was taken over (or removed) while it ran."""


@dataclass
class Holder:
    """What a lease file holds."""

    host: str
    pid: int
    command: str
    started: str  # ISO 8601, UTC
    heartbeat: str  # ISO 8601, UTC: renewed every HEARTBEAT_S
    token: str  # this lease's own id: a pid and host can recur, a token does not

    def age(self) -> float:
        """Seconds since the last heartbeat, by this machine's clock (never negative: a clock ahead reads as 0)."""
        return max(0.0, (datetime.now(timezone.utc) - datetime.fromisoformat(self.heartbeat)).total_seconds())

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}"


# ---------------------------------------------------------------- one small object with compare-and-swap

class _Store:
    """The lease's file on a pyarrow file system without conditional writes (gs://, ...): look, then write. A version
    is the bytes read."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> Any | None:
        """Write `data` if there is no lease; its version, or None when one exists."""
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return None
        return self._write(data)

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: Any) -> Any | None:
        """Write `data` if the lease is still at `version`; the new version, or None when it is not."""
        now = self.read()
        return self._write(data) if now is not None and now[1] == version else None

    def delete(self, version: Any) -> bool:
        """Delete the lease if it is still at `version`."""
        now = self.read()
        if now is None or now[1] != version:
            return False
        self.fs.delete_file(self.path)
        return True

    def _write(self, data: bytes) -> Any:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:  # an upload: visible only once complete
            f.write(data)
        return data


class _LocalStore(_Store):
    """The lease on local (or shared) disk: created by link(2) of a complete temporary file, replaced by rename(2)."""

    def __init__(self, path: Path):
        super().__init__(pafs.LocalFileSystem(), str(path))
        self.file = path

    def create(self, data: bytes) -> Any | None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.file)
        except FileExistsError:
            return None
        finally:
            tmp.unlink()
        return data

    def _write(self, data: bytes) -> Any:
        from .atomic import write_bytes

        write_bytes(self.file, data)
        return data


class _S3Store(_Store):
    """The lease on S3: conditional PutObject/DeleteObject through botocore, the ETag as the version."""

    def __init__(self, fs: pafs.S3FileSystem, path: str):
        import botocore.session
        from botocore.config import Config

        super().__init__(fs, path)
        self.bucket, self.key = path.split("/", 1)
        # what pyarrow resolved from the URI and the environment (endpoint, scheme, credentials given in the URI),
        # so both clients talk to the same store as the same user (S3FileSystem's pickling state, pyarrow 26)
        opts = fs.__reduce__()[1][0]
        endpoint = opts["endpoint_override"] or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{opts['scheme']}://{endpoint}"
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name=fs.region or None, aws_access_key_id=opts["access_key"],
            aws_secret_access_key=opts["secret_key"], aws_session_token=opts["session_token"],
            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}))

    def _call(self, op: str, **kw: Any) -> dict | None:
        """One request; None when its condition failed (412; 409: a concurrent conditional write) or the lease is
        missing; any other failure (a missing bucket too) an OSError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "NoSuchKey"):
                return None
            raise OSError(str(exc)) from None
        except BotoCoreError as exc:
            raise OSError(str(exc)) from None

    def create(self, data: bytes) -> Any | None:
        r = self._call("put_object", Body=data, IfNoneMatch="*")
        return None if r is None else r["ETag"]

    def read(self) -> tuple[bytes, Any] | None:
        r = self._call("get_object")
        return None if r is None else (r["Body"].read(), r["ETag"])

    def replace(self, data: bytes, version: Any) -> Any | None:
        r = self._call("put_object", Body=data, IfMatch=version)
        return None if r is None else r["ETag"]

    def delete(self, version: Any) -> bool:
        return self._call("delete_object", IfMatch=version) is not None


def _store(fs: pafs.FileSystem, root: str) -> _Store:
    path = f"{root.rstrip('/')}/{LEASE_FILE}"
    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalStore(Path(path))
    if isinstance(fs, pafs.S3FileSystem):
        return _S3Store(fs, path)
    return _Store(fs, path)


def _running(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): os.kill said it exists


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class DriverLease:
    """The lease of the experiment at `uri` (pyarrow's `fs` and `root` for it, as experiment.Experiment has them),
    for a driver running `command`. As a context manager: take it (LeaseHeld when another driver holds it), renew it
    from a daemon thread every `interval` seconds, release it on the way out, whatever the way."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str, command: str, timeout: float = LEASE_TIMEOUT_S,
                 interval: float = HEARTBEAT_S):
        if not timeout >= 2 * interval:
            raise rule_error("lease_timeout", timeout, f">= {2 * interval:g} (twice the heartbeat interval, "
                                                       f"{interval:g} s)")
        self.uri, self.timeout, self.interval = uri, float(timeout), float(interval)
        self.store = _store(fs, root)
        self.mine = Holder(socket.gethostname(), os.getpid(), command, _now(), "", uuid.uuid4().hex)
        self.version: Any = None  # the store's version of our lease; None while we hold none
        self.lost: str | None = None  # why the lease is no longer ours, once a renewal found out
        self._lock = threading.Lock()  # one request at a time: a renewal in flight finishes before the release
        self._stop = threading.Event()

    def __enter__(self) -> DriverLease:
        self.acquire()
        threading.Thread(target=self._heartbeat, name="driver-lease", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        try:
            self.release()
        except OSError as why:  # the driver's own outcome stands; the lease will be taken over
            log.warning(f"{self.uri}: its lease ({LEASE_FILE}) could not be removed ({why}); the next driver takes it "
                        "over at once on this host, elsewhere once its heartbeat is older than --lease-timeout")

    def _payload(self) -> bytes:
        self.mine.heartbeat = _now()
        return json.dumps(asdict(self.mine)).encode()

    def _read(self) -> tuple[Holder, Any] | None:
        got = self.store.read()
        if got is None:
            return None
        try:
            return Holder(**json.loads(got[0])), got[1]
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.uri}/{LEASE_FILE}: not a driver lease ({exc}); remove it if no `search` or "
                             "`resume` of this experiment runs") from None

    def _stale(self, holder: Holder) -> str | None:
        """Why another driver's lease may be taken over, or None when it may not."""
        if holder.host == self.mine.host and not _running(holder.pid):
            return "that process is no longer running"
        age = holder.age()
        if age > self.timeout:
            return f"its last heartbeat is {age:.0f} s old (--lease-timeout {self.timeout:g} s)"
        return None

    def acquire(self) -> None:
        """Take the lease: create it, or take over a stale one; LeaseHeld naming the holder otherwise, and one line
        (a ValueError) when the storage refuses."""
        try:
            self._acquire()
        except OSError as exc:
            raise ValueError(f"{self.uri}: its lease ({LEASE_FILE}) cannot be taken ({exc})") from None

    def _acquire(self) -> None:
        for _ in range(10):  # each round ends unless the lease changed between our read and our write
            version = self.store.create(self._payload())
            if version is not None:
                self.version = version
                return
            current = self._read()
            if current is None:
                continue  # released meanwhile
            holder, seen = current
            why = self._stale(holder)
            if why is None:
                raise LeaseHeld(
                    f"{self.uri}: another driver runs this experiment ({holder.describe()}, `{holder.command}` since "
                    f"{holder.started}, last heartbeat {holder.age():.0f} s ago); one driver per experiment: wait for "
                    f"it to end or stop it (its lease is taken over once its heartbeat is older than --lease-timeout, "
                    f"{self.timeout:g} s)")
            version = self.store.replace(self._payload(), seen)
            if version is not None:
                log.warning(f"{self.uri}: taking over the lease of {holder.describe()}: {why}")
                self.version = version
                return
        raise LeaseHeld(f"{self.uri}: its lease ({LEASE_FILE}) kept changing while this driver tried to take it")

    def renew(self) -> None:
        """Write a new heartbeat if the lease is still ours; LeaseLost naming the new holder otherwise."""
        with self._lock:
            if self.version is None:  # released (the driver is ending) or lost already
                return
            version = self.store.replace(self._payload(), self.version)
            if version is not None:
                self.version = version
                return
            self.version = None
            try:
                current = self._read()
                self.lost = (f"another driver took over this experiment ({current[0].describe()})" if current
                             else f"this driver's lease ({LEASE_FILE}) was removed")
            except (OSError, ValueError):
                self.lost = f"this driver's lease ({LEASE_FILE}) is no longer its own"
            self.lost = f"{self.uri}: {self.lost}"
            raise LeaseLost(self.lost)

    def release(self) -> bool:
        """Delete the lease if it is still ours; whether it was."""
        with self._lock:
            if self.version is None:
                return False
            done = self.store.delete(self.version)
            self.version = None
            return done

    def check(self) -> None:
        """Before a driver writes its tables: LeaseLost when its lease was taken over while it ran."""
        if self.lost:
            raise LeaseLost(f"{self.lost}; this driver stopped without writing the tables")

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.renew()
                failing = False
            except LeaseLost as exc:
                log.error(f"{exc}; stopping this driver")
                os.kill(os.getpid(), signal.SIGINT)  # the sweep's interrupted path; finish then writes nothing
                return
            except OSError as exc:  # storage unreachable for a moment: try again at the next beat
                if not failing:
                    log.warning(f"{self.uri}: the lease's heartbeat was not written ({exc}); trying again every "
                                f"{self.interval:g} s")
                failing = True
