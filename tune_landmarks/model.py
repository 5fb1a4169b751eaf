"""The model interface every model implements, the built-in heatmap model, and checkpoint files.

`LandmarkModel` is what the rest of the tool knows of a model: preprocess, forward (activated output), the loss
targets it is compared with, decoding to points, which parameters are per landmark, freezing, and its
architecture record. The built-in `LandmarkNet` (a timm features_only backbone at stride 4 plus a small head)
and a user's own imported class (imported.py) both implement it, so training, inference and export hold no
"which kind of model" branch.

Frames. Points travel through the tool in the cached input frame (pixel centres aligned with the original image,
cache.to_target). A model may read its output in another convention: `frame` tensors (B, 3) = (sx, sy, spacing
mm/px) per image give it what it needs to convert (`to_corner` / `from_corner`).

Checkpoints are read with `torch.load(weights_only=True)` unless the caller says the file is trusted, and written
atomically (tmp file + os.replace), as timm's checkpoint saver does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from . import heatmap
from .atomic import atomic_path
from .config import rule_error

log = logging.getLogger(__name__)

ALIASES = {"hrnet": "hrnet_w32"}
HRNET_STAGES = (("layer1",), ("transition1", "stage2"), ("transition2", "stage3"), ("transition3", "stage4"))
HRNET_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2")
GREY_MEAN, GREY_STD = 0.449, 0.226  # ImageNet statistics averaged over RGB
HeatmapLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, K, h, w) x 2 -> (K,)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the mismatch."""


def to_corner(points: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Cached input frame (centres aligned, x_t = (x + 0.5) s - 0.5) -> the corner convention x_t = x s of scripts
    that normalise a point as x / W; `frame` (B, 3) holds each image's (sx, sy, spacing)."""
    return points + 0.5 - 0.5 * frame[:, None, :2].to(points.dtype)


def from_corner(points: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `to_corner`."""
    return points - 0.5 + 0.5 * frame[:, None, :2].to(points.dtype)


def input_size(x: torch.Tensor) -> tuple[int, int]:
    """(W, H) of a batch (B, C, H, W)."""
    return int(x.shape[-1]), int(x.shape[-2])


def measured_stride(out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(sx, sy) input pixels per heatmap pixel, measured from the output's shape (never assumed)."""
    return torch.tensor([size[0] / out.shape[-1], size[1] / out.shape[-2]], device=out.device, dtype=torch.float32)


class LandmarkModel(nn.Module):
    """What the tool needs of a landmark model. Inputs are grey batches (B, 1, H, W) in [0, 1] at the model's
    input size; outputs heatmaps (B, K, h, w) or coordinates (B, K, 2) after the model's activation. The defaults
    are the tool's own heatmap conventions (targets and decoding centre-aligned at the measured stride); a model
    that reads its output otherwise overrides them."""

    num_landmarks: int
    kind = "heatmap"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def net_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.net_forward(self.preprocess(x)))

    def targets(self, out: torch.Tensor, kps: torch.Tensor, frame: torch.Tensor, size: tuple[int, int],
                sigma: float) -> torch.Tensor:
        """What `out` is compared with for keypoints `kps` (B, K, 2) in the cached input frame of size (W, H)."""
        stride = measured_stride(out, size)
        return heatmap.encode(heatmap.to_heatmap_frame(kps, stride), tuple(out.shape[-2:]), sigma)

    def per_landmark_loss(self, out: torch.Tensor, target: torch.Tensor, heatmap_loss: HeatmapLoss) -> torch.Tensor:
        """(K,) loss of each landmark: `heatmap_loss` (the run's adaptive wing or MSE) for heatmaps."""
        return heatmap_loss(out, target)

    def teacher_target(self, teach: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The drift guard's target from the frozen start model's output, in `target`'s form: heatmaps clamped
        to [0, 1], the range a target has (adaptive wing is infinite for targets above alpha)."""
        return teach.float().clamp(0, 1)

    def decode(self, out: torch.Tensor, frame: torch.Tensor | None, size: tuple[int, int], decoder: str,
               sigma: float) -> torch.Tensor:
        """(B, K, 2) points in the cached input frame."""
        return heatmap.to_input_frame(heatmap.decode(out.float(), decoder, sigma), measured_stride(out, size))

    def per_landmark_params(self) -> list[nn.Parameter]:
        """Parameters whose rows belong to one landmark each (no weight decay: AdamW's decoupled decay would move
        a masked landmark's channel without any gradient)."""
        raise NotImplementedError

    def freeze(self, n: int) -> list[str]:
        """Freeze the first `n` stages; returns the frozen submodules' names (their BatchNorms stay in eval)."""
        if n > 0:
            raise ValueError(f"--freeze-stages applies to the built-in timm HRNet backbones, not to {self.describe()}")
        return []

    def train_mode(self, frozen: list[str], bn_eval: bool) -> None:
        """model.train(), but frozen modules (and with bn_eval every BatchNorm) keep their running statistics."""
        self.train()
        for name in frozen:
            self.get_submodule(name).eval()
        if bn_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def arch(self) -> dict[str, Any]:
        """The architecture record a checkpoint stores: enough to build this model again."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class LandmarkNet(LandmarkModel):
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

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x - GREY_MEAN) / GREY_STD

    def net_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])

    def per_landmark_params(self) -> list[nn.Parameter]:
        return list(self.head[-1].parameters())

    def freeze(self, n: int) -> list[str]:
        """Freeze the stem and the first `n` HRNet stages (requires_grad False). Backward then stops early, which
        is what makes a step really faster."""
        if n <= 0:
            return []
        names = {k for k, _ in self.backbone.named_children()}
        if not set(HRNET_STEM) <= names or not all(set(s) <= names for s in HRNET_STAGES):
            raise ValueError(f"--freeze-stages applies to timm HRNet backbones; {self.backbone_name!r} has no HRNet stages")
        if n > len(HRNET_STAGES):
            raise rule_error("freeze_stages", n, f"<= {len(HRNET_STAGES)}")
        frozen = [f"backbone.{m}" for m in list(HRNET_STEM) + [m for stage in HRNET_STAGES[:n] for m in stage]]
        for name in frozen:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        return frozen

    def arch(self) -> dict[str, Any]:
        return {"model": self.backbone_name, "num_landmarks": self.num_landmarks}

    def describe(self) -> str:
        return f"the built-in {self.backbone_name!r} model with {self.num_landmarks} landmarks"


def resolve_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        raise rule_error("model", name, "a timm model name (e.g. hrnet_w18_small_v2, hrnet_w32) or 'hrnet'")
    return name


def create_model(name: str, num_landmarks: int, pretrained: str | None = None) -> LandmarkNet:
    """Build the model; `pretrained` is a local timm weights file (nothing is downloaded)."""
    if num_landmarks < 1:
        raise rule_error("num_landmarks", num_landmarks, "> 0")
    model = LandmarkNet(resolve_name(name), num_landmarks)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


PICKLE_HINT = ("import it with `tune-landmarks import-model CHECKPOINT --spec SPEC.yaml --out DIR --trust-pickle` "
               "if you trust it")


def load_file(path: str | Path, trust_pickle: bool = False, hint: str = PICKLE_HINT) -> Any:
    """A .safetensors or torch file. Pickled Python objects (e.g. an argparse.Namespace saved beside the weights)
    are read only when `trust_pickle`: unpickling runs code from the file. Refusals are one line, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path))
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path}: not a checkpoint: neither a torch file (torch.save) nor a .safetensors file")
    try:
        with warnings.catch_warnings():  # torch's own advice is not ours to print
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # an UnpicklingError for anything that is not plain tensors/containers
        if not trust_pickle and isinstance(exc, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: not a weights-only checkpoint: it holds pickled Python objects (reading "
                                  f"them runs code from the file); {hint}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None


STATE_KEYS = ("model_state_dict", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel, torch.compile


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def state_dict_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict, a saved nn.Module, and the usual wrappers (model_state_dict, state_dict, model);
    strips DataParallel's `module.` and torch.compile's `_orig_mod.`."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), (dict, nn.Module)):
                return state_dict_of(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {_strip(k): v for k, v in obj.items()}
    raise CheckpointError(f"{path}: no state_dict found (expected a bare state_dict or a dict with "
                          f"{', '.join(repr(k) for k in STATE_KEYS)})")


def load_pretrained_backbone(model: LandmarkNet, path: str | Path) -> None:
    """Load local timm classification weights into the backbone (non-strict) and report the gaps."""
    sd = state_dict_of(load_file(path), path)
    own = model.backbone.state_dict()
    first = next(k for k in own if k.endswith("weight") and own[k].ndim == 4)
    if first in sd and sd[first].ndim == 4 and sd[first].shape[1] != own[first].shape[1]:
        sd[first] = sd[first].sum(1, keepdim=True)  # RGB stem -> grey, as timm's adapt_input_conv does
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    res = model.backbone.load_state_dict(sd, strict=False)
    log.info(f"--pretrained {path}: loaded {len(sd)} tensors; missing {len(res.missing_keys)}"
          + (f" (e.g. {', '.join(res.missing_keys[:5])})" if res.missing_keys else ""))


def resolve_code(arch: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An architecture record read from a model folder: its code copy's folder (stored relative) made absolute."""
    code = arch.get("code")
    if isinstance(code, dict) and not Path(code["dir"]).is_absolute():
        return arch | {"code": code | {"dir": str((folder / code["dir"]).resolve())}}
    return arch


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (or an exported/imported model directory) into a dict with at least 'model'."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / "model.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: a model directory must hold model.json and model.safetensors")
        meta = json.loads(meta_path.read_text())
        ckpt = {"model": state_dict_of(load_file(path / "model.safetensors"), path / "model.safetensors"),
                "arch": resolve_code(meta["arch"], path), "symbols": meta["symbols"], "config": meta.get("config", {}),
                "export": meta}
        if isinstance(meta.get("refine"), dict):  # an exported cascade: its start model is a folder inside it
            rec = meta["refine"]
            start = rec["start"] | ({"path": str(path / rec["start"]["path"])} if "path" in rec["start"] else {})
            ckpt["refine"] = rec | {"start": start}
        return ckpt
    obj = load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "arch" in obj:
        return obj
    return {"model": state_dict_of(obj, path)}


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: LandmarkModel, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strictly load a state dict, failing with one message that lists the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({_listed(v)})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped: checkpoint vs model", wrong)) if v]
        raise CheckpointError(f"{path}: its weights do not fit {model.describe()}: " + "; ".join(parts))
    model.load_state_dict(sd)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through a temp file + os.replace: a reader never sees half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """A file's sha256; of a model folder, its weights' (model.safetensors)."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p / "model.safetensors"] if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
