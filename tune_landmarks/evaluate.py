"""`tune-landmarks evaluate`: a checkpoint's errors on one split, in mm, per landmark and per image.

The scoring itself is infer.evaluate_checkpoint (the same as every epoch's validation and the verdict); this
module is the command, and imports torch only when it runs.
"""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_scoring_options


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .infer import evaluate_checkpoint, write_predictions
    from .metrics import format_table

    ev = evaluate_checkpoint(args.checkpoint, args.dataset_path, args.split, fmt=args.format, annotator=args.annotator,
                             device=args.device, cache_dir=args.cache_dir, start=args.start, progress=True,
                             skip_images=args.skip_images)
    print(format_table(ev.summary, ev.difficult, None))
    if ev.summary.drift:
        print("drift of the untrained landmarks vs --start: "
              + ", ".join(f"{s} {v:+.3f}" for s, v in sorted(ev.summary.drift.items(), key=lambda kv: -kv[1])))
    if args.out:
        print(f"wrote {write_predictions(ev, args.out)}")
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("evaluate", help="score a checkpoint on a split (mm), write per image x landmark Parquet")
    s.add_argument("--checkpoint", required=True, help="best.pt/last.pt, a weights file or an exported directory")
    s.add_argument("--out", help="predictions Parquet file")
    s.add_argument("--start", help="start checkpoint, to report drift per landmark")
    add_scoring_options(s)
    s.set_defaults(func=cmd_evaluate)
