"""The `tune-landmarks` command line. Run options come from TrainConfig's fields (YAML defaults via
--config, then flags; `--image_size` and `--image-size` both work, as in the workflow being replaced).

Library modules log; this module decides what reaches the console (`-q` warnings only, `-v` everything,
Ray's own lines included). Each subcommand's module keeps its heavy imports (torch, Ray) inside its
functions, so `tune-landmarks --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Sequence

from . import compare, export, predict, report, resume
from .config import FIELDS, TrainConfig, from_dict, load_yaml
from .experiment import RESOURCE_POLICIES
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
    if cfg.resume:
        from .build import fixed_options
        from .model import read_checkpoint

        ckpt = read_checkpoint(cfg.resume)
        fixed = fixed_options(ckpt.get("arch"))  # an imported model is read as its spec says
        for k, v in fixed.items():
            if k in explicit and getattr(cfg, k) != v:
                raise ValueError(f"The value of `{k}` is {getattr(cfg, k)!r}, but {cfg.resume} is an imported model "
                                 f"whose spec fixes it to {v!r}: leave --{k.replace('_', '-')} out")
            setattr(cfg, k, v)
        if not fixed:
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
    """Read every split, decode every image once, measure the annotators' disagreement; exit 1 on any problem
    (and on pairs beyond --max-disagreement-mm with --strict)."""
    import pyarrow as pa

    from .atomic import write_parquet
    from .check import PAIR_SCHEMA, decode_check, far_pairs, format_summary, pair_distances, summarise
    from .read import describe, read_split, spacing_range

    info = describe(args.path, args.format)
    print(f"{info.root}: {info.format} layout, {len(info.symbols)} landmarks, splits: {', '.join(info.splits)}")
    problems: list[str] = []
    pair_tables = [PAIR_SCHEMA.empty_table()]
    for split in info.splits:
        sp = read_split(info, split, args.annotator)
        broken, sizes = decode_check(sp.records, split, args.progress)
        problems += sp.problems + broken
        pair_tables.append(pair_distances(sp, info.symbols))
        ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
        lo, hi = spacing_range(sp.records)
        bad = len(sp.bad_images) + len(broken)
        print(f"  {split:<6} {len(sizes):>5} images  {len(info.symbols)} landmarks  "
              + (f"size {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px  spacing {lo:g}-{hi:g} mm/px" if ws else "")
              + (f"  ({bad} with problems)" if bad else ""))
    _print_roles(info, args)
    pairs = pa.concat_tables(pair_tables)
    limit = args.max_disagreement_mm
    summary = summarise(pairs, info.symbols, limit)
    if args.report:
        if pairs.num_rows:
            print(f"senior-junior distance per landmark, mm ({pairs.num_rows // len(info.symbols)} images):")
            print(format_summary(summary, limit))
        else:
            print("no senior-junior distances: both annotators' files are needed (--annotator mean)")
    for out, table in ((args.report_out, summary), (args.pairs_out, pairs)):
        if out:
            print(f"wrote {write_parquet(table, out)}")
    far = [f"{r['split']} {r['image_id']} {r['landmark']}: senior ({r['senior_x']:g}, {r['senior_y']:g}) and junior "
           f"({r['junior_x']:g}, {r['junior_y']:g}) are {r['distance_mm']:.1f} mm apart (> {limit:g} mm)"
           for r in far_pairs(pairs, limit).to_pylist()]
    if args.strict:
        problems += far
    elif far:
        print(f"{len(far)} warning(s): annotators disagree beyond --max-disagreement-mm (--strict makes these errors):")
        for w in far:
            print(f"  - {w}")
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("ok")
    return 0


def _print_roles(info: Any, args: argparse.Namespace) -> None:
    """The images of each role a run or sweep would use with these split specs (images with problems left out)."""
    from .read import load_roles

    try:
        roles = load_roles(info, args.train_split, args.val_split, args.test_split, args.annotator, skip_bad=True)
    except ValueError as exc:
        print(f"roles: refused — {str(exc).splitlines()[0]}")
        return
    names = {"train": "training", "val": "selection (--val-split)", "test": "verdict (--test-split)"}
    print("roles a run or sweep would use: " + ", ".join(f"{names[role]} {v['spec']} {len(v['image_ids'])} images"
                                                          for role, v in roles.ids().items()))


def _finetune_defaults(cfg: TrainConfig) -> TrainConfig:
    """finetune's defaults are the workflow's: masked loss on the twelve landmarks the workflow names."""
    if cfg.mode != "all" and not cfg.difficult and cfg.difficult_threshold is None:
        from .read import describe

        syms = describe(cfg.dataset_path, cfg.format).symbols
        cfg.difficult = [s for s in WORKFLOW_DIFFICULT if s in syms]
        print(f"no --difficult given: using the workflow's set present here ({', '.join(cfg.difficult)})")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .stages import train_any as train

    base = TrainConfig(mode="masked") if args.command == "finetune" else TrainConfig()
    cfg = run_config(args, base)
    if args.command == "finetune":
        if not cfg.resume and not cfg.pretrained and not cfg.start_predictions:
            return _fail("finetune needs --resume START_CHECKPOINT (or, for --mode refine, --start-predictions DIR; "
                         "use `train` to train from scratch)")
        cfg = _finetune_defaults(cfg)
    res = train(cfg)
    print(f"best epoch {res.best_epoch}: val MRE {res.best.mre:.3f} mm; wrote {res.out}/best.pt, last.pt, "
          f"config.yaml, metrics.parquet")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .infer import evaluate_checkpoint, write_predictions
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


def cmd_import_model(args: argparse.Namespace) -> int:
    """Import a user's checkpoint and model class (imported.py); with a dataset, score it the spec's way so the user
    can hold the figures against their own script's."""
    from .imported import import_model

    out = import_model(args.checkpoint, args.spec, args.out, args.trust_pickle)
    print(f"imported {args.checkpoint} -> {out}: model.safetensors, model.json, code/ (usable wherever a checkpoint is: "
          "evaluate, finetune --resume, search --resume, predict --model)")
    if args.dataset_path:
        from .infer import evaluate_checkpoint
        from .metrics import format_landmark_sdr

        ev = evaluate_checkpoint(out, args.dataset_path, args.split, fmt=args.format, annotator=args.annotator,
                                 device=args.device, cache_dir=args.cache_dir, progress=True)
        print(f"{args.split}: {len(ev.image_ids)} images, MRE {ev.summary.mre:.3f} mm, SDR@2mm {ev.summary.sdr[2.0]:.1f}%")
        print(format_landmark_sdr(ev.errors, ev.symbols))
    return 0


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--name", required=True, help="experiment name (a folder under --storage)")
    p.add_argument("--storage", default="./sweeps", help="local/shared path or pyarrow URI (s3://, gs://)")
    p.add_argument("--arms", default="masked,all", type=_names,
                   help="arms searched alike and compared by the verdict: masked, weighted, all, refine (the refinement "
                        "stage; give its own ranges in the space's `arms: refine:` section) (default masked,all)")
    p.add_argument("--num-samples", "--num_samples", type=int, default=20, dest="num_samples",
                   help="trials per arm (the same for every arm: the fair comparison)")
    p.add_argument("--arm-samples", "--arm_samples", type=_budgets, default={}, dest="arm_samples", metavar="ARM=N,...",
                   help="a different budget for some arms (fewer trials: a less certain verdict for that arm)")
    p.add_argument("--arm-epochs", "--arm_epochs", type=_budgets, default={}, dest="arm_epochs", metavar="ARM=N,...",
                   help="other epochs per trial for some arms (e.g. refine=30: a refinement epoch costs a fraction of "
                        "a fine-tuning epoch; the verdict prints each arm's epochs and training time)")
    p.add_argument("--max-concurrent", "--max_concurrent", type=int, default=4, dest="max_concurrent")
    p.add_argument("--gpus-per-trial", "--gpus_per_trial", type=float, default=None, dest="gpus_per_trial",
                   help="fractional shares a GPU; default 1 where CUDA is available, else 0")
    p.add_argument("--cpus-per-trial", "--cpus_per_trial", type=float, default=1.0, dest="cpus_per_trial")
    p.add_argument("--resource-policy", "--resource_policy", choices=RESOURCE_POLICIES, default="distribute",
                   dest="resource_policy",
                   help="distribute (default): cores that finished trials leave go to the trials still running (a "
                        "trial restarts from its checkpoint at its new size); fixed: every trial keeps "
                        "--cpus-per-trial")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--max-failures", "--max_failures", type=int, default=0, dest="max_failures")
    p.add_argument("--reduction-factor", "--reduction_factor", type=float, default=2.0, dest="reduction_factor")
    p.add_argument("--grace-period", "--grace_period", type=int, default=None, dest="grace_period",
                   help="ASHA's first rung (default: the largest warmup in the space, at least 1)")
    p.add_argument("--keep-checkpoints", "--keep_checkpoints", type=int, default=2, dest="keep_checkpoints")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _budgets(text: str) -> dict[str, int]:
    """`masked=8,all=4` -> {"masked": 8, "all": 4}."""
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in _names(text))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ARM=N[,ARM=N...]") from None


def cmd_search(args: argparse.Namespace) -> int:
    from .experiment import SweepSettings
    from .search import run_search

    base = run_config(args, TrainConfig(mode="masked"))
    gpus = args.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    settings = SweepSettings(name=args.name, storage=args.storage, num_samples=args.num_samples,
                             max_concurrent=args.max_concurrent, gpus_per_trial=gpus,
                             cpus_per_trial=args.cpus_per_trial, address=args.address,
                             epochs=base.epochs, seed=base.seed,
                             arms=args.arms, arm_samples=args.arm_samples, arm_epochs=args.arm_epochs,
                             max_failures=args.max_failures,
                             reduction_factor=args.reduction_factor, grace_period=args.grace_period,
                             keep_checkpoints=args.keep_checkpoints, resource_policy=args.resource_policy)
    return run_search(args.space, base, settings)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, smoke=args.smoke_test)


def _scoring_options(s: argparse.ArgumentParser) -> None:
    """How `evaluate` and `import-model` score a model on a split."""
    s.add_argument("--split", default="valid")
    s.add_argument("--format", choices=("aariz", "isbi"))
    s.add_argument("--annotator", default="mean", choices=("senior", "junior", "mean"))
    s.add_argument("--device", default="auto")
    s.add_argument("--cache_dir", "--cache-dir", dest="cache_dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune-landmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (debug lines, Ray's own)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic Aariz-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", "--num_images", type=int, default=30, dest="num_images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=512, help="approximate image width in pixels")
    s.set_defaults(func=cmd_synth)

    from .check import DEFAULT_MAX_DISAGREEMENT_MM

    s = sub.add_parser("check-dataset", help="list a dataset's splits and every problem in it; decodes every image")
    s.add_argument("path")
    s.add_argument("--format", choices=("aariz", "isbi"))
    s.add_argument("--annotator", default="mean", choices=("senior", "junior", "mean"),
                   help="whose points to check (mean: both files, and their disagreement)")
    s.add_argument("--report", action="store_true",
                   help="list per landmark the senior-junior distance in mm: mean, median, 95th percentile, max and where")
    s.add_argument("--report-out", "--report_out", dest="report_out", metavar="FILE",
                   help="write that per-landmark table as Parquet")
    s.add_argument("--pairs-out", "--pairs_out", dest="pairs_out", metavar="FILE",
                   help="write every image x landmark senior-junior distance as Parquet")
    s.add_argument("--max-disagreement-mm", "--max_disagreement_mm", dest="max_disagreement_mm", type=float,
                   default=DEFAULT_MAX_DISAGREEMENT_MM, metavar="MM",
                   help=f"warn about senior-junior pairs farther apart than MM (default {DEFAULT_MAX_DISAGREEMENT_MM:g}: "
                        "on ISBI 2015 above the largest distance of 16 of the 19 landmarks, 10 of 5,700 pairs beyond it)")
    s.add_argument("--strict", action="store_true", help="pairs beyond --max-disagreement-mm are errors (exit 1)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar while decoding")
    for flag in ("train", "val", "test"):
        s.add_argument(f"--{flag}-split", f"--{flag}_split", dest=f"{flag}_split",
                       help=f"{flag} split spec for the roles shown (NAME or NAME:FRACTION; default per layout)")
    s.set_defaults(func=cmd_check)

    for name, what in (("train", "train from scratch (all landmarks by default)"),
                       ("finetune", "fine-tune a checkpoint, loss masked to the difficult landmarks by default")):
        s = sub.add_parser(name, help=what)
        add_run_options(s)
        s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="score a checkpoint on a split (mm), write per image x landmark Parquet")
    s.add_argument("--checkpoint", required=True, help="best.pt/last.pt, a weights file or an exported directory")
    s.add_argument("--dataset_path", "--dataset-path", required=True, dest="dataset_path")
    s.add_argument("--out", help="predictions Parquet file")
    s.add_argument("--start", help="start checkpoint, to report drift per landmark")
    _scoring_options(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("import-model", help="your own model: a checkpoint and model class (spec YAML) as a model folder")
    s.add_argument("checkpoint", help="the checkpoint your own script saved (.pth/.pt/.safetensors)")
    s.add_argument("--spec", required=True, help="model spec YAML (README: Your own model)")
    s.add_argument("--out", required=True, help="model folder to write (new or empty)")
    s.add_argument("--trust-pickle", "--trust_pickle", action="store_true", dest="trust_pickle",
                   help="read a checkpoint that holds pickled Python objects (e.g. argparse.Namespace): this runs code "
                        "from the file, so only for files you trust")
    s.add_argument("--dataset_path", "--dataset-path", dest="dataset_path", help="score the import on this dataset")
    _scoring_options(s)
    s.set_defaults(func=cmd_import_model)

    s = sub.add_parser("search", help="Ray Tune + Optuna sweep of fine-tuning trials")
    _sweep_options(s)
    add_run_options(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("demo", help="synthetic data -> start model -> sweep -> best trial (CPU, minutes)")
    s.add_argument("--workdir", default="demo_run")
    s.add_argument("--smoke-test", "--smoke_test", action="store_true", dest="smoke_test", help="tiny and fast")
    s.set_defaults(func=cmd_demo)

    for module in SUBCOMMAND_MODULES:
        module.register_cli(sub)
    return p


# Modules that add their own subcommand with `register_cli(sub)`.
SUBCOMMAND_MODULES = (resume, export, predict, report, compare)


class _ConsoleHandler(logging.Handler):
    """Information to stdout as plain lines (it is the program's output); warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: this tool's information; -v: debug lines, Ray's included."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger(__package__)
    pkg.handlers[:] = [handler]
    pkg.setLevel(level)
    pkg.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # DatasetError, CheckpointError, SpaceError too
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
