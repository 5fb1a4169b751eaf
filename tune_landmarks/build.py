"""From an architecture record to a model: the one place that knows which kinds of model there are.

A checkpoint or model folder records its architecture (`arch`): the built-in timm model by name (model.py), or an
imported user model by its spec and code copy (imported.py). Everything above this module asks here for the
model, for the run options it fixes (input size, resize, decoder) and for what a model folder records of it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from . import imported
from .config import TrainConfig
from .model import CheckpointError, LandmarkModel, create_model, load_weights, read_checkpoint, resolve_code, resolve_name

log = logging.getLogger(__name__)


def is_imported(arch: dict[str, Any] | None) -> bool:
    return bool(arch) and arch.get("kind") == imported.KIND


def build(arch: dict[str, Any]) -> LandmarkModel:
    """The model an architecture record describes, weights not loaded."""
    if is_imported(arch):
        return imported.build(arch)
    return create_model(arch["model"], int(arch["num_landmarks"]))


def from_checkpoint(ckpt: dict[str, Any], path: str | Path, symbols: list[str] | None = None,
                    model: str | None = None) -> LandmarkModel:
    """The checkpoint's model with its weights loaded strictly. `symbols`: the dataset's landmarks, which must be the
    checkpoint's; `model`: the run's `--model`, for a checkpoint that names no architecture (a bare state dict) and
    to refuse a checkpoint of another built-in architecture."""
    arch = ckpt.get("arch")
    if arch is None:
        if model is None or symbols is None:
            raise CheckpointError(f"{path}: names no architecture or landmark symbols; use a model folder "
                                  "(tune-landmarks export or import-model) or a best.pt/last.pt written by tune-landmarks")
        arch = {"model": resolve_name(model), "num_landmarks": len(symbols)}
    elif model is not None and not is_imported(arch) and arch["model"] != resolve_name(model):
        raise CheckpointError(f"{path}: architecture {arch['model']!r} does not match the requested {resolve_name(model)!r}")
    if symbols is not None:
        own = ckpt.get("symbols")
        if int(arch.get("num_landmarks", len(symbols))) != len(symbols):
            raise CheckpointError(f"{path}: has {arch['num_landmarks']} landmarks, the dataset has {len(symbols)}")
        if own and list(own) != list(symbols):
            raise CheckpointError(f"{path}: landmark symbols {list(own)} differ from the dataset's {list(symbols)}")
    net = build(arch)
    load_weights(net, ckpt["model"], path)
    return net


def read_arch(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's architecture record without reading its weights when it is a model folder."""
    path = Path(path)
    if path.is_dir() and (path / "model.json").is_file():
        return resolve_code(json.loads((path / "model.json").read_text())["arch"], path)
    return read_checkpoint(path).get("arch")


def fixed_options(arch: dict[str, Any] | None) -> dict[str, Any]:
    """Run options a start model fixes: an imported model's input (size, resize, interpolation) and decoder."""
    if not is_imported(arch):
        return {}
    return imported.config_values(imported.parse_spec(arch["spec"], arch["code"]["entry"]))


def with_start_model(cfg: TrainConfig, ckpt: dict[str, Any] | None = None) -> TrainConfig:
    """`cfg` with the options its start model (`cfg.resume`, or `ckpt` when the caller has read it) fixes: an
    imported model is read as its spec says."""
    if not cfg.resume:
        return cfg
    fixed = fixed_options(ckpt.get("arch") if ckpt is not None else read_arch(cfg.resume))
    if fixed:
        log.debug("options fixed by the start model %s: %s", cfg.resume, fixed)
    return dataclasses.replace(cfg, **fixed) if fixed else cfg


def output_record(arch: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """How a model folder's outputs are read (model.json): an imported model's spec says it; the built-in heatmaps
    are decoded with the run's decoder and sigma at stride 4."""
    if is_imported(arch):
        return {"output": arch["spec"]["output"], "input": arch["spec"]["input"]}
    return {"heatmap": {"sigma": cfg.sigma, "decoder": cfg.decoder, "stride": 4}}


def portable(arch: dict[str, Any], dest: Path) -> dict[str, Any]:
    """The record a model folder `dest` stores: an imported model's code copied into it, so the folder can move."""
    return imported.portable(arch, dest) if is_imported(arch) else arch


def code_modules(arch: dict[str, Any] | None) -> list[str]:
    """Folders Ray must ship to other nodes (runtime_env py_modules) for trials to build this model."""
    return [str(imported.code_dir(arch["code"]))] if is_imported(arch) else []
