"""The `tune-landmarks` command line. Run options come from TrainConfig's fields (YAML defaults via
--config, then flags; `--image_size` and `--image-size` both work, as in the workflow being replaced)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

from .config import FIELDS, TrainConfig, from_dict, load_yaml
from .landmarks import WORKFLOW_DIFFICULT

_HELP = {
    "dataset_path": "dataset root (Aariz or ISBI 2015 layout)", "image_size": "network input WIDTH HEIGHT",
    "resume": "start checkpoint: a weights file starts a fine-tune, a last.pt continues that run",
    "difficult": "comma-separated symbols, e.g. UMT,UPM,R", "difficult_threshold": "difficult = start MRE above MM",
    "mode": "all | weighted | masked", "model": "hrnet (= hrnet_w32) or any timm features_only backbone",
    "mixed_precision": "autocast: fp16/bf16 on CUDA, bf16 on CPU", "distill_weight": "drift guard: teacher weight",
    "freeze_stages": "freeze the stem and the first N HRNet stages", "bn_eval": "freeze BatchNorm running statistics",
}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in both spellings; unset flags stay unset (SUPPRESS)."""
    p.add_argument("--config", help="YAML file of run options (flags override it)")
    for name, f in FIELDS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _HELP.get(name)}
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif name == "image_size":
            p.add_argument(*flags, nargs=2, type=int, metavar=("W", "H"), **kw)
        else:
            p.add_argument(*flags, **kw)


def run_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults, then --config YAML, then flags. A start checkpoint supplies the architecture and image
    size unless they are given, so `finetune --resume X` needs no --model to match X."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    cfg = from_dict(values, base, source=str(getattr(args, "config", "config")))
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = from_dict(given, cfg, source="command line")
    explicit = set(values) | set(given)
    if cfg.resume and not {"model", "image_size"} <= explicit:
        from .model import read_checkpoint

        ckpt = read_checkpoint(cfg.resume)
        if "model" not in explicit and ckpt.get("arch"):
            cfg.model = ckpt["arch"]["model"]
        if "image_size" not in explicit and ckpt.get("image_size"):
            cfg.image_size = tuple(ckpt["image_size"])
    return cfg


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import make_synthetic

    out = make_synthetic(args.out, args.num_images, args.seed, args.size)
    print(f"wrote a synthetic Aariz-format dataset with {args.num_images} images to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .read import describe, image_size, read_split, spacing_range

    info = describe(args.path, args.format)
    print(f"{info.root}: {info.format} layout, {len(info.symbols)} landmarks, splits: {', '.join(info.splits)}")
    problems = []
    for split in info.splits:
        sp = read_split(info, split, args.annotator)
        problems += sp.problems
        sizes = [image_size(r.image_path) for r in sp.records]
        ws, hs = [s[0] for s in sizes if s], [s[1] for s in sizes if s]
        lo, hi = spacing_range(sp.records)
        print(f"  {split:<6} {len(sp.records):>5} images  {len(info.symbols)} landmarks  "
              + (f"size {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px  spacing {lo:g}-{hi:g} mm/px" if ws else "")
              + (f"  ({len(sp.bad_images)} with problems)" if sp.bad_images else ""))
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("ok")
    return 0


def _finetune_defaults(cfg: TrainConfig) -> TrainConfig:
    """finetune's defaults are the workflow's: masked loss on the twelve landmarks the workflow names."""
    if cfg.mode != "all" and not cfg.difficult and cfg.difficult_threshold is None:
        from .read import describe

        syms = describe(cfg.dataset_path, cfg.format).symbols
        cfg.difficult = [s for s in WORKFLOW_DIFFICULT if s in syms]
        print(f"no --difficult given: using the workflow's set present here ({', '.join(cfg.difficult)})")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .run import train

    base = TrainConfig(mode="masked") if args.command == "finetune" else TrainConfig()
    cfg = run_config(args, base)
    if args.command == "finetune":
        if not cfg.resume and not cfg.pretrained:
            return _fail("finetune needs --resume START_CHECKPOINT (use `train` to train from scratch)")
        cfg = _finetune_defaults(cfg)
    res = train(cfg)
    print(f"best epoch {res.best_epoch}: val MRE {res.best.mre:.3f} mm; wrote {res.out}/best.pt, last.pt, "
          f"config.yaml, metrics.parquet")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, write_predictions
    from .metrics import format_table

    ev = evaluate_checkpoint(args.checkpoint, args.dataset_path, args.split, fmt=args.format, annotator=args.annotator,
                             device=args.device, cache_dir=args.cache_dir, start=args.start, progress=True)
    print(format_table(ev.summary, ev.difficult, None))
    if ev.summary.drift:
        print("drift of the untrained landmarks vs --start: "
              + ", ".join(f"{s} {v:+.3f}" for s, v in sorted(ev.summary.drift.items(), key=lambda kv: -kv[1])))
    if args.out:
        print(f"wrote {write_predictions(ev, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune-landmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic Aariz-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", "--num_images", type=int, default=30, dest="num_images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=512, help="approximate image width in pixels")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("check-dataset", help="list a dataset's splits and every problem in it")
    s.add_argument("path")
    s.add_argument("--format", choices=("aariz", "isbi"))
    s.add_argument("--annotator", default="mean", choices=("senior", "junior", "mean"))
    s.set_defaults(func=cmd_check)

    for name, what in (("train", "train from scratch (all landmarks by default)"),
                       ("finetune", "fine-tune a checkpoint, loss masked to the difficult landmarks by default")):
        s = sub.add_parser(name, help=what)
        add_run_options(s)
        s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="score a checkpoint on a split (mm), write per image x landmark Parquet")
    s.add_argument("--checkpoint", required=True, help="best.pt/last.pt, a weights file or an exported directory")
    s.add_argument("--dataset_path", "--dataset-path", required=True, dest="dataset_path")
    s.add_argument("--split", default="valid")
    s.add_argument("--out", help="predictions Parquet file")
    s.add_argument("--start", help="start checkpoint, to report drift per landmark")
    s.add_argument("--format", choices=("aariz", "isbi"))
    s.add_argument("--annotator", default="mean", choices=("senior", "junior", "mean"))
    s.add_argument("--device", default="auto")
    s.add_argument("--cache_dir", "--cache-dir", dest="cache_dir")
    s.set_defaults(func=cmd_evaluate)

    from . import commands  # sweep-level commands (search, resume, export, predict, report, compare, demo)

    commands.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    from .model import CheckpointError
    from .read import DatasetError

    try:
        return int(args.func(args) or 0)
    except (DatasetError, CheckpointError, ValueError, FileExistsError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
