"""Sweeps: Ray Tune runs the trials (each one `run.train`), Optuna (TPE) samples them, ASHA stops the
weak ones early, and a control arm fine-tunes all landmarks with the same budget.

Layout of an experiment directory `<storage>/<name>/`:
    sweep.json            what the sweep was asked to do (base config, settings, space, start errors)
    optuna_journal.log    the Optuna study (open it with `optuna-dashboard optuna_journal.log`)
    <trial dirs>          Ray's, each with result.json and up to `keep` checkpoints
    trials.parquet, epochs.parquet, landmarks.parquet   written at the end (and by resume)
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's classic table, trimmed by CLIReporter below

import optuna  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from .config import TrainConfig, from_dict  # noqa: E402
from .space import SearchSpace, load_space  # noqa: E402

SWEEP_FILE = "sweep.json"
JOURNAL_FILE = "optuna_journal.log"
CONTROL_KEY = "control"
METRIC = "val_mre"
REPORT_KEYS = ("val_mre", "best_val_mre", "val_mre_difficult", "val_mre_other", "max_drift", "sdr_2mm", "epoch")


@dataclass
class SweepSettings:
    name: str
    storage: str = "./sweeps"
    num_samples: int = 20
    max_concurrent: int = 4
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    address: str | None = None
    epochs: int | None = None
    seed: int = 0
    control_trials: int = 1
    max_failures: int = 0
    reduction_factor: float = 2.0
    grace_period: int | None = None  # default: max(1, ceil(largest warmup in the space))
    keep_checkpoints: int = 2
    reuse_actors: bool = True  # False starts a fresh trial process per trial (scripts/bench_ray_overhead.py)

    def validate(self) -> "SweepSettings":
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be {rule}.")

        need(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'")
        need(self.num_samples >= 1, "num_samples", ">= 1")
        need(self.max_concurrent >= 1, "max_concurrent", ">= 1")
        need(self.gpus_per_trial >= 0, "gpus_per_trial", ">= 0")
        need(self.cpus_per_trial > 0, "cpus_per_trial", "> 0")
        need(self.epochs is None or self.epochs >= 1, "epochs", ">= 1")
        need(self.control_trials >= 0, "control_trials", ">= 0")
        need(self.max_failures >= 0, "max_failures", ">= 0")
        need(self.reduction_factor > 1, "reduction_factor", "> 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        return self


def storage_uri(storage: str) -> str:
    """Ray needs an absolute path or a URI (a relative path fails with 'URI has empty scheme')."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def is_local(storage: str) -> bool:
    return "://" not in storage or storage.startswith("file://")


def experiment_path(settings: SweepSettings) -> str:
    return f"{storage_uri(settings.storage).rstrip('/')}/{settings.name}"


# ---------------------------------------------------------------- the trial

def trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_dir: str) -> TrainConfig:
    """The single-run config a trial runs: the sweep's base, then the sampled parameters."""
    params = {k: v for k, v in sampled.items() if k != CONTROL_KEY}
    cfg = from_dict(params, from_dict(base), source="trial parameters")
    cfg.out = str(Path(trial_dir) / "run")
    cfg.progress = False
    return cfg


def trainable(config: dict[str, Any], base: dict[str, Any], start_errors: dict[str, float]) -> None:
    """One Ray trial: `run.train` with a callback that reports each epoch and its checkpoint to Tune."""
    import torch
    from ray import tune

    from .run import train

    cfg = trial_config(base, config, tune.get_context().get_trial_dir())
    cfg.threads = cfg.threads or max(1, int(round(float(base.get("threads") or 1))))
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

    train(cfg, callback=report, start_per_landmark=start_errors or None, keep_files=False, quiet=True)


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
        self.inner._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
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
        journal forever, while Ray asks for them again. Mark them FAIL (user attr `orphan`) so the study
        holds each Ray trial once and TPE does not wait on them."""
        known = {t.number for t in self.inner._ot_trials.values()}
        study = self.inner._ot_study
        n = 0
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                study._storage.set_trial_user_attr(t._trial_id, "orphan", True)
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                n += 1
        return n


class ControlFreeASHA(ASHAScheduler):
    """ASHA that lets the control arm run its full budget and keeps it out of the rungs."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config.get(CONTROL_KEY):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if trial.config.get(CONTROL_KEY):
            self._trial_info.pop(trial.trial_id, None)
            return None
        return super().on_trial_complete(tune_controller, trial, result)


def replay_rungs(scheduler: ASHAScheduler, trials: list) -> int:
    """Ray does not save ASHA's rungs with the experiment: a restored sweep starts with empty rungs and
    would let weak trials run to the end. Feed every searched trial's recorded per-epoch results back,
    in the order they happened, so the rungs are as they were before the interruption."""
    events = [(e.get("timestamp", 0), e.get("training_iteration", e.get("epoch")), t.trial_id, e[METRIC])
              for t in trials if not t.control for e in t.epochs if e.get(METRIC) is not None]
    bracket = scheduler._brackets[0]
    for _, it, tid, value in sorted(events, key=lambda ev: (ev[0], ev[1])):
        bracket.on_result(SimpleNamespace(trial_id=tid), int(it), scheduler._metric_op * float(value))
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

@dataclass
class Sweep:
    """What `sweep.json` holds: enough to rebuild the trainable, searcher and scheduler on resume."""

    settings: SweepSettings
    base: dict[str, Any]
    space_path: str
    space_text: str
    start_errors: dict[str, float]
    symbols: list[str]
    controls: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        d = asdict(self)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(d, indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Sweep":
        d = json.loads(Path(path).read_text())
        return cls(settings=SweepSettings(**d.pop("settings")), **d)

    def space(self) -> SearchSpace:
        import yaml

        from .space import _param

        data = yaml.safe_load(self.space_text)
        return SearchSpace(Path(self.space_path), tuple(_param(Path(self.space_path), k, v) for k, v in data.items()))


def control_configs(space: SearchSpace, k: int) -> list[dict[str, Any]]:
    """Control arm: all landmarks in the loss, the space's central lr/warmup, everything else as sampled
    centrally; seeds differ between control repeats."""
    defaults = space.defaults()
    drop = {"difficult_threshold", "difficult", "difficult_weight", "distill_weight"}
    base = {k2: v for k2, v in defaults.items() if k2 not in drop}
    base["mode"] = "all"
    return [{**base, CONTROL_KEY: True, **({"seed": i} if k > 1 else {})} for i in range(k)]


def prepare_sweep(space_file: str, base: TrainConfig, settings: SweepSettings) -> tuple[Sweep, "object"]:
    """Everything that can fail before Ray starts: the space, the data (cached once for all trials),
    the start checkpoint's per-landmark errors (computed once, handed to every trial)."""
    from .model import create_model, load_weights, read_checkpoint
    from .run import evaluate_split, prepare_data, resolve_device

    settings.validate()
    settings.storage = storage_uri(settings.storage)
    space = load_space(space_file)
    if not base.resume:
        raise ValueError("search needs --resume START_CHECKPOINT: trials fine-tune from it")
    if settings.epochs:
        base.epochs = settings.epochs
    settings.epochs = base.epochs
    if space.max_warmup() > base.epochs:
        raise ValueError(f"{space.path}: warmup_epochs reaches {space.max_warmup()}, more than --epochs {base.epochs}")
    ckpt = read_checkpoint(base.resume)
    base.resume = str(Path(base.resume).resolve())
    base.dataset_path = str(Path(base.dataset_path).resolve())
    base.threads = max(1, int(settings.cpus_per_trial))
    # a trial's own values are validated with each sample; check the base with a safe mode here
    probe = from_dict({**{p.name: p.default() for p in space.params}}, from_dict(base.to_dict()))
    if probe.mode != "all" and not probe.difficult and probe.difficult_threshold is None:
        raise ValueError(f"{space.path}: mode {probe.mode!r} needs `difficult` or `difficult_threshold` in the space "
                         "or --difficult on the command line")
    probe.validate()
    data = prepare_data(base, progress=True)
    model = create_model(base.model, len(data.info.symbols))
    load_weights(model, ckpt, base.resume, data.info.symbols)
    device = resolve_device(base.device)
    model.to(device)
    summ, _, _ = evaluate_split(model, data.val, data.info.symbols, device, base)
    print(f"start checkpoint {base.resume}: {data.val_split} MRE {summ.mre:.3f} mm (computed once, shared by all trials)")
    notes = []
    space, note = space.with_threshold_below(max(summ.per_landmark.values()))
    if note:
        print(f"note: {note}")
        notes.append(note)
    sweep = Sweep(settings, base.to_dict(), str(space.path), Path(space_file).read_text(), summ.per_landmark,
                  data.info.symbols, control_configs(space, settings.control_trials), notes)
    if space is not None and note:
        sweep.space_text = _space_yaml(space)
    return sweep, data


def _space_yaml(space: SearchSpace) -> str:
    import yaml

    out = {}
    for p in space.params:
        if p.type == "fixed":
            out[p.name] = {"type": "fixed", "value": list(p.value) if isinstance(p.value, tuple) else p.value}
        elif p.type == "categorical":
            out[p.name] = {"type": "categorical", "choices": list(p.choices)}
        else:
            out[p.name] = {"type": p.type, "low": p.low, "high": p.high} | ({"log": True} if p.type == "int" and p.log else {})
    return yaml.safe_dump(out, sort_keys=False)


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
    exp = experiment_path(s)
    space = sweep.space()
    journal = _journal_path(s)
    searcher, scheduler = make_searcher(space, s, journal, sweep.controls), make_scheduler(space, s)
    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    fn = tune.with_resources(tune.with_parameters(trainable, base=sweep.base, start_errors=sweep.start_errors), resources)
    if restore:
        tuner = tune.Tuner.restore(exp, trainable=fn, resume_unfinished=True, resume_errored=not restart_errored,
                                   restart_errored=restart_errored)
        # the scheduler Tune will use is the one unpickled with the experiment, not the fresh one above
        return tuner, tuner._local_tuner._tune_config.scheduler
    reporter = CLIReporter(parameter_columns=space.searched + [CONTROL_KEY],
                           metric_columns={"epoch": "ep", "val_mre": "val_mre", "val_mre_difficult": "difficult",
                                           "max_drift": "max_drift", "best_val_mre": "best"},
                           max_report_frequency=30, sort_by_metric=False)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples + len(sweep.controls),
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=s.reuse_actors,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=s.name, storage_path=storage_uri(s.storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="min"),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            progress_reporter=reporter, verbose=1),
    )
    return tuner, scheduler


def trial_dirname(trial) -> str:
    """Short trial folders (Ray's default name repeats every parameter)."""
    return f"trial_{trial.trial_id}"


def _journal_path(s: SweepSettings) -> Path:
    if is_local(s.storage):
        p = Path(experiment_path(s).removeprefix("file://"))
    else:  # the journal needs a file system with appends; keep it beside the command
        p = Path.cwd() / f"{s.name}.optuna"
    p.mkdir(parents=True, exist_ok=True)
    return p / JOURNAL_FILE


def run_search(space_file: str, base: TrainConfig, settings: SweepSettings) -> int:
    """Launch a sweep; returns the exit code (130 when interrupted with unfinished trials)."""
    from .results import finish

    exp = experiment_path(settings)
    if is_local(settings.storage) and Path(exp, SWEEP_FILE).exists():
        raise FileExistsError(f"{exp}: an experiment of that name exists; resume it with "
                              f"`tune-landmarks resume {exp}` or choose another --name")
    sweep, _ = prepare_sweep(space_file, base, settings)
    if is_local(settings.storage):
        Path(exp).mkdir(parents=True, exist_ok=True)
        sweep.save(Path(exp) / SWEEP_FILE)
    else:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(exp)
        with fs.open_output_stream(f"{root}/{SWEEP_FILE}") as f:
            f.write(json.dumps(asdict(sweep), indent=2).encode())
    init_ray(settings.address)
    tuner, _ = build_tuner(sweep)
    tuner.fit()
    return finish(exp, sweep)


def print_interrupted(exp: str, unfinished: int, total: int) -> None:
    print(f"interrupted: {unfinished} of {total} trials unfinished — resume with: tune-landmarks resume {exp}",
          file=sys.stderr)
