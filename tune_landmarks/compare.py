"""`tune-landmarks compare`: is a fine-tuned model really better than its start, landmark by landmark?

Models scored on the same images are compared pairwise: the difference of their mean radial errors
(candidate - reference) and of their SDR@2mm, each with a 95 % percentile interval from a bootstrap
that resamples images (an image's landmarks stay together, since errors on one image are correlated).
The statistics are verdict.paired_bootstrap's; this module reads and scores the inputs and writes the outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from .config import rule_error
from .experiment import SWEEP_FILE, VERDICT_FILES, Experiment, Sweep
from .options import add_bootstrap_options, add_dataset_options, add_device_options, add_experiment_options
from .results import best_row, checkpoint_damage, collect, kept_checkpoints
from .verdict import (
    CONFIDENCE,
    SDR_MM,
    PairedDiff,
    Scored,
    aligned,
    compare_models,
    format_verdict,
    paired_bootstrap,
    verdict_record,
    verdict_sentences,
)

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image_id", "symbol", "error_mm")
_KINDS = "a checkpoint, an exported model directory or an `evaluate` Parquet file"


# ---------------------------------------------------------------- inputs

def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def read_predictions(path: str | Path) -> Scored:
    """An `evaluate --out` table back into an (images x landmarks) error matrix; every image must have
    every landmark exactly once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not an `evaluate` predictions table (missing column(s) {', '.join(missing)})")
    if table.num_rows == 0:
        raise ValueError(f"{path}: the predictions table has no rows")
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    syms = [str(v) for v in table.column("symbol").to_pylist()]
    err = np.asarray(table.column("error_mm").to_numpy(zero_copy_only=False), dtype=float)
    bad = int((~np.isfinite(err)).sum())
    if bad:
        raise ValueError(f"{path}: {bad} missing or non-finite error_mm value(s)")
    image_ids, symbols = list(dict.fromkeys(ids)), list(dict.fromkeys(syms))
    row = {v: i for i, v in enumerate(image_ids)}
    col = {v: i for i, v in enumerate(symbols)}
    r, c = np.array([row[v] for v in ids]), np.array([col[v] for v in syms])
    seen = np.zeros((len(image_ids), len(symbols)), int)
    np.add.at(seen, (r, c), 1)
    if (seen != 1).any():
        i, j = np.argwhere(seen != 1)[0]
        raise ValueError(f"{path}: image {image_ids[i]!r} has {seen[i, j]} rows for landmark {symbols[j]!r} "
                         f"({int((seen != 1).sum())} image x landmark cells are not exactly one row)")
    errors = np.empty(seen.shape)
    errors[r, c] = err
    return Scored(path, image_ids, symbols, errors, [])


def evaluated(path: Path, dataset_path: str | Path, split: str | None, **options: Any) -> Scored:
    """A checkpoint or exported model scored on `split` (default: the dataset's validation split)."""
    from .infer import evaluate_checkpoint
    from .read import describe

    split = describe(dataset_path, options.get("fmt")).val_split(split)
    ev = evaluate_checkpoint(path, dataset_path, split, **options)
    return Scored(path, ev.image_ids, ev.symbols, ev.errors, ev.difficult, split)


def labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the fewest trailing path parts that tell the inputs apart."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{n}" for i, n in enumerate(names)]  # the same path given twice


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


# ---------------------------------------------------------------- outputs


def format_rows(rows: Sequence[PairedDiff]) -> str:
    """The printed table: landmarks sorted by difference, then the sets; * marks intervals that exclude 0."""
    def line(r: PairedDiff) -> str:
        return (f"{r.landmark + (' (D)' if r.difficult and not r.is_group else ''):<11}{r.ref_mre_mm:>8.3f}"
                f"{r.cand_mre_mm:>8.3f}{r.diff_mm:>+9.3f} [{r.diff_low_mm:+.3f}, {r.diff_high_mm:+.3f}]"
                f"{'*' if r.significant else ' '}{r.sdr_diff_pp:>+12.1f} [{r.sdr_low_pp:+.1f}, {r.sdr_high_pp:+.1f}]"
                f"{'*' if r.sdr_significant else ''}")

    head = (f"{'landmark':<11}{'ref mm':>8}{'cand mm':>8}{'diff mm':>9}{f' {CONFIDENCE:.0%} interval':<18}"
            f"{f'SDR@{SDR_MM:g}mm pp':>12} interval")
    marks = sorted((r for r in rows if not r.is_group), key=lambda r: r.diff_mm)
    return "\n".join([head, *map(line, marks), "-" * len(head), *(line(r) for r in rows if r.is_group)])


def comparison_table(results: Sequence[tuple[str, str, Sequence[PairedDiff]]]) -> Any:
    """compare.parquet: one row per (reference, candidate, landmark or set)."""
    import pyarrow as pa

    names = [f.name for f in fields(PairedDiff)]
    cols: dict[str, list] = {"reference": [], "candidate": []} | {k: [] for k in names}
    for ref, cand, rows in results:
        for r in rows:
            cols["reference"].append(ref)
            cols["candidate"].append(cand)
            for k, v in asdict(r).items():
                cols[k].append(v)
    return pa.table(cols)


# ---------------------------------------------------------------- the command

def compare(inputs: Sequence[str | Path], out: str | Path, dataset_path: str | Path | None = None,
            split: str | None = None, difficult: str | Sequence[str] | None = None, *, n_boot: int = 2000,
            seed: int = 0, fmt: str | None = None, annotator: str = "mean", device: str = "auto",
            cache_dir: str | None = None, skip_images: Sequence[str] = ()) -> dict[str, list[PairedDiff]]:
    """Compare inputs[1:] (candidates) against inputs[0] (the reference); write compare.parquet and one
    forest plot per candidate to `out`, log the tables, and return the rows by candidate label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .atomic import write_bytes
    from .landmarks import parse_symbols
    from .plots import forest_figure, png_bytes

    if len(inputs) < 2:
        raise rule_error("inputs", [str(p) for p in inputs], "two or more models (a reference and a candidate)")
    if n_boot < 1:
        raise rule_error("bootstrap", n_boot, "> 0")
    if seed < 0:
        raise rule_error("seed", seed, ">= 0")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory (expected {_KINDS})")
    tables = {p: read_predictions(p) for p in paths if p.is_file() and _is_parquet(p)}
    models = [p for p in paths if p not in tables]
    if models and dataset_path is None:
        raise ValueError(f"{models[0]}: scoring a model needs --dataset_path (or give an `evaluate` Parquet file)")
    anchor = next(iter(tables.values()), None)
    for t in tables.values():
        aligned(anchor, t)  # mismatched tables fail before any model is evaluated
    if dataset_path is not None:
        from .read import describe

        known = describe(dataset_path, fmt).symbols
    else:
        known = anchor.symbols
    chosen = parse_symbols(difficult, known) if difficult else None
    options = {"fmt": fmt, "annotator": annotator, "device": device, "cache_dir": cache_dir, "skip_images": skip_images}
    scored = {p: tables[p] if p in tables else evaluated(p, dataset_path, split, **options) for p in paths}
    names = labels(paths)
    files = [slug(n) for n in names]
    if len(set(files)) < len(files):
        files = [f"{i}_{f}" for i, f in enumerate(files)]
    ref = scored[paths[0]]
    results: list[tuple[str, str, list[PairedDiff]]] = []
    for name, p in zip(names[1:], paths[1:]):
        cand = scored[p]
        hard = chosen if chosen is not None else [s for s in cand.difficult if s in ref.symbols]
        rows = paired_bootstrap(ref.errors, aligned(ref, cand), ref.symbols, hard, n_boot=n_boot, seed=seed)
        results.append((names[0], name, rows))

    out = Path(out)
    sink = pa.BufferOutputStream()
    pq.write_table(comparison_table(results), sink)
    written = {out / "compare.parquet": sink.getvalue().to_pybytes()}
    for (ref_name, cand_name, rows), file in zip(results, files[1:]):
        hard = [r.landmark for r in rows if r.difficult and not r.is_group]
        log.info(f"\n{cand_name} vs {ref_name} (reference): {rows[0].n_images} images, difficult: "
              f"{', '.join(hard) or 'none'}; {n_boot} bootstrap resamples of images")
        log.info(format_rows(rows))
        fig = forest_figure(rows, f"{cand_name} vs {ref_name} ({rows[0].n_images} images)")
        written[out / f"forest_{file}.png"] = png_bytes(fig)
    for path, data in written.items():  # everything computed first: an error above leaves no file behind
        log.info(f"wrote {write_bytes(path, data)}")
    return {cand: rows for _, cand, rows in results}


# ---------------------------------------------------------------- the sweep's verdict

def arm_winners(exp: Experiment, sweep: Sweep) -> dict[str, tuple[dict[str, Any], Path]]:
    """"best ARM" -> (its trials.parquet row, its best epoch's checkpoint on this machine), for every arm
    with a scored trial: each arm's winner by the same rule on the selection split."""
    rows = exp.read_table("trials").to_pylist()
    out = {}
    for arm in sweep.settings.arms:
        row = best_row(rows, arm)
        if row is None:
            continue
        kept, epoch = kept_checkpoints(exp, row["trial_id"]), int(row["best_epoch"])
        if epoch not in kept:
            raise FileNotFoundError(f"{exp.trial_dir(row['trial_id'])}: the checkpoint of epoch {epoch} (best {arm}) "
                                    "was not kept")
        why = checkpoint_damage(exp, kept[epoch][1])
        if why:
            from .model import CheckpointError

            raise CheckpointError(f"{exp.uri_of(kept[epoch][1])}: the checkpoint of trial {row['trial_id']} epoch "
                                  f"{epoch} (best {arm}) is damaged ({why}): no verdict on a checkpoint that is not the "
                                  "one the sweep chose")
        out[f"best {arm}"] = (row, exp.local_file(kept[epoch][1], "checkpoint.pt"))
    return out


def arm_seconds(exp: Experiment) -> dict[str, float]:
    """Each arm's training time over all its trials' epochs (epochs.parquet's train_seconds): the compute the arm
    was given, printed beside its budget, since an epoch of one arm can cost a tenth of another's."""
    trials = {r["trial_id"]: r["arm"] for r in exp.read_table("trials").to_pylist()}
    out: dict[str, float] = {}
    for r in exp.read_table("epochs").to_pylist():
        arm = trials.get(r["trial_id"])
        if arm is not None and r.get("train_seconds") is not None:
            out[arm] = out.get(arm, 0.0) + float(r["train_seconds"])
    return out


def sweep_verdict(experiment: Experiment | str, n_boot: int = 2000, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Each arm's winner vs the start and vs each other on the sweep's verdict split (images no choice ever
    saw), written to verdict.json and verdict.parquet in the experiment; returns the record."""
    import pyarrow as pa

    exp = Experiment.of(experiment)
    sweep = exp.load_sweep()
    test, val = sweep.roles.get("test"), sweep.roles.get("val", {})
    if not test:
        raise ValueError(f"{exp.uri_of(SWEEP_FILE)}: records no verdict split (a sweep of an earlier version)")
    winners = arm_winners(exp, sweep)
    models = {"start": Path(sweep.start)} | {name: ckpt for name, (_, ckpt) in winners.items()}
    base = sweep.base
    options = {"fmt": base.format, "annotator": base.annotator, "device": device, "cache_dir": base.cache_dir,
               "skip_images": base.skip_images}
    scored = {name: evaluated(path, base.dataset_path, test["spec"], **options) for name, path in models.items()}
    ids = scored["start"].image_ids
    if sorted(ids) != sorted(test["image_ids"]):
        raise ValueError(f"{base.dataset_path}: the verdict split {test['spec']!r} no longer holds the images the "
                         f"sweep recorded ({len(ids)} now, {len(test['image_ids'])} recorded): the dataset changed")
    chosen = {s for row, _ in winners.values() if row["difficult"] for s in row["difficult"].split(",")}
    difficult = [s for s in sweep.symbols if s in chosen]  # every winner's own set, each chosen on the selection split
    comparisons = compare_models(scored, difficult, n_boot, seed)
    seconds = arm_seconds(exp)
    selection = {"start": sweep.start_mre} | {name: row["best_val_mre"] for name, (row, _) in winners.items()}
    record = verdict_record(
        comparisons, test["spec"], ids, difficult, n_boot, seed, selection_split=val.get("spec"),
        skip_images=base.skip_images, allow_duplicates=base.allow_duplicates,
        selection_mre_mm=selection,
        arms={arm: {"trial_id": row["trial_id"], "epoch": row["best_epoch"], "difficult": row["difficult"] or "",
                    "budget": sweep.settings.budget(arm), "epochs": sweep.settings.epochs_of(arm),
                    "train_seconds": seconds.get(arm, 0.0)}
              for arm, (row, _) in ((name.removeprefix("best "), w) for name, w in winners.items())},
        sentences=verdict_sentences(comparisons, test["spec"], selection, val.get("spec", "selection")))
    exp.write_bytes(VERDICT_FILES["json"], json.dumps(record, indent=2))
    exp.write_table(VERDICT_FILES["table"], pa.Table.from_pylist(record["comparisons"]))
    return record


def verdict_text(record: dict[str, Any]) -> str:
    """What the console shows of a verdict: its sentences, then the headline table."""
    budgets = ", ".join(f"{arm} {a['budget']} trials"
                        + (f" x {a['epochs']} epochs, {a['train_seconds']:.0f} s training" if "epochs" in a else "")
                        for arm, a in record.get("arms", {}).items())
    head = (f"verdict on {record['split']} ({len(record['image_ids'])} images never used for a choice; paired "
            f"bootstrap, {record['confidence']:.0%} intervals; difficult: {', '.join(record['difficult']) or 'none'}; "
            f"budgets: {budgets or 'none'})")
    return "\n".join([head, *record["sentences"], format_verdict(record)])


def cmd_verdict(args: argparse.Namespace) -> int:
    """The verdict again (another bootstrap or seed); a sweep tracked in MLflow gets it on its parent run, its server
    asked before any work. It takes no driver lease (storage.py): it reads the trials and rewrites only verdict.json
    and verdict.parquet, each whole, so it may run beside a driver (whose own verdict at its end then replaces them)."""
    exp = Experiment.find(args.experiment, args.storage)
    sweep = exp.load_sweep()
    if sweep.settings.mlflow:
        from .tracking import connect

        connect(sweep.settings.mlflow)
    record = sweep_verdict(exp, args.bootstrap, args.seed, args.device)
    log.info(verdict_text(record))
    if sweep.settings.mlflow:
        from .tracking import sweep_ended

        sweep_ended(exp, sweep, collect(exp), record)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    compare([args.reference, *args.candidates], args.out, args.dataset_path, args.split, args.difficult,
            n_boot=args.bootstrap, seed=args.seed, fmt=args.format, annotator=args.annotator, device=args.device,
            cache_dir=args.cache_dir, skip_images=args.skip_images)
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("compare", help="paired bootstrap comparison of models on the same images (mm, SDR)")
    s.add_argument("reference", help=f"the reference (e.g. the start model): {_KINDS}")
    s.add_argument("candidates", nargs="+", help="one or more candidates, each of the same kinds")
    add_dataset_options(s, required=False)
    s.add_argument("--split", help="split to score models on (default: the dataset's validation split); a dataset is "
                                   "needed when an input is a model rather than a Parquet file")
    s.add_argument("--out", required=True, help="folder for compare.parquet and the forest plots")
    s.add_argument("--difficult", help="comma-separated symbols (default: the candidate checkpoint's difficult set)")
    add_bootstrap_options(s)
    add_device_options(s, cache=True)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("verdict", help="each arm's winner vs the start and each other, on the sweep's verdict split")
    add_experiment_options(s)
    add_bootstrap_options(s)
    add_device_options(s)
    s.set_defaults(func=cmd_verdict)
