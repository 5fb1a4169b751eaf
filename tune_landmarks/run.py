"""One fine-tuning (or training) run: the single loop that the CLI and every sweep trial call.

`train(cfg, callback)` reads and caches the data, builds or resumes the model, picks the difficult
landmarks, trains with the masked/weighted adaptive-wing loss, evaluates in millimetres each epoch,
writes best.pt / last.pt / config.yaml / metrics.parquet, and hands each epoch's metrics and
checkpoint to `callback` (how a Ray trial reports without a second copy of this loop).
"""
from __future__ import annotations

import copy
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import heatmap
from .atomic import write_parquet
from .augment import AugmentConfig, LandmarkDataset, train_transform
from .cache import CachedSplit, build_cache, to_original
from .config import TrainConfig
from .landmarks import parse_symbols
from .loss import check_finite, landmark_weights, per_landmark, weighted_total
from .metrics import Summary, format_table, radial_errors_mm, summarize
from .model import LandmarkNet, arch_of, create_model, freeze_stages, load_weights, read_checkpoint, save_atomic, set_train_mode
from .read import DatasetInfo, describe, load_split

Callback = Callable[[dict[str, Any], Path], None]


@dataclass
class Data:
    info: DatasetInfo
    train: CachedSplit
    val: CachedSplit
    train_split: str
    val_split: str


@dataclass
class RunResult:
    out: Path
    best_epoch: int
    best: Summary
    last: Summary
    difficult: list[str]
    start_per_landmark: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"The value of `device` is {name!r}, but no CUDA device is available here.")
    return torch.device(name)


def prepare_data(cfg: TrainConfig, progress: bool = True) -> Data:
    """Read both splits (all problems at once, before any model is built) and cache them."""
    info = describe(cfg.dataset_path, cfg.format)
    tr_name, va_name = cfg.train_split or info.default_splits[0], cfg.val_split or info.default_splits[1]
    tr = load_split(info, tr_name, cfg.annotator, cfg.skip_bad)
    va = load_split(info, va_name, cfg.annotator, cfg.skip_bad)
    size = tuple(cfg.image_size)
    return Data(info, build_cache(tr.records, tr_name, size, cfg.annotator, cfg.cache_dir, progress),
                build_cache(va.records, va_name, size, cfg.annotator, cfg.cache_dir, progress), tr_name, va_name)


def autocast(device: torch.device, enabled: bool):
    """fp16 on CUDA (bf16 where the card supports it), bf16 on CPU."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


@torch.no_grad()
def predict_batch(model: LandmarkNet, images: np.ndarray, device: torch.device, decoder: str = "dark",
                  sigma: float = 2.0, amp: bool = False) -> np.ndarray:
    """Landmarks (N, K, 2) in the input frame for resized uint8 images (N, H, W); the model must be in eval
    mode. Shared by evaluation and `predict`, so both see exactly the same preprocessing and decoding."""
    x = torch.from_numpy(np.array(images)).unsqueeze(1).float().div_(255)
    x = x.to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        hm = model(x)
    pts = heatmap.to_input_frame(heatmap.decode(hm.float(), decoder, sigma), model.stride)
    return pts.cpu().numpy().astype(np.float64)


@torch.no_grad()
def predict_cached(model: LandmarkNet, split: CachedSplit, device: torch.device, decoder: str = "dark",
                   sigma: float = 2.0, batch_size: int = 8, amp: bool = False) -> np.ndarray:
    """Predicted landmarks (N, K, 2) in original-image pixels for every image of a cached split."""
    was_training = model.training
    model.eval()
    out = [predict_batch(model, split.images[i:i + batch_size], device, decoder, sigma, amp)
           for i in range(0, len(split), batch_size)]
    model.train(was_training)
    pred = np.concatenate(out)
    return to_original(pred, split.scale[:, None, :])


def evaluate_split(model: LandmarkNet, split: CachedSplit, symbols: list[str], device: torch.device,
                   cfg: TrainConfig, difficult: list[str] | None = None, start: dict[str, float] | None = None,
                   trained: list[str] | None = None) -> tuple[Summary, np.ndarray, np.ndarray]:
    pred = predict_cached(model, split, device, cfg.decoder, cfg.sigma, max(cfg.batch_size, 8), cfg.mixed_precision)
    err = radial_errors_mm(pred, split.keypoints_orig, split.spacing_mm)
    return summarize(err, symbols, difficult, start, trained), pred, err


def select_difficult(start: dict[str, float], threshold: float) -> list[str]:
    """Landmarks whose start validation MRE exceeds `threshold` mm, worst first."""
    chosen = [s for s, v in sorted(start.items(), key=lambda kv: -kv[1]) if v > threshold]
    if not chosen:
        worst = max(start.items(), key=lambda kv: kv[1])
        raise ValueError(f"--difficult-threshold {threshold:g} mm selects no landmark: the largest starting error is "
                         f"{worst[1]:.3f} mm ({worst[0]})")
    return chosen


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 1 % of the peak at the last step."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def param_groups(model: LandmarkNet, weight_decay: float) -> list[dict[str, Any]]:
    """timm's convention (no decay on biases and norms) plus the final heatmap conv: its rows are per
    landmark, and AdamW's decoupled decay would move a masked landmark's channel without any gradient."""
    final = {id(p) for p in model.head[-1].parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or id(p) in final else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, callback: Callback | None = None, start_per_landmark: dict[str, float] | None = None,
          data: Data | None = None, keep_files: bool = True, quiet: bool = False) -> RunResult:
    """Run (or continue) one training/fine-tuning run; see the module docstring.

    `cfg.progress` shows the per-epoch progress bar; `quiet` (sweep trials, whose console is Ray's table)
    also silences the one-line summaries. `keep_files=False` (sweep trials) keeps last.pt only until the
    callback has taken it and writes no best.pt: Ray stores the reported checkpoints, and a 50-trial
    sweep should not hold 100 more copies."""
    cfg.validate()
    out = Path(cfg.out).resolve()
    data = data or prepare_data(cfg, cfg.progress)
    say = (lambda *a: None) if quiet else print
    symbols = data.info.symbols
    if cfg.difficult:
        parse_symbols(cfg.difficult, symbols)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_all(cfg.seed)

    model = create_model(cfg.model, len(symbols), cfg.pretrained)
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        ckpt = read_checkpoint(cfg.resume)
        load_weights(model, ckpt, cfg.resume, symbols)
        if "optimizer" in ckpt and "epoch" in ckpt:  # a last.pt: continue that run
            resume_state = ckpt
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # the start model's validation errors: for choosing the difficult set and measuring drift
    if resume_state is not None:
        start_per_landmark = resume_state.get("start_per_landmark") or start_per_landmark
    elif start_per_landmark is None and (cfg.resume or cfg.pretrained):
        start_summ, _, _ = evaluate_split(model, data.val, symbols, device, cfg)
        start_per_landmark = start_summ.per_landmark
        say(f"start checkpoint on {data.val_split}: MRE {start_summ.mre:.3f} mm")

    if resume_state is not None and resume_state.get("difficult") is not None:
        difficult = list(resume_state["difficult"])
    elif cfg.difficult_threshold is not None:
        if start_per_landmark is None:
            raise ValueError("--difficult-threshold needs a start checkpoint (--resume) to measure errors on")
        difficult = select_difficult(start_per_landmark, cfg.difficult_threshold)
    else:
        difficult = list(cfg.difficult)
    weights = landmark_weights(symbols, difficult, cfg.mode, cfg.difficult_weight)
    trained = [s for s, w in zip(symbols, weights.tolist()) if w > 0]
    untrained_idx = [i for i, w in enumerate(weights.tolist()) if w == 0]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    (out / "difficult.json").write_text(json.dumps(
        {"difficult": difficult, "threshold_mm": cfg.difficult_threshold, "mode": cfg.mode, "trained": trained,
         "start_per_landmark_mm": start_per_landmark}, indent=2))
    if cfg.mode != "all":
        say(f"difficult ({len(difficult)}): " + ", ".join(
            f"{s} {start_per_landmark[s]:.2f}mm" if start_per_landmark else s for s in difficult))

    teacher = None
    if cfg.distill_weight > 0 and untrained_idx:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    frozen = freeze_stages(model, cfg.freeze_stages)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    ds = LandmarkDataset(data.train, train_transform(AugmentConfig(cfg.aug_scale, cfg.aug_rotate, cfg.aug_translate,
                                                                   cfg.aug_brightness_contrast, cfg.aug_clahe_p)))
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps_per_epoch * cfg.epochs,
                                                             int(round(cfg.warmup_epochs * steps_per_epoch))))
    use_scaler = cfg.mixed_precision and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    hm_size = (cfg.image_size[1] // model.stride, cfg.image_size[0] // model.stride)
    awing = cfg.awing()

    start_epoch, best_mre, best_epoch, history = 0, math.inf, -1, []
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = int(resume_state["epoch"]) + 1
        best_mre = float(resume_state.get("best_val_mre", math.inf))
        best_epoch = int(resume_state.get("best_epoch", -1))
        history = json.loads(resume_state.get("history", "[]"))
        _set_rng_state(resume_state["rng"])
        say(f"resumed {cfg.resume} at epoch {start_epoch}")

    best_summ = last_summ = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        ds.transform.set_random_seed(cfg.seed * 100003 + epoch)
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=False, num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        set_train_mode(model, frozen, cfg.bn_eval)
        losses, wait = [], 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, file=sys.stdout)
        t_data = time.perf_counter()
        for step, (x, kps, _) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            wait += time.perf_counter() - t_data
            x, kps = x.to(device, non_blocking=True), kps.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            target = heatmap.encode(heatmap.to_heatmap_frame(kps, model.stride), hm_size, cfg.sigma)
            with autocast(device, cfg.mixed_precision):
                pred = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        teach = teacher(x)
            loss = weighted_total(per_landmark(pred, target, cfg.loss, awing), weights)
            if teacher is not None:
                idx = torch.tensor(untrained_idx, device=device)
                # the teacher's maps clamped to [0, 1], the range a target has: adaptive wing is undefined
                # (infinite) for targets above alpha, and raw outputs can leave [0, 1]
                soft = teach.float().index_select(1, idx).clamp(0, 1)
                d = per_landmark(pred.index_select(1, idx), soft, cfg.loss, awing).mean()
                loss = loss + cfg.distill_weight * d
            check_finite(loss.item(), f"loss at epoch {epoch + 1} step {step + 1}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
            t_data = time.perf_counter()
        bar.close()
        train_seconds = time.perf_counter() - t0
        summ, _, _ = evaluate_split(model, data.val, symbols, device, cfg, difficult, start_per_landmark, trained)
        epoch_seconds = time.perf_counter() - t0
        last_summ = summ
        improved = summ.mre < best_mre
        if improved:
            best_mre, best_epoch, best_summ = summ.mre, epoch, summ
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "lr": opt.param_groups[0]["lr"], **summ.flat(), "epoch_seconds": epoch_seconds,
               "train_seconds": train_seconds, "data_wait_seconds": wait, "peak_memory_mb": _peak_memory_mb(device),
               "per_landmark": summ.per_landmark}
        history.append(rec)
        state = {"model": model.state_dict(), "arch": arch_of(model), "symbols": symbols, "config": cfg.to_dict(),
                 "image_size": list(cfg.image_size), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict() if use_scaler else {}, "epoch": epoch, "rng": _rng_state(),
                 "best_val_mre": best_mre, "best_epoch": best_epoch, "difficult": difficult,
                 "start_per_landmark": start_per_landmark, "val_mre": summ.mre, "history": json.dumps(history)}
        last_path = save_atomic(state, out / ("last.pt" if keep_files else ".epoch/last.pt"))
        if improved and keep_files:
            save_atomic({k: state[k] for k in ("model", "arch", "symbols", "config", "image_size", "epoch", "difficult",
                                                "start_per_landmark", "val_mre")}, out / "best.pt")
        _write_metrics(out, history, difficult, start_per_landmark)
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {rec['train_loss']:.4f}  val MRE {summ.mre:.3f} mm"
                  + (f"  difficult {summ.mre_difficult:.3f}  others {summ.mre_other:.3f}" if difficult else "")
                  + (f"  max drift {summ.max_drift:+.3f}" if summ.drift else "")
                  + f"  SDR@2mm {summ.sdr[2.0]:.1f}%  {epoch_seconds:.1f}s" + ("  *best" if improved else ""))
        if callback is not None:
            metrics = {k: v for k, v in rec.items() if k != "per_landmark"} | {"best_val_mre": best_mre}
            metrics |= {f"mre_{s}": v for s, v in summ.per_landmark.items()} | {"difficult": ",".join(difficult)}
            callback(metrics, last_path)
        if not keep_files:
            last_path.unlink(missing_ok=True)
    if last_summ is None:  # resumed a run that had already finished
        last_summ = summarize(np.array([list(history[-1]["per_landmark"].values())]), symbols, difficult)
    if best_summ is None:
        best_summ = summarize(np.array([list(history[best_epoch]["per_landmark"].values())]), symbols, difficult)
    say(format_table(best_summ, difficult, start_per_landmark))
    return RunResult(out, best_epoch + 1, best_summ, last_summ, difficult, start_per_landmark, history)


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
