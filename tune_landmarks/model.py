"""The heatmap model (a timm features_only backbone at stride 4 plus a small head) and its checkpoints.

Checkpoints are read with `torch.load(weights_only=True)` only (no pickle code ever runs) and
written atomically (tmp file + os.replace), as timm's checkpoint saver does.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from .atomic import atomic_path

log = logging.getLogger(__name__)

ALIASES = {"hrnet": "hrnet_w32"}
HRNET_STAGES = (("layer1",), ("transition1", "stage2"), ("transition2", "stage3"), ("transition3", "stage4"))
HRNET_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2")
GREY_MEAN, GREY_STD = 0.449, 0.226  # ImageNet statistics averaged over RGB


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the mismatch."""


class LandmarkNet(nn.Module):
    """timm backbone (stride-4 feature map) -> 3x3 conv/BN/ReLU -> 1x1 conv to K heatmaps."""

    def __init__(self, backbone: str, num_landmarks: int):
        super().__init__()
        self.backbone_name = backbone
        self.num_landmarks = num_landmarks
        # in_chans=1: the stem takes the grey image directly (timm sums RGB filters when adapting weights)
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1,), in_chans=1)
        if self.backbone.feature_info.reduction()[0] != 4:
            raise ValueError(f"backbone {backbone!r}: feature index 1 has stride "
                             f"{self.backbone.feature_info.reduction()[0]}, need 4")
        c = self.backbone.feature_info.channels()[0]
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, num_landmarks, 1))
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - GREY_MEAN) / GREY_STD
        return self.head(self.backbone(x)[0])


def resolve_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        raise ValueError(f"The value of `model` is {name!r}, but must be a timm model name (e.g. hrnet_w18_small_v2, "
                         f"hrnet_w32) or 'hrnet'.")
    return name


def create_model(name: str, num_landmarks: int, pretrained: str | None = None) -> LandmarkNet:
    """Build the model; `pretrained` is a local timm weights file (nothing is downloaded)."""
    if num_landmarks < 1:
        raise ValueError(f"The value of `num_landmarks` is {num_landmarks}, but must be > 0.")
    model = LandmarkNet(resolve_name(name), num_landmarks)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


def arch_of(model: LandmarkNet) -> dict[str, Any]:
    return {"model": model.backbone_name, "num_landmarks": model.num_landmarks}


def _load_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for anything that is not plain tensors/containers
        raise CheckpointError(f"{path}: not a weights-only checkpoint (refusing to unpickle arbitrary objects): "
                              f"{str(exc).splitlines()[0]}") from None


def state_dict_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict and the usual wrappers (state_dict, model, model_state_dict)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return state_dict_of(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise CheckpointError(f"{path}: no state_dict found (expected a bare state_dict or a dict with "
                          f"'model', 'state_dict' or 'model_state_dict')")


def load_pretrained_backbone(model: LandmarkNet, path: str | Path) -> None:
    """Load local timm classification weights into the backbone (non-strict) and report the gaps."""
    sd = state_dict_of(_load_file(path), path)
    own = model.backbone.state_dict()
    first = next(k for k in own if k.endswith("weight") and own[k].ndim == 4)
    if first in sd and sd[first].ndim == 4 and sd[first].shape[1] != own[first].shape[1]:
        sd[first] = sd[first].sum(1, keepdim=True)  # RGB stem -> grey, as timm's adapt_input_conv does
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    res = model.backbone.load_state_dict(sd, strict=False)
    log.info(f"--pretrained {path}: loaded {len(sd)} tensors; missing {len(res.missing_keys)}"
          + (f" (e.g. {', '.join(res.missing_keys[:5])})" if res.missing_keys else ""))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (or an exported model directory) into a dict with at least 'model'."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / "model.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: a model directory must hold model.json and model.safetensors")
        meta = json.loads(meta_path.read_text())
        ckpt = {"model": state_dict_of(_load_file(path / "model.safetensors"), path / "model.safetensors"),
                "arch": meta["arch"], "symbols": meta["symbols"], "config": meta.get("config", {}), "export": meta}
        if isinstance(meta.get("refine"), dict):  # an exported cascade: its start model is a folder inside it
            rec = meta["refine"]
            ckpt["refine"] = rec | {"start": rec["start"] | {"path": str(path / rec["start"]["path"])}}
        return ckpt
    obj = _load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "arch" in obj:
        return obj
    return {"model": state_dict_of(obj, path)}


def load_weights(model: LandmarkNet, ckpt: dict[str, Any], path: str | Path, symbols: list[str] | None = None) -> None:
    """Strictly load weights, failing with one message that names both sides of any mismatch."""
    arch = ckpt.get("arch")
    if arch and arch.get("model") != model.backbone_name:
        raise CheckpointError(f"{path}: architecture {arch.get('model')!r} does not match the requested "
                              f"{model.backbone_name!r}")
    if arch and arch.get("num_landmarks") != model.num_landmarks:
        raise CheckpointError(f"{path}: has {arch.get('num_landmarks')} landmarks, the dataset has {model.num_landmarks}")
    if symbols is not None and ckpt.get("symbols") and list(ckpt["symbols"]) != list(symbols):
        raise CheckpointError(f"{path}: landmark symbols {ckpt['symbols']} differ from the dataset's {symbols}")
    sd = ckpt["model"]
    head_w = sd.get("head.3.weight")
    if head_w is not None and head_w.shape[0] != model.num_landmarks:
        raise CheckpointError(f"{path}: has {head_w.shape[0]} landmarks, the dataset has {model.num_landmarks}")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: architecture does not match {model.backbone_name!r} with {model.num_landmarks} landmarks "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors"
            + (f", e.g. {(missing + unexpected + wrong)[0]}" if missing or unexpected or wrong else "") + ")")
    model.load_state_dict(sd)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through a temp file + os.replace: a reader never sees half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = [p / "model.safetensors"] if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def freeze_stages(model: LandmarkNet, n: int) -> list[str]:
    """Freeze the stem and the first `n` HRNet stages (requires_grad False; their BatchNorms go to eval
    in `set_train_mode`). Backward then stops early, which is what makes a step really faster."""
    if n <= 0:
        return []
    names = {k for k, _ in model.backbone.named_children()}
    if not set(HRNET_STEM) <= names or not all(set(s) <= names for s in HRNET_STAGES):
        raise ValueError(f"--freeze-stages applies to timm HRNet backbones; {model.backbone_name!r} has no HRNet stages")
    if n > len(HRNET_STAGES):
        raise ValueError(f"The value of `freeze_stages` is {n}, but must be <= {len(HRNET_STAGES)}.")
    frozen = list(HRNET_STEM) + [m for stage in HRNET_STAGES[:n] for m in stage]
    for name in frozen:
        for p in getattr(model.backbone, name).parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: LandmarkNet, frozen: list[str], bn_eval: bool) -> None:
    """model.train(), but frozen modules (and with bn_eval every BatchNorm) keep their running statistics."""
    model.train()
    for name in frozen:
        getattr(model.backbone, name).eval()
    if bn_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
