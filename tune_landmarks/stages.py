"""The entry point of every training run, over both stages: fine-tuning the model itself (run.train) and the
refinement stage on top of a frozen start model (refine.train_refine). The CLI, sweep trials, export's seed
confirmations and the benchmarks call `train_any`; run.py sits below refine.py (which reuses its steps), so the
choice between them lives here, above both."""
from __future__ import annotations

from pathlib import Path

from . import refine, run
from .config import TrainConfig
from .run import Callback, Data, RunResult


def train_any(cfg: TrainConfig, callback: Callback | None = None, start_per_landmark: dict[str, float] | None = None,
              data: Data | None = None, scratch: Path | None = None) -> RunResult:
    """run.train, or for mode 'refine' refine.train_refine: one entry point for the CLI, sweep trials and re-runs."""
    train = refine.train_refine if cfg.mode == "refine" else run.train
    return train(cfg, callback, start_per_landmark, data, scratch)
