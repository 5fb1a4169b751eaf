"""Options shared by several subcommands, typed once: the run options (one flag per TrainConfig field, in both
spellings, as the workflow being replaced wrote them), the dataset, scoring, device, experiment and bootstrap
options, and the small parsers.

Every subcommand registers itself with `register_cli(sub)` in its own module and takes its shared options from
here, so a flag means the same thing, with the same help, wherever it appears. Only argparse, config and read:
any command module may use it, however low in the data's way.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .config import ANNOTATORS, DEFAULT_STORAGE, FIELDS, FORMATS, coerce

_HELP = {
    "dataset_path": "dataset root (Aariz or ISBI 2015 layout)", "image_size": "network input WIDTH HEIGHT",
    "resume": "start checkpoint: a weights file starts a fine-tune, a last.pt continues that run",
    "difficult": "comma-separated symbols, e.g. UMT,UPM,R", "difficult_threshold": "difficult = start MRE above MM",
    "mode": "all | weighted | masked", "model": "hrnet (= hrnet_w32) or any timm features_only backbone",
    "mixed_precision": "autocast: fp16/bf16 on CUDA, bf16 on CPU", "distill_weight": "drift guard: teacher weight",
    "freeze_stages": "freeze the stem and the first N HRNet stages", "bn_eval": "freeze BatchNorm running statistics",
    "skip_images": "leave these images out of every role: ID,ID,... or @FILE (one id a line); recorded",
    "allow_duplicates": "go on when two roles share a radiograph (check-dataset names them); recorded",
}


def flag(name: str) -> list[str]:
    """`--dataset_path` and `--dataset-path`: both spellings of an option, the workflow's first."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in both spellings; unset flags stay unset (SUPPRESS)."""
    p.add_argument("--config", help="YAML file of run options (flags override it)")
    for name, f in FIELDS.items():
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _HELP.get(name)}
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            p.add_argument(*flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif name == "image_size":
            p.add_argument(*flag(name), nargs=2, type=int, metavar=("W", "H"), **kw)
        else:
            p.add_argument(*flag(name), **kw)


def add_dataset_options(p: argparse.ArgumentParser, required: bool | None = True, annotator_help: str | None = None) -> None:
    """Which dataset, in which layout, whose points: the options every command that reads a dataset shares
    (`required=None`: the command names its dataset otherwise, e.g. as a positional path)."""
    if required is not None:
        p.add_argument(*flag("dataset_path"), dest="dataset_path", required=required, help=_HELP["dataset_path"])
    p.add_argument("--format", choices=FORMATS, help="dataset layout (default: detected)")
    p.add_argument("--annotator", default="mean", choices=ANNOTATORS,
                   help=annotator_help or "whose points are the truth (mean: both annotators' average; both: "
                                         "judged on the mean, training draws one annotator's points per item)")
    p.add_argument(*flag("skip_images"), dest="skip_images", type=skip_list, default=[], metavar="ID,...|@FILE",
                   help=_HELP["skip_images"])


def add_device_options(p: argparse.ArgumentParser, cache: bool = False) -> None:
    """Where models run, and (`cache`) where decoded images are kept."""
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    if cache:
        p.add_argument(*flag("cache_dir"), dest="cache_dir",
                       help="decoded-image cache (default $TUNE_LANDMARKS_CACHE, else ~/.cache/tune_landmarks)")


def add_scoring_options(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    """How `evaluate` and `import-model` score a model on a split."""
    add_dataset_options(p, dataset_required)
    p.add_argument("--split", default="valid", help="split spec to score (NAME or NAME:FRACTION)")
    add_device_options(p, cache=True)


def add_experiment_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """Which sweep: a path or URI, or a name under --storage (experiment.Experiment.find)."""
    p.add_argument("experiment", nargs="?" if optional else None, help="experiment path or URI, or a name under --storage")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"where an experiment's name is looked up: a folder or a URI (default {DEFAULT_STORAGE})")


def add_bootstrap_options(p: argparse.ArgumentParser, when: str = "") -> None:
    """The paired bootstrap of every comparison: resamples of the images, and its seed."""
    p.add_argument("--bootstrap", type=int, default=2000, help=f"bootstrap resamples of the images{when}")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")


def skip_list(text: str) -> list[str]:
    """--skip-images: `ID,ID,...` or `@FILE` (one id a line), as the run option reads it."""
    try:
        return coerce("skip_images", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def names(text: str) -> list[str]:
    """`masked, all` -> ["masked", "all"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def budgets(text: str) -> dict[str, int]:
    """`masked=8,all=4` -> {"masked": 8, "all": 4}."""
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in names(text))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ARM=N[,ARM=N...]") from None
