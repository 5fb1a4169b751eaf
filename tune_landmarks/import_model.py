"""`tune-landmarks import-model`: a user's own checkpoint and model class become a model folder the tool can
fine-tune, search, export and predict with; with a dataset, the import is scored the spec's way at once, so the
user can hold its figures against their own script's.

The import itself is imported.py's; this module is the command, and imports torch only when it runs.
"""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_scoring_options, flag


def cmd_import_model(args: argparse.Namespace) -> int:
    from .imported import import_model

    out = import_model(args.checkpoint, args.spec, args.out, args.trust_pickle)
    print(f"imported {args.checkpoint} -> {out}: model.safetensors, model.json, code/ (usable wherever a checkpoint is: "
          "evaluate, finetune --resume, search --resume, predict --model)")
    if args.dataset_path:
        from .infer import evaluate_checkpoint
        from .metrics import format_landmark_sdr

        ev = evaluate_checkpoint(out, args.dataset_path, args.split, fmt=args.format, annotator=args.annotator,
                                 device=args.device, cache_dir=args.cache_dir, progress=True, skip_images=args.skip_images)
        print(f"{args.split}: {len(ev.image_ids)} images, MRE {ev.summary.mre:.3f} mm, SDR@2mm {ev.summary.sdr[2.0]:.1f}%")
        print(format_landmark_sdr(ev.errors, ev.symbols))
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("import-model", help="your own model: a checkpoint and model class (spec YAML) as a model folder")
    s.add_argument("checkpoint", help="the checkpoint your own script saved (.pth/.pt/.safetensors)")
    s.add_argument("--spec", required=True, help="model spec YAML (README: Your own model)")
    s.add_argument("--out", required=True, help="model folder to write (new or empty)")
    s.add_argument(*flag("trust_pickle"), action="store_true", dest="trust_pickle",
                   help="read a checkpoint that holds pickled Python objects (e.g. argparse.Namespace): this runs code "
                        "from the file, so only for files you trust")
    add_scoring_options(s, dataset_required=False)
    s.set_defaults(func=cmd_import_model)
