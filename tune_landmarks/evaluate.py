"""Evaluate a checkpoint (or an exported model directory) on one split, in millimetres."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_parquet
from .cache import build_cache
from .config import TrainConfig, from_dict
from .metrics import Summary, predictions_table, radial_errors_mm, summarize
from .model import create_model, load_weights, read_checkpoint
from .read import describe, load_split
from .run import predict_cached, resolve_device


@dataclass
class Evaluation:
    summary: Summary
    image_ids: list[str]
    symbols: list[str]
    pred: np.ndarray
    true: np.ndarray
    errors: np.ndarray
    difficult: list[str]


def config_of(ckpt: dict) -> TrainConfig:
    """The run configuration stored with a checkpoint (model name, image size, decoder...)."""
    stored = dict(ckpt.get("config") or {})
    known = {k: v for k, v in stored.items() if k in TrainConfig.__dataclass_fields__}
    cfg = from_dict(known) if known else TrainConfig()
    if ckpt.get("arch"):
        cfg.model = ckpt["arch"]["model"]
    if ckpt.get("image_size"):
        cfg.image_size = tuple(ckpt["image_size"])
    return cfg


def evaluate_checkpoint(checkpoint: str | Path, dataset_path: str | Path, split: str, *, fmt: str | None = None,
                        annotator: str = "mean", device: str = "auto", cache_dir: str | None = None,
                        start: str | Path | None = None, progress: bool = False) -> Evaluation:
    """Predict every image of `split` and score it; `start` adds per-landmark drift against that checkpoint."""
    ckpt = read_checkpoint(checkpoint)
    cfg = config_of(ckpt)
    info = describe(dataset_path, fmt)
    sp = load_split(info, split, annotator)
    cached = build_cache(sp.records, split, tuple(cfg.image_size), annotator, cache_dir, progress)
    dev = resolve_device(device)
    model = create_model(cfg.model, len(info.symbols))
    load_weights(model, ckpt, checkpoint, info.symbols)
    model.to(dev)
    difficult = list(ckpt.get("difficult") or (ckpt.get("export") or {}).get("difficult") or [])
    start_pl, trained = None, None
    if start is not None:
        st = evaluate_checkpoint(start, dataset_path, split, fmt=fmt, annotator=annotator, device=device,
                                 cache_dir=cache_dir)
        start_pl = st.summary.per_landmark
        mode = cfg.mode
        trained = info.symbols if mode == "all" else difficult if mode == "masked" else info.symbols
    # the precision the run validated with, so an export reproduces its recorded metrics
    pred = predict_cached(model, cached, dev, cfg.decoder, cfg.sigma, amp=cfg.mixed_precision)
    err = radial_errors_mm(pred, cached.keypoints_orig, cached.spacing_mm)
    summ = summarize(err, info.symbols, difficult, start_pl, trained)
    return Evaluation(summ, list(cached.image_ids), info.symbols, pred, cached.keypoints_orig, err, difficult)


def write_predictions(ev: Evaluation, path: str | Path) -> Path:
    return write_parquet(predictions_table(ev.image_ids, ev.symbols, ev.pred, ev.true, ev.errors), path)
