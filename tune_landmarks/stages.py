"""The entry point of every training run, over both stages: fine-tuning the model itself (run.train) and the
refinement stage on top of a frozen start model (refine.train_refine). The CLI (`train`, `finetune`), sweep trials,
export's seed confirmations and the benchmarks call `train_any`; run.py sits below refine.py (which reuses its
steps), so the choice between them lives here, above both. Both are imported when a run starts, so registering the
commands costs no torch import."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FIELDS, TrainConfig, from_dict, load_yaml, rule_error
from .landmarks import WORKFLOW_DIFFICULT
from .options import add_run_options

if TYPE_CHECKING:
    from .run import Callback, Data, RunResult


def train_any(cfg: TrainConfig, callback: Callback | None = None, start_per_landmark: dict[str, float] | None = None,
              data: Data | None = None, scratch: Path | None = None) -> RunResult:
    """run.train, or for mode 'refine' refine.train_refine: one entry point for the CLI, sweep trials and re-runs."""
    from . import refine, run

    train = refine.train_refine if cfg.mode == "refine" else run.train
    return train(cfg, callback, start_per_landmark, data, scratch)


def run_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults, then --config YAML, then flags. A start checkpoint supplies the architecture and image
    size unless they are given, so `finetune --resume X` needs no --model to match X."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    cfg = from_dict(values, base, source=str(getattr(args, "config", "config")))
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = from_dict(given, cfg, source="command line")
    explicit = set(values) | set(given)
    if cfg.resume:
        from .build import fixed_options
        from .model import read_checkpoint

        ckpt = read_checkpoint(cfg.resume)
        fixed = fixed_options(ckpt.get("arch"))  # an imported model is read as its spec says
        for k, v in fixed.items():
            if k in explicit and getattr(cfg, k) != v:
                raise rule_error(k, getattr(cfg, k), f"{v!r}: {cfg.resume} is an imported model whose spec fixes it "
                                                     f"(leave --{k.replace('_', '-')} out)")
            setattr(cfg, k, v)
        if not fixed:
            if "model" not in explicit and ckpt.get("arch"):
                cfg.model = ckpt["arch"]["model"]
            if "image_size" not in explicit and ckpt.get("image_size"):
                cfg.image_size = tuple(ckpt["image_size"])
    return cfg


def _finetune_defaults(cfg: TrainConfig) -> TrainConfig:
    """finetune's defaults are the workflow's: masked loss on the twelve landmarks the workflow names."""
    if cfg.mode != "all" and not cfg.difficult and cfg.difficult_threshold is None:
        from .read import describe

        syms = describe(cfg.dataset_path, cfg.format).symbols
        cfg.difficult = [s for s in WORKFLOW_DIFFICULT if s in syms]
        print(f"no --difficult given: using the workflow's set present here ({', '.join(cfg.difficult)})")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    base = TrainConfig(mode="masked") if args.command == "finetune" else TrainConfig()
    cfg = run_config(args, base)
    if args.command == "finetune":
        if not cfg.resume and not cfg.pretrained and not cfg.start_predictions:
            raise ValueError("finetune needs --resume START_CHECKPOINT (or, for --mode refine, --start-predictions DIR; "
                             "use `train` to train from scratch)")
        cfg = _finetune_defaults(cfg)
    res = train_any(cfg)
    print(f"best epoch {res.best_epoch}: val MRE {res.best.mre:.3f} mm; wrote {res.out}/best.pt, last.pt, "
          f"config.yaml, metrics.parquet")
    return 0


def register_cli(sub: Any) -> None:
    for name, what in (("train", "train from scratch (all landmarks by default)"),
                       ("finetune", "fine-tune a checkpoint, loss masked to the difficult landmarks by default")):
        s = sub.add_parser(name, help=what)
        add_run_options(s)
        s.set_defaults(func=cmd_train)
