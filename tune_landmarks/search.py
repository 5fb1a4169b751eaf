"""Sweeps, the Ray driver: Ray Tune runs the trials (each one `stages.train_any`), Optuna (TPE) samples them, ASHA
stops the weak ones early, and every arm (masked, weighted, all landmarks, refine) is searched alike with its own
budget, so the verdict compares tuned arms.

What an experiment is and where it lives (sweep.json, file and folder names) is experiment.py's; reading
its results is results.py's. This module only launches, restores and finishes sweeps.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's classic table, trimmed by CLIReporter below

import optuna  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from . import ray_adapter, ray_setup, resources, tracking  # noqa: E402
from .config import TrainConfig, from_dict, rule_error  # noqa: E402
from .experiment import (  # noqa: E402
    ARM_KEY,
    JOURNAL_FILE,
    METRIC,
    SWEEP_FILE,
    Experiment,
    Sweep,
    SweepSettings,
    experiment_uri,
    trial_dirname,
)
from .results import (  # noqa: E402
    EPOCH_JSON,
    TrialRecord,
    checkpoint_record,
    collect,
    damage_of,
    latest_intact,
    summary_text,
    unfinished,
    write_tables,
)
from .space import SearchSpace, load_space  # noqa: E402
from .storage import LEASE_TIMEOUT_S, DriverLease, storage_uri, trial_scratch, working_copy  # noqa: E402

log = logging.getLogger(__name__)
REPORT_KEYS = ("val_mre", "best_val_mre", "val_mre_difficult", "val_mre_other", "max_drift", "sdr_2mm", "epoch")


# ---------------------------------------------------------------- the trial

def trainable(config: dict[str, Any], sweep: Sweep) -> None:
    """One Ray trial: `stages.train_any` (run.train, or the refinement stage for the refine arm) with a callback
    that reports each epoch and its checkpoint to Tune."""
    import torch
    from ray import tune

    from .stages import train_any

    cfg = sweep.trial_config(config, tune.get_context().get_trial_dir())
    cfg.threads = resources.trial_threads()  # --cpus-per-trial, or the share --resource-policy distribute gave it
    torch.set_num_threads(cfg.threads)
    # every file the trial writes for itself; Ray stores what it reports
    scratch = trial_scratch(experiment_uri(sweep.settings.storage, sweep.settings.name), tune.get_context().get_trial_id())
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restored (or resized) trial continues from its last reported epoch, not from 0
        with ckpt.as_directory() as d:
            _restore_from(Path(d), sweep, tune.get_context().get_trial_id(), scratch / "resume.pt")
        cfg.resume = str(scratch / "resume.pt")
    cpu = time.process_time()

    def report(metrics: dict[str, Any], checkpoint_file: Path) -> None:
        nonlocal cpu
        d = scratch / "report"  # Ray copies it into the trial's storage before tune.report returns
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        try:
            os.link(checkpoint_file, d / "checkpoint.pt")
        except OSError:
            shutil.copy(checkpoint_file, d / "checkpoint.pt")
        (d / EPOCH_JSON).write_text(json.dumps(checkpoint_record(d / "checkpoint.pt", metrics["epoch"], metrics["val_mre"])))
        (scratch / "resume.pt").unlink(missing_ok=True)  # a restored trial's start: loaded, and now superseded
        # the threads the epoch ran with and the CPU seconds this process spent since the last report (the sweep's
        # busy share, BENCHMARKS.md); then the next epoch's threads, from the share Ray gives the trial now
        metrics |= {"threads": torch.get_num_threads(), "cpu_seconds": time.process_time() - cpu}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(d)))
        cpu = time.process_time()
        torch.set_num_threads(resources.trial_threads())

    logging.getLogger("tune_landmarks").setLevel(logging.WARNING)  # the console is Ray's table
    try:
        train_any(cfg, callback=report, start_per_landmark=sweep.start_errors or None, scratch=scratch)
    finally:  # a trial Ray stops while it waits in tune.report may never get here: ray_setup.ScratchCleanup
        shutil.rmtree(scratch, ignore_errors=True)


def _restore_from(d: Path, sweep: Sweep, trial_id: str, dest: Path) -> None:
    """Copy the checkpoint a restored trial continues from to `dest`: the one Ray restored, unless its bytes are not
    the ones recorded when it was written (a killed upload, a full disk); then the trial's latest intact kept
    checkpoint, which the trial's log names (resume names it too, sweeps.damaged_restarts)."""
    meta, data = json.loads((d / EPOCH_JSON).read_text()), (d / "checkpoint.pt").read_bytes()
    why = damage_of(meta, data)
    if why is None:
        dest.write_bytes(data)
        return
    from .model import CheckpointError

    exp = Experiment(experiment_uri(sweep.settings.storage, sweep.settings.name))
    found = latest_intact(exp, trial_id, int(meta["epoch"]))
    if found is None:
        raise CheckpointError(f"trial {trial_id}: the checkpoint of epoch {meta['epoch']} is damaged ({why}) and no "
                              "earlier intact one was kept: restart it with `resume --restart-errored`")
    epoch, rel = found
    dest.write_bytes(exp.read_bytes(rel, "checkpoint.pt"))
    log.warning(f"trial {trial_id}: the checkpoint of epoch {meta['epoch']} is damaged ({why}); continuing from "
                f"epoch {epoch}, its latest intact checkpoint")


# ---------------------------------------------------------------- searcher, scheduler, state

class ArmSearch(Searcher):
    """One Optuna study per arm (the same TPE sampler and seed, each over its arm's space), trials handed out
    in turn until every arm has spent its budget: the arms are tuned alike, so the verdict compares tuned
    arms, not one arm's luck with a single learning rate."""

    def __init__(self, inners: dict[str, OptunaSearch], budgets: dict[str, int], journal: Path):
        super().__init__(metric="best_val_mre", mode="min")
        self.inners, self.budgets, self.journal = inners, budgets, journal
        self.asked = dict.fromkeys(inners, 0)
        self.arm_of: dict[str, str] = {}
        self.max_concurrent: float = math.inf
        self.live: set[str] = set()  # trials handed out and not complete, in this process only (never saved)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Take `--max-concurrent` here: the ConcurrencyLimiter Ray wraps this searcher in then defers to it and
        keeps no live set of its own. The limiter's live set is saved with its state; when a driver dies between
        Ray's uploads of that state and of the trial list, the restored set holds a trial the restored list has
        finished, nothing ever completes it, and the resumed sweep waits for ever. Here the live set is not saved:
        a restored sweep starts it empty (the trials Ray resumes run on their resources, which still bound what
        runs at once)."""
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        open_arms = [a for a in self.inners if self.asked[a] < self.budgets[a]]
        if not open_arms:
            return Searcher.FINISHED
        if len(self.live) >= self.max_concurrent:
            return None
        arm = min(open_arms, key=lambda a: self.asked[a] / self.budgets[a])  # in turn, whatever the budgets
        params = self.inners[arm].suggest(trial_id)
        if not isinstance(params, dict):
            return params
        self.asked[arm] += 1
        self.arm_of[trial_id] = arm
        self.live.add(trial_id)
        ray_adapter.optuna_trial(self.inners[arm], trial_id).set_user_attr("ray_trial_id", trial_id)
        return {**params, ARM_KEY: arm}

    def open_in_study(self, trial_id: str) -> OptunaSearch | None:
        """The arm's searcher when the trial is still open in the arm's study, else None. Optuna's journal is
        written at once, Ray's trial list at its snapshots: a driver killed between the two leaves a trial that
        the study has finished (told its value, or stopped by ASHA) but that Ray restores as unfinished and runs
        on from its checkpoint. Its new results go to Ray's tables; the study keeps what it was told first."""
        arm = self.arm_of.get(trial_id)
        if arm is None:
            return None
        number = ray_adapter.optuna_trial(self.inners[arm], trial_id).number
        study = ray_adapter.optuna_study(self.inners[arm])
        return None if study.get_trials(deepcopy=False)[number].state.is_finished() else self.inners[arm]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (inner := self.open_in_study(trial_id)) is not None:
            inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if (inner := self.open_in_study(trial_id)) is not None:
            inner.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        inner = {}
        with tempfile.TemporaryDirectory() as d:
            for arm, searcher in self.inners.items():
                searcher.save(os.path.join(d, arm))
                inner[arm] = Path(d, arm).read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"asked": self.asked, "arm_of": self.arm_of, "inner": inner}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.asked, self.arm_of, self.live = state["asked"], state["arm_of"], set()
        with tempfile.TemporaryDirectory() as d:
            for arm, blob in state["inner"].items():
                Path(d, arm).write_bytes(blob)
                ray_adapter.restore_optuna(self.inners[arm], os.path.join(d, arm), self.journal)
        self.fail_orphans()

    def fail_orphans(self) -> int:
        """Trials Optuna handed out after the last saved searcher state (a hard kill) are RUNNING in the
        journal forever, while Ray asks for them again. Fail them (user attr `orphan`) so each study holds
        each Ray trial once and TPE does not wait on them."""
        n = 0
        for searcher in self.inners.values():
            known = ray_adapter.optuna_numbers(searcher)
            study = ray_adapter.optuna_study(searcher)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.number not in known:
                    ray_adapter.set_trial_user_attr(study, t, "orphan", True)
                    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                    n += 1
        return n


class ArmASHA(FIFOScheduler):
    """ASHA within each arm: one ASHAScheduler per arm (the same reduction factor; the same rungs unless
    --arm-epochs gives an arm more epochs), a trial compared only with its own arm's trials. Shared rungs would let
    an arm that starts ahead (the refinement stage moves the difficult landmarks more in one epoch than a fine-tune
    does in four) stop every trial of the others at the first rung, and the verdict would compare a tuned arm with
    arms cut short."""

    def __init__(self, by_arm: dict[str, ASHAScheduler]):
        super().__init__()
        self.by_arm = by_arm

    def arm(self, trial: Any) -> ASHAScheduler:
        return self.by_arm[trial.config.get(ARM_KEY, next(iter(self.by_arm)))]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.by_arm.values()])

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.arm(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.arm(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.arm(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.arm(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{arm}: {s.debug_string()}" for arm, s in self.by_arm.items())


def replay_rungs(scheduler: Any, trials: list[TrialRecord]) -> int:
    """Ray does not save ASHA's rungs with the experiment: a restored sweep starts with empty rungs and
    would let weak trials run to the end. Feed every trial's recorded per-epoch results back into its arm's
    rungs, in the order they happened, so the rungs are as they were before the interruption."""
    events = [(e.get("timestamp", 0), e.get("training_iteration", e.get("epoch")), t.trial_id, t.arm, e[METRIC])
              for t in trials for e in t.epochs if e.get(METRIC) is not None]
    by_arm = ray_adapter.base_scheduler(scheduler).by_arm
    for _, it, tid, arm, value in sorted(events, key=lambda ev: (ev[0], ev[1])):
        ray_adapter.asha_record(by_arm[arm], tid, it, value)
    return len(events)


def arm_spaces(space: SearchSpace, arms: list[str]) -> dict[str, SearchSpace]:
    return {arm: space.for_arm(arm) for arm in arms}


def make_searcher(space: SearchSpace, settings: SweepSettings, journal: Path) -> ArmSearch:
    """One OptunaSearch (TPE, seeded) per arm over the arm's define-by-run space, the studies (`NAME.ARM`) in
    one journal file."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    inners = {arm: OptunaSearch(sub.define_by_run(), metric="best_val_mre", mode="min",
                                sampler=optuna.samplers.TPESampler(seed=settings.seed),
                                study_name=f"{settings.name}.{arm}", storage=storage)
              for arm, sub in arm_spaces(space, settings.arms).items()}
    return ArmSearch(inners, {arm: settings.budget(arm) for arm in settings.arms}, journal)


def make_scheduler(space: SearchSpace, settings: SweepSettings) -> Any:
    """ASHA on the epoch within each arm, up to the arm's epochs; the first rung is never before the largest
    warmup any arm can draw ends, nor (`--arm-grace-period refine=N`) before an arm's own first rung: a crop network
    trained from scratch is not judged at its first epochs. Under `--resource-policy distribute`, inside Ray's
    ResourceChangingScheduler (resources.py): cores finished trials leave go to the trials still running."""
    grace = settings.grace_period or max(1, math.ceil(space.max_warmup()))

    def asha(arm: str, epochs: int) -> ASHAScheduler:
        first = settings.arm_grace_period.get(arm, grace)
        return ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="min", max_t=epochs,
                             grace_period=min(first, epochs), reduction_factor=settings.reduction_factor)

    epochs = {arm: int(settings.epochs_of(arm)) for arm in settings.arms}
    by_arm = ArmASHA({arm: asha(arm, n) for arm, n in epochs.items()})
    if settings.resource_policy == "fixed":
        return by_arm
    return resources.make(by_arm, settings.cpus_per_trial, settings.gpus_per_trial, settings.max_concurrent,
                          settings.total_trials, epochs, ARM_KEY)


# ---------------------------------------------------------------- driver

def prepare_sweep(space_file: str, base: TrainConfig, settings: SweepSettings) -> Sweep:
    """Everything that can fail before Ray starts: the settings and the space (every endpoint against its
    option's rule), the data (cached once for all trials), the start checkpoint's per-landmark errors
    (computed once, handed to every trial). The Sweep holds new objects: `base` and `settings` stay as given."""
    from .build import with_start_model
    from .infer import start_errors
    from .model import read_checkpoint
    from .run import prepare_data

    settings.validate()
    settings = dataclasses.replace(settings, storage=storage_uri(settings.storage), epochs=settings.epochs or base.epochs)
    base = dataclasses.replace(base, epochs=settings.epochs)
    space = load_space(space_file)
    if not (base.resume or base.start_predictions):
        raise ValueError("search needs --resume START_CHECKPOINT (trials fine-tune from it), or for `--arms refine` "
                         "--start-predictions DIR (another detector's points)")
    if base.start_predictions and settings.arms != ["refine"]:
        raise rule_error("arms", ",".join(settings.arms), "'refine' with --start-predictions (the other arms fine-tune "
                                                          "a start model)")
    spaces = arm_spaces(space, settings.arms)
    for arm, sub in spaces.items():  # a trial's own values are checked with each sample; the arms' corners here
        own = dataclasses.replace(base, epochs=settings.epochs_of(arm))
        sub.check_against(own)
        from_dict(sub.defaults(), own).validate()
    if base.resume:
        base = with_start_model(base, read_checkpoint(base.resume))  # an imported model's spec fixes how images are read
        base = dataclasses.replace(base, resume=str(Path(base.resume).resolve()))
    else:
        base = dataclasses.replace(base, start_predictions=str(Path(base.start_predictions).resolve()))
    base = dataclasses.replace(base, dataset_path=str(Path(base.dataset_path).resolve()),
                               threads=max(1, int(settings.cpus_per_trial)))
    data = prepare_data(base, progress=True)
    base = dataclasses.replace(base, train_split=data.roles.train.name, val_split=data.roles.val.name,  # every trial
                               test_split=data.roles.test.name if data.roles.test else None)   # and resume: these
    if data.roles.test is None:
        raise ValueError(f"{data.info.root}: no verdict split (the dataset has none of its own): give --test-split, "
                         "images the selection never sees")
    if "refine" in spaces:
        prepare_crops(spaces["refine"], base, data)
    summ = start_errors(base, data)
    log.info(f"start {base.resume or base.start_predictions}: {data.val_split} MRE {summ.mre:.3f} mm "
             "(computed once, shared by all trials)")
    log.info("roles: " + ", ".join(f"{role} {v['spec']} ({len(v['image_ids'])} images)"
                                    for role, v in data.roles.ids().items()))
    notes = []
    space, note = space.with_threshold_below(max(summ.per_landmark.values()))
    if note:
        log.info(f"note: {note}")
        notes.append(note)
    return Sweep(settings, base, str(space.path), space.to_dict(), summ.per_landmark, data.info.symbols,
                 data.roles.ids(), notes)


def prepare_crops(space: SearchSpace, base: TrainConfig, data: Any) -> None:
    """For the refine arm, before Ray starts: every crop setting the arm can sample checked against the training
    and selection images (too fine a resolution, a crop larger than an image; each entry, `refine_crop_mm.Go`
    included, at its landmark's resolutions), and the physical cache of every resolution it can sample (a fixed
    value or choices) built once, for all trials to share; a resolution drawn from a range is cached by the first
    trial that draws it."""
    from .config import DEFAULT_KEY, assign
    from .crops import CropGeometry
    from .refine import check_crop_entries, check_crops, physical_splits

    def entries(name: str) -> dict[str, list[Any]]:
        """Each entry (`default` or a landmark) of a per-landmark option: the values the space or the base gives it."""
        out = {k: [v] for k, v in getattr(base, name).items()}
        for p in space.params:
            if p.name.split(".")[0] == name:
                out[p.name.partition(".")[2] or DEFAULT_KEY] = [v for _, v in p.corners()]
        return out

    sides, resolutions = entries("refine_crop_mm"), entries("refine_mm_per_px")
    check_crop_entries(assign(base, {f"{name}.{k}": vs[0] for name, got in (("refine_crop_mm", sides),
                                                                             ("refine_mm_per_px", resolutions))
                                     for k, vs in got.items()}), data.info.symbols, base.difficult or None)
    for key, values in resolutions.items():
        for res in values:
            check_crops({key: res}, {}, data)
    for key, mms in sides.items():
        for res in resolutions.get(key, resolutions.get(DEFAULT_KEY, [])):
            for mm in mms:
                check_crops({}, {key: CropGeometry.from_mm(mm, res)}, data)
    ranged = {p.name.partition(".")[2] or DEFAULT_KEY for p in space.params
              if p.name.split(".")[0] == "refine_mm_per_px" and p.type not in ("fixed", "categorical")}
    for key, values in resolutions.items():
        if key not in ranged:  # every value it can take, not a range
            for res in values:
                physical_splits(data, res, base)


def init_ray(address: str | None, start_model: str | None = None) -> None:
    """Ray for the sweep: a cluster at `address`, else a local Ray whose every listener is on 127.0.0.1, whatever
    the environment (ray_adapter.local_ray_on_loopback), and that asks for Ray's token (Ray's default for a local
    Ray, unless RAY_AUTH_MODE says otherwise). An imported start model's code copy travels to every worker as a
    runtime_env `py_modules` entry (no shared filesystem needed for it)."""
    import ray

    from .build import code_modules, read_arch

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    console = ray_setup.ray_init_options(ray_setup.verbosity())  # what reaches the console (ray_setup.py)
    modules = code_modules(read_arch(start_model)) if start_model else []
    if modules:
        console["runtime_env"] = console.get("runtime_env", {}) | {"py_modules": modules}
    if address:
        ray.init(address=address, **console)
    else:
        ray_adapter.local_ray_on_loopback()
        ray.init(include_dashboard=False, **console)


def build_tuner(sweep: Sweep, restore: bool = False, restart_errored: bool = False):
    """The Tuner for a new sweep, or the restored one; returns it with the scheduler it will use."""
    from ray import tune
    from ray.tune import CLIReporter

    s = sweep.settings
    exp = Experiment.at(s.storage, s.name)
    space = sweep.search_space()
    journal = journal_path(exp)
    searcher = make_searcher(space, s, journal)
    scheduler = make_scheduler(space, s)
    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    fn = tune.with_resources(tune.with_parameters(trainable, sweep=sweep), resources)
    console = ray_setup.run_config_options(exp, journal, {a: s.epochs_of(a) for a in s.arms}, ray_setup.verbosity())
    if s.mlflow:  # each trial's MLflow run (tracking.py)
        console["callbacks"].append(tracking.TrialRuns(s.mlflow, exp.uri))
    if restore:
        tuner = tune.Tuner.restore(exp.uri, trainable=fn, resume_unfinished=True, resume_errored=not restart_errored,
                                   restart_errored=restart_errored)
        # the searcher (its journal) and callbacks of where the experiment is now, not those pickled where it was
        # first run; Ray restores the searcher's state into it (ArmSearch.restore). The scheduler is the pickled one.
        tune_config, run_config = ray_adapter.restored_configs(tuner)
        tune_config.search_alg = searcher
        run_config.callbacks, run_config.verbose = console["callbacks"], console["verbose"]  # this run's -v/-q too
        return tuner, tune_config.scheduler
    reporter = CLIReporter(parameter_columns=[ARM_KEY] + space.searched,
                           metric_columns={"epoch": "ep", "val_mre": "val_mre", "val_mre_difficult": "difficult",
                                           "max_drift": "max_drift", "best_val_mre": "best"},
                           max_report_frequency=30, sort_by_metric=False)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=sweep.total_trials,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=s.reuses_actors,
                                    trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id)),
        run_config=tune.RunConfig(
            name=s.name, storage_path=storage_uri(s.storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="min"),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            progress_reporter=reporter, **console),
    )
    return tuner, scheduler


def journal_path(exp: Experiment) -> Path:
    """The Optuna journal Optuna writes: in the experiment folder when it is local; for object storage (no
    appends) a local copy that ray_setup.StorageSync uploads to the experiment at every snapshot of Ray's state
    and at the end, and that `resume` pulls from it first (storage.working_copy: the same path on every
    machine, because Ray saves it with the searcher)."""
    p = exp.local / JOURNAL_FILE if exp.local is not None else working_copy(exp.uri, JOURNAL_FILE)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def run_search(space_file: str, base: TrainConfig, settings: SweepSettings,
               lease_timeout: float = LEASE_TIMEOUT_S) -> int:
    """Launch a sweep; returns the exit code (130 when interrupted with unfinished trials). The experiment's lease
    (storage.DriverLease) is taken once the checks have passed, before anything is written, and held to the end."""
    exp = Experiment.at(settings.storage, settings.name)
    exp.check_storage()  # object storage: credentials, endpoint, bucket; before anything runs or is written
    lease = DriverLease(exp.uri, exp.fs, exp.root, "search", lease_timeout)
    _refuse_existing(exp)
    if settings.mlflow:  # the tracking server answers; sweep.json keeps its URI without credentials
        settings = dataclasses.replace(settings, mlflow=tracking.connect(settings.mlflow))
    sweep = prepare_sweep(space_file, base, settings)
    with lease:
        _refuse_existing(exp)  # another `search` of this name may have written it while this one prepared
        exp.save_sweep(sweep)
        if settings.mlflow:
            tracking.Tracker(exp, settings.mlflow).open(sweep)
        if exp.local is None:  # a new experiment: no local copies (journal, driver.log) left from an earlier one here
            shutil.rmtree(working_copy(exp.uri, JOURNAL_FILE).parent, ignore_errors=True)
        init_ray(settings.address, sweep.base.resume)
        tuner, _ = build_tuner(sweep)
        with ray_setup.driver_console(exp):
            tuner.fit()
            return finish(exp, sweep, lease)


def _refuse_existing(exp: Experiment) -> None:
    """One name, one sweep: a second `search` of it would mix two sweeps' trials in one experiment."""
    if exp.exists(SWEEP_FILE):
        raise FileExistsError(f"{exp}: an experiment of that name exists; resume it with "
                              f"`tune-landmarks resume {exp}` or choose another --name")


def finish(exp: Experiment, sweep: Sweep, lease: DriverLease) -> int:
    """After fit(): tables, the summary on the selection split, and exit 130 with the resume command if trials
    are unfinished; else the verdict on the verdict split (verdict.json, verdict.parquet). With `--mlflow`, the runs
    brought up to date and the verdict logged to the parent run (tracking.sweep_ended). Nothing is written when
    `lease` was taken over while the sweep ran (LeaseLost): the driver that took it writes them."""
    from .compare import sweep_verdict, verdict_text

    lease.check()
    exp.upload(JOURNAL_FILE, journal_path(exp))  # a remote experiment's journal, in its storage (a local one is there)
    trials = collect(exp)
    paths = write_tables(exp, sweep, trials)
    log.info("tables: " + ", ".join(paths.values()))
    log.info(summary_text(sweep, trials))
    left = unfinished(sweep, trials)
    if left > 0:
        log.warning(f"interrupted: {left} of {sweep.total_trials} trials unfinished — resume with: "
                    f"tune-landmarks resume {exp}")
        tracking.sweep_ended(exp, sweep, trials, None)
        return 130
    record = sweep_verdict(exp, n_boot=1000)
    log.info(verdict_text(record))
    tracking.sweep_ended(exp, sweep, trials, record)
    return 0
