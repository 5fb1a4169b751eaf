"""Search spaces (search_spaces/*.yaml): parse, validate, and turn into an Optuna define-by-run function.

Each top-level key is a run option (a TrainConfig field) with a spec:
    lr:            {type: loguniform, low: 1.0e-7, high: 1.0e-4}
    warmup_epochs: {type: int, low: 0, high: 5}
    mode:          {type: categorical, choices: [masked, weighted]}
    loss:          {type: fixed, value: adaptive_wing}
A per-landmark option takes one entry a key: `refine_crop_mm.Go: {type: uniform, low: 35, high: 55}` searches
Gonion's crop, `refine_crop_mm` alone every landmark's (its `default` entry).
Everything is checked before Ray starts, each error naming the file and the key: fixed values and
choices against the option's rule, and both endpoints of a range too, because every numeric rule is an
interval (config.Rule) and an interval holds a range exactly when it holds both endpoints. Rules between
options (config.RELATIONS) are checked here when the space alone decides them, and against the sweep's
base run by `SearchSpace.check_against`.

The space has one text form, `SearchSpace.to_dict()` (what YAML holds, JSON-serialisable), read back by
`space_from_dict`; a sweep stores that dict and rebuilds the very same space on resume.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    RELATIONS,
    Relation,
    TrainConfig,
    assign,
    check_field,
    coerce,
    load_yaml,
    option_of,
    rule_message,
    scalar_name,
    value_of,
)

# what each arm of a sweep cannot use: `all` trains every landmark (no difficult set, nothing left to distil);
# `weighted` trains every landmark too (nothing to distil); `masked` has no weights to set; only `refine` has
# crops, and it never trains the start model (no weights, distillation, frozen stages or whole-image shifts)
REFINE_ONLY = frozenset({"refine_crop_mm", "refine_crop_k", "refine_crop_min_mm", "refine_crop_max_mm",
                         "refine_mm_per_px", "refine_offset_scale", "refine_model", "refine_passes",
                         "refine_tta"})
ARM_UNUSABLE = {"masked": frozenset({"difficult_weight"}) | REFINE_ONLY,
                "weighted": frozenset({"distill_weight"}) | REFINE_ONLY,
                "all": frozenset({"difficult_threshold", "difficult", "difficult_weight", "distill_weight"}) | REFINE_ONLY,
                "refine": frozenset({"difficult_weight", "distill_weight", "bn_eval", "freeze_stages", "aug_translate"})}
ARMS_KEY = "arms"  # a space's per-arm section: `arms: {refine: {lr: {...}}}` replaces or adds entries for that arm
TYPES = ("loguniform", "uniform", "int", "categorical", "fixed")
_KEYS = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "int": {"low", "high", "log"},
         "categorical": {"choices"}, "fixed": {"value"}}
# options that belong to the sweep, not to a trial: a space may not change them
DRIVER_OWNED = ("dataset_path", "format", "out", "resume", "start_predictions", "cache_dir", "device", "progress", "train_split",
                "val_split", "test_split", "image_size", "resize", "interpolation", "model", "annotator", "threads", "epochs")


class SpaceError(ValueError):
    pass


@dataclass(frozen=True)
class Param:
    """One entry of a space, its values already coerced to the option's type."""

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

    def corners(self) -> list[tuple[str, Any]]:
        """(how to name it in a message, value) for each value that decides a monotone rule over the entry."""
        if self.type == "fixed":
            return [("The value of `value` is", self.value)]
        if self.type == "categorical":
            return [("One of `choices` is", c) for c in self.choices]
        return [("The value of `low` is", self.low), ("The value of `high` is", self.high)]

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON spec of this entry; `space_from_dict` reads it back to an equal Param."""
        if self.type == "fixed":
            return {"type": "fixed", "value": _plain(self.value)}
        if self.type == "categorical":
            return {"type": "categorical", "choices": [_plain(c) for c in self.choices]}
        log = {"log": True} if self.type == "int" and self.log else {}
        return {"type": self.type, "low": self.low, "high": self.high} | log


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _param(path: Path, name: str, spec: Any) -> Param:
    """One validated entry; every refusal names the file and the key."""
    where = f"{path}: `{name}`"
    try:
        option = option_of(scalar_name(name))
    except KeyError:
        raise SpaceError(f"{where}: unknown option (not a run option, nor SYMBOL entry of a per-landmark one like "
                         "refine_crop_mm.Go; see `tune-landmarks finetune --help`)") from None
    if name in DRIVER_OWNED:
        raise SpaceError(f"{where}: set by the search command for every trial, not searchable")
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{where}: must be a mapping with `type` ({', '.join(TYPES)})")
    kind = spec["type"]
    if kind not in TYPES:
        raise SpaceError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
    allowed = _KEYS[kind] | {"type"}
    extra = set(spec) - allowed
    if extra:
        raise SpaceError(f"{where}: key(s) {', '.join(sorted(extra))} do not belong to type {kind}")
    missing = allowed - set(spec) - {"log"}
    if missing:
        raise SpaceError(f"{where}: type {kind} needs {', '.join(sorted(missing))}")

    def check_value(v: Any) -> Any:
        try:
            return check_field(option.name, coerce(option.name, v))
        except ValueError as exc:
            raise SpaceError(f"{where}: {exc}") from None

    if kind == "fixed":
        return Param(name, kind, value=check_value(spec["value"]))
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: `choices` must be a non-empty list")
        if option.type in (list, tuple):
            raise SpaceError(f"{where}: option is a list, and Optuna's choices are single values; use fixed")
        return Param(name, kind, choices=tuple(check_value(c) for c in choices))
    return _range(where, name, kind, spec, option)


def _range(where: str, name: str, kind: str, spec: dict[str, Any], option: Any) -> Param:
    low, high = spec["low"], spec["high"]
    numeric = (int,) if kind == "int" else (int, float)
    for k, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, numeric):
            raise SpaceError(f"{where}: {rule_message(k, v, 'an integer' if kind == 'int' else 'a number')}")
        if not math.isfinite(v):
            raise SpaceError(f"{where}: {rule_message(k, v, 'a finite number')}")
    if kind != "int" and option.type is int:
        raise SpaceError(f"{where}: option is an integer; use type int")
    if not option.numeric:  # an integer grid on a float option (e.g. warmup_epochs) is fine
        raise SpaceError(f"{where}: option is not numeric; use categorical or fixed")
    if low >= high:
        raise SpaceError(f"{where}: low ({low}) must be < high ({high})")
    log = spec.get("log", kind == "loguniform")
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: {rule_message('log', log, 'true or false')}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0 (got {low})")
    if option.rule is not None:
        for k, v in (("low", low), ("high", high)):
            if not option.rule.ok(v):
                raise SpaceError(f"{where}: {rule_message(k, v, option.rule.must)}")
    return Param(name, kind, low=low, high=high, log=log)


@dataclass(frozen=True)
class SearchSpace:
    """The entries every arm shares (`params`) and, per arm, the entries its own section of the file replaces
    or adds (`per_arm`): a refinement network trained from scratch needs another learning-rate range than a
    fine-tune of the start model, and saying so in the file keeps "every arm tuned alike" honest."""

    path: Path
    params: tuple[Param, ...]
    per_arm: tuple[tuple[str, tuple[Param, ...]], ...] = ()

    @property
    def searched(self) -> list[str]:
        """The names searched by some arm, in file order (shared entries first)."""
        return list(dict.fromkeys(p.name for p in self.every_entry() if p.searched))

    def every_entry(self) -> tuple[Param, ...]:
        """The shared entries, then every arm section's."""
        return self.params + tuple(p for _, ps in self.per_arm for p in ps)

    def get(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def fixed(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.params if not p.searched}

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default() for p in self.params}

    def max_warmup(self) -> float:
        """The longest warmup a trial can get (ASHA's first rung must not come before it ends)."""
        return max([float(v) for p in self.every_entry() if p.name == "warmup_epochs" for _, v in p.corners()],
                   default=0.0)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The space as its file holds it (JSON-serialisable): `space_from_dict(s.to_dict(), s.path) == s`."""
        arms = {ARMS_KEY: {arm: {p.name: p.to_dict() for p in ps} for arm, ps in self.per_arm}} if self.per_arm else {}
        return {p.name: p.to_dict() for p in self.params} | arms

    def define_by_run(self) -> DefineByRun:
        return DefineByRun(self.params)

    def check_against(self, base: TrainConfig) -> None:
        """Refuse a space whose trials would break a rule between options on top of the sweep's `base` run
        (e.g. `warmup_epochs` above base.epochs), naming the entry and the endpoint or choice that does."""
        for relation in RELATIONS:
            self._check_relation(relation, base)

    def _check_relation(self, relation: Relation, base: TrainConfig) -> None:
        """Every combination of the corners of the entries the relation reads; when it reads none, `base`."""
        entries = [p for p in self.params if p.name.split(".")[0] in relation.options]
        for combo in itertools.product(*(p.corners() for p in entries)):
            cfg = assign(base, {p.name: v for p, (_, v) in zip(entries, combo)})
            broken = relation.check(cfg)
            if broken is None:
                continue
            name, must = broken
            if not entries:
                raise SpaceError(f"{self.path}: {rule_message(name, value_of(cfg, name), must)}")
            p, (label, v) = next(((p, c) for p, c in zip(entries, combo) if p.name == name), (entries[0], combo[0]))
            then = "" if p.name == name else f"; then the value of `{name}` is {value_of(cfg, name)!r}"
            raise SpaceError(f"{self.path}: `{p.name}`: {label} {v!r}{then}, but must be {must}.")  # rule_message's words

    def for_arm(self, arm: str) -> SearchSpace:
        """The space an arm searches: the shared entries minus what the arm cannot use (ARM_UNUSABLE), with the
        arm's own section on top and `mode` fixed to the arm. Every arm gets the same ranges for what they share
        unless the file says otherwise for that arm, so their budgets buy the same search."""
        if arm not in ARM_UNUSABLE:
            raise SpaceError(f"{self.path}: arm {arm!r} is not one of {', '.join(ARM_UNUSABLE)}")
        mode = self.get("mode")
        if mode is not None and mode.type != "fixed":
            raise SpaceError(f"{self.path}: `mode` is searched, but --arms chooses it (e.g. --arms masked,weighted)")
        own = dict(self.per_arm).get(arm, ())
        replaced = {p.name for p in own}
        keep = tuple(p for p in self.params
                     if p.name.split(".")[0] not in ARM_UNUSABLE[arm] and p.name not in replaced and p.name != "mode")
        return SearchSpace(self.path, keep + own + (Param("mode", "fixed", value=arm),))

    def with_threshold_below(self, max_start_error: float) -> tuple[SearchSpace, str | None]:
        """A threshold above every landmark's start error selects nothing; clip each range (the shared one and
        any arm's own) to just below it."""
        notes: list[str] = []

        def clip(params: tuple[Param, ...], where: str) -> tuple[Param, ...]:
            return tuple(self._clipped(p, max_start_error, where, notes) if p.name == "difficult_threshold" else p
                         for p in params)

        space = SearchSpace(self.path, clip(self.params, ""),
                            tuple((arm, clip(ps, f"{ARMS_KEY}.{arm}.")) for arm, ps in self.per_arm))
        return (space, "; ".join(notes)) if notes else (self, None)

    def _clipped(self, p: Param, max_start_error: float, where: str, notes: list[str]) -> Param:
        if p.type not in ("uniform", "loguniform") or p.high < max_start_error:
            return p
        new_high = round(max_start_error * 0.999, 6)
        if new_high <= p.low:
            raise SpaceError(f"{self.path}: `{where}difficult_threshold` range {p.low}..{p.high} mm lies above every "
                             f"start error (largest {max_start_error:.3f} mm): no threshold would select a landmark")
        notes.append(f"{where}difficult_threshold: high {p.high} mm clipped to {new_high} mm (the largest start error "
                     f"is {max_start_error:.3f} mm; a higher threshold would select no landmark)")
        return dataclasses.replace(p, high=new_high)


@dataclass(frozen=True)
class DefineByRun:
    """The function OptunaSearch calls with each Optuna trial (a class, so the searcher can be pickled).
    It suggests the searched entries and returns the fixed ones, as Optuna's define-by-run API expects."""

    params: tuple[Param, ...]

    def __call__(self, trial: Any) -> dict[str, Any]:
        for p in self.params:
            if p.type in ("loguniform", "uniform"):
                trial.suggest_float(p.name, p.low, p.high, log=p.log)
            elif p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            elif p.type == "categorical":
                trial.suggest_categorical(p.name, list(p.choices))
        return {p.name: p.value for p in self.params if p.type == "fixed"}


def space_from_dict(data: Any, source: str | Path) -> SearchSpace:
    """A validated space from its dict form (a YAML file's content, or `SearchSpace.to_dict()` stored in
    sweep.json); `source` names it in every error and becomes `SearchSpace.path`."""
    path = Path(source)
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: must be a mapping of option: spec")
    data = dict(data)
    sections = data.pop(ARMS_KEY, None) or {}
    if not data and not sections:
        raise SpaceError(f"{path}: empty search space")
    params = tuple(_param(path, str(k), v) for k, v in data.items())
    space = SearchSpace(path, params, _arm_sections(path, sections))
    if not any(p.searched for p in space.every_entry()):
        raise SpaceError(f"{path}: nothing to search (every entry is fixed)")
    arm_spaces = [dataclasses.replace(space.for_arm(arm), path=Path(f"{path}: {ARMS_KEY}.{arm}")) for arm, _ in space.per_arm]
    for sub in [space, *arm_spaces]:
        for relation in RELATIONS:  # a relation whose options are all in the space is decided by the space alone
            if set(relation.options) <= {p.name.split(".")[0] for p in sub.params}:
                sub._check_relation(relation, TrainConfig())
    return space


def _arm_sections(path: Path, sections: Any) -> tuple[tuple[str, tuple[Param, ...]], ...]:
    """The `arms:` section: per arm, entries as at the top level, none of them one the arm cannot use."""
    if not isinstance(sections, dict):
        raise SpaceError(f"{path}: `{ARMS_KEY}` must map arm names ({', '.join(ARM_UNUSABLE)}) to entries")
    out = []
    for arm, entries in sections.items():
        where = f"{path}: `{ARMS_KEY}.{arm}`"
        if arm not in ARM_UNUSABLE:
            raise SpaceError(f"{where}: not an arm ({', '.join(ARM_UNUSABLE)})")
        if not isinstance(entries, dict) or not entries:
            raise SpaceError(f"{where}: must be a non-empty mapping of option: spec")
        bad = sorted(k for k in entries if str(k).split(".")[0] in ARM_UNUSABLE[arm] | {"mode"})
        if bad:
            raise SpaceError(f"{where}: {', '.join(bad)} cannot be searched by this arm")
        out.append((str(arm), tuple(_param(Path(f"{path}: {ARMS_KEY}.{arm}"), str(k), v) for k, v in entries.items())))
    return tuple(out)


def load_space(path: str | Path) -> SearchSpace:
    """The validated space of a YAML file; its `path` is made absolute (a sweep may resume elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        data = load_yaml(path)
    except ValueError as exc:
        raise SpaceError(str(exc)) from None
    return dataclasses.replace(space_from_dict(data, path), path=path.resolve())
