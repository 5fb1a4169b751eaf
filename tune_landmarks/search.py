"""Sweeps, the Ray driver: Ray Tune runs the trials (each one `run.train`), Optuna (TPE) samples them, ASHA
stops the weak ones early, and a control arm fine-tunes all landmarks with the same budget.

What an experiment is and where it lives (sweep.json, file and folder names) is experiment.py's; reading
its results is results.py's. This module only launches, restores and finishes sweeps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's classic table, trimmed by CLIReporter below

import optuna  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from . import ray_adapter  # noqa: E402
from .config import TrainConfig, from_dict  # noqa: E402
from .experiment import (  # noqa: E402
    CONTROL_KEY,
    JOURNAL_FILE,
    METRIC,
    SWEEP_FILE,
    Experiment,
    Sweep,
    SweepSettings,
    storage_uri,
    trial_dirname,
)
from .results import TrialRecord, collect, summary_text, unfinished, write_tables  # noqa: E402
from .space import SearchSpace, load_space  # noqa: E402

log = logging.getLogger(__name__)
REPORT_KEYS = ("val_mre", "best_val_mre", "val_mre_difficult", "val_mre_other", "max_drift", "sdr_2mm", "epoch")


# ---------------------------------------------------------------- the trial

def trainable(config: dict[str, Any], sweep: Sweep) -> None:
    """One Ray trial: `run.train` with a callback that reports each epoch and its checkpoint to Tune."""
    import torch
    from ray import tune

    from .run import train

    cfg = sweep.trial_config(config, tune.get_context().get_trial_dir())
    cfg.threads = cfg.threads or max(1, int(round(float(sweep.base.get("threads") or 1))))
    torch.set_num_threads(cfg.threads)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restored trial continues from its last reported epoch, not from 0
        local = Path(tempfile.mkdtemp(prefix="tl-resume-"))
        with ckpt.as_directory() as d:
            shutil.copy(Path(d) / "checkpoint.pt", local / "checkpoint.pt")
        cfg.resume = str(local / "checkpoint.pt")

    def report(metrics: dict[str, Any], checkpoint_file: Path) -> None:
        d = Path(tempfile.mkdtemp(prefix="tl-ckpt-"))
        try:
            os.link(checkpoint_file, d / "checkpoint.pt")
        except OSError:
            shutil.copy(checkpoint_file, d / "checkpoint.pt")
        (d / "epoch.json").write_text(json.dumps({"epoch": metrics["epoch"], "val_mre": metrics["val_mre"]}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(d)))
        shutil.rmtree(d, ignore_errors=True)

    logging.getLogger("tune_landmarks").setLevel(logging.WARNING)  # the console is Ray's table
    train(cfg, callback=report, start_per_landmark=sweep.start_errors or None, keep_files=False)


# ---------------------------------------------------------------- searcher, scheduler, state

class ControlArm(Searcher):
    """Hands out the control configurations first, then delegates to Optuna. Control trials are never
    told to Optuna (they are not samples of the space)."""

    def __init__(self, inner: OptunaSearch, controls: list[dict[str, Any]]):
        super().__init__(metric="best_val_mre", mode="min")
        self.inner = inner
        self.controls = list(controls)
        self.control_ids: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.controls:
            self.control_ids.add(trial_id)
            return self.controls.pop(0)
        params = self.inner.suggest(trial_id)
        if isinstance(params, dict):
            ray_adapter.optuna_trial(self.inner, trial_id).set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.control_ids:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.control_ids:
            self.inner.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            self.inner.save(os.path.join(d, "inner.pkl"))
            inner = Path(d, "inner.pkl").read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"controls": self.controls, "control_ids": self.control_ids, "inner": inner}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.controls, self.control_ids = state["controls"], state["control_ids"]
        with tempfile.TemporaryDirectory() as d:
            Path(d, "inner.pkl").write_bytes(state["inner"])
            self.inner.restore(os.path.join(d, "inner.pkl"))
        self.fail_orphans()

    def fail_orphans(self) -> int:
        """Trials Optuna handed out after the last saved searcher state (a hard kill) are RUNNING in the
        journal forever, while Ray asks for them again. Fail them (user attr `orphan`) so the study holds
        each Ray trial once and TPE does not wait on them."""
        known = ray_adapter.optuna_numbers(self.inner)
        study = ray_adapter.optuna_study(self.inner)
        orphans = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.number not in known]
        for t in orphans:
            ray_adapter.set_trial_user_attr(study, t, "orphan", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        return len(orphans)


class ControlFreeASHA(ASHAScheduler):
    """ASHA that lets the control arm run its full budget and keeps it out of the rungs."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config.get(CONTROL_KEY):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if trial.config.get(CONTROL_KEY):
            ray_adapter.asha_forget(self, trial.trial_id)
            return None
        return super().on_trial_complete(tune_controller, trial, result)


def replay_rungs(scheduler: ASHAScheduler, trials: list[TrialRecord]) -> int:
    """Ray does not save ASHA's rungs with the experiment: a restored sweep starts with empty rungs and
    would let weak trials run to the end. Feed every searched trial's recorded per-epoch results back,
    in the order they happened, so the rungs are as they were before the interruption."""
    events = [(e.get("timestamp", 0), e.get("training_iteration", e.get("epoch")), t.trial_id, e[METRIC])
              for t in trials if not t.control for e in t.epochs if e.get(METRIC) is not None]
    for _, it, tid, value in sorted(events, key=lambda ev: (ev[0], ev[1])):
        ray_adapter.asha_record(scheduler, tid, it, value)
    return len(events)


def make_searcher(space: SearchSpace, settings: SweepSettings, journal: Path,
                  controls: list[dict[str, Any]]) -> ControlArm:
    """OptunaSearch (TPE, seeded) over the space's define-by-run function, its study in a journal file."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    inner = OptunaSearch(space.define_by_run(), metric="best_val_mre", mode="min",
                         sampler=optuna.samplers.TPESampler(seed=settings.seed), study_name=settings.name,
                         storage=storage)
    return ControlArm(inner, controls)


def make_scheduler(space: SearchSpace, settings: SweepSettings) -> ControlFreeASHA:
    """ASHA on the epoch; the first rung is never before the largest warmup in the space ends."""
    grace = settings.grace_period or max(1, math.ceil(space.max_warmup()))
    epochs = int(settings.epochs)
    return ControlFreeASHA(time_attr="training_iteration", metric=METRIC, mode="min", max_t=epochs,
                           grace_period=min(grace, epochs), reduction_factor=settings.reduction_factor)


# ---------------------------------------------------------------- driver

def control_configs(space: SearchSpace, k: int) -> list[dict[str, Any]]:
    """Control arm: all landmarks in the loss, the space's central lr/warmup, everything else as sampled
    centrally; seeds differ between control repeats."""
    defaults = space.defaults()
    drop = {"difficult_threshold", "difficult", "difficult_weight", "distill_weight"}
    base = {k2: v for k2, v in defaults.items() if k2 not in drop}
    base["mode"] = "all"
    return [{**base, CONTROL_KEY: True, **({"seed": i} if k > 1 else {})} for i in range(k)]


def prepare_sweep(space_file: str, base: TrainConfig, settings: SweepSettings) -> tuple[Sweep, Any]:
    """Everything that can fail before Ray starts: the settings and the space (every endpoint against its
    option's rule), the data (cached once for all trials), the start checkpoint's per-landmark errors
    (computed once, handed to every trial)."""
    from .infer import start_errors
    from .model import read_checkpoint
    from .run import prepare_data

    settings.validate()
    settings.storage = storage_uri(settings.storage)
    space = load_space(space_file)
    if not base.resume:
        raise ValueError("search needs --resume START_CHECKPOINT: trials fine-tune from it")
    if settings.epochs:
        base.epochs = settings.epochs
    settings.epochs = base.epochs
    space.check_against(base)
    read_checkpoint(base.resume)
    base.resume = str(Path(base.resume).resolve())
    base.dataset_path = str(Path(base.dataset_path).resolve())
    base.threads = max(1, int(settings.cpus_per_trial))
    # a trial's own values are validated with each sample; the base with the space's central values here
    from_dict(space.defaults(), base).validate()
    data = prepare_data(base, progress=True)
    summ = start_errors(base, data)
    log.info(f"start checkpoint {base.resume}: {data.val_split} MRE {summ.mre:.3f} mm "
             "(computed once, shared by all trials)")
    notes = []
    space, note = space.with_threshold_below(max(summ.per_landmark.values()))
    if note:
        log.info(f"note: {note}")
        notes.append(note)
    sweep = Sweep(settings, base.to_dict(), str(space.path), space.to_dict(), summ.per_landmark, data.info.symbols,
                  control_configs(space, settings.control_trials), notes)
    return sweep, data


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # local sweeps listen on 127.0.0.1 only; nothing is exposed
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(include_dashboard=False, log_to_driver=True)


def build_tuner(sweep: Sweep, restore: bool = False, restart_errored: bool = False):
    """The Tuner for a new sweep, or the restored one; returns it with the scheduler it will use."""
    from ray import tune
    from ray.tune import CLIReporter

    s = sweep.settings
    exp = Experiment.at(s.storage, s.name)
    space = sweep.search_space()
    searcher = make_searcher(space, s, journal_path(exp), sweep.controls)
    scheduler = make_scheduler(space, s)
    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    fn = tune.with_resources(tune.with_parameters(trainable, sweep=sweep), resources)
    if restore:
        tuner = tune.Tuner.restore(exp.uri, trainable=fn, resume_unfinished=True, resume_errored=not restart_errored,
                                   restart_errored=restart_errored)
        return tuner, ray_adapter.restored_scheduler(tuner)
    reporter = CLIReporter(parameter_columns=space.searched + [CONTROL_KEY],
                           metric_columns={"epoch": "ep", "val_mre": "val_mre", "val_mre_difficult": "difficult",
                                           "max_drift": "max_drift", "best_val_mre": "best"},
                           max_report_frequency=30, sort_by_metric=False)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=sweep.total_trials,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=s.reuse_actors,
                                    trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id)),
        run_config=tune.RunConfig(
            name=s.name, storage_path=storage_uri(s.storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="min"),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            progress_reporter=reporter, verbose=1),
    )
    return tuner, scheduler


def journal_path(exp: Experiment) -> Path:
    """The Optuna journal: in the experiment folder when it is local; beside the command otherwise (a journal
    needs a file system with appends, which object storage is not)."""
    p = exp.local if exp.local is not None else Path.cwd() / f"{exp.name}.optuna"
    p.mkdir(parents=True, exist_ok=True)
    return p / JOURNAL_FILE


def run_search(space_file: str, base: TrainConfig, settings: SweepSettings) -> int:
    """Launch a sweep; returns the exit code (130 when interrupted with unfinished trials)."""
    exp = Experiment.at(settings.storage, settings.name)
    if exp.exists(SWEEP_FILE):
        raise FileExistsError(f"{exp}: an experiment of that name exists; resume it with "
                              f"`tune-landmarks resume {exp}` or choose another --name")
    sweep, _ = prepare_sweep(space_file, base, settings)
    exp.save_sweep(sweep)
    init_ray(settings.address)
    tuner, _ = build_tuner(sweep)
    tuner.fit()
    return finish(exp, sweep)


def finish(exp: Experiment, sweep: Sweep) -> int:
    """After fit(): tables, summary, and exit 130 with the resume command if trials are unfinished; else the
    verdict on the start, the best trial and the control."""
    from .report import sweep_verdict

    trials = collect(exp)
    paths = write_tables(exp, sweep, trials)
    log.info("tables: " + ", ".join(paths.values()))
    log.info(summary_text(sweep, trials))
    left = unfinished(sweep, trials)
    if left > 0:
        log.warning(f"interrupted: {left} of {sweep.total_trials} trials unfinished — resume with: "
                    f"tune-landmarks resume {exp}")
        return 130
    log.info("\n".join(sweep_verdict(exp)))
    return 0
