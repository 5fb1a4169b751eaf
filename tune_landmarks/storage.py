"""Where and how bytes go when pyarrow.fs is not enough: the driver's lease of an experiment.

One driver per experiment. `search` and `resume` drive a sweep: they write Ray's state, the Optuna journal, the
tables and the checkpoints. Two of them at once (a cron job and a person, two login nodes) would both write all of
it, and one read the other's half-written files. So a driver first takes the experiment's lease, `driver.lease` in
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
import signal
import socket
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .config import rule_error

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- the lease

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
