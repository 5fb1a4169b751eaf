"""Using a model for inference: device and precision, batched prediction, scoring a split in millimetres,
loading a checkpoint (or an exported model) to predict or to evaluate it.

One home for all of it because every number the tool reports must come from one code path: a training
run's validation (run.py), `evaluate`, `export`'s verification and `predict` all place the model, preprocess,
decode and map back to original pixels through these functions, so they cannot disagree.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .atomic import write_parquet
from .build import fixed_options, from_checkpoint
from .cache import CachedSplit, build_cache, to_original, to_target
from .config import DEFAULT_KEY, TrainConfig, from_dict
from .crops import (
    CropGeometry,
    PhysicalSplit,
    View,
    build_physical_cache,
    check_geometry,
    from_crop,
    geometries,
    ring_shifts,
    take,
    views,
)
from .device import autocast, device_of, place, resolve_device
from .metrics import Summary, predictions_table, radial_errors_mm, summarize
from .model import CheckpointError, LandmarkModel, input_size, read_checkpoint, sha256_file
from .read import DatasetInfo, Record, describe, load_split, predictions_sha256, read_predictions


@torch.no_grad()
def predict_batch(model: LandmarkModel, images: np.ndarray, device: torch.device, decoder: str = "dark",
                  sigma: float = 2.0, amp: bool = False, scale: np.ndarray | None = None) -> np.ndarray:
    """Landmarks (N, K, 2) in the input frame for resized uint8 images (N, H, W) whose per-axis scales from the
    original images are `scale` (N, 2) (None: crops, scale 1); the model must be in eval mode. Shared by evaluation
    and `predict`, so both see exactly the same preprocessing and decoding (the model's own, model.LandmarkModel)."""
    x = torch.from_numpy(np.array(images)).unsqueeze(1).float().div_(255)
    x = x.to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        out = model(x)
    frame = None if scale is None else frame_of(scale).to(device)
    pts = model.decode(out.float(), frame, input_size(x), decoder, sigma)
    return pts.cpu().numpy().astype(np.float64)


def frame_of(scale: np.ndarray) -> torch.Tensor:
    """(N, 3) (sx, sy, spacing) per image, as augment.frame_item gives training: what a model needs to read its output
    in its own convention (decoding needs no spacing: 0)."""
    scale = np.asarray(scale, np.float64)
    return torch.from_numpy(np.concatenate([scale, np.zeros((len(scale), 1))], 1)).float()


@torch.no_grad()
def predict_cached(model: LandmarkModel, split: CachedSplit, device: torch.device, decoder: str = "dark",
                   sigma: float = 2.0, batch_size: int = 8, amp: bool = False) -> np.ndarray:
    """Predicted landmarks (N, K, 2) in original-image pixels for every image of a cached split."""
    was_training = model.training
    model.eval()
    out = [predict_batch(model, split.images[i:i + batch_size], device, decoder, sigma, amp, split.scale[i:i + batch_size])
           for i in range(0, len(split), batch_size)]
    model.train(was_training)
    pred = np.concatenate(out)
    return to_original(pred, split.scale[:, None, :])


def evaluate_split(model: LandmarkModel, split: CachedSplit, symbols: list[str], device: torch.device,
                   cfg: TrainConfig, difficult: list[str] | None = None, start: dict[str, float] | None = None,
                   trained: list[str] | None = None) -> tuple[Summary, np.ndarray, np.ndarray]:
    """Score the model on a cached split with the run's decoder, sigma and precision: (summary, predictions
    in original pixels, errors in mm). `start` and `trained` add the drift of the landmarks outside the loss."""
    pred = predict_cached(model, split, device, cfg.decoder, cfg.sigma, max(cfg.batch_size, 8), cfg.mixed_precision)
    err = radial_errors_mm(pred, split.keypoints_orig, split.spacing_mm)
    return summarize(err, symbols, difficult, start, trained), pred, err


class HasValidation(Protocol):
    """The part of run.Data that `start_errors` reads (infer sits below run, so it names the shape, not the class)."""

    info: DatasetInfo
    val: CachedSplit


def start_errors(cfg: TrainConfig, data: HasValidation, model: LandmarkModel | None = None) -> Summary:
    """The start model's errors on the validation split: what the difficult set is chosen from and what drift
    is measured against. `model` is the start model when the caller holds it already (on its device); without
    it, cfg.resume is loaded as cfg.model on cfg.device, or (no start model) cfg.start_predictions are scored."""
    symbols = data.info.symbols
    if model is None and not cfg.resume and cfg.start_predictions:
        pred = read_predictions(cfg.start_predictions, list(data.val.image_ids), symbols)
        return summarize(radial_errors_mm(pred, data.val.keypoints_orig, data.val.spacing_mm), symbols)
    if model is None:
        if not cfg.resume:
            raise ValueError("start_errors: no start model (neither `model` nor cfg.resume)")
        model = place(from_checkpoint(read_checkpoint(cfg.resume), cfg.resume, symbols, cfg.model),
                      resolve_device(cfg.device))
    return evaluate_split(model, data.val, symbols, device_of(model), cfg)[0]


def config_of(ckpt: dict[str, Any]) -> TrainConfig:
    """The run configuration stored with a checkpoint (model name, image size, decoder...)."""
    stored = dict(ckpt.get("config") or {})
    known = {k: v for k, v in stored.items() if k in TrainConfig.__dataclass_fields__}
    cfg = from_dict(known) if known else TrainConfig()
    if ckpt.get("arch"):
        cfg.model = ckpt["arch"]["model"]
    if ckpt.get("image_size"):
        cfg.image_size = tuple(ckpt["image_size"])
    for k, v in fixed_options(ckpt.get("arch")).items():
        setattr(cfg, k, v)
    return cfg


def load_model(path: str | Path, device: torch.device, ckpt: dict[str, Any] | None = None,
               symbols: list[str] | None = None) -> tuple[LandmarkModel, TrainConfig, list[str]]:
    """The model (in eval mode on `device`), its run config (image size, decoder, sigma) and its landmark
    symbols: what `predict` needs when there is no dataset to take the symbols from. `ckpt`: the file, when the
    caller has read it already; `symbols`: the dataset's landmarks, which must be the model's (refused, naming both,
    before any work, as load_cascade does)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    if is_refine(ckpt):
        raise CheckpointError(f"{path}: a refinement stage, which predicts with its start model: load it with "
                              "load_cascade (evaluate, compare and predict do)")
    own = list(ckpt.get("symbols") or [])
    if not own or not ckpt.get("arch"):
        raise CheckpointError(f"{path}: names no architecture or landmark symbols; use an exported model "
                              "folder (tune-landmarks export) or a best.pt/last.pt written by tune-landmarks")
    model = from_checkpoint(ckpt, path, own if symbols is None else symbols)
    return place(model, device).eval(), config_of(ckpt), own


def predict_as_run(model: LandmarkModel, cfg: TrainConfig, split: CachedSplit) -> np.ndarray:
    """A model's points (original px) for a split cached at its input size, decoded with its own run's decoder,
    sigma and precision: what `evaluate` gives it (a cascade's start model included)."""
    return predict_cached(model, split, device_of(model), cfg.decoder, cfg.sigma, amp=cfg.mixed_precision)


# ---------------------------------------------------------------- the refinement cascade (trained by refine.py)

@torch.no_grad()
def refine_points(model: LandmarkModel, at: Mapping[float, View], coarse: np.ndarray, crops: Sequence[CropGeometry],
                  device: torch.device, decoder: str = "dark", sigma: float = 2.0, amp: bool = False,
                  batch_size: int = 32, tta: int = 1) -> np.ndarray:
    """Refined points (N, L, 2) in original px. For image n and refined landmark j: the crop `crops[j]` of the
    physical image n at that crop's resolution (`at[res]`: the images and their scales, original -> physical px)
    around `coarse[n, j]` (original px), channel j of `model` decoded there by `predict_batch` and mapped back
    exactly (crops.from_crop). Crops of one size are batched together. `tta` > 1: that many crops per landmark,
    shifted (crops.ring_shifts), their points averaged."""
    images = [at[g.mm_per_px][0] for g in crops]
    scales = np.stack([at[g.mm_per_px][1] for g in crops], 1)  # (N, L, 2)
    centres = to_target(coarse, scales)
    origins = np.stack([g.origins(centres[:, j]) for j, g in enumerate(crops)], 1)
    shifts = [ring_shifts(tta, g.size) for g in crops]
    jobs = sorted(((n, j, t) for n in range(coarse.shape[0]) for j in range(coarse.shape[1]) for t in range(tta)),
                  key=lambda job: crops[job[1]].size)
    points = np.empty((tta, *coarse.shape), np.float64)
    was_training = model.training
    model.eval()
    b = 0
    while b < len(jobs):
        size = crops[jobs[b][1]].size
        chunk = [job for job in jobs[b:b + batch_size] if crops[job[1]].size == size]
        where = np.stack([origins[n, j] + shifts[j][t] for n, j, t in chunk])
        pts = predict_batch(model, np.stack([take(images[j][n], o, size) for (n, j, _), o in zip(chunk, where)]),
                            device, decoder, sigma, amp)
        for (n, j, t), o, p in zip(chunk, where, pts):
            points[t, n, j] = from_crop(p[j], scales[n, j], o)
        b += len(chunk)
    model.train(was_training)
    return points.mean(0)


@dataclass
class Cascade:
    """A start model and the refinement stage of some of its landmarks: those come from crops around the start
    model's points; every other landmark is the start model's own prediction, bit for bit (the same call on the
    same input as the start model alone). With `given` instead of a start model, the start points are another
    detector's predictions read from that folder (read.read_predictions), copied as they are."""

    start: LandmarkModel | None
    start_cfg: TrainConfig
    refine: LandmarkModel
    cfg: TrainConfig  # the refinement run's: crop settings, and the decoder and sigma of the crop heatmaps
    symbols: list[str]
    refined: list[str]  # the refinement model's channels, in order
    train_spacing_mm: tuple[float, float] = (0.0, 0.0)  # pixel spacings of the images it was trained on (min, max)
    given: Path | None = None  # the start detector's predictions (a folder of JSON files), when no start model

    def start_points(self, split: CachedSplit) -> np.ndarray:
        """The start points (N, K, 2) in original px of a cached split's images."""
        if self.given is not None:
            return read_predictions(self.given, list(split.image_ids), self.symbols)
        return predict_as_run(self.start, self.start_cfg, split)

    @property
    def crops(self) -> dict[str, CropGeometry]:
        """Each refined landmark's crop (the run's resolved `refine_crop_mm` and `refine_mm_per_px`; one side and
        resolution for all in older stages)."""
        return geometries(self.cfg.refine_crop_mm, self.refined, self.cfg.refine_mm_per_px)

    @property
    def resolutions(self) -> list[float]:
        """The crop resolutions: one physical cache each."""
        return sorted({g.mm_per_px for g in self.crops.values()})

    def check_images(self, spacing_mm: np.ndarray, sizes: np.ndarray, image_ids: Sequence[str]) -> None:
        """Refuse images the crops cannot serve (crops.check_geometry), naming the image and the landmark."""
        crops = self.crops
        by_entry = {(s if s in self.cfg.refine_mm_per_px else DEFAULT_KEY): g.mm_per_px for s, g in crops.items()}
        check_geometry(by_entry, crops, spacing_mm, sizes, image_ids)

    def physical(self, records: list[Record], split: str, annotator: str, cache_dir: str | Path | None,
                 progress: bool) -> dict[float, PhysicalSplit]:
        """A split at each crop resolution (crops.build_physical_cache), as predict_cached reads it."""
        return {res: build_physical_cache(records, split, res, annotator, cache_dir, progress) for res in self.resolutions}

    @property
    def channels(self) -> list[int]:
        return [self.symbols.index(s) for s in self.refined]

    def refine_coarse(self, coarse: np.ndarray, at: Mapping[float, View]) -> np.ndarray:
        """All landmarks (N, K, 2): the start model's points `coarse` with the refined ones replaced; with
        `refine_passes` 2 or 3, each pass crops again around the previous pass's points (the landmark nearer the
        crop's centre, where training put most of its crops)."""
        out = coarse.copy()
        points = coarse[:, self.channels]
        for _ in range(self.cfg.refine_passes):
            points = refine_points(self.refine, at, points, list(self.crops.values()),
                                   device_of(self.refine), self.cfg.decoder, self.cfg.sigma,
                                   self.cfg.mixed_precision, tta=self.cfg.refine_tta)
        out[:, self.channels] = points
        return out

    def predict_cached(self, split: CachedSplit, phys: Mapping[float, PhysicalSplit]) -> np.ndarray:
        """All landmarks (N, K, 2) in original px for a split cached at the start model's input size (`split`) and at
        each crop resolution (`phys`, the same records: Cascade.physical)."""
        for p in phys.values():
            if list(split.image_ids) != list(p.image_ids):
                raise ValueError(f"{split.path} and {p.path} hold different images")
            self.check_images(p.spacing_mm, p.orig_size, p.image_ids)
        return self.refine_coarse(self.start_points(split), views(phys))


def is_refine(ckpt: dict[str, Any]) -> bool:
    """A refinement-stage checkpoint (refine.py writes one; its "refine" record names the start model)."""
    return isinstance(ckpt.get("refine"), dict)


def checked_start(path: str | Path, rec: dict[str, Any], start: str | Path | None = None) -> Path:
    """The start model a refinement stage's record (`rec`, its checkpoint `path`) names, or `start` instead: refused,
    naming both files, when it is missing or its sha256 is not the recorded one."""
    start_path = Path(start or rec["start"]["path"])
    if not start_path.exists():
        raise CheckpointError(f"{path}: its start model {start_path} is missing (the refinement stage needs the start "
                              "model it was trained on)")
    got = sha256_file(start_path)
    if got != rec["start"]["sha256"]:
        raise CheckpointError(f"{path}: refines the start model with sha256 {rec['start']['sha256'][:16]}... "
                              f"({rec['start']['path']}), but {start_path} has sha256 {got[:16]}...: a refinement stage "
                              "fits only the start model it was trained on")
    return start_path


def is_given(rec: dict[str, Any]) -> bool:
    """A refinement stage trained on another detector's predictions (its record names a folder, no start model)."""
    return "predictions" in rec["start"]


def load_cascade(path: str | Path, device: torch.device, symbols: list[str] | None = None,
                 ckpt: dict[str, Any] | None = None, start: str | Path | None = None,
                 given: str | Path | None = None) -> Cascade:
    """A refine checkpoint and the start model it records (`start` overrides the recorded path), both in eval
    mode on `device`. Refused before any work, naming both sides: a start model whose sha256 is not the
    recorded one, or landmarks that differ from `symbols` (the dataset's) or from the start model's. `given`: a
    folder of start predictions to refine instead of the start model's (the recorded one for a stage trained on
    predictions)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    if not is_refine(ckpt):
        raise CheckpointError(f"{path}: not a refinement-stage checkpoint (tune-landmarks finetune --mode refine writes one)")
    rec = ckpt["refine"]
    own, refined = list(ckpt.get("symbols") or []), list(rec["refined"])
    if symbols is not None and own != list(symbols):
        raise CheckpointError(f"{path}: landmark symbols {own} differ from the dataset's {list(symbols)}")
    if not refined or not set(refined) <= set(own):
        raise CheckpointError(f"{path}: refines {refined}, which are not among its landmarks {own}")
    refine = place(from_checkpoint(ckpt, path), device).eval()
    keep = tuple(rec.get("train_spacing_mm") or (0.0, 0.0))
    if given is not None or is_given(rec):
        cfg = config_of(ckpt)
        return Cascade(None, cfg, refine, cfg, own, refined, keep, Path(given or rec["start"]["predictions"]))
    start_path = checked_start(path, rec, start)
    start_model, start_cfg, start_symbols = load_model(start_path, device)
    if start_symbols != own:
        raise CheckpointError(f"{path}: landmark symbols {own} differ from its start model's {start_symbols} ({start_path})")
    return Cascade(start_model, start_cfg, refine, config_of(ckpt), own, refined, keep)


def is_predictions(path: str | Path) -> bool:
    """A folder of per-image prediction JSON files (`predict`'s output), not a model folder."""
    path = Path(path)
    return path.is_dir() and not (path / "model.json").is_file() and any(path.glob("*.json"))


def start_sha256(path: str | Path) -> str:
    """The identity of what a run started from: a checkpoint's or model folder's sha256, or a predictions folder's."""
    return predictions_sha256(path) if is_predictions(path) else sha256_file(path)


@dataclass
class Evaluation:
    """A checkpoint scored on one split: the summary and the per image x landmark arrays behind it."""

    summary: Summary
    image_ids: list[str]
    symbols: list[str]
    pred: np.ndarray
    true: np.ndarray
    errors: np.ndarray
    difficult: list[str]


def evaluate_checkpoint(checkpoint: str | Path, dataset_path: str | Path, split: str, *, fmt: str | None = None,
                        annotator: str = "mean", device: str = "auto", cache_dir: str | None = None,
                        start: str | Path | None = None, progress: bool = False,
                        skip_images: Sequence[str] = ()) -> Evaluation:
    """Predict every image of `split` (but `skip_images`) and score it; `start` adds per-landmark drift against that
    checkpoint.
    A refine checkpoint is evaluated as its cascade (Cascade.predict_cached), checked against its start model first;
    a folder of predictions (`predict`'s JSON files, e.g. another detector's) is scored as it is."""
    if is_predictions(checkpoint):
        return _evaluate_predictions(Path(checkpoint), dataset_path, split, fmt, annotator, skip_images)
    ckpt = read_checkpoint(checkpoint)
    cfg = config_of(ckpt)
    info = describe(dataset_path, fmt)
    dev = resolve_device(device)
    cascade = load_cascade(checkpoint, dev, info.symbols, ckpt) if is_refine(ckpt) else None
    sp = load_split(info, split, annotator, skip=frozenset(skip_images))
    reads = cascade.start_cfg if cascade else cfg
    cached = build_cache(sp.records, split, tuple(reads.image_size), annotator, cache_dir, progress, reads.resize,
                         reads.interpolation)
    difficult = list(ckpt.get("difficult") or (ckpt.get("export") or {}).get("difficult") or [])
    start_pl, trained = None, None
    if start is not None:
        st = evaluate_checkpoint(start, dataset_path, split, fmt=fmt, annotator=annotator, device=device,
                                 cache_dir=cache_dir, skip_images=skip_images)
        start_pl = st.summary.per_landmark
        trained = difficult if cfg.mode in ("masked", "refine") else info.symbols
    if cascade is not None:
        pred = cascade.predict_cached(cached, cascade.physical(sp.records, split, annotator, cache_dir, progress))
    else:
        model = place(from_checkpoint(ckpt, checkpoint, info.symbols), dev)
        # the precision the run validated with, so an export reproduces its recorded metrics
        pred = predict_cached(model, cached, dev, cfg.decoder, cfg.sigma, amp=cfg.mixed_precision)
    err = radial_errors_mm(pred, cached.keypoints_orig, cached.spacing_mm)
    summ = summarize(err, info.symbols, difficult, start_pl, trained)
    return Evaluation(summ, list(cached.image_ids), info.symbols, pred, cached.keypoints_orig, err, difficult)


def _evaluate_predictions(folder: Path, dataset_path: str | Path, split: str, fmt: str | None,
                          annotator: str, skip_images: Sequence[str] = ()) -> Evaluation:
    info = describe(dataset_path, fmt)
    sp = load_split(info, split, annotator, skip=frozenset(skip_images))
    pred = read_predictions(folder, [r.image_id for r in sp.records], info.symbols)
    true = np.stack([r.keypoints for r in sp.records])
    err = radial_errors_mm(pred, true, np.array([r.spacing_mm for r in sp.records]))
    return Evaluation(summarize(err, info.symbols), [r.image_id for r in sp.records], info.symbols, pred, true, err, [])


def write_predictions(ev: Evaluation, path: str | Path) -> Path:
    """The per image x landmark table (`evaluate --out`) as Parquet, written atomically."""
    return write_parquet(predictions_table(ev.image_ids, ev.symbols, ev.pred, ev.true, ev.errors), path)
