"""An experiment: what a sweep is (`Sweep`, its `SweepSettings`), what `sweep.json` holds, and the names of its
files and folders. Where and how the bytes go (a local folder or object storage) is storage.Storage's, which an
Experiment is.

Everything that only reads an experiment (results, export, report, resume, compare) imports this module,
never the Ray driver (search.py), so reading `sweep.json` needs neither Ray, Optuna nor torch.

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
import posixpath
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_STORAGE, TrainConfig, from_dict, rule_error
from .storage import Storage, storage_uri

if TYPE_CHECKING:
    import pyarrow as pa

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
    arm_grace_period: dict[str, int] = field(default_factory=dict)  # an arm's first ASHA rung when not grace_period
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
        need(set(self.arm_grace_period) <= set(self.arms) and all(n >= 1 for n in self.arm_grace_period.values()),
             "arm_grace_period", "epochs >= 1 for arms of --arms")
        need(self.grace_period is None or self.grace_period >= 1, "grace_period", ">= 1")
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
    base: TrainConfig  # the run options every trial starts from (sweep.json: TrainConfig.to_dict())
    space_path: str
    space: dict[str, Any]  # the parsed search space (space.SearchSpace.to_dict()), after any clipping
    start_errors: dict[str, float]  # the start checkpoint's per-landmark MRE on the selection split
    symbols: list[str]
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)  # read.Roles.ids(): spec and image ids per role
    notes: list[str] = field(default_factory=list)

    @property
    def start(self) -> str:
        """What the trials start from: the start checkpoint, or (a refine-only sweep) the start detector's predictions."""
        return self.base.resume or self.base.start_predictions

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
            base = from_dict(d.pop("base"), source=f"{source}: base")
            return cls(settings=SweepSettings(**{"resource_policy": "fixed"} | d.pop("settings")), base=base, **d)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{source}: not a readable {SWEEP_FILE} of this version ({exc})") from None


def trial_config(base: TrainConfig, sampled: dict[str, Any], trial_dir: str | Path) -> TrainConfig:
    """The single-run config a trial runs: the sweep's base, then the sampled parameters (a new object each)."""
    params = {k: v for k, v in sampled.items() if k != ARM_KEY}
    cfg = from_dict(params, base, source="trial parameters")
    cfg.out = str(Path(trial_dir) / "run")
    cfg.progress = False
    return cfg


def experiment_uri(storage: str, name: str) -> str:
    """The experiment `name` under `storage`, as Experiment.at names it (computed without opening the storage)."""
    return f"{storage_uri(storage).rstrip('/')}/{name}"


class Experiment(Storage):
    """One experiment: a storage location laid out as a sweep (SWEEP_FILE, JOURNAL_FILE, TABLES, trial folders)."""

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

    def trial_dir(self, trial_id: str) -> str:
        """A trial's folder inside this experiment (so a moved or copied experiment reads its own copies)."""
        return self.uri_of(trial_dirname(trial_id))

def load_sweep(experiment: Experiment | str | Path) -> Sweep:
    return Experiment.of(experiment).load_sweep()


