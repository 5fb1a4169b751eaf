"""The refinement stage (`--mode refine`): train only the difficult landmarks, without touching the start model.

Masked fine-tuning of the shared model keeps none of the workflow's promises (a step costs the same, the
landmarks outside the loss drift; see BENCHMARKS.md). Here the start model stays frozen and predicts every
landmark as before; a small heatmap network (model.LandmarkNet on a `refine_model` backbone, one channel per
refined landmark) looks at a high-resolution crop of the image (crops.py) around the start model's point and
finds the landmark in it. So the other landmarks are the start model's own, bit for bit; a step sees a few small
crops and never back-propagates through the start model; and the crop shows the anatomy at several times the
resolution of the global input.

One network for all refined landmarks: every crop trains only its own landmark's channel (CropObjective), so
a channel only ever learns its landmark, while the backbone is shared by all crops (one checkpoint, one forward
per batch of mixed crops). Training crops are centred on the ground truth plus an offset drawn to match the start
model's own errors for that landmark on the training images (Offsets), so training sees what inference will.

`train_refine` reuses run.py's pieces: the epoch loop `fit`, `train_step` (through `train_one_epoch`), the
optimiser, schedule, CheckpointSaver and the run files; validation is `infer.Cascade`, the code `evaluate`,
`predict` and export score and predict with. stages.train_any is the one entry point over both stages.

The start model may be any model behind model.LandmarkModel, a user's imported one included: the stage only
reads its points (infer.predict_as_run), never its architecture.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import run
from .atomic import atomic_path
from .augment import AugmentConfig, frame_item, train_transform
from .cache import CachedSplit
from .config import DEFAULT_KEY, MAX_CROP_PX, TrainConfig, rule_message
from .crops import (
    CropGeometry,
    PhysicalSplit,
    build_physical_cache,
    check_geometry,
    crop_side_mm,
    geometries,
    resolution,
    size_groups,
    smallest_extent_mm,
    take,
    to_crop,
    views,
)
from .device import amp_dtype, device_of, intra_op_threads, place, resolve_device
from .infer import Cascade, is_refine, load_cascade, load_model, predict_as_run
from .landmarks import parse_symbols
from .loss import per_landmark, weighted_total
from .metrics import Summary, radial_errors_mm, summarize
from .model import CheckpointError, LandmarkModel, create_model, read_checkpoint, sha256_file
from .read import predictions_sha256, read_predictions
from .run import Callback, Data, Objective, RunResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offsets:
    """Where a training crop is centred relative to the ground truth, per refined landmark: a Gaussian with the
    mean and covariance (mm) of the start model's own errors on the training images, times `scale`
    (refine_offset_scale: > 1 widens it, since a model errs less on the images it was trained on)."""

    mean: np.ndarray  # (L, 2) mm
    chol: np.ndarray  # (L, 2, 2) mm, Cholesky factor of the covariance

    @classmethod
    def fit(cls, errors_mm: np.ndarray, scale: float) -> Offsets:
        """From the start model's error vectors (N, L, 2), prediction minus truth in mm."""
        mean = errors_mm.mean(0)
        cov = np.stack([np.cov(e.T) if len(e) > 1 else np.zeros((2, 2)) for e in errors_mm.transpose(1, 0, 2)])
        chol = np.linalg.cholesky(cov + 1e-6 * np.eye(2))
        return cls(scale * mean, scale * chol)

    def draw(self, j: int, rng: np.random.Generator) -> np.ndarray:
        return self.mean[j] + self.chol[j] @ rng.standard_normal(2)

    def describe(self, symbols: list[str]) -> dict[str, dict[str, Any]]:
        """Per landmark: mean (mm) and the RMS radius of the offset distribution (mm), for the logs and checkpoint."""
        return {s: {"mean_mm": self.mean[j].round(4).tolist(), "rms_mm": float(np.sqrt((self.chol[j] ** 2).sum()))}
                for j, s in enumerate(symbols)}


class CropDataset(Dataset):
    """Training crops, one item per (training image, refined landmark): centred on the ground truth plus an offset
    drawn from `offsets`, then `transform` (augment.train_transform: rotation, scale, intensity). Items as
    augment.LandmarkDataset's: crop (1, P, P) float in [0, 1], keypoints (L, 2) in crop px, frame. The keypoints of
    the channels that are not this crop's landmark are NaN, so their targets are too and CropObjective leaves them
    out. Offsets come from the transform's own generator, which run.epoch_loader reseeds each epoch. Each landmark
    has its own crop (`geometries`, one per channel) from the images at that crop's resolution (`phys`, by mm/px);
    crops of different sizes go to different batches (`batches`). `labels` (A, N, K, 2), original px: the points to
    learn, one array per annotator; with A > 1 each item draws one (run.training_labels)."""

    def __init__(self, phys: dict[float, PhysicalSplit], channels: list[int], geometries: list[CropGeometry],
                 offsets: Offsets, transform: Any, labels: np.ndarray):
        self.phys, self.channels, self.geometries, self.offsets, self.transform, self.labels = \
            phys, channels, geometries, offsets, transform, labels
        self.images = labels.shape[1]

    def __len__(self) -> int:
        return self.images * len(self.channels)

    def groups(self) -> list[int]:
        """How many items each crop size has (run.steps_per_epoch counts their batches apart)."""
        return [self.images * len(js) for js in size_groups([g.size for g in self.geometries]).values()]

    def batches(self, batch_size: int, generator: torch.Generator) -> list[list[int]] | None:
        """One epoch's batches when the landmarks' crops differ in size: the items shuffled, batched within each size,
        the batches shuffled; None when every crop has one size (the DataLoader's own shuffle, as before)."""
        if len(self.groups()) == 1:
            return None
        by_size: dict[int, list[int]] = {}
        for i in torch.randperm(len(self), generator=generator).tolist():
            by_size.setdefault(self.geometries[i % len(self.channels)].size, []).append(i)
        chunks = [idx[b:b + batch_size] for idx in by_size.values() for b in range(0, len(idx), batch_size)]
        return [chunks[k] for k in torch.randperm(len(chunks), generator=generator).tolist()]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        n, j = divmod(i, len(self.channels))
        geometry = self.geometries[j]
        phys = self.phys[geometry.mm_per_px]
        who = int(self.transform.random_generator.integers(len(self.labels))) if len(self.labels) > 1 else 0
        truth = self.labels[who, n, self.channels[j]]
        centre = to_crop(truth, phys.scale[n], 0) + self.offsets.draw(j, self.transform.random_generator) / \
            geometry.mm_per_px
        origin = geometry.origins(centre)
        point = to_crop(truth, phys.scale[n], origin).astype(np.float32)[None]
        out = self.transform(image=take(phys.image(n), origin, geometry.size), keypoints=point)
        kps = np.full((len(self.channels), 2), np.nan, np.float32)
        kps[j] = np.asarray(out["keypoints"], np.float32).reshape(-1, 2)[0]
        image = torch.from_numpy(np.ascontiguousarray(out["image"])).unsqueeze(0).float().div_(255.0)
        return image, torch.from_numpy(kps), frame_item(np.ones(2), geometry.mm_per_px)


class CropObjective(Objective):
    """run.Objective for crops: a crop trains only its own landmark's channel. The other channels' targets are NaN
    (CropDataset); those (crop, channel) pairs get prediction = target = 0, so no loss and no gradient, and each
    channel's loss is its mean over the crops of its own landmark, normalised over the channels in the batch."""

    def __call__(self, model: LandmarkModel, pred: torch.Tensor, target: torch.Tensor,
                 teach: torch.Tensor | None = None) -> torch.Tensor:
        own = ~torch.isnan(target[:, :, 0, 0])
        mask = own[:, :, None, None]
        per = per_landmark(torch.where(mask, pred.float(), 0.0), torch.where(mask, target, 0.0), self.loss, self.awing)
        count = own.sum(0)
        return weighted_total(per * own.shape[0] / count.clamp_min(1), (count > 0).to(per.dtype))


def crop_transform(cfg: TrainConfig) -> Any:
    """The run's augmentation on a crop, less the translation (the offsets are the translation)."""
    return train_transform(AugmentConfig(cfg.aug_scale, cfg.aug_rotate, 0.0, cfg.aug_brightness_contrast, cfg.aug_clahe_p))


@dataclass
class Start:
    """Where a refinement run's start points come from: a frozen start model (`model`, read from `path`) or another
    detector's predictions (`given`, a folder); with `refine` and `state`, the refinement run this one continues."""

    model: LandmarkModel | None
    cfg: TrainConfig  # what the start model reads (image size, resize, decoder)
    symbols: list[str] | None
    path: Path | None = None
    given: Path | None = None
    refine: LandmarkModel | None = None
    state: dict[str, Any] | None = None  # the continued run's last.pt

    def record(self) -> dict[str, str]:
        """What the stage's checkpoint records of its start, with the sha256 that identifies it."""
        if self.given is not None:
            return {"predictions": str(self.given), "sha256": predictions_sha256(self.given)}
        return {"path": str(self.path.resolve()), "sha256": sha256_file(self.path)}

    def points(self, split: CachedSplit, symbols: list[str], sha: str) -> np.ndarray:
        """The start points (original px) of a cached split; given predictions must cover every image of it."""
        if self.given is not None:
            return read_predictions(self.given, list(split.image_ids), symbols)
        return start_points(self.model, self.cfg, sha, split)


def _start(cfg: TrainConfig, device: torch.device) -> Start:
    """A start checkpoint begins a refinement run, `cfg.start_predictions` alone begins one on another detector's
    points, a refinement run's last.pt continues it (its start model checked by sha256)."""
    if not cfg.resume:
        return Start(None, cfg, None, given=Path(cfg.start_predictions).resolve())
    ckpt = read_checkpoint(cfg.resume)
    if not is_refine(ckpt):
        if cfg.start_predictions:
            raise ValueError(f"give either a start model (--resume {cfg.resume}) or its predictions (--start-predictions "
                             f"{cfg.start_predictions}), not both")
        return Start(*load_model(cfg.resume, device, ckpt=ckpt), path=Path(cfg.resume))
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{cfg.resume}: a refinement stage's best.pt; continue a refine run from its last.pt, "
                              "or begin one with --resume START_CHECKPOINT")
    c, rec = load_cascade(cfg.resume, device, ckpt=ckpt), ckpt["refine"]["start"]
    return Start(c.start, c.start_cfg, c.symbols, Path(rec["path"]) if "path" in rec else None, c.given, c.refine, ckpt)


def start_points(start: LandmarkModel, start_cfg: TrainConfig, start_sha: str, split: CachedSplit) -> np.ndarray:
    """The frozen start model's points (original px) for a cached split: the same for every refinement run and sweep
    trial on that start model (11 s for ISBI's 150 images on one CPU thread, against 3 s for a refine epoch), so the
    first run computes them and keeps them beside the cached split, keyed by the start model's sha256, its decoding
    and the device; the others read them (np.save/np.load: the same float64 values)."""
    device = device_of(start).type
    key = json.dumps([start_sha, start_cfg.decoder, start_cfg.sigma, start_cfg.mixed_precision, device])
    path = split.path / f"start-points-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.is_file():
        return np.load(path)
    points = predict_as_run(start, start_cfg, split)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, points)
    return points


def check_crops(mm_per_px: dict[str, float], crops: dict[str, CropGeometry], data: Data) -> None:
    """Refuse crop settings the training or selection images cannot serve (crops.check_geometry), before any work."""
    for split in (data.train, data.val):
        check_geometry(mm_per_px, crops, split.spacing_mm, split.orig_size, split.image_ids)


def check_crop_entries(cfg: TrainConfig, symbols: list[str], refined: list[str] | None = None) -> None:
    """Refuse a `refine_crop_mm` entry that names no landmark of the dataset, or (`refined`: the run's refined set,
    when the run names it with --difficult) a landmark the stage does not refine. With a threshold the set is chosen
    by the start model's errors, so an entry for a landmark it leaves out is unused, not wrong (a sweep's trials
    refine different sets)."""
    allowed, what = (symbols, "a landmark of the dataset") if refined is None else (refined, "a landmark this stage refines")
    for name in ("refine_crop_mm", "refine_mm_per_px"):
        for key, value in getattr(cfg, name).items():
            if key != DEFAULT_KEY and key not in allowed:
                raise ValueError(rule_message(name, {key: value},
                                              f"keyed by {what} ({', '.join(allowed)}) or `{DEFAULT_KEY}`"))


def crop_sides(cfg: TrainConfig, refined: list[str], errors_mm: np.ndarray, limit_mm: float) -> dict[str, float]:
    """Each refined landmark's crop side (mm): its own `refine_crop_mm` entry, else the `default` one, else derived
    from how far the start model misses it: `refine_crop_k` x the 99th percentile of its radial errors on the
    training images (`errors_mm`, (N, L, 2) for `refined`), clipped to [refine_crop_min_mm, refine_crop_max_mm], to
    `limit_mm` (the smallest image's shorter side) and to MAX_CROP_PX crop pixels. A landmark the start model
    misses by more needs a wider view to contain the truth; one it places well needs less anatomy and gets a
    smaller, cheaper crop."""
    p99 = np.percentile(np.linalg.norm(errors_mm, axis=-1), 99, axis=0) if len(errors_mm) else np.zeros(len(refined))
    out = {}
    for j, s in enumerate(refined):
        if s in cfg.refine_crop_mm or DEFAULT_KEY in cfg.refine_crop_mm:
            out[s] = crop_side_mm(cfg.refine_crop_mm, s)
        else:
            derived = np.clip(cfg.refine_crop_k * p99[j], cfg.refine_crop_min_mm, cfg.refine_crop_max_mm)
            out[s] = round(float(min(derived, limit_mm, MAX_CROP_PX * resolution(cfg.refine_mm_per_px, s))), 3)
    return out


def physical_splits(data: Data, mm_per_px: float, cfg: TrainConfig) -> dict[str, PhysicalSplit]:
    """The training and selection images at a crop resolution (crops.build_physical_cache): decoded once, then
    shared by every run and trial at that resolution."""
    return {role: build_physical_cache(sp.records, sp.name, mm_per_px, cfg.annotator, cfg.cache_dir, cfg.progress)
            for role, sp in (("train", data.roles.train), ("val", data.roles.val))}


def given_crops(cfg: TrainConfig) -> dict[str, CropGeometry]:
    """The crops the options give before any landmark is chosen: each `refine_crop_mm` entry at its resolution."""
    return {key: CropGeometry.from_mm(mm, resolution(cfg.refine_mm_per_px, key)) for key, mm in cfg.refine_crop_mm.items()}


def train_refine(cfg: TrainConfig, callback: Callback | None = None, start_per_landmark: dict[str, float] | None = None,
                 data: Data | None = None, scratch: Path | None = None) -> RunResult:
    """Train (or continue) the refinement stage on top of the frozen start model `cfg.resume`; called as run.train
    is, returning its RunResult. The difficult set is chosen as run.train chooses it (`start_per_landmark` when
    the caller measured it, e.g. once per sweep; else the start model's validation errors measured here). The
    summaries use the start errors measured here, on the predictions the cascade keeps, so the drift of every
    landmark outside the set is exactly 0. `cfg.threads` holds for the run only."""
    with intra_op_threads(cfg.threads):
        return _train_refine(cfg, callback, start_per_landmark, data, scratch)


def _train_refine(cfg: TrainConfig, callback: Callback | None, start_per_landmark: dict[str, float] | None,
                  data: Data | None, scratch: Path | None) -> RunResult:
    cfg.validate()
    if cfg.mode != "refine":
        raise ValueError(f"train_refine trains mode 'refine', not {cfg.mode!r} (run.train does)")
    device = resolve_device(cfg.device)
    run.seed_all(cfg.seed)
    start = _start(cfg, device)
    for p in start.model.parameters() if start.model is not None else ():
        p.requires_grad_(False)
    cfg = dataclasses.replace(cfg, model=start.cfg.model, image_size=tuple(start.cfg.image_size),  # what the start reads
                              resize=start.cfg.resize, interpolation=start.cfg.interpolation)
    data = data or run.prepare_data(cfg, cfg.progress)
    symbols = data.info.symbols
    if start.symbols is not None and start.symbols != symbols:
        raise CheckpointError(f"{start.path}: landmark symbols {start.symbols} differ from the dataset's {symbols}")
    if cfg.difficult:
        parse_symbols(cfg.difficult, symbols)
    check_crop_entries(cfg, symbols, cfg.difficult or None)
    check_crops(cfg.refine_mm_per_px, given_crops(cfg), data)

    start_rec = start.record()
    coarse_val, coarse_train = (start.points(sp, symbols, start_rec["sha256"]) for sp in (data.val, data.train))
    start_pl = summarize(radial_errors_mm(coarse_val, data.val.keypoints_orig, data.val.spacing_mm), symbols).per_landmark
    difficult = run.choose_difficult(cfg, start.state, start_per_landmark or start_pl)
    channels = [symbols.index(s) for s in difficult]
    errors = (coarse_train - data.train.keypoints_orig)[:, channels] * data.train.spacing_mm[:, None, None]
    limit = min(smallest_extent_mm(sp.spacing_mm, sp.orig_size) for sp in (data.train, data.val))
    cfg = dataclasses.replace(cfg, refine_crop_mm=crop_sides(cfg, difficult, errors, limit))  # recorded as resolved
    crops = geometries(cfg.refine_crop_mm, difficult, cfg.refine_mm_per_px)
    phys = {res: physical_splits(data, res, cfg) for res in sorted({g.mm_per_px for g in crops.values()})}
    offsets = Offsets.fit(errors, cfg.refine_offset_scale)
    log.info("refine: %s on crops (px at mm/px = mm): %s; training offsets (RMS mm): %s", cfg.refine_model,
             ", ".join(f"{s} {g.size} at {g.mm_per_px:g} = {g.field_mm:.1f}" for s, g in crops.items()),
             ", ".join(f"{s} {d['rms_mm']:.2f}" for s, d in offsets.describe(difficult).items()))
    model = start.refine or place(create_model(cfg.refine_model, len(difficult)), device)
    cascade = Cascade(start.model, start.cfg, model, cfg, symbols, difficult, given=start.given)
    out = Path(cfg.out).resolve()
    run.write_run_files(out, cfg, difficult, difficult, start_pl)

    record = {"start": start_rec, "refined": difficult,
              "crop_px": {s: g.size for s, g in crops.items()}, "mm_per_px": {s: g.mm_per_px for s, g in crops.items()},
              "offsets": offsets.describe(difficult),
              "train_spacing_mm": [float(data.train.spacing_mm.min()), float(data.train.spacing_mm.max())]}
    objective = CropObjective.from_config(cfg, torch.ones(len(difficult)))
    opt = run.build_optimizer(model, cfg)
    ds = CropDataset({res: p["train"] for res, p in phys.items()}, channels, list(crops.values()), offsets,
                     crop_transform(cfg), run.training_labels(cfg, data))
    steps = run.steps_per_epoch(len(ds), cfg.batch_size, cfg.max_steps_per_epoch, ds.groups())
    optim = run.Optimisation.create(opt, run.build_scheduler(opt, cfg, steps), device,
                                    amp_dtype(device, cfg.mixed_precision), cfg.grad_clip)
    saver = run.CheckpointSaver(out, cfg, symbols, difficult, start_pl, scratch, extra={"refine": record})
    first_epoch, history = 0, []
    if start.state is not None:
        first_epoch, history = saver.restore(start.state, optim)
        log.info("resumed %s at epoch %d", cfg.resume, first_epoch)
    val_views = views({res: p["val"] for res, p in phys.items()})

    def score(_: torch.nn.Module) -> Summary:
        pred = cascade.refine_coarse(coarse_val, val_views)
        err = radial_errors_mm(pred, data.val.keypoints_orig, data.val.spacing_mm)
        return summarize(err, symbols, difficult, start_pl, difficult)

    return run.fit(model, ds, objective, optim, saver, cfg, steps, score, first_epoch=first_epoch, history=history,
                   callback=callback)
