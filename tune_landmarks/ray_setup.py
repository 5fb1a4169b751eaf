"""How the sweep driver sets Ray up: what reaches the console, what the experiment keeps of Ray's logs, and a
remote experiment's Optuna journal kept in its storage. Everything here is Ray's own configuration.

The console follows the CLI's verbosity (the package logger's level: `cli.configure_logging`):
- default: Ray's progress table trimmed to the searched parameters and key metrics (search.build_tuner's
  CLIReporter), one line per finished (or retried) trial (`TrialLines`), then the summary (search.finish).
  Kept out: the "Checkpoint successfully created at ..." INFO line a trial process logs at every epoch (the
  `worker_process_setup_hook` passes only warnings and errors of the trial processes' "ray" logger to their
  console; the checkpoint itself is in the trial folder), Ray Tune's INFO lines and a failed trial's
  traceback on the driver (they go to `driver.log`; the traceback is also the trial's `error.txt`), Optuna's
  study-created line, and the "Experiment state snapshotting has been triggered multiple times" warning
  (`TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0`, the switch Ray names for it: the forced
  snapshots it warns about are what keeps the saved state pointing at checkpoints that still exist when
  `--keep-checkpoints` deletes old ones, so they stay; with the epochs of a real sweep they are minutes apart).
- `-v`: Ray's defaults, everything (verbose 3, every INFO line, the warning).
- `-q`: no table and no trial lines; warnings and errors only.

Kept in the experiment whatever the verbosity: Ray's own trial files (result.json, progress.csv, error.txt with
a failed trial's traceback) and `driver.log` (Ray's driver lines and this tool's, tracebacks included). Each
node's full Ray logs (worker stdout/stderr) stay where Ray puts them, /tmp/ray/session_*/logs.
(RunConfig(log_to_file) with SyncConfig(sync_artifacts) would copy the trials' stdout/stderr into the
experiment, at the cost of an upload of each trial's working folder after every report.)

A remote experiment's Optuna journal (object storage cannot append) is worked on in a local copy
(storage.working_copy) and uploaded whole by `StorageSync` each time Ray snapshots the experiment state,
right after Ray has written the searcher's state, and when the sweep ends: the stored journal is never older
than the searcher state Ray would restore. `resume` pulls it first (Storage.pull_growing).
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .experiment import ARM_KEY, JOURNAL_FILE, METRIC, Experiment
from .storage import Storage, sweep_scratch, trial_scratch, working_copy

log = logging.getLogger(__name__)
DRIVER_LOG = "driver.log"
_PKG = __package__ or "tune_landmarks"


def verbosity() -> int:
    """-1 (-q), 0 (default) or 1 (-v), read from the level the CLI gave the package logger (a library caller
    that configured nothing gets the quiet console)."""
    level = logging.getLogger(_PKG).getEffectiveLevel()
    return 1 if level <= logging.DEBUG else 0 if level <= logging.INFO else -1


def quiet_worker_console() -> None:
    """Ray's `worker_process_setup_hook`: in every worker process of the sweep the console handler of the "ray"
    logger passes warnings and errors only."""
    for handler in logging.getLogger("ray").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def ray_init_options(v: int) -> dict[str, Any]:
    """Keyword arguments for ray.init (and the environment Ray Tune reads) for verbosity `v`."""
    import os

    if v > 0:
        return {"log_to_driver": True}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in Journal ..."
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return {"log_to_driver": True, "runtime_env": {"worker_process_setup_hook": quiet_worker_console}}


def run_config_options(exp: Experiment, journal: Path, epochs: dict[str, int], v: int) -> dict[str, Any]:
    """Keyword arguments for tune.RunConfig: the console's verbosity and the callbacks (`epochs`: each arm's)."""
    callbacks: list[Callback] = [StorageSync(exp.uri, str(journal)), ScratchCleanup(exp.uri)]
    if v >= 0:
        callbacks.insert(0, TrialLines(epochs))
    return {"verbose": 3 if v > 0 else 1 if v == 0 else 0, "callbacks": callbacks}


class TrialLines(Callback):
    """One line per finished trial: its arm, epochs and best val MRE, or why it failed."""

    def __init__(self, epochs: dict[str, int]):
        self.epochs = {arm: int(n) for arm, n in epochs.items()}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        n = int(r.get("training_iteration") or 0)
        best = r.get("best_val_mre")
        of = self.epochs.get(trial.config.get(ARM_KEY), 0)
        early = f", stopped early by ASHA after {n} of {of} epochs" if 0 < n < of else ""
        score = f"best {METRIC} {best:.3f} mm" if isinstance(best, float) else "no result"
        log.info(f"trial {trial.trial_id} ({trial.config.get(ARM_KEY, '?')}) finished: {score}{early}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .results import _error_line

        try:
            why = _error_line(trial.get_error())
        except Exception:  # the error file may not be written yet
            why = "see its error file"
        n = int((trial.last_result or {}).get("training_iteration") or 0)
        log.warning(f"trial {trial.trial_id} ({trial.config.get(ARM_KEY, '?')}) failed after {n} epoch(s): {why}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial whose process or node was lost, retried (FailureConfig(max_failures), --max-failures)."""
        n = int((trial.last_result or {}).get("training_iteration") or 0)
        log.warning(f"trial {trial.trial_id} ({trial.config.get(ARM_KEY, '?')}) lost after {n} epoch(s); retrying from "
                    f"its last checkpoint (failure {trial.num_failures})")


class ScratchCleanup(Callback):
    """Removes an ended trial's scratch folder (storage.trial_scratch: its last epoch's checkpoint, 50 MB and
    more), which the trial's own `finally` misses when Ray ends its process while it waits in tune.report (ASHA's
    stop, the last epoch), and the sweep's whole folder when the sweep ends. The driver reaches the folders of the
    trials that ran on its own node."""

    def __init__(self, uri: str):
        self.uri = uri

    def _remove(self, trial: Any) -> None:
        shutil.rmtree(trial_scratch(self.uri, trial.trial_id), ignore_errors=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Every trial has ended: what is left in the sweep's folder on this node is a killed driver's (its trials
        that Ray's saved state never knew are not resumed), or of trials that ended unseen."""
        shutil.rmtree(sweep_scratch(self.uri), ignore_errors=True)


class StorageSync(Callback):
    """Keeps a remote experiment's Optuna journal in its storage (see the module docstring). Ray calls
    `get_state` of every callback each time it snapshots the experiment, just after saving the searcher."""

    def __init__(self, uri: str, journal: str):
        self.uri, self.journal = uri, journal
        self._pushed = -1

    def push(self) -> None:
        exp = Storage(self.uri)
        local = Path(self.journal)
        if exp.local is None and local.is_file() and local.stat().st_size != self._pushed:
            size = local.stat().st_size
            exp.upload(JOURNAL_FILE, local)
            self._pushed = size

    def get_state(self) -> dict | None:
        self.push()
        return None  # nothing of this callback to restore

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.push()

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "journal": self.journal, "_pushed": -1}


class _NoTracebacks(logging.Filter):
    """Ray Tune's driver logs a failed trial's whole traceback; the console shows TrialLines' one line. Also kept off
    the console (they stay in driver.log): two warnings Ray gives about itself under `--resource-policy distribute`,
    that its ResourceChangingScheduler (ray_adapter.RestorableResourceChanging) reads a restricted TrialRunner
    attribute, and that a resized trial's logger, restarting, found no result.json to download yet (its results go
    on in the driver's own copy)."""

    SELF_WARNINGS = ("You are trying to access ", "Remote file not found: ")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ray.tune"):
            return True
        return not (record.exc_info or str(record.msg).startswith(self.SELF_WARNINGS))


@contextmanager
def driver_console(exp: Experiment) -> Iterator[Path]:
    """Around fit() and the summary: Ray's and this tool's driver lines into the experiment's driver.log (a
    local experiment's own file; a remote one's uploaded at the end), and, without -v, Ray's INFO lines and
    tracebacks off the console. Yields the log file."""
    v = verbosity()
    if exp.local is not None:
        local = exp.local / DRIVER_LOG
        local.parent.mkdir(parents=True, exist_ok=True)
    else:  # a resumed remote sweep appends to its stored log, or to the one its killed driver left on this machine
        local = exp.pull_growing(DRIVER_LOG, working_copy(exp.uri, DRIVER_LOG))
    file_handler = logging.FileHandler(local, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger, pkg = logging.getLogger("ray"), logging.getLogger(_PKG)
    consoles = [h for h in ray_logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = [(h, h.level) for h in consoles]
    no_tracebacks = _NoTracebacks()
    if v <= 0:
        for h in consoles:
            h.setLevel(logging.WARNING)
            h.addFilter(no_tracebacks)
    ray_logger.addHandler(file_handler)
    pkg.addHandler(file_handler)
    try:
        yield local
    finally:
        ray_logger.removeHandler(file_handler)
        pkg.removeHandler(file_handler)
        for h, level in saved:
            h.setLevel(level)
            h.removeFilter(no_tracebacks)
        file_handler.close()
        if exp.local is None:
            try:
                exp.write_bytes(DRIVER_LOG, local.read_bytes())
            except OSError as exc:
                log.warning(f"{exp.uri_of(DRIVER_LOG)}: not uploaded ({exc}); kept at {local}, where a resume on this "
                            "machine takes it up")
            else:
                local.unlink(missing_ok=True)
