"""One configuration dataclass for a fine-tuning run.

It flows from the CLI flags (cli.py builds the flags from these fields, underscore and hyphen
spellings alike), from YAML (`--config`), and from a sweep trial's sampled parameters; so a sampled
`lr` and a typed `--lr` are the same thing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .heatmap import DECODERS
from .loss import LOSSES, MODES, AWingParams

ANNOTATORS = ("senior", "junior", "mean")


@dataclass
class TrainConfig:
    # data
    dataset_path: str = ""
    format: str | None = None  # aariz | isbi; detected from the layout when None
    annotator: str = "mean"
    train_split: str | None = None  # default: train
    val_split: str | None = None  # default: valid (Aariz) / test1 (ISBI)
    skip_bad: bool = False
    image_size: tuple[int, int] = (256, 256)  # width height of the network input
    cache_dir: str | None = None
    # model and checkpoints
    model: str = "hrnet"
    pretrained: str | None = None
    resume: str | None = None
    out: str = "runs/run"
    # optimisation
    epochs: int = 20
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    grad_clip: float = 5.0
    mixed_precision: bool = False
    seed: int = 0
    # loss
    loss: str = "adaptive_wing"
    awing_omega: float = 14.0
    awing_theta: float = 0.5
    awing_epsilon: float = 1.0
    awing_alpha: float = 2.1
    awing_weight: float = 10.0
    sigma: float = 2.0
    # which landmarks are trained
    mode: str = "all"  # all | weighted | masked
    difficult: list[str] = field(default_factory=list)
    difficult_threshold: float | None = None  # mm, on the start checkpoint's validation errors
    difficult_weight: float = 2.5
    # guarding the landmarks that are not trained, and speed
    distill_weight: float = 0.0
    bn_eval: bool = False
    freeze_stages: int = 0
    # augmentation
    aug_scale: float = 0.1
    aug_rotate: float = 10.0
    aug_translate: float = 0.05
    aug_brightness_contrast: float = 0.2
    aug_clahe_p: float = 0.3
    # evaluation and execution
    decoder: str = "dark"
    device: str = "auto"
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 for smoke tests and benchmarks
    progress: bool = True

    def awing(self) -> AWingParams:
        return AWingParams(self.awing_omega, self.awing_theta, self.awing_epsilon, self.awing_alpha, self.awing_weight)

    def validate(self) -> "TrainConfig":
        """Check every value eagerly, before any data is read or any model is built."""
        for name in RULES:
            check_field(name, getattr(self, name))
        if self.difficult and self.difficult_threshold is not None:
            raise ValueError("--difficult and --difficult-threshold exclude each other (choose one way to pick the "
                             "difficult set)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"The value of `warmup_epochs` is {self.warmup_epochs}, but must be <= epochs ({self.epochs}).")
        if self.mode != "all" and not self.difficult and self.difficult_threshold is None:
            raise ValueError(f"mode {self.mode!r} needs --difficult SYMBOLS or --difficult-threshold MM")
        if self.distill_weight > 0 and not (self.resume or self.pretrained):
            raise ValueError("--distill-weight needs a start model (--resume): the teacher is the start checkpoint")
        self.awing()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Single-field rules: (predicate, what the value must be). Used by validate() and by search-space checks.
RULES: dict[str, tuple[Any, str]] = {
    "dataset_path": (bool, "a dataset directory"),
    "format": (lambda v: v in (None, "aariz", "isbi"), "'aariz' or 'isbi'"),
    "annotator": (lambda v: v in ANNOTATORS, f"one of {', '.join(ANNOTATORS)}"),
    "image_size": (lambda v: len(v) == 2 and all(int(x) >= 32 and int(x) % 32 == 0 for x in v),
                   "two multiples of 32 (width height), each >= 32"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "loss": (lambda v: v in LOSSES, f"one of {', '.join(LOSSES)}"),
    "sigma": (lambda v: v > 0, "> 0"),
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "difficult_threshold": (lambda v: v is None or v > 0, "> 0 mm"),
    "difficult_weight": (lambda v: v > 0, "> 0"),
    "distill_weight": (lambda v: v >= 0, ">= 0"),
    "freeze_stages": (lambda v: 0 <= v <= 4, "between 0 and 4"),
    "decoder": (lambda v: v in DECODERS, f"one of {', '.join(DECODERS)}"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu or cuda[:N]"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "max_steps_per_epoch": (lambda v: v >= 0, ">= 0"),
    "awing_omega": (lambda v: v > 0, "> 0"),
    "awing_theta": (lambda v: v > 0, "> 0"),
    "awing_epsilon": (lambda v: v > 0, "> 0"),
    "awing_alpha": (lambda v: v > 1, "> 1"),
    "awing_weight": (lambda v: v >= 0, ">= 0"),
}


def check_field(name: str, value: Any) -> Any:
    """Raise the uniform message if `value` breaks the single-field rule of option `name`."""
    rule = RULES.get(name)
    if rule is not None and not rule[0](value):
        raise ValueError(f"The value of `{name}` is {value!r}, but must be {rule[1]}.")
    return value


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI/sampled value to the field's type, with a uniform message when it cannot."""
    if name not in FIELDS:
        raise KeyError(name)
    default = FIELDS[name].default if FIELDS[name].default is not dataclasses.MISSING else FIELDS[name].default_factory()
    try:
        if value is None:
            return None
        if name == "image_size":
            vals = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value, value])]
            if len(vals) != 2:
                raise ValueError
            return (vals[0], vals[1])
        if name == "difficult":
            return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else [str(s) for s in value]
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float) or name in ("difficult_threshold",):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"The value of `{name}` is {value!r}, which is not a valid {type(default).__name__}.") from None


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
    return dataclasses.replace(base or TrainConfig(), **{k: coerce(k, v) for k, v in values.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping of option: value")
    return data
