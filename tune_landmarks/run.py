"""One fine-tuning (or training) run: the single loop that the CLI and every sweep trial call.

Laid out as timm's train.py: `train_step` (one batch), `train_one_epoch`, `validate`, `build_optimizer` and
`build_scheduler`, and `CheckpointSaver` (what a run keeps on disk). `train(cfg, callback)` tells the story
of a run with them: read and cache the data, build or resume the model, choose the difficult landmarks,
train with the masked/weighted adaptive-wing loss, evaluate in millimetres each epoch, write best.pt /
last.pt / config.yaml / metrics.parquet, and hand each epoch's metrics and checkpoint to `callback` (how a
Ray trial reports without a second copy of this loop). The benchmarks (scripts/_bench.py) time these same
functions, so a step they time is the step a trial takes.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import write_parquet
from .augment import AugmentConfig, LandmarkDataset, train_transform
from .build import from_checkpoint, with_start_model
from .cache import CachedSplit, build_cache, to_target
from .check import refuse_shared_films
from .config import BOTH, TrainConfig
from .device import amp_dtype, autocast, device_of, intra_op_threads, place, resolve_device
from .infer import evaluate_split, start_errors
from .landmarks import parse_symbols
from .loss import AWingParams, check_finite, landmark_weights, per_landmark, weighted_total
from .metrics import Summary, format_table, summarize
from .model import LandmarkModel, create_model, input_size, read_checkpoint, save_atomic
from .read import DatasetError, DatasetInfo, Roles, describe, load_roles, load_split, parse_split

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any], Path], None]


@dataclass
class Data:
    """The training and selection splits of a run, read and cached once (a sweep shares one Data between its
    trials' set-up); `roles` holds every role's images, the verdict split's included (never cached here)."""

    info: DatasetInfo
    train: CachedSplit
    val: CachedSplit
    roles: Roles

    @property
    def train_split(self) -> str:
        return self.roles.train.name

    @property
    def val_split(self) -> str:
        return self.roles.val.name


@dataclass
class RunResult:
    """What a finished run hands back: where its files are, its best and last epochs' summaries, its history."""

    out: Path
    best_epoch: int
    best: Summary
    last: Summary
    difficult: list[str]
    start_per_landmark: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_data(cfg: TrainConfig, progress: bool = True) -> Data:
    """Read every role's split (all problems at once, and overlapping roles refused, before any model is
    built) and cache them; a radiograph in two roles, found by its fingerprint in the decode pass, is refused
    before any model is built (check.refuse_shared_films). The run trains and selects on the first two caches."""
    info = describe(cfg.dataset_path, cfg.format)
    roles = load_roles(info, cfg.train_split, cfg.val_split, cfg.test_split, cfg.annotator, cfg.skip_bad,
                       skip_images=cfg.skip_images)
    size, how = tuple(cfg.image_size), (cfg.resize, cfg.interpolation)
    cached = {role: (sp.name, build_cache(sp.records, sp.name, size, cfg.annotator, cfg.cache_dir, progress, *how))
              for role, sp in (("train", roles.train), ("val", roles.val), ("test", roles.test)) if sp is not None}
    refuse_shared_films(info.root, cached, cfg.allow_duplicates)
    return Data(info, cached["train"][1], cached["val"][1], roles)


# ---------------------------------------------------------------- what is trained, and how

def select_difficult(start: dict[str, float], threshold: float) -> list[str]:
    """Landmarks whose start validation MRE exceeds `threshold` mm, worst first."""
    chosen = [s for s, v in sorted(start.items(), key=lambda kv: -kv[1]) if v > threshold]
    if not chosen:
        worst = max(start.items(), key=lambda kv: kv[1])
        raise ValueError(f"--difficult-threshold {threshold:g} mm selects no landmark: the largest starting error is "
                         f"{worst[1]:.3f} mm ({worst[0]})")
    return chosen


def choose_difficult(cfg: TrainConfig, resume_state: dict[str, Any] | None,
                     start: dict[str, float] | None) -> list[str]:
    """A continued run keeps the set it chose; otherwise --difficult-threshold on the start model's errors,
    else --difficult as given."""
    if resume_state is not None and resume_state.get("difficult") is not None:
        difficult = list(resume_state["difficult"])
    elif cfg.difficult_threshold is not None:
        if start is None:
            raise ValueError("--difficult-threshold needs a start checkpoint (--resume) to measure errors on")
        difficult = select_difficult(start, cfg.difficult_threshold)
    else:
        difficult = list(cfg.difficult)
    if cfg.mode != "all":
        log.info("difficult (%d): %s", len(difficult),
                 ", ".join(f"{s} {start[s]:.2f}mm" if start else s for s in difficult))
    return difficult


@dataclass
class Objective:
    """What a step minimises: each landmark's loss against the model's targets (model.LandmarkModel: adaptive wing
    or MSE on heatmaps, L1 in mm on coordinates), normalised over `weights` (the mode: all, weighted or masked);
    with a `teacher` (the drift guard) plus `distill_weight` times the loss of the landmarks outside the loss
    against the frozen start model's outputs."""

    weights: torch.Tensor
    loss: str = "adaptive_wing"
    awing: AWingParams = field(default_factory=AWingParams)
    sigma: float = 2.0
    teacher: LandmarkModel | None = None
    distill_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, weights: torch.Tensor, teacher: LandmarkModel | None = None) -> Objective:
        awing = AWingParams(cfg.awing_omega, cfg.awing_theta, cfg.awing_epsilon, cfg.awing_alpha, cfg.awing_weight)
        return cls(weights, cfg.loss, awing, cfg.sigma, teacher, cfg.distill_weight)

    def heatmap_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return per_landmark(pred, target, self.loss, self.awing)

    def __call__(self, model: LandmarkModel, pred: torch.Tensor, target: torch.Tensor,
                 teach: torch.Tensor | None = None) -> torch.Tensor:
        loss = weighted_total(model.per_landmark_loss(pred, target, self.heatmap_loss), self.weights)
        if teach is None:
            return loss
        idx = torch.nonzero(self.weights == 0).flatten().to(pred.device)
        soft = model.teacher_target(teach, target).index_select(1, idx)
        return loss + self.distill_weight * model.per_landmark_loss(pred.index_select(1, idx), soft,
                                                                    self.heatmap_loss).mean()


def make_teacher(model: LandmarkModel) -> LandmarkModel:
    """A frozen copy of the start model: the drift guard's targets for the landmarks outside the loss."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def param_groups(model: LandmarkModel, weight_decay: float) -> list[dict[str, Any]]:
    """timm's convention (no decay on biases and norms) plus the final layer: its rows are per landmark, and
    AdamW's decoupled decay would move a masked landmark's channel without any gradient."""
    final = {id(p) for p in model.per_landmark_params()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or id(p) in final else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: LandmarkModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at cfg.lr over `param_groups`; build it after freezing, so frozen parameters are left out."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 1 % of the peak at the last step."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_lambda` stepped once per batch: warmup over cfg.warmup_epochs, decay over all cfg.epochs of
    `steps` steps each (a resumed run restores its position)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))))


def steps_per_epoch(n_train: int, batch_size: int, max_steps: int = 0, groups: Sequence[int] = ()) -> int:
    """Every batch of the training split (the last may be short), capped by --max-steps-per-epoch; with `groups`
    (the sizes of groups batched apart, e.g. crops of different sides), every group's batches."""
    n = sum(math.ceil(g / batch_size) for g in (groups or [n_train]))
    return min(n, max_steps) if max_steps else n


@dataclass
class Optimisation:
    """What turns a step's loss into a weight update: the optimiser, its schedule (stepped per batch), the
    loss scaler (on only for fp16 on CUDA), the gradient clip, and `amp`, the forward's autocast dtype (None
    = fp32). Benchmarks may share one optimiser between several of these."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    amp: torch.dtype | None = None

    @classmethod
    def create(cls, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
               amp: torch.dtype | None, grad_clip: float) -> Optimisation:
        """fp16 needs loss scaling to keep small gradients; bf16 has fp32's range and needs none."""
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16 and device.type == "cuda")
        return cls(opt, sched, scaler, grad_clip, amp)

    def update(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """Backward (scaled), clip the unscaled gradients, optimiser and schedule step."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.opt)
            # frozen parameters have no gradient, and clip_grad_norm_ skips those
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict()}  # {} when the scaler is off

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------- step, epoch, validation

def train_step(model: LandmarkModel, x: torch.Tensor, kps: torch.Tensor, frame: torch.Tensor, objective: Objective,
               optim: Optimisation, what: str = "loss") -> float:
    """One batch: forward under autocast, the model's targets made on the device (the loss outside autocast, in
    fp32), then `optim.update`. `frame` (B, 3): each image's scale and spacing (augment.frame_item). Returns the
    loss; a non-finite one raises, naming `what`, before it touches the weights."""
    device = device_of(model)
    x, kps, frame = x.to(device, non_blocking=True), kps.to(device, non_blocking=True), frame.to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, optim.amp is not None, optim.amp):
        pred = model(x)
        with torch.no_grad():
            teach = objective.teacher(x) if objective.teacher is not None else None
    with torch.no_grad():
        target = model.targets(pred, kps, frame, input_size(x), objective.sigma)
    loss = objective(model, pred, target, teach)
    value = loss.item()
    check_finite(value, what)
    optim.update(loss, model)
    return value


def training_labels(cfg: TrainConfig, data: Data) -> np.ndarray:
    """(A, N, K, 2) original px: the points the training images teach, one array per annotator an item may draw
    (augment.LandmarkDataset, refine.CropDataset). The run's truth (A = 1), or with `--annotator both` each
    annotator's own points (A = 2: labels as they are, their disagreement left in rather than averaged away;
    selection and evaluation stay on the mean)."""
    if cfg.annotator != BOTH:
        return data.train.keypoints_orig[None]
    ids = list(data.train.image_ids)
    out = []
    for who in ("senior", "junior"):
        sp = load_split(data.info, parse_split(data.roles.train.name)[0], who, cfg.skip_bad, frozenset(cfg.skip_images))
        points = {r.image_id: r.keypoints for r in sp.records}
        missing = [i for i in ids if i not in points]
        if missing:
            raise DatasetError(data.info.root, [f"--annotator both: no {who} points for {len(missing)} training "
                                                f"image(s): {', '.join(missing[:10])}"])
        out.append(np.stack([points[i] for i in ids]))
    return np.stack(out)


def train_dataset(split: CachedSplit, cfg: TrainConfig, labels: np.ndarray | None = None) -> LandmarkDataset:
    """The training split under the run's augmentation (reseeded every epoch by `epoch_loader`); `labels`
    (training_labels, original px) when its items draw one annotator's points each."""
    return LandmarkDataset(split, train_transform(AugmentConfig(cfg.aug_scale, cfg.aug_rotate, cfg.aug_translate,
                                                                cfg.aug_brightness_contrast, cfg.aug_clahe_p)),
                           None if labels is None or len(labels) == 1 else to_target(labels, split.scale[:, None, :]))


def epoch_loader(ds: LandmarkDataset, cfg: TrainConfig, epoch: int) -> DataLoader:
    """One epoch's batches, shuffled and augmented from (seed, epoch) alone, so a resumed run sees exactly
    the batches the uninterrupted one would have."""
    seed = cfg.seed * 100003 + epoch
    ds.transform.set_random_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batches = ds.batches(cfg.batch_size, generator) if hasattr(ds, "batches") else None
    if batches is not None:  # items of different shapes (refine.CropDataset): the dataset groups them
        return DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=False, num_workers=cfg.num_workers,
                      generator=generator)


def train_one_epoch(model: LandmarkModel, loader: DataLoader, objective: Objective, optim: Optimisation,
                    cfg: TrainConfig, epoch: int, steps: int, frozen: list[str]) -> tuple[float, float]:
    """At most `steps` steps over `loader`, with the progress bar; returns the mean loss and the seconds
    spent waiting for batches (the data path's share of the epoch)."""
    model.train_mode(frozen, cfg.bn_eval)
    losses, wait = [], 0.0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False,
               file=sys.stdout)
    t_data = time.perf_counter()
    for step, (x, kps, frame) in enumerate(loader):
        if step >= steps:
            break
        wait += time.perf_counter() - t_data
        losses.append(train_step(model, x, kps, frame, objective, optim, f"loss at epoch {epoch + 1} step {step + 1}"))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update()
        t_data = time.perf_counter()
    bar.close()
    return (float(np.mean(losses)) if losses else float("nan")), wait


def validate(model: LandmarkModel, data: Data, cfg: TrainConfig, difficult: list[str], start: dict[str, float] | None,
             trained: list[str]) -> Summary:
    """The epoch's validation in mm: `infer.evaluate_split`, the code `evaluate` and `export` score with."""
    return evaluate_split(model, data.val, data.info.symbols, device_of(model), cfg, difficult, start, trained)[0]


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


class CheckpointSaver:
    """What a run keeps on disk, each file written atomically (model.save_atomic), and the best epoch so far.

    last.pt, every epoch: all that `--resume last.pt` needs to continue exactly as if never stopped (optimiser,
    schedule, scaler, RNG states, history). best.pt, when the val MRE improves: the weights and what they were
    chosen on. With a `scratch` folder (sweep trials) last.pt is written there only until the callback has taken
    it, and no best.pt: Ray stores the reported checkpoints, and a 50-trial sweep should not hold 100 more copies.
    `extra` goes into both files as it is (the refinement stage's record of its start model, refine.py).
    """

    BEST_KEYS = ("model", "arch", "symbols", "config", "image_size", "epoch", "difficult", "start_per_landmark",
                 "val_mre")

    def __init__(self, out: Path, cfg: TrainConfig, symbols: list[str], difficult: list[str],
                 start: dict[str, float] | None, scratch: Path | None = None, extra: dict[str, Any] | None = None):
        self.out, self.cfg, self.symbols, self.difficult, self.start = out, cfg, symbols, difficult, start
        self.scratch, self.extra = scratch, dict(extra or {})
        self.best_mre, self.best_epoch = math.inf, -1

    def restore(self, state: dict[str, Any], optim: Optimisation) -> tuple[int, list[dict[str, Any]]]:
        """Continue from a last.pt (its weights are already loaded): returns the next epoch and the history."""
        optim.load_state_dict(state)
        self.best_mre = float(state.get("best_val_mre", math.inf))
        self.best_epoch = int(state.get("best_epoch", -1))
        _set_rng_state(state["rng"])
        return int(state["epoch"]) + 1, json.loads(state.get("history", "[]"))

    def save(self, epoch: int, val_mre: float, model: LandmarkModel, optim: Optimisation,
             history: list[dict[str, Any]]) -> tuple[Path, bool]:
        """Write this epoch's checkpoint(s); returns last.pt's path and whether the epoch is the best so far."""
        improved = val_mre < self.best_mre
        if improved:
            self.best_mre, self.best_epoch = val_mre, epoch
        state = {"model": model.state_dict(), "arch": model.arch(), "symbols": self.symbols,
                 "config": self.cfg.to_dict(), "image_size": list(self.cfg.image_size), **optim.state_dict(),
                 "epoch": epoch, "rng": _rng_state(), "best_val_mre": self.best_mre, "best_epoch": self.best_epoch,
                 "difficult": self.difficult, "start_per_landmark": self.start, "val_mre": val_mre,
                 "history": json.dumps(history)} | self.extra
        last = save_atomic(state, (self.scratch or self.out) / "last.pt")
        if improved and self.scratch is None:
            save_atomic({k: state[k] for k in (*self.BEST_KEYS, *self.extra)}, self.out / "best.pt")
        return last, improved

    def release(self, last: Path) -> None:
        """The callback has taken this epoch's checkpoint: a sweep trial keeps no copy of its own."""
        if self.scratch is not None:
            last.unlink(missing_ok=True)


# ---------------------------------------------------------------- the run

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _start_model(cfg: TrainConfig, symbols: list[str], device: torch.device,
                 ckpt: dict[str, Any] | None) -> tuple[LandmarkModel, dict[str, Any] | None]:
    """The model to train, placed on `device`, and the checkpoint when it is a last.pt (whose run this continues):
    the start checkpoint's (`ckpt`, cfg.resume as read) own architecture (built-in or imported), else a new cfg.model."""
    if ckpt is None:
        return place(create_model(cfg.model, len(symbols), cfg.pretrained), device), None
    model = from_checkpoint(ckpt, cfg.resume, symbols, cfg.model)
    resume_state = ckpt if "optimizer" in ckpt and "epoch" in ckpt else None  # a last.pt: continue that run
    return place(model, device), resume_state


def _start_per_landmark(cfg: TrainConfig, model: LandmarkModel, data: Data, resume_state: dict[str, Any] | None,
                        given: dict[str, float] | None) -> dict[str, float] | None:
    """The start model's validation errors, for choosing the difficult set and measuring drift: a continued
    run's own, else the caller's, else measured here (when there is a start model)."""
    if resume_state is not None:
        return resume_state.get("start_per_landmark") or given
    if given is not None or not (cfg.resume or cfg.pretrained):
        return given
    start = start_errors(cfg, data, model)
    log.info("start checkpoint on %s: MRE %.3f mm", data.val_split, start.mre)
    return start.per_landmark


def write_run_files(out: Path, cfg: TrainConfig, difficult: list[str], trained: list[str],
                     start: dict[str, float] | None) -> None:
    """config.yaml and difficult.json: what this run was asked to do and what it chose, before it trains."""
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    (out / "difficult.json").write_text(json.dumps(
        {"difficult": difficult, "threshold_mm": cfg.difficult_threshold, "mode": cfg.mode, "trained": trained,
         "start_per_landmark_mm": start}, indent=2))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _epoch_record(epoch: int, train_loss: float, optim: Optimisation, summ: Summary, epoch_seconds: float,
                  train_seconds: float, wait: float, device: torch.device) -> dict[str, Any]:
    """One entry of the run's history: a metrics.parquet row group and (less per_landmark) a report.
    `epoch_seconds` = training + validation; the checkpoint's seconds (known after it is written) go to the report."""
    return {"epoch": epoch + 1, "train_loss": train_loss, "lr": optim.opt.param_groups[0]["lr"], **summ.flat(),
            "epoch_seconds": epoch_seconds, "train_seconds": train_seconds,
            "validate_seconds": epoch_seconds - train_seconds, "data_wait_seconds": wait,
            "peak_memory_mb": _peak_memory_mb(device), "per_landmark": summ.per_landmark}


def _epoch_line(rec: dict[str, Any], summ: Summary, epochs: int, difficult: list[str], improved: bool) -> str:
    return (f"epoch {rec['epoch']}/{epochs}  loss {rec['train_loss']:.4f}  val MRE {summ.mre:.3f} mm"
            + (f"  difficult {summ.mre_difficult:.3f}  others {summ.mre_other:.3f}" if difficult else "")
            + (f"  max drift {summ.max_drift:+.3f}" if summ.drift else "")
            + f"  SDR@2mm {summ.sdr[2.0]:.1f}%  {rec['epoch_seconds']:.1f}s" + ("  *best" if improved else ""))


def _reported(rec: dict[str, Any], summ: Summary, best_mre: float, difficult: list[str]) -> dict[str, Any]:
    """The callback's metrics: the record's scalars, the best so far, each landmark's MRE, the difficult set."""
    metrics = {k: v for k, v in rec.items() if k != "per_landmark"} | {"best_val_mre": best_mre}
    return metrics | {f"mre_{s}": v for s, v in summ.per_landmark.items()} | {"difficult": ",".join(difficult)}


def _recorded(rec: dict[str, Any], symbols: list[str], difficult: list[str]) -> Summary:
    """An epoch's summary rebuilt from its history entry (an epoch run before this process resumed)."""
    return summarize(np.array([list(rec["per_landmark"].values())]), symbols, difficult)


def train(cfg: TrainConfig, callback: Callback | None = None, start_per_landmark: dict[str, float] | None = None,
          data: Data | None = None, scratch: Path | None = None) -> RunResult:
    """Run (or continue) one training/fine-tuning run; see the module docstring.

    `start_per_landmark`: the start model's errors when the caller has them (a sweep measures them once for
    all trials). `scratch`: see CheckpointSaver. `cfg.progress` shows the per-epoch progress bar; the
    one-line summaries go to this module's logger. `cfg.threads` holds for the run only (intra_op_threads)."""
    with intra_op_threads(cfg.threads):
        return _train(cfg, callback, start_per_landmark, data, scratch)


def _train(cfg: TrainConfig, callback: Callback | None, start_per_landmark: dict[str, float] | None,
           data: Data | None, scratch: Path | None) -> RunResult:
    start = read_checkpoint(cfg.validate().resume) if cfg.resume else None  # read once: options, weights, state
    cfg = with_start_model(cfg, start)
    if cfg.mode == "refine":  # refine.py sits above this module (it reuses the steps below), so it cannot be called here
        raise ValueError("mode 'refine' trains the refinement stage: call tune_landmarks.stages.train_any (or "
                         "train_refine), which runs it with this module's steps")
    data = data or prepare_data(cfg, cfg.progress)
    symbols = data.info.symbols
    if cfg.difficult:
        parse_symbols(cfg.difficult, symbols)
    device = resolve_device(cfg.device)
    seed_all(cfg.seed)
    model, resume_state = _start_model(cfg, symbols, device, start)
    start_per_landmark = _start_per_landmark(cfg, model, data, resume_state, start_per_landmark)
    difficult = choose_difficult(cfg, resume_state, start_per_landmark)
    weights = landmark_weights(symbols, difficult, cfg.mode, cfg.difficult_weight)
    trained = [s for s, w in zip(symbols, weights.tolist()) if w > 0]
    out = Path(cfg.out).resolve()
    write_run_files(out, cfg, difficult, trained, start_per_landmark)

    teacher = make_teacher(model) if cfg.distill_weight > 0 and len(trained) < len(symbols) else None
    objective = Objective.from_config(cfg, weights, teacher)
    frozen = model.freeze(cfg.freeze_stages)
    opt = build_optimizer(model, cfg)
    ds = train_dataset(data.train, cfg, training_labels(cfg, data))
    steps = steps_per_epoch(len(ds), cfg.batch_size, cfg.max_steps_per_epoch)
    optim = Optimisation.create(opt, build_scheduler(opt, cfg, steps), device, amp_dtype(device, cfg.mixed_precision),
                                cfg.grad_clip)
    saver = CheckpointSaver(out, cfg, symbols, difficult, start_per_landmark, scratch)
    first_epoch, history = 0, []
    if resume_state is not None:
        first_epoch, history = saver.restore(resume_state, optim)
        log.info("resumed %s at epoch %d", cfg.resume, first_epoch)
    return fit(model, ds, objective, optim, saver, cfg, steps,
               lambda m: validate(m, data, cfg, difficult, start_per_landmark, trained),
               frozen=frozen, first_epoch=first_epoch, history=history, callback=callback)


def fit(model: LandmarkModel, ds: Any, objective: Objective, optim: Optimisation, saver: CheckpointSaver,
        cfg: TrainConfig, steps: int, score: Callable[[LandmarkModel], Summary], *, frozen: list[str] | None = None,
        first_epoch: int = 0, history: list[dict[str, Any]] | None = None,
        callback: Callback | None = None) -> RunResult:
    """The epoch loop of every run (`train`, and the refinement stage in refine.py): `train_one_epoch` over `ds`
    (a Dataset with an albumentations `transform`, see epoch_loader), `score(model)` (the epoch's validation
    Summary), the saver's checkpoints, metrics.parquet, the log line and the callback."""
    device = device_of(model)
    history = history if history is not None else []
    out, symbols, difficult, start = saver.out, saver.symbols, saver.difficult, saver.start
    best = last = None
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loss, wait = train_one_epoch(model, epoch_loader(ds, cfg, epoch), objective, optim, cfg, epoch, steps,
                                     frozen or [])
        train_seconds = time.perf_counter() - t0
        last = score(model)
        rec = _epoch_record(epoch, loss, optim, last, time.perf_counter() - t0, train_seconds, wait, device)
        history.append(rec)
        t1 = time.perf_counter()
        last_path, improved = saver.save(epoch, last.mre, model, optim, history)
        best = last if improved else best
        _write_metrics(out, history, difficult, start)
        written = time.perf_counter() - t1  # reported, not in the history: last.pt holds the history it was written with
        log.info(_epoch_line(rec, last, cfg.epochs, difficult, improved))
        if callback is not None:
            callback(_reported(rec, last, saver.best_mre, difficult) | {"checkpoint_seconds": written}, last_path)
        saver.release(last_path)
    last = last or _recorded(history[-1], symbols, difficult)  # None: resumed a run that had already finished
    best = best or _recorded(history[saver.best_epoch], symbols, difficult)
    log.info("%s", format_table(best, difficult, start))
    return RunResult(out, saver.best_epoch + 1, best, last, difficult, start, history)


def _write_metrics(out: Path, history: list[dict[str, Any]], difficult: list[str],
                   start: dict[str, float] | None) -> None:
    """metrics.parquet: one row per epoch x landmark, the epoch's scalars repeated on each row."""
    rows: dict[str, list] = {"epoch": [], "symbol": [], "mre_mm": [], "start_mre_mm": [], "difficult": []}
    scalars = [k for k in history[0] if k not in ("per_landmark", "epoch")]
    for k in scalars:
        rows[k] = []
    for rec in history:
        for s, v in rec["per_landmark"].items():
            rows["epoch"].append(rec["epoch"])
            rows["symbol"].append(s)
            rows["mre_mm"].append(v)
            rows["start_mre_mm"].append(start.get(s) if start else None)
            rows["difficult"].append(s in difficult)
            for k in scalars:
                rows[k].append(rec[k])
    write_parquet(pa.table(rows), out / "metrics.parquet")
