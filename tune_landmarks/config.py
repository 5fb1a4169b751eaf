"""One configuration dataclass for a fine-tuning run, each field carrying its own rule.

A run's options flow from the CLI flags (cli.py builds the flags from these fields, underscore and
hyphen spellings alike), from YAML (`--config`), and from a sweep trial's sampled parameters; so a
sampled `lr` and a typed `--lr` are the same thing, checked by the same rule with the same message:
"The value of `lr` is -0.001, but must be > 0."

Why dataclass fields with a `Rule` in their metadata, and not pydantic: a rule here is data (bounds,
choices), not only a predicate, because a search space must check the endpoints of a range against
it before any trial runs (space.py), and for an interval the two endpoints decide the whole range.
pydantic would add a dependency to the base module, word its errors its own way, and still hide the
bounds that space.py needs; a plain dataclass also keeps `dataclasses.replace`/`asdict` for callers.

This module is the base of the package: it imports neither torch nor any other module of it, so the
names the rules refer to (LOSSES, MODES, DECODERS...) live here and loss.py/heatmap.py import them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ANNOTATORS = ("senior", "junior", "mean", "both")
BOTH = "both"  # the refinement stage's training crops draw one annotator's point each; the truth otherwise is the mean
FORMATS = ("aariz", "isbi")
DEFAULT_KEY = "default"  # a per-landmark option's entry for every landmark it does not name
DEFAULT_MM_PER_PX = 0.3  # a refined landmark's crop resolution when refine_mm_per_px names neither it nor `default`
DEFAULT_STORAGE = "./sweeps"  # where a sweep's experiment goes, and where a name alone is looked up
LOSSES = ("adaptive_wing", "mse")
MODES = ("all", "weighted", "masked", "refine")
DECODERS = ("dark", "quarter", "argmax")
RESIZES = ("stretch", "letterbox")  # each axis on its own | aspect kept, zero padding right/bottom (cache.resize)
INTERPOLATIONS = ("auto", "area", "linear", "cubic")  # auto: area when shrinking, else linear


@dataclass(frozen=True)
class Rule:
    """What one option's value must be. An interval (`low`/`high`, both ends in or both out) or a set of
    `choices` is stated as data, so a search range can be checked by its endpoints; `test` is for the few
    rules that are neither (image size, device) and needs `text`. `note` is appended to the derived text."""

    low: float | None = None
    high: float | None = None
    inclusive: bool = True
    choices: tuple[Any, ...] = ()
    test: Callable[[Any], bool] | None = None
    text: str = ""
    note: str = ""

    def ok(self, value: Any) -> bool:
        try:
            if self.choices and value not in self.choices:
                return False
            if self.low is not None and not (value >= self.low if self.inclusive else value > self.low):
                return False
            if self.high is not None and not (value <= self.high if self.inclusive else value < self.high):
                return False
            return self.test is None or bool(self.test(value))
        except (TypeError, ValueError, AttributeError):  # a value of the wrong type (set directly) breaks it
            return False

    @property
    def must(self) -> str:
        """The second half of "The value of `x` is v, but must be ...": derived from the bounds."""
        if self.text:
            return self.text
        if self.choices:
            words = f"one of {', '.join(map(str, self.choices))}"
        elif self.low is not None and self.high is not None and self.inclusive:
            words = f"between {self.low} and {self.high}"
        else:
            bounds = (("> ", "< "), (">= ", "<= "))[self.inclusive]
            words = " and ".join(op + str(b) for op, b in zip(bounds, (self.low, self.high)) if b is not None)
        return words + self.note


def gt(low: float, note: str = "") -> Rule:
    return Rule(low=low, inclusive=False, note=note)


def ge(low: float, note: str = "") -> Rule:
    return Rule(low=low, note=note)


def between(low: float, high: float) -> Rule:
    return Rule(low=low, high=high)


def one_of(*choices: Any) -> Rule:
    return Rule(choices=choices)


def _image_size_ok(v: Any) -> bool:
    return len(v) == 2 and all(int(x) >= 8 for x in v)


def _device_ok(v: Any) -> bool:
    return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


def opt(default: Any = dataclasses.MISSING, rule: Rule | None = None, *,
        factory: Callable[[], Any] | None = None) -> Any:
    """A TrainConfig field whose rule rides in its metadata: name, type, default and rule on one line."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class TrainConfig:
    # data
    dataset_path: str = opt("", Rule(test=bool, text="a dataset directory"))
    format: str | None = opt(None, one_of(*FORMATS))  # detected from the layout when None
    annotator: str = opt("mean", one_of(*ANNOTATORS))
    train_split: str | None = None  # default: train, less any image another role carves from it
    val_split: str | None = None  # selection; default: valid (Aariz) / train:0.2 (ISBI), see read.DatasetInfo
    test_split: str | None = None  # verdict; default: test (Aariz) / test1 (ISBI); never chosen on
    skip_bad: bool = False
    skip_images: list[str] = opt(factory=list)  # image ids left out of every role (--skip-images ID,... or @FILE)
    allow_duplicates: bool = False  # go on when two roles share a radiograph (fingerprint.py); recorded
    image_size: tuple[int, int] = opt((256, 256), Rule(test=_image_size_ok,  # width height of the network input
                                                       text="two sizes in pixels (width height), each >= 8"))
    resize: str = opt("stretch", one_of(*RESIZES))  # how an image reaches image_size (an imported model's spec sets it)
    interpolation: str = opt("auto", one_of(*INTERPOLATIONS))
    cache_dir: str | None = None
    # model and checkpoints
    model: str = "hrnet"
    pretrained: str | None = None
    resume: str | None = None
    start_predictions: str | None = None  # refine without a start model: another detector's predictions (a folder)
    out: str = "runs/run"
    # optimisation
    epochs: int = opt(20, ge(1))
    batch_size: int = opt(4, ge(1))
    lr: float = opt(1e-4, gt(0))
    weight_decay: float = opt(1e-4, ge(0))
    warmup_epochs: float = opt(0.0, ge(0))
    grad_clip: float = opt(5.0, ge(0, " (0 = off)"))
    mixed_precision: bool = False
    seed: int = opt(0, ge(0))
    # loss
    loss: str = opt("adaptive_wing", one_of(*LOSSES))
    awing_omega: float = opt(14.0, gt(0))
    awing_theta: float = opt(0.5, gt(0))
    awing_epsilon: float = opt(1.0, gt(0))
    awing_alpha: float = opt(2.1, gt(1))
    awing_weight: float = opt(10.0, ge(0))
    sigma: float = opt(2.0, gt(0))
    # which landmarks are trained
    mode: str = opt("all", one_of(*MODES))
    difficult: list[str] = opt(factory=list)
    difficult_threshold: float | None = opt(None, gt(0, " mm"))  # on the start checkpoint's validation errors
    difficult_weight: float = opt(2.5, gt(0))
    # guarding the landmarks that are not trained, and speed
    distill_weight: float = opt(0.0, ge(0))
    bn_eval: bool = False
    freeze_stages: int = opt(0, between(0, 4))
    # refine mode: a second, local stage for the difficult landmarks (refine.py; crops.py for the geometry)
    # side of each landmark's square crop (rounded to whole 32-px blocks): {SYMBOL: mm, default: mm}, a plain number
    # for every landmark; a landmark it leaves out gets refine_crop_k x its start model's p99 error (refine.crop_sides)
    refine_crop_mm: dict[str, float] = opt(factory=dict, rule=gt(0, " mm"))
    refine_crop_k: float = opt(8.0, gt(0))  # derived side = k x the start model's 99th-percentile train error (docs/refine.md §7)
    refine_crop_min_mm: float = opt(19.2, gt(0, " mm"))  # derived sides are clipped to [min, max]
    refine_crop_max_mm: float = opt(57.6, gt(0, " mm"))
    # each landmark's crop resolution, same forms (one physical cache per value); never finer than the images' spacing
    refine_mm_per_px: dict[str, float] = opt(factory=lambda: {DEFAULT_KEY: DEFAULT_MM_PER_PX}, rule=gt(0, " mm/px"))
    refine_offset_scale: float = opt(1.5, ge(0))  # training-crop offsets: x the start model's own train errors
    refine_model: str = opt("hrnet_w18_small", Rule(test=bool, text="a timm backbone name"))  # the crop network
    refine_passes: int = opt(1, between(1, 3))  # crops at inference: 2 = crop again around the refined point
    refine_tta: int = opt(1, between(1, 16))  # crops per landmark at inference, shifted on a ring, points averaged
    # augmentation
    aug_scale: float = opt(0.1, ge(0))
    aug_rotate: float = opt(10.0, ge(0))
    aug_translate: float = opt(0.05, ge(0))
    aug_brightness_contrast: float = opt(0.2, ge(0))
    aug_clahe_p: float = opt(0.3, between(0, 1))
    # evaluation and execution
    decoder: str = opt("dark", one_of(*DECODERS))
    device: str = opt("auto", Rule(test=_device_ok, text="auto, cpu or cuda[:N]"))
    num_workers: int = opt(0, ge(0))
    threads: int = opt(0, ge(0))  # torch intra-op threads; 0 leaves torch's default
    max_steps_per_epoch: int = opt(0, ge(0))  # 0 = whole epoch; >0 for smoke tests and benchmarks
    progress: bool = True

    def __post_init__(self) -> None:
        # a plain number for a per-landmark option (TrainConfig(refine_crop_mm=38.4)) means every landmark
        for name in PER_LANDMARK:
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self, name, {DEFAULT_KEY: float(value)})

    def validate(self) -> TrainConfig:
        """Check every value eagerly, before any data is read or any model is built."""
        for name in OPTIONS:
            check_field(name, getattr(self, name))
        for relation in RELATIONS:
            broken = relation.check(self)
            if broken:
                raise ValueError(rule_message(broken[0], value_of(self, broken[0]), broken[1]))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class Option:
    """One run option as the checks see it: its value type (the annotation without `None`), whether
    None is allowed, and its rule."""

    name: str
    type: type  # str, bool, int, float, tuple (image_size), list (difficult) or dict (per landmark; the rule is each value's)
    optional: bool
    rule: Rule | None

    @property
    def numeric(self) -> bool:
        return self.type in (int, float)


def _option(f: dataclasses.Field, hint: Any) -> Option:
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    (base,) = [m for m in members if m is not type(None)]
    return Option(f.name, typing.get_origin(base) or base, type(None) in members, f.metadata.get("rule"))


_HINTS = typing.get_type_hints(TrainConfig)
OPTIONS: dict[str, Option] = {name: _option(f, _HINTS[name]) for name, f in FIELDS.items()}
PER_LANDMARK = tuple(name for name, o in OPTIONS.items() if o.type is dict)


@dataclass(frozen=True)
class Relation:
    """A rule between options. `check` returns (the option to blame, what its value must be) when broken.
    It reads only `options` and is monotone in each numeric one, so SearchSpace.check_against can decide
    it for a search range from the range's endpoints."""

    options: tuple[str, ...]
    check: Callable[[TrainConfig], tuple[str, str] | None]


IMPORTED = "imported"  # `model` of a user's own model (imported.py): its spec fixes image_size


def _built_in_size(c: TrainConfig) -> tuple[str, str] | None:
    if c.model != IMPORTED and not all(int(x) >= 32 and int(x) % 32 == 0 for x in c.image_size):
        return "image_size", "two multiples of 32 (width height), each >= 32 (the built-in models' stride)"
    return None


def _one_way_to_pick(c: TrainConfig) -> tuple[str, str] | None:
    if c.difficult and c.difficult_threshold is not None:
        return "difficult_threshold", "unset when `difficult` is given (choose one way to pick the difficult set)"
    return None


def _warmup_within_epochs(c: TrainConfig) -> tuple[str, str] | None:
    return ("warmup_epochs", f"<= epochs ({c.epochs})") if c.warmup_epochs > c.epochs else None


def _mode_has_a_set(c: TrainConfig) -> tuple[str, str] | None:
    if c.mode != "all" and not c.difficult and c.difficult_threshold is None:
        return "mode", ("'all' unless the difficult set is picked by `difficult` (--difficult SYMBOLS) or "
                        "`difficult_threshold` (--difficult-threshold MM)")
    return None


def _distill_has_a_teacher(c: TrainConfig) -> tuple[str, str] | None:
    if c.distill_weight > 0 and not (c.resume or c.pretrained):
        return "distill_weight", "0 without a start model (--resume): the teacher is the start checkpoint"
    return None


def crop_pixels(crop_mm: float, mm_per_px: float) -> int:
    """A refine crop's side in pixels: `crop_mm` at `mm_per_px`, rounded to whole 32-px blocks (HRNet's fusion
    needs a multiple of 32) and never below one block."""
    return 32 * max(1, round(crop_mm / mm_per_px / 32))


MAX_CROP_PX = 512


def entry_of(values: dict[str, float], key: str, fallback: float | None = None) -> float | None:
    """A per-landmark option's value for landmark `key`: its own entry, else `default`, else `fallback`."""
    return values.get(key, values.get(DEFAULT_KEY, fallback))


def _crop_in_pixels(c: TrainConfig) -> tuple[str, str] | None:
    for key, mm in c.refine_crop_mm.items():
        res = entry_of(c.refine_mm_per_px, key, DEFAULT_MM_PER_PX)
        if mm / res > MAX_CROP_PX + 16:
            at = entry_name("refine_mm_per_px", key if key in c.refine_mm_per_px else DEFAULT_KEY)
            return entry_name("refine_crop_mm", key), (
                f"<= {MAX_CROP_PX} crop pixels at `{at}` {res:g} "
                f"(<= {(MAX_CROP_PX + 16) * res:g} mm): a crop is a local view")
    return None


def _crop_clip_in_order(c: TrainConfig) -> tuple[str, str] | None:
    if c.refine_crop_min_mm > c.refine_crop_max_mm:
        return "refine_crop_min_mm", f"<= `refine_crop_max_mm` ({c.refine_crop_max_mm:g} mm)"
    return None


def _refine_has_a_start(c: TrainConfig) -> tuple[str, str] | None:
    if c.mode == "refine" and not (c.resume or c.start_predictions):
        return "mode", ("not 'refine' without a start model (--resume START) or its predictions (--start-predictions "
                        "DIR): the refinement stage sits on top of it")
    if c.start_predictions and c.mode != "refine":
        return "start_predictions", "unset unless mode is 'refine' (the other modes fine-tune a start model)"
    return None


RELATIONS: tuple[Relation, ...] = (
    Relation(("image_size", "model"), _built_in_size),
    Relation(("difficult", "difficult_threshold"), _one_way_to_pick),
    Relation(("warmup_epochs", "epochs"), _warmup_within_epochs),
    Relation(("mode", "difficult", "difficult_threshold"), _mode_has_a_set),
    Relation(("distill_weight", "resume", "pretrained"), _distill_has_a_teacher),
    Relation(("refine_crop_mm", "refine_mm_per_px"), _crop_in_pixels),
    Relation(("refine_crop_min_mm", "refine_crop_max_mm"), _crop_clip_in_order),
    Relation(("mode", "resume", "start_predictions"), _refine_has_a_start),
)


def rule_message(name: str, value: Any, must: str) -> str:
    """The one wording of a broken rule, for every option, argument and setting in the package (Optuna's), so a user
    learns one sentence. A numpy scalar reads as the plain number it is."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    return f"The value of `{name}` is {value!r}, but must be {must}."


def rule_error(name: str, value: Any, must: str) -> ValueError:
    """`raise rule_error("lr", lr, "> 0")`: the one wording as the ValueError the command line reports."""
    return ValueError(rule_message(name, value, must))


def truth_of(annotator: str) -> str:
    """Whose points are the truth for `annotator`: `both` trains on each annotator's own points (refine.py) and is
    judged, cached and selected on their mean."""
    return "mean" if annotator == BOTH else annotator


def entry_name(name: str, key: str) -> str:
    """How a message names one entry of a per-landmark option: `refine_crop_mm.Go`; the `default` entry (what a
    plain number sets) is the option itself."""
    return name if key == DEFAULT_KEY else f"{name}.{key}"


def option_of(name: str) -> Option:
    """The option a name sets: a run option, or one entry of a per-landmark one (`refine_crop_mm.Go`, a number under
    the option's rule). KeyError for anything else."""
    base, dot, key = name.partition(".")
    option = OPTIONS[base]
    if not dot:
        return option
    if option.type is not dict or not key:
        raise KeyError(name)
    return Option(name, float, False, option.rule)


def scalar_name(name: str) -> str:
    """The number a search space samples for `name`: an entry of a per-landmark option (a plain name is its
    `default` entry: every landmark), else the option itself."""
    return f"{name}.{DEFAULT_KEY}" if OPTIONS.get(name) is not None and OPTIONS[name].type is dict else name


def value_of(cfg: TrainConfig, name: str) -> Any:
    """An option's value, or one entry's (`refine_crop_mm.Go`)."""
    base, dot, key = name.partition(".")
    value = getattr(cfg, base)
    return value.get(key or DEFAULT_KEY) if isinstance(value, dict) else value


def assign(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """`cfg` with `values` set, as they are (already coerced): an entry (`refine_crop_mm.Go`) updates its option's
    mapping, a plain number for a per-landmark option sets every landmark's (`{default: value}`)."""
    plain = {k: v for k, v in values.items() if "." not in k}
    for name, v in plain.items():
        if OPTIONS[name].type is dict and not isinstance(v, dict):
            plain[name] = {DEFAULT_KEY: v}
    for name, v in values.items():
        if "." in name:
            base, _, key = name.partition(".")
            plain[base] = {**plain.get(base, getattr(cfg, base)), key: v}
    return dataclasses.replace(cfg, **plain)


def check_field(name: str, value: Any) -> Any:
    """Raise the uniform message if `value` breaks the rule of option `name` (or of an entry, `refine_crop_mm.Go`);
    return it otherwise. A per-landmark option's rule holds for each of its values."""
    option = option_of(name)
    if value is None and option.optional:
        return value
    if option.type is dict:
        for key, v in value.items():
            if option.rule is not None and not option.rule.ok(v):
                raise ValueError(rule_message(entry_name(name, key), v, option.rule.must))
        return value
    if option.rule is not None and not option.rule.ok(value):
        raise ValueError(rule_message(entry_name(*name.split(".", 1)) if "." in name else name, value, option.rule.must))
    return value


def _per_landmark(name: str, value: Any) -> dict[str, float]:
    """`Go=45,default=30` (the command line), a YAML mapping, or one number for every landmark."""
    if isinstance(value, str) and "=" in value:
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        value = {k.strip(): v for k, v in pairs}
    if not isinstance(value, dict):
        if isinstance(value, bool):
            raise ValueError
        return {DEFAULT_KEY: float(value)}
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key or isinstance(v, bool):
            raise ValueError
        out[key] = float(v)
    return out


def _items_of(name: str, value: str) -> list[str]:
    """`@FILE`: the file's lines, blank lines and `#` comments left out (a list kept beside the dataset)."""
    try:
        text = Path(value[1:]).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise rule_error(name, value, f"a comma-separated list or @FILE of a readable file ({exc.strerror})") from None
    return [item for line in text.splitlines() if (item := line.split("#", 1)[0].strip())]


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI/sampled value to the option's type, with a uniform message when it cannot."""
    option = option_of(name)
    try:
        if value is None:
            if option.optional:
                return None
            raise ValueError
        if option.type is tuple:  # image_size: "W H" pairs, or one number for a square
            vals = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value, value])]
            if len(vals) != 2:
                raise ValueError
            return (vals[0], vals[1])
        if option.type is list:  # difficult: "UMT,UPM" or a YAML list; "@FILE": one item a line (# comments)
            if isinstance(value, str) and value.startswith("@"):
                return _items_of(name, value)
            return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else [str(s) for s in value]
        if option.type is dict:
            return _per_landmark(name, value)
        if option.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if option.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return option.type(value)
    except (TypeError, ValueError):
        what = "number, or SYMBOL=number pairs (default=number for the others)" if option.type is dict else \
            option.type.__name__
        raise rule_error(name, value, f"a valid {what}") from None


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """`base` (default: the defaults) with `values` coerced on top (`assign`: `refine_crop_mm.Go` keys set one
    entry); an unknown key is named with `source`."""
    unknown = [k for k in values if not _known(str(k))]
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(map(str, unknown))}")
    return assign(base or TrainConfig(), {k: coerce(k, v) for k, v in values.items()})


def _known(name: str) -> bool:
    try:
        option_of(name)
    except KeyError:
        return False
    return True


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping read with the safe loader; an empty file is an empty mapping."""
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
