"""Sweeps tracked in MLflow (`search --mlflow URI`), for labs that follow their Ray Tune sweeps there.

What goes where: the MLflow experiment named after the sweep (`--name`; one that exists is reused) holds one parent
run per sweep, named after it too, and one child run per trial (`ARM TRIAL_ID`, nested under the parent by MLflow's
`mlflow.parentRunId` tag). The parent has the sweep's settings as parameters, the tag `sweep_uri` (where the sweep's
files live) and, at the end, the verdict: its headline numbers as metrics (`verdict.A_vs_B.GROUP.mean_difference_mm`,
`ci_low_mm`, `ci_high_mm`, `a_mre_mm`, `b_mre_mm`, `sdr_difference_pp`; `selection.NAME.mre_mm`), its first sentence
and each arm's winner as tags, verdict.json as an artifact; `export` adds the tags `exported_model` (the folder) and
`exported_trial`, and the export's small files (not its weights) as artifacts under `export/FOLDER/`. A child run has
the trial's sampled parameters and `arm`, the tags `arm`, `trial_id`, `difficult` and `best_checkpoint` (the storage
URI of the kept checkpoint of its best epoch), and per epoch (step = epoch) the columns of epochs.parquet as
metrics, under the names the trial reports to Ray (`val_mre`, `val_mre_difficult`, `max_drift`, `sdr_2mm`, ...).

Why not Ray's MLflowLoggerCallback: it keeps its trial -> run map in memory, keyed by Trial objects, so a resumed
sweep would start a second run for every trial; it nests nothing under a sweep; and it logs every value in a request
of its own. Here the map is `mlflow_runs.jsonl` in the experiment (the sweep's line, then a line per trial), written
through its storage (a local folder or object storage alike), so `resume` continues the same runs and `export` finds
the parent. Not a `.json` file: a restored Ray copies every .json and .pkl file of the experiment into its driver's
folder and uploads them back at each snapshot, over anything written since. An epoch already in its run
(one Ray runs again after a resume from an older saved state) is not logged twice. When the tracking server stops
answering mid-sweep the sweep goes on, and the end of `search` or `resume` brings every run up to date from the
sweep's own records.

Credentials never reach sweep.json: `user:password@` in an http(s) URI is moved to MLflow's own environment
variables (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD) for this process, and the URI is stored without it.
MLflow itself is imported only here, inside functions: runs without `--mlflow` never import it.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ray.tune import Callback

from .experiment import ARM_KEY, MLFLOW_FILE, VERDICT_FILES, Experiment, Sweep, trial_dirname
from .metrics import finite_or_none
from .results import EPOCH_SCALARS, TrialRecord, kept_checkpoints

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)
INSTALL = "pip install 'tune_landmarks[mlflow]'"
RUN_STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}  # Ray's ending -> the run's; any other: KILLED (interrupted)
VERDICT_NUMBERS = ("mean_difference_mm", "ci_low_mm", "ci_high_mm", "a_mre_mm", "b_mre_mm", "sdr_difference_pp")
BATCH = 1000  # metrics per request: MLflow's limit for log_batch


def require_mlflow() -> ModuleType:
    """MLflow's client, or one message saying how to install it (raised before any work)."""
    try:
        import mlflow
    except ImportError:
        raise ValueError(f"--mlflow needs MLflow's client, which is not installed: {INSTALL}") from None
    return mlflow


def public_uri(uri: str) -> tuple[str, str | None, str | None]:
    """An http(s) tracking URI without its `user:password@`, and that user and password (None where absent)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    user, password = parts.username, parts.password
    public = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return public, unquote(user) if user else None, unquote(password) if password is not None else None


def connect(uri: str) -> str:
    """Before any work (before the data is read or Ray starts): MLflow's client is installed and the tracking server
    answers. Credentials in the URI go to MLflow's environment variables for this process; returns the URI to store."""
    mlflow = require_mlflow()
    public, user, password = public_uri(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        log.info(f"note: the credentials in --mlflow are used by this command but not stored; `resume` and `export` "
                 f"read them from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD ({public} is stored)")
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
    from mlflow.exceptions import MlflowException

    quick = {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0", MLFLOW_HTTP_REQUEST_TIMEOUT.name: "10"}  # one try, not minutes
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        mlflow.MlflowClient(public).search_experiments(max_results=1)
    except MlflowException as exc:
        raise ValueError(f"--mlflow {public}: {problem(exc)}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return public


def problem(exc: Exception) -> str:
    """An MLflow client error as one line: the server does not answer, refuses the credentials, or what it said."""
    text = str(exc)
    if errno := re.search(r"\[Errno -?\d+\] ([^\"')]+)", text):
        return f"the tracking server does not answer ({errno.group(1).strip()})"
    if any(k in text for k in ("Max retries exceeded", "timed out", "Read timed out")):
        return "the tracking server does not answer (no connection)"
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if re.search(r"\b40[13]\b|UNAUTHENTICATED|PERMISSION_DENIED", text):
        return (f"the tracking server refused the request ({first}); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    return f"the tracking server answered with an error ({first})"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _short(name: str) -> str:
    """A verdict's model name as a metric key's part: `best masked` -> `masked`."""
    return name.removeprefix("best ").replace(" ", "_")


class Tracker:
    """One sweep in MLflow: its MLflow experiment, parent run and trial -> run map, kept in the experiment's
    `mlflow_runs.jsonl` (so every process of the sweep, and every machine that reads it, finds the same runs)."""

    def __init__(self, exp: Experiment, uri: str):
        mlflow = require_mlflow()
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines at every run's end
        self.exp, self.uri, self.client = exp, uri, mlflow.MlflowClient(uri)
        lines = [json.loads(ln) for ln in exp.read_text(MLFLOW_FILE).splitlines()] if exp.exists(MLFLOW_FILE) else [{}]
        self.experiment_id: str | None = lines[0].get("experiment_id")
        self.parent: str | None = lines[0].get("parent_run_id")
        self.runs: dict[str, str] = {d["trial_id"]: d["run_id"] for d in lines[1:]}
        self.logged: dict[str, set[int]] = {}  # the epochs each run touched by this process holds

    def _save(self) -> None:
        lines = [{"experiment_id": self.experiment_id, "parent_run_id": self.parent}]
        lines += [{"trial_id": t, "run_id": r} for t, r in self.runs.items()]
        self.exp.write_bytes(MLFLOW_FILE, "".join(json.dumps(d) + "\n" for d in lines))

    def parent_run(self, sweep: Sweep) -> str:
        """The sweep's parent run, created the first time (in the MLflow experiment named after the sweep)."""
        if self.parent is not None:
            return self.parent
        name = sweep.settings.name
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(f"--mlflow {self.uri}: the MLflow experiment {name!r} is deleted; restore it "
                             f"(`mlflow experiments restore`) or delete it for good, or choose another --name")
        self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.parent = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        self._save()
        return self.parent

    def open(self, sweep: Sweep) -> None:
        """At the start of `search` and `resume`: the parent run running, with the sweep's settings as parameters
        (logged again by `resume`: the same values) and tagged with where the experiment is now."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        s = sweep.settings
        params = {k: v for k, v in vars(s).items() if k not in ("name", "storage", "address", "mlflow")} | {
            "start": sweep.start, "dataset_path": sweep.base.dataset_path, "space": sweep.space_path,
            "selection_split": sweep.roles.get("val", {}).get("spec"), "verdict_split": sweep.roles.get("test", {}).get("spec")}
        try:
            parent = self.parent_run(sweep)
            self.client.log_batch(parent, params=[Param(k, _text(v)) for k, v in sorted(params.items())])
            self.client.update_run(parent, status="RUNNING")
            self.client.set_tag(parent, "sweep_uri", self.exp.uri)
        except MlflowException as exc:
            raise ValueError(f"--mlflow {self.uri}: {problem(exc)}") from None
        log.info(f"tracked in MLflow at {self.uri}: experiment {sweep.settings.name!r} (id {self.experiment_id}), "
                 f"parent run {parent}, a child run per trial")

    def run_of(self, trial_id: str, config: dict[str, Any]) -> str:
        """A trial's run, created on first use; the first time this process uses it, its parameters are logged (again:
        the same values) and the epochs it holds read back, so a resumed trial's epochs are not logged twice."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run_id = self.runs.get(trial_id)
        if run_id is None:
            arm = str(config.get(ARM_KEY))
            tags = {MLFLOW_PARENT_RUN_ID: self.parent, "arm": arm, "trial_id": trial_id}
            run_id = self.client.create_run(self.experiment_id, run_name=f"{arm} {trial_id}", tags=tags).info.run_id
            self.runs[trial_id] = run_id
            self._save()
        if trial_id not in self.logged:
            self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in sorted(config.items())])
            self.logged[trial_id] = {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}
        return run_id

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        self.client.update_run(self.run_of(trial_id, config), status="RUNNING")

    def log_epochs(self, trial_id: str, config: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        """The epochs (reported results) its run does not hold yet: the epochs table's columns, step = epoch."""
        from mlflow.entities import Metric, RunTag

        run_id = self.run_of(trial_id, config)
        new = [e for e in epochs if int(e["epoch"]) not in self.logged[trial_id]]
        if not new:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(e["epoch"])) for e in new for k in EPOCH_SCALARS
                   if (v := finite_or_none(e.get(k))) is not None]
        tags = [RunTag("difficult", str(new[-1]["difficult"]))] if new[-1].get("difficult") is not None else []
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH], tags=tags)
        self.logged[trial_id] |= {int(e["epoch"]) for e in new}

    def best_checkpoint(self, trial_id: str, config: dict[str, Any], rel: str) -> None:
        """`rel`: the checkpoint folder inside the experiment."""
        self.client.set_tag(self.run_of(trial_id, config), "best_checkpoint", self.exp.uri_of(rel))

    def end_trial(self, trial_id: str, config: dict[str, Any], status: str) -> None:
        self.client.set_terminated(self.run_of(trial_id, config), status)

    def sync(self, trials: list[TrialRecord]) -> None:
        """At the end of `search` and `resume`: each started trial's run holds all its recorded epochs (those a live
        report missed too), the kept checkpoint of its best epoch, and how it ended (KILLED: interrupted)."""
        for t in trials:
            if not t.epochs and t.trial_id not in self.runs:
                continue  # never started
            config = t.params | {ARM_KEY: t.arm}
            self.log_epochs(t.trial_id, config, t.epochs)
            kept = kept_checkpoints(self.exp, t.trial_id).get(int(t.best["epoch"])) if t.best else None
            if kept is not None:
                self.best_checkpoint(t.trial_id, config, kept[1])
            status = RUN_STATUS.get(t.status, "KILLED")
            if self.client.get_run(self.runs[t.trial_id]).info.status != status:  # a run ended before keeps its end time
                self.end_trial(t.trial_id, config, status)

    def log_verdict(self, record: dict[str, Any]) -> None:
        """The verdict on the parent run: its headline numbers (each group's comparison, each model's selection MRE)
        as metrics, its first sentence, split and each arm's winner as tags, verdict.json as an artifact."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        numbers = {f"selection.{_short(name)}.mre_mm": v for name, v in record.get("selection_mre_mm", {}).items()}
        for r in record["comparisons"]:
            if r["is_group"]:
                numbers |= {f"verdict.{_short(r['a'])}_vs_{_short(r['b'])}.{r['group']}.{k}": r[k] for k in VERDICT_NUMBERS}
        metrics = [Metric(k, f, now, 0) for k, v in numbers.items() if (f := finite_or_none(v)) is not None]
        tags = [RunTag("verdict", (record.get("sentences") or [""])[0]), RunTag("verdict_split", record["split"])]
        tags += [RunTag(f"winner.{arm}", a["trial_id"]) for arm, a in record.get("arms", {}).items()]
        self.client.log_batch(self.parent, metrics=metrics, tags=tags)
        self.client.log_text(self.parent, self.exp.read_text(VERDICT_FILES["json"]), VERDICT_FILES["json"])

    def log_export(self, sweep: Sweep, out: Path, trial_id: str) -> None:
        """An export of the sweep on its parent run: the folder and trial as tags, the export's records (model.json,
        verification.json, ...; not the weights, which the folder holds) as artifacts under export/FOLDER/; the trial's
        run is tagged with the folder too."""
        parent = self.parent_run(sweep)
        self.client.set_tag(parent, "exported_model", str(out))
        self.client.set_tag(parent, "exported_trial", trial_id)
        if trial_id in self.runs:
            self.client.set_tag(self.runs[trial_id], "exported_model", str(out))
        for f in sorted(out.iterdir()):
            if f.is_file() and f.suffix in (".json", ".yaml", ".md"):
                self.client.log_artifact(parent, str(f), f"export/{out.name}")


def sweep_ended(exp: Experiment, sweep: Sweep, trials: list[TrialRecord], verdict: dict[str, Any] | None) -> None:
    """At the end of `search` and `resume` (search.finish): the trials' runs brought up to date, then the parent run
    FINISHED with the verdict, or KILLED when the sweep was interrupted. A tracking server that fails here is a
    warning: the sweep's own files are complete."""
    if not sweep.settings.mlflow:
        return
    from mlflow.exceptions import MlflowException

    try:
        tracker = Tracker(exp, sweep.settings.mlflow)
        tracker.parent_run(sweep)
        tracker.sync(trials)
        if verdict is not None:
            tracker.log_verdict(verdict)
        tracker.client.set_terminated(tracker.parent, "FINISHED" if verdict is not None else "KILLED")
    except MlflowException as exc:
        log.warning(f"MLflow at {sweep.settings.mlflow}: the sweep's runs were not brought up to date ({problem(exc)})")


def export_logged(exp: Experiment, sweep: Sweep, out: Path, trial_id: str) -> None:
    """After `export` of a sweep run with `--mlflow`: the export on the sweep's parent run (Tracker.log_export). A
    tracking server that fails here is a warning: the export is written."""
    from mlflow.exceptions import MlflowException

    try:
        Tracker(exp, sweep.settings.mlflow).log_export(sweep, out, trial_id)
    except MlflowException as exc:
        log.warning(f"MLflow at {sweep.settings.mlflow}: the export was not logged ({problem(exc)})")
        return
    log.info(f"logged to MLflow at {sweep.settings.mlflow}: the sweep's parent run has the tag exported_model={out}")


class TrialRuns(Callback):
    """The trials' runs while the sweep runs (search.build_tuner adds it with `--mlflow`): a trial's run is started
    (or continued) with the trial, each reported epoch logged, the best epoch's checkpoint tagged once Ray has stored
    it, the run ended with the trial. When the tracking server fails, one warning, and the sweep goes on untracked
    until it ends (then `sweep_ended` completes the runs from the sweep's own records)."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.tracker: Tracker | None = None

    def setup(self, **info: Any) -> None:
        self.tracker = Tracker(Experiment(self.experiment), self.uri)

    def _call(self, method: str, trial: Any, *args: Any) -> None:
        if self.tracker is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            getattr(self.tracker, method)(trial.trial_id, trial.config, *args)
        except MlflowException as exc:
            self.tracker = None
            log.warning(f"MLflow at {self.uri}: {problem(exc)}; the sweep goes on, and its runs are brought up to date "
                        "when it ends")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("start", trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._call("log_epochs", trial, [result])

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """Ray calls this after on_trial_result with the epoch's stored checkpoint; tagged when the epoch is the trial's
        best so far (Ray keeps the best checkpoints by val MRE, so it stays)."""
        r = trial.last_result or {}
        if finite_or_none(r.get("val_mre")) is not None and r["val_mre"] <= r.get("best_val_mre", r["val_mre"]):
            self._call("best_checkpoint", trial, f"{trial_dirname(trial.trial_id)}/{posixpath.basename(checkpoint.path)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("end_trial", trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("end_trial", trial, "FAILED")

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles its callbacks with the experiment (tuner.pkl): the URI and the experiment, never a client."""
        return {"uri": self.uri, "experiment": self.experiment, "tracker": None}
