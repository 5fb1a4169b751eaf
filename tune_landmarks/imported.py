"""A user's own model: their class from their own `model.py`, described by a YAML spec, behind the tool's model
interface (model.LandmarkModel).

The spec says how the user's script fed and read the model (input size, resize, channels, normalisation; output
kind, activation, decoding), so that this tool trains, scores and exports it exactly as that script did. The code
is copied into the model folder and checked by sha256 whenever it is imported again; it loads under a private
module name, so two imported models never share a module. On a Ray cluster the code copy travels to other nodes
as a `py_modules` entry of the job's runtime_env (`code_dir`), found there by its package name.

Coordinate convention of `soft-argmax` and of `coords: unit`: u = sum p j / (w - 1) / sum p, and the point in the
original image is (u W, v H) (model.to_corner/from_corner convert from and to the tool's centre-aligned frame).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import yaml

from . import heatmap
from .atomic import staged_dir
from .config import DECODERS, IMPORTED, INTERPOLATIONS, RESIZES, rule_message
from .landmarks import AARIZ, ISBI2015, symbols
from .model import (
    CheckpointError,
    HeatmapLoss,
    LandmarkModel,
    from_corner,
    load_file,
    load_weights,
    measured_stride,
    sha256_file,
    state_dict_of,
    to_corner,
)

FORMAT_VERSION = 1
KIND = IMPORTED
CODE_DIR = "code"
SOFT_ARGMAX = "soft-argmax"
CATALOGUES = {"aariz": AARIZ, "isbi": ISBI2015}
_INPUT = {"size", "resize", "interpolation", "channels", "mean", "std"}
_OUTPUT = {"kind", "activation", "decode", "coords"}
_TOP = {"code", "extra_files", "class", "kwargs", "landmarks", "input", "output"}


class SpecError(ValueError):
    """A model spec that cannot be used; the message names the spec file."""


@dataclass(frozen=True)
class InputSpec:
    size: tuple[int, int]  # width, height
    resize: str = "stretch"
    interpolation: str = "auto"
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class OutputSpec:
    kind: str = "heatmap"
    activation: str = "none"
    decode: str = SOFT_ARGMAX
    coords: str = "unit"


@dataclass(frozen=True)
class ModelSpec:
    """The contract of a model spec YAML (README, "Your own model")."""

    code: str
    cls: str
    landmarks: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra_files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("cls")
        d["input"]["size"] = list(self.input.size)
        for k in ("mean", "std"):
            d["input"][k] = list(d["input"][k])
        d["landmarks"], d["extra_files"] = list(self.landmarks), list(self.extra_files)
        return d


def _must(where: str, name: str, value: Any, what: str) -> SpecError:
    return SpecError(f"{where}: {rule_message(name, value, what)}")


def _unknown(where: str, section: str, given: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(given) - known)
    if extra:
        raise SpecError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} "
                        f"{', '.join(f'`{section}{k}`' for k in extra)} (known: {', '.join(sorted(known))})")


def _floats(where: str, name: str, value: Any, channels: int) -> tuple[float, ...]:
    vals = value if isinstance(value, list) else [value]
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise _must(where, name, value, f"a number or a list of {channels} numbers") from None
    if len(out) == 1:
        out = out * channels
    if len(out) != channels:
        raise _must(where, name, value, f"one value per channel ({channels})")
    return out


def parse_spec(data: Any, where: str) -> ModelSpec:
    """A spec's dict (as read from YAML at `where`) checked key by key; every error names `where`."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a model spec must be a mapping (code, class, landmarks, input, output)")
    _unknown(where, "", data, _TOP)
    for key in ("code", "class", "landmarks", "input"):
        if key not in data:
            raise SpecError(f"{where}: `{key}` is missing")
    inp, outp = data["input"], data.get("output") or {}
    if not isinstance(inp, dict) or not isinstance(outp, dict):
        raise SpecError(f"{where}: `input` and `output` must be mappings")
    _unknown(where, "input.", inp, _INPUT)
    _unknown(where, "output.", outp, _OUTPUT)
    marks = data["landmarks"]
    if isinstance(marks, str) and marks in CATALOGUES:
        names = tuple(symbols(CATALOGUES[marks]))
    elif isinstance(marks, list) and marks and all(isinstance(s, str) for s in marks) and len(set(marks)) == len(marks):
        names = tuple(marks)
    else:
        raise _must(where, "landmarks", marks, "aariz, isbi or a list of distinct landmark symbols")
    size = inp.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 8 for v in size)):
        raise _must(where, "input.size", size, "[width, height] in pixels, each an integer >= 8")
    channels = inp.get("channels", 1)
    if channels not in (1, 3):
        raise _must(where, "input.channels", channels, "1 or 3")
    resize, interp = inp.get("resize", "stretch"), inp.get("interpolation", "auto")
    if resize not in RESIZES:
        raise _must(where, "input.resize", resize, f"one of {', '.join(RESIZES)}")
    if interp not in INTERPOLATIONS:
        raise _must(where, "input.interpolation", interp, f"one of {', '.join(INTERPOLATIONS)}")
    std = _floats(where, "input.std", inp.get("std", 1.0), channels)
    if not all(s > 0 for s in std):
        raise _must(where, "input.std", inp.get("std"), "> 0")
    kind = outp.get("kind", "heatmap")
    checks = (("output.kind", kind, ("heatmap", "coords")),
              ("output.activation", outp.get("activation", "none"), ("none", "sigmoid")),
              ("output.decode", outp.get("decode", SOFT_ARGMAX), (SOFT_ARGMAX, *DECODERS)),
              ("output.coords", outp.get("coords", "unit"), ("unit", "pixels")))
    for name, value, choices in checks:
        if value not in choices:
            raise _must(where, name, value, f"one of {', '.join(choices)}")
    if not isinstance(data["class"], str) or not isinstance(data["code"], str):
        raise SpecError(f"{where}: `code` must be a .py file and `class` a name in it")
    kwargs, extra = data.get("kwargs") or {}, data.get("extra_files") or []
    if not isinstance(kwargs, dict) or not isinstance(extra, list):
        raise SpecError(f"{where}: `kwargs` must be a mapping and `extra_files` a list")
    return ModelSpec(data["code"], data["class"], names,
                     InputSpec(tuple(size), resize, interp, channels, _floats(where, "input.mean", inp.get("mean", 0.0),
                                                                               channels), std),
                     OutputSpec(kind, *(v for _, v, _ in checks[1:])), dict(kwargs), tuple(extra))


def read_spec(path: str | Path) -> tuple[ModelSpec, list[Path]]:
    """The spec at `path` and its code files (the entry first), each checked to exist beside it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError:
        raise SpecError(f"{path}: model spec not found or unreadable") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    spec = parse_spec(data, str(path))
    files = []
    for name in (spec.code, *spec.extra_files):
        f = (path.parent / name).resolve()
        if f.suffix != ".py" or not f.is_file():
            raise SpecError(f"{path}: code file {name!r} ({f}) is missing or not a .py file")
        if files and f.parent != files[0].parent:
            raise SpecError(f"{path}: extra file {name!r} must sit in the folder of {spec.code!r}")
        files.append(f)
    if len({f.name for f in files}) != len(files):
        raise SpecError(f"{path}: two code files share a name")
    return spec, files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_code(files: list[Path], dest: Path) -> dict[str, Any]:
    """Copy the code files into `dest/code/<package>/`; the package name is a digest of the files, so another model's
    code never takes its place. Returns the `code` record (its dir relative to `dest`)."""
    shas = {f.name: _sha(f) for f in files}
    package = "tl_user_" + hashlib.sha256(json.dumps(sorted(shas.items())).encode()).hexdigest()[:16]
    folder = dest / CODE_DIR / package
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return {"dir": f"{CODE_DIR}/{package}", "package": package, "entry": files[0].name, "files": shas}


def code_dir(code: dict[str, Any]) -> Path:
    """The folder holding the code copy: the recorded one, else (a trial on another node of a Ray cluster) the package
    that the job's runtime_env `py_modules` put on this worker's path."""
    folder = Path(code["dir"])
    if folder.is_dir():
        return folder
    found = importlib.util.find_spec(code["package"])
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    raise CheckpointError(f"{folder}: the imported model's code copy is missing (and package {code['package']!r} is "
                          "not importable here)")


def checked_code(code: dict[str, Any]) -> Path:
    """The code copy's folder, every file checked against its recorded sha256."""
    folder = code_dir(code)
    for name, sha in code["files"].items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: a file of the imported model's code copy is missing")
        if _sha(f) != sha:
            raise CheckpointError(f"{f}: changed since the model was imported (sha256 {_sha(f)[:16]}..., recorded "
                                  f"{sha[:16]}...): re-import the model from its checkpoint and spec")
    return folder


def load_code(code: dict[str, Any]) -> ModuleType:
    """The user's module from the code copy (checked_code first)."""
    folder = checked_code(code)
    name = f"{code['package']}.{Path(code['entry']).stem}"
    if name in sys.modules:
        return sys.modules[name]
    if len(code["files"]) > 1 and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # the entry imports its extra files as its own script did: by their names
    entry = folder / code["entry"]
    mod_spec = importlib.util.spec_from_file_location(name, entry)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise CheckpointError(f"{entry}: importing it failed: {type(exc).__name__}: {exc}") from None
    return module


class ImportedModel(LandmarkModel):
    """The user's network (`net`, its state dict keys unchanged) fed and read as its spec says."""

    def __init__(self, net: nn.Module, spec: ModelSpec, arch: dict[str, Any]):
        super().__init__()
        self.net, self.spec, self._arch = net, spec, arch
        self.num_landmarks = len(spec.landmarks)
        self.kind = spec.output.kind
        self._mean = torch.tensor(spec.input.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.input.std).view(1, -1, 1, 1)

    # the weights are the user's own module's: their checkpoint's keys, no prefix of ours
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, self.spec.input.channels, -1, -1)
        return (x - self._mean.to(x.device, x.dtype)) / self._std.to(x.device, x.dtype)

    def net_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.spec.output.activation == "sigmoid" else out

    @property
    def _tool_convention(self) -> bool:
        """Heatmaps decoded by the tool's own decoders (dark, quarter, argmax): its centre-aligned frame applies."""
        return self.kind == "heatmap" and self.spec.output.decode != SOFT_ARGMAX

    def _px_per_unit(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Input pixels per unit of the model's own coordinates (x, y): the input size for soft-argmax and unit
        coordinates, 1 for `coords: pixels`."""
        if self.kind == "coords" and self.spec.output.coords == "pixels":
            return torch.ones(2, device=device)
        return torch.tensor(size, dtype=torch.float32, device=device)

    def targets(self, out: torch.Tensor, kps: torch.Tensor, frame: torch.Tensor, size: tuple[int, int],
                sigma: float) -> torch.Tensor:
        if self._tool_convention:
            return super().targets(out, kps, frame, size, sigma)
        corner = to_corner(kps.float(), frame)
        per_unit = self._px_per_unit(size, out.device)
        if self.kind == "heatmap":  # u = x / W_in, at output pixel u (w - 1)
            h, w = out.shape[-2:]
            at = corner / per_unit * torch.tensor([w - 1, h - 1], device=out.device, dtype=torch.float32)
            return heatmap.encode(at, (h, w), sigma)
        mm = per_unit * frame[:, None, 2:3].float() / frame[:, None, :2].float()  # mm per model unit, per axis
        return torch.cat([corner / per_unit, mm.expand_as(corner)], -1)

    def per_landmark_loss(self, out: torch.Tensor, target: torch.Tensor, heatmap_loss: HeatmapLoss) -> torch.Tensor:
        if self.kind == "heatmap":
            return heatmap_loss(out, target)
        return ((out.float() - target[..., :2]).abs() * target[..., 2:]).sum(-1).mean(0)  # L1 in mm

    def teacher_target(self, teach: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "heatmap":
            return super().teacher_target(teach, target)
        return torch.cat([teach.float(), target[..., 2:]], -1)

    def decode(self, out: torch.Tensor, frame: torch.Tensor | None, size: tuple[int, int], decoder: str,
               sigma: float) -> torch.Tensor:
        """The spec's decoding (the `decoder` argument applies to built-in models only)."""
        if self._tool_convention:
            hm = heatmap.decode(out.float(), self.spec.output.decode, sigma)
            return heatmap.to_input_frame(hm, measured_stride(out, size))
        unit = heatmap.soft_argmax(out.float()) if self.kind == "heatmap" else out.float()
        if frame is None:
            frame = torch.ones(out.shape[0], 3, device=out.device)
        return from_corner(unit * self._px_per_unit(size, out.device), frame)

    def per_landmark_params(self) -> list[nn.Parameter]:
        """The last layer whose weight has one row per landmark (K for heatmaps, 2K for coordinates)."""
        rows = (self.num_landmarks,) if self.kind == "heatmap" else (2 * self.num_landmarks, self.num_landmarks)
        last = None
        for m in self.net.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, nn.Parameter) and w.ndim >= 2 and w.shape[0] in rows:
                last = m
        return list(last.parameters(recurse=False)) if last is not None else []

    def arch(self) -> dict[str, Any]:
        return self._arch

    def describe(self) -> str:
        return f"the imported model {self.spec.cls!r} ({self._arch['code']['entry']}, {self.num_landmarks} landmarks)"


def _instantiate(module: ModuleType, spec: ModelSpec, where: str) -> nn.Module:
    factory = getattr(module, spec.cls, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"{where}: defines no class or function {spec.cls!r}")
    try:
        net = factory(**spec.kwargs)
    except Exception as exc:
        raise CheckpointError(f"{where}: {spec.cls}(**{spec.kwargs}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise CheckpointError(f"{where}: {spec.cls}(**kwargs) gave a {type(net).__name__}, not a torch.nn.Module")
    return net


@torch.no_grad()
def dry_run(model: ImportedModel, where: str) -> tuple[int, ...]:
    """One forward on a blank image of the declared size: the output's shape, checked against the spec."""
    w, h = model.spec.input.size
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, 1, h, w))
    except Exception as exc:
        raise CheckpointError(f"{where}: a forward on a blank {w} x {h} image failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        model.train(was)
    k = len(model.spec.landmarks)
    if not isinstance(out, torch.Tensor):
        raise CheckpointError(f"{where}: the forward returned a {type(out).__name__}, not a tensor")
    shape = tuple(out.shape)
    ok = len(shape) == 4 if model.kind == "heatmap" else (len(shape) == 3 and shape[2] == 2)
    if not ok:
        need = "(B, K, h, w)" if model.kind == "heatmap" else "(B, K, 2)"
        raise CheckpointError(f"{where}: output kind {model.kind} needs shape {need}, the forward on a blank {w} x {h} "
                              f"image gave {shape}")
    if shape[1] != k:
        raise CheckpointError(f"{where}: the output has K = {shape[1]} landmarks, the spec lists {k}")
    return shape


def build(arch: dict[str, Any]) -> ImportedModel:
    """An imported model from its architecture record (weights not loaded), its output checked by a dry run."""
    code = arch["code"]
    module = load_code(code)
    spec = parse_spec(arch["spec"], f"{code['dir']}/{code['entry']}")
    where = str(code_dir(code) / code["entry"])
    model = ImportedModel(_instantiate(module, spec, where), spec, arch)
    dry_run(model, where)
    return model


def config_values(spec: ModelSpec) -> dict[str, Any]:
    """The run options an imported model fixes: what it reads (size, resize, interpolation) and its decoder."""
    vals = {"model": KIND, "image_size": tuple(spec.input.size), "resize": spec.input.resize,
            "interpolation": spec.input.interpolation}
    return vals | ({"decoder": spec.output.decode} if spec.output.decode in DECODERS else {})


def import_model(checkpoint: str | Path, spec_path: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """Write the model folder `out`: model.safetensors (the checkpoint's weights, loaded strictly into the spec's
    class), the code copy and model.json. Every check runs before anything is written; `out` appears whole or not."""
    from safetensors.torch import save_file

    from .config import TrainConfig

    checkpoint, spec_path, out = Path(checkpoint), Path(spec_path), Path(out).resolve()
    spec, files = read_spec(spec_path)
    hint = "pass --trust-pickle if you trust it"
    sd = state_dict_of(load_file(checkpoint, trust_pickle, hint), checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose another --out")
    with staged_dir(out) as tmp:
        code = copy_code(files, tmp)
        arch = {"kind": KIND, "model": KIND, "format_version": FORMAT_VERSION, "num_landmarks": len(spec.landmarks),
                "spec": spec.to_dict(), "code": code | {"dir": str(tmp / code["dir"])},
                "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                           "spec": str(spec_path.resolve())}}
        model = build(arch)
        load_weights(model, sd, checkpoint)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = TrainConfig(**config_values(spec))
        meta = {"format_version": FORMAT_VERSION, "arch": arch | {"code": code}, "symbols": list(spec.landmarks),
                "image_size": list(spec.input.size), "config": cfg.to_dict()}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    return out


def portable(arch: dict[str, Any], dest: Path) -> dict[str, Any]:
    """An imported model's architecture record for a model folder `dest`: its code copied into it (checked first),
    recorded relative, so the folder can be moved."""
    code = arch["code"]
    src, folder = checked_code(code), dest / CODE_DIR / code["package"]
    folder.mkdir(parents=True, exist_ok=True)
    for name in code["files"]:
        shutil.copyfile(src / name, folder / name)
    return arch | {"code": code | {"dir": f"{CODE_DIR}/{code['package']}"}}
