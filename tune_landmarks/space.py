"""Search-space YAML files (search_spaces/*.yaml): parse, validate, and turn into an Optuna
define-by-run function.

Each top-level key is a run option (a TrainConfig field) with a spec:
    lr:            {type: loguniform, low: 1.0e-7, high: 1.0e-4}
    warmup_epochs: {type: int, low: 0, high: 5}
    mode:          {type: categorical, choices: [masked, weighted]}
    loss:          {type: fixed, value: adaptive_wing}
Everything is checked before Ray starts; each error names the file and the key.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FIELDS, check_field, coerce, load_yaml

TYPES = ("loguniform", "uniform", "int", "categorical", "fixed")
# options that belong to the sweep, not to a trial: a space may not change them
DRIVER_OWNED = ("dataset_path", "format", "out", "resume", "cache_dir", "device", "progress", "train_split",
                "val_split", "image_size", "model", "annotator", "threads", "epochs")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    log: bool = False

    @property
    def searched(self) -> bool:
        return self.type != "fixed"

    def default(self) -> Any:
        """The space's central value: geometric/arithmetic mid-point, first choice, or the fixed value."""
        if self.type == "fixed":
            return self.value
        if self.type == "categorical":
            return self.choices[0]
        if self.type == "loguniform":
            return math.exp((math.log(self.low) + math.log(self.high)) / 2)
        if self.type == "int":
            return int(statistics.median_low(range(int(self.low), int(self.high) + 1)))
        return (self.low + self.high) / 2


class SpaceError(ValueError):
    pass


def _param(path: Path, name: str, spec: Any) -> Param:
    where = f"{path}: `{name}`"
    if name not in FIELDS:
        raise SpaceError(f"{where}: unknown option (not a run option; see `tune-landmarks finetune --help`)")
    if name in DRIVER_OWNED:
        raise SpaceError(f"{where}: set by the search command for every trial, not searchable")
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{where}: must be a mapping with `type` ({', '.join(TYPES)})")
    kind = spec["type"]
    if kind not in TYPES:
        raise SpaceError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
    allowed = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "int": {"low", "high", "log"},
               "categorical": {"choices"}, "fixed": {"value"}}[kind] | {"type"}
    extra = set(spec) - allowed
    if extra:
        raise SpaceError(f"{where}: key(s) {', '.join(sorted(extra))} do not belong to type {kind}")
    missing = allowed - set(spec) - {"log"}
    if missing:
        raise SpaceError(f"{where}: type {kind} needs {', '.join(sorted(missing))}")

    def check_value(v: Any) -> Any:
        try:
            return check_field(name, coerce(name, v))
        except ValueError as exc:
            raise SpaceError(f"{where}: {exc}") from None

    if kind == "fixed":
        return Param(name, kind, value=check_value(spec["value"]))
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: `choices` must be a non-empty list")
        return Param(name, kind, choices=tuple(check_value(c) for c in choices))
    low, high = spec["low"], spec["high"]
    numeric = (int,) if kind == "int" else (int, float)
    for k, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, numeric):
            raise SpaceError(f"{where}: `{k}` is {v!r}, but must be {'an integer' if kind == 'int' else 'a number'}")
    default = FIELDS[name].default
    if kind != "int" and isinstance(default, int) and not isinstance(default, bool):
        raise SpaceError(f"{where}: option is an integer; use type int")
    if kind == "int" and isinstance(default, float):
        pass  # an integer grid on a float option (e.g. warmup_epochs) is fine
    elif isinstance(default, (bool, str, list, tuple)) and default is not None:
        raise SpaceError(f"{where}: option is not numeric; use categorical or fixed")
    if low >= high:
        raise SpaceError(f"{where}: low ({low}) must be < high ({high})")
    log = kind == "loguniform" or bool(spec.get("log", False))
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0 (got {low})")
    return Param(name, kind, low=low, high=high, log=log)


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: tuple[Param, ...]

    @property
    def searched(self) -> list[str]:
        return [p.name for p in self.params if p.searched]

    def get(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def fixed(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.params if not p.searched}

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default() for p in self.params}

    def max_warmup(self) -> float:
        p = self.get("warmup_epochs")
        if p is None:
            return 0.0
        if p.type == "categorical":
            return float(max(p.choices))
        return float(p.value if p.type == "fixed" else p.high)

    def define_by_run(self) -> "DefineByRun":
        return DefineByRun(self.params)

    def with_threshold_below(self, max_start_error: float) -> tuple["SearchSpace", str | None]:
        """A threshold above every landmark's start error selects nothing; clip the range to just below it."""
        p = self.get("difficult_threshold")
        if p is None or p.type not in ("uniform", "loguniform") or p.high < max_start_error:
            return self, None
        new_high = round(max_start_error * 0.999, 6)
        if new_high <= p.low:
            raise SpaceError(f"{self.path}: `difficult_threshold` range {p.low}..{p.high} mm lies above every start "
                             f"error (largest {max_start_error:.3f} mm): no threshold would select a landmark")
        clipped = Param(p.name, p.type, low=p.low, high=new_high, log=p.log)
        return (SearchSpace(self.path, tuple(clipped if q is p else q for q in self.params)),
                f"difficult_threshold: high {p.high} mm clipped to {new_high} mm (the largest start error is "
                f"{max_start_error:.3f} mm; a higher threshold would select no landmark)")


@dataclass(frozen=True)
class DefineByRun:
    """The function OptunaSearch calls with each Optuna trial (a class, so the searcher can be pickled)."""

    params: tuple[Param, ...]

    def __call__(self, trial) -> dict[str, Any]:
        for p in self.params:
            if p.type in ("loguniform", "uniform"):
                trial.suggest_float(p.name, p.low, p.high, log=p.log)
            elif p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            elif p.type == "categorical":
                trial.suggest_categorical(p.name, list(p.choices))
        return {p.name: p.value for p in self.params if p.type == "fixed"}


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        data = load_yaml(path)
    except ValueError as exc:
        raise SpaceError(str(exc)) from None
    if not data:
        raise SpaceError(f"{path}: empty search space")
    params = tuple(_param(path, str(k), v) for k, v in data.items())
    if not any(p.searched for p in params):
        raise SpaceError(f"{path}: nothing to search (every entry is fixed)")
    thr = next((p for p in params if p.name == "difficult_threshold"), None)
    dif = next((p for p in params if p.name == "difficult"), None)
    if thr is not None and dif is not None:
        raise SpaceError(f"{path}: `difficult` and `difficult_threshold` exclude each other")
    return SearchSpace(path.resolve(), params)
