"""`tune-landmarks export`: the sweep's best trial, at its best epoch, as a self-contained model folder.

The folder holds `model.safetensors` (weights only) and `model.json` (architecture, image size, symbols,
decoder, the trial's full run config and sampled parameters, its validation metrics, the start
checkpoint's sha256), `best_hyperparameters.yaml`, the per-landmark table and `verification.json`:
the exported files are re-evaluated on the validation split and must reproduce the recorded val MRE
within TOLERANCE_MM, or nothing is published. A held-out `--split` is scored once, after the choice.
Everything is written into a temporary sibling folder and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import staged_dir, write_bytes
from .config import rule_error
from .experiment import Experiment, Sweep
from .metrics import finite_or_none
from .options import add_device_options, add_experiment_options
from .results import TrialRecord, best_trial, checkpoint_damage, collect, kept_checkpoints

if TYPE_CHECKING:
    from .config import TrainConfig
    from .metrics import Summary

log = logging.getLogger(__name__)

TOLERANCE_MM = 1e-3
ALL_WON = "plain fine-tuning on all landmarks beat every other arm on the selection split"
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
START_DIR = "start"  # a cascade's start model, inside its export folder


class VerificationError(ValueError):
    """The exported files do not reproduce the metrics recorded for them."""


@dataclass
class Selection:
    """The exported trial, its best epoch's reported results, and the checkpoint Ray kept for that epoch (a
    folder inside the experiment)."""

    trial: TrialRecord
    epoch: dict[str, Any]
    checkpoint: str


def _mm(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def choose(trials: list[TrialRecord]) -> tuple[TrialRecord, dict[str, Any]]:
    """The best trial at its best epoch (results.best_trial: the sweep's one rule), and that epoch's results."""
    bt = best_trial(trials)
    if bt is None:
        raise ValueError("no trial of this experiment reported a validation result; nothing to export")
    return bt, bt.best


def checkpoint_for_epoch(exp: Experiment, trial_id: str, epoch: int) -> str:
    """The kept checkpoint folder (inside the experiment) of a trial's `epoch` (1-based)."""
    kept = kept_checkpoints(exp, trial_id)
    if epoch not in kept:
        raise FileNotFoundError(
            f"{exp.trial_dir(trial_id)}: the checkpoint of epoch {epoch} (the trial's best) was not kept; kept epochs: "
            f"{', '.join(map(str, sorted(kept))) or 'none'} "
            "(a sweep keeps the best --keep-checkpoints by val MRE, and the latest)")
    return kept[epoch][1]


def select(trials: list[TrialRecord], exp: Experiment, force: bool = False) -> Selection:
    """The chosen trial and epoch, with the checkpoint folder to export them from. A chosen checkpoint whose bytes are
    not the ones recorded when it was written (results.checkpoint_damage) is refused by trial and epoch; with `force`,
    the next trial by the same rule whose checkpoint is intact is taken instead, and the skipped ones are named."""
    from .model import CheckpointError

    left = list(trials)
    while True:
        trial, epoch = choose(left)
        rel = checkpoint_for_epoch(exp, trial.trial_id, int(epoch["epoch"]))
        why = checkpoint_damage(exp, rel)
        if why is None:
            return Selection(trial, epoch, rel)
        said = f"{exp.uri_of(rel)}: the checkpoint of trial {trial.trial_id} epoch {int(epoch['epoch'])} is damaged ({why})"
        if not force:
            raise CheckpointError(f"{said}; nothing exported — --force exports the next-best trial whose checkpoint is "
                                  "intact")
        log.warning(f"--force: {said}; taking the next-best trial")
        left = [t for t in left if t is not trial]
        if not any(t.best for t in left):
            raise CheckpointError(f"{said}, and no other trial has an intact checkpoint to export")


def choice_words(sel: Selection, overall: tuple[TrialRecord, dict[str, Any]] | None, arm: str | None) -> str | None:
    """What the export says about the arm it took, following the choice actually made: with `--arm`, whether that
    arm's winner is also the best trial of the sweep (`overall`) or which arm's is; without, that plain fine-tuning on
    all landmarks won, when it did (the masked arms exist to beat it)."""
    if arm is None:
        return f"The best trial is of arm 'all': {ALL_WON}." if sel.trial.arm == "all" else None
    best, epoch = overall
    if best.trial_id == sel.trial.trial_id:
        return f"--arm {arm}: its winner is also the best trial of every arm on the selection split."
    return (f"--arm {arm}: exported that arm's winner as asked; the best trial on the selection split is of arm "
            f"'{best.arm}' (trial {best.trial_id}, {epoch['val_mre']:.3f} mm against {sel.epoch['val_mre']:.3f} mm).")


def _validation_source(sweep: Sweep) -> dict[str, Any]:
    """Where the sweep measured val MRE: the data, annotator and selection split the proof must use."""
    from .read import describe

    base = sweep.base
    info = describe(base.dataset_path, base.format)
    return {"dataset_path": str(info.root), "format": info.format, "annotator": base.annotator,
            "split": sweep.roles["val"]["spec"], "cache_dir": base.cache_dir, "skip_images": list(base.skip_images)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_JSON).is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no earlier export ({MODEL_JSON}); "
                              "choose another --out")


def _check_split(split: str, sweep: Sweep, source: dict[str, Any]) -> None:
    """A held-out split must share no image with what the sweep trained or chose on (its recorded roles): no id, and
    no radiograph under another id (run.prepare_data compares the roles' fingerprints, as the sweep did)."""
    from .config import from_dict
    from .read import describe, read_split
    from .run import prepare_data

    sp = read_split(describe(source["dataset_path"], source["format"]), split, source["annotator"],
                    frozenset(source.get("skip_images", [])))
    ids = {r.image_id for r in sp.records}
    used = {role: ids & set(sweep.roles[role]["image_ids"]) for role in ("train", "val") if role in sweep.roles}
    clash = {role: shared for role, shared in used.items() if shared}
    if not ids or clash:
        why = "it holds no image" if not ids else "; ".join(
            f"{len(v)} image(s) of the {'training' if r == 'train' else 'selection'} split {sweep.roles[r]['spec']!r}"
            for r, v in clash.items())
        raise rule_error("split", split, "images neither trained on nor used to choose (e.g. the sweep's verdict split "
                                         f"{sweep.roles.get('test', {}).get('spec')!r}): {why}")
    prepare_data(from_dict({"test_split": split}, sweep.base), progress=False)


def landmark_rows(sweep: Sweep, epoch: dict[str, Any], difficult: list[str]) -> list[dict[str, Any]]:
    """Per landmark: the start checkpoint's val MRE, the exported epoch's, the change, and whether it was
    trained as difficult."""
    rows = []
    for s in sweep.symbols:
        start, best = finite_or_none(sweep.start_errors.get(s)), finite_or_none(epoch.get(f"mre_{s}"))
        change = None if start is None or best is None else best - start
        rows.append({"symbol": s, "start_mre_mm": start, "best_mre_mm": best, "change_mm": change,
                     "difficult": s in difficult})
    return rows


def _landmarks_md(rows: list[dict[str, Any]], heading: str) -> str:
    lines = [f"# {heading}", "", "| landmark | start MRE mm | best MRE mm | change mm | difficult |",
             "|---|---:|---:|---:|:---:|"]
    lines += [f"| {r['symbol']} | {_mm(r['start_mre_mm'])} | {_mm(r['best_mre_mm'])} | "
              f"{_mm(r['change_mm'], '+.3f')} | {'*' if r['difficult'] else ''} |" for r in rows]
    return "\n".join(lines) + "\n"


def _epoch_metrics(epoch: dict[str, Any], symbols: list[str]) -> dict[str, Any]:
    """The validation metrics the trial reported for the exported epoch (what the proof must reproduce)."""
    scalars = {k: finite_or_none(v) for k, v in epoch.items()
               if k.startswith(("val_", "sdr_")) or k.endswith("_drift")}
    return scalars | {"per_landmark": {s: finite_or_none(epoch.get(f"mre_{s}")) for s in symbols}}


def write_stage(dest: Path, ckpt: dict[str, Any], cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """One model as `dest/model.safetensors` (weights only) and `dest/model.json` (what reading it back needs:
    architecture, image size, symbols, decoding, run config), plus `extra`; an imported model's code copy goes
    with it (build.portable), so the folder can be moved. Returns the JSON written."""
    from safetensors.torch import save_file

    from .build import output_record, portable

    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, str(dest / WEIGHTS), metadata={"format": "pt"})
    os.chmod(dest / WEIGHTS, 0o644)
    meta = {"format_version": 1, "arch": portable(ckpt["arch"], dest), "image_size": list(cfg.image_size),
            "symbols": list(ckpt["symbols"])} | output_record(ckpt["arch"], cfg) | {"config": cfg.to_dict()} | extra
    (dest / MODEL_JSON).write_text(json.dumps(meta, indent=2))
    return meta


def write_model(dest: Path, ckpt: dict[str, Any], cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """`write_stage` for a plain checkpoint. A refinement stage is exported as its whole cascade: its start model
    as the complete model folder `dest/start` (itself usable by `predict`), and the refinement stage in `dest`,
    whose model.json's `refine` record names that folder and its sha256 (load_cascade checks it), keeping the
    start checkpoint it was trained on as `source_path`/`source_sha256`. `predict` needs nothing else. A stage
    trained on another detector's predictions is exported alone: `predict --start-predictions` gives its points."""
    from .infer import checked_start, config_of, is_given, is_refine
    from .model import read_checkpoint, sha256_file

    if not is_refine(ckpt):
        return write_stage(dest, ckpt, cfg, extra)
    rec = ckpt["refine"]
    if is_given(rec):
        return write_stage(dest, ckpt, cfg, extra | {"refine": rec})
    source = checked_start(extra["source"]["checkpoint"], rec)  # both callers name the exported checkpoint
    start = read_checkpoint(source)
    write_stage(dest / START_DIR, start, config_of(start), {"source": {"path": str(source), "sha256": rec["start"]["sha256"]}})
    stage = {"path": START_DIR, "sha256": sha256_file(dest / START_DIR), "source_path": str(source),
             "source_sha256": rec["start"]["sha256"]}
    return write_stage(dest, ckpt, cfg, extra | {"refine": rec | {"start": stage}})


def _write_model(dest: Path, sel: Selection, sweep: Sweep, exp: Experiment, source: dict[str, Any]) -> None:
    """The model (write_model: a cascade for a refine trial), best_hyperparameters.yaml and the landmark table
    into `dest`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from .infer import start_sha256
    from .model import read_checkpoint

    ckpt = read_checkpoint(exp.local_file(sel.checkpoint, "checkpoint.pt"))
    cfg = sweep.trial_config(sel.trial.params, exp.trial_dir(sel.trial.trial_id))
    epoch = int(sel.epoch["epoch"])
    difficult = list(ckpt.get("difficult") or [])
    start = Path(sweep.start)
    write_model(dest, ckpt, cfg, {
        "hyperparameters": sel.trial.params, "difficult": difficult,
        "metrics": _epoch_metrics(sel.epoch, sweep.symbols), "validation": source,
        "trial_id": sel.trial.trial_id, "epoch": epoch, "arm": sel.trial.arm,
        "start_checkpoint": {"path": str(start), "sha256": start_sha256(start)},
        "source": {"experiment": exp.uri, "checkpoint": exp.uri_of(sel.checkpoint)},
    })
    (dest / "best_hyperparameters.yaml").write_text(
        f"# trial {sel.trial.trial_id} (arm {sel.trial.arm}), epoch {epoch}: "
        f"val MRE {sel.epoch['val_mre']:.4f} mm\n"
        "# usable as `tune-landmarks finetune --config` (with --dataset-path and --resume)\n"
        + yaml.safe_dump(sel.trial.params, sort_keys=True))
    rows = landmark_rows(sweep, sel.epoch, difficult)
    pq.write_table(pa.Table.from_pylist(rows), dest / "landmarks.parquet")
    heading = f"Trial {sel.trial.trial_id}, epoch {epoch} vs the start checkpoint (validation MRE)"
    (dest / "landmarks.md").write_text(_landmarks_md(rows, heading))


def _scores(summary: Summary) -> dict[str, Any]:
    """A summary as JSON (NaN, e.g. from weights that were set to NaN, becomes null)."""
    return {"mre": finite_or_none(summary.mre), "sd": finite_or_none(summary.sd),
            "mre_difficult": finite_or_none(summary.mre_difficult), "mre_other": finite_or_none(summary.mre_other),
            "sdr": {f"{t:g}mm": v for t, v in summary.sdr.items()},
            "per_landmark": {s: finite_or_none(v) for s, v in summary.per_landmark.items()}}


def _verified(rec: dict[str, Any]) -> str:
    return (f"val MRE {rec['reproduced_val_mre']:.4f} mm on {rec['split']!r} reproduced (recorded "
            f"{rec['recorded_val_mre']:.4f}, max |difference| {rec['max_abs_difference_mm']:.2e} mm)")


def verify(export_dir: str | Path, device: str = "auto") -> dict[str, Any]:
    """Re-evaluate an export on the validation data named in its model.json and require the recorded val MRE
    (and each landmark's MRE) within TOLERANCE_MM; writes verification.json either way."""
    from .infer import evaluate_checkpoint
    from .model import sha256_file

    export_dir = Path(export_dir)
    meta_path = export_dir / MODEL_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{export_dir}: not an exported model ({MODEL_JSON} is missing)")
    meta = json.loads(meta_path.read_text())
    src, recorded = meta["validation"], meta["metrics"]
    ev = evaluate_checkpoint(export_dir, src["dataset_path"], src["split"], fmt=src["format"],
                             annotator=src["annotator"], device=device, cache_dir=src["cache_dir"],
                             skip_images=src.get("skip_images", []))
    got = _scores(ev.summary)
    pairs = {"val MRE": (recorded["val_mre"], got["mre"])} | {
        f"{s} MRE": (v, got["per_landmark"][s]) for s, v in recorded["per_landmark"].items() if v is not None}
    diffs = {k: math.inf if b is None else abs(b - a) for k, (a, b) in pairs.items()}
    worst = max(diffs, key=diffs.get)
    passed = diffs[worst] <= TOLERANCE_MM
    record = {"passed": passed, "tolerance_mm": TOLERANCE_MM, "split": src["split"],
              "dataset_path": src["dataset_path"], "annotator": src["annotator"], "images": len(ev.image_ids),
              "recorded_val_mre": recorded["val_mre"], "reproduced_val_mre": got["mre"],
              "max_abs_difference_mm": finite_or_none(diffs[worst]), "worst": worst,
              "reproduced": got, "weights_sha256": sha256_file(export_dir)}
    write_bytes(export_dir / "verification.json", json.dumps(record, indent=2))
    if not passed:
        raise VerificationError(
            f"{export_dir / WEIGHTS}: does not reproduce its recorded validation metrics on {src['split']!r} "
            f"of {src['dataset_path']}: {worst} recorded {pairs[worst][0]:.6f} mm, reproduced "
            f"{_mm(pairs[worst][1], '.6f')} mm (|difference| {diffs[worst]:.6f} > {TOLERANCE_MM:g} mm); "
            "the weights or the data changed")
    return record


def _held_out(export_dir: Path, split: str, src: dict[str, Any], device: str) -> dict[str, Any]:
    """Score the held-out split once, after the choice was made."""
    from .infer import evaluate_checkpoint

    ev = evaluate_checkpoint(export_dir, src["dataset_path"], split, fmt=src["format"],
                             annotator=src["annotator"], device=device, cache_dir=src["cache_dir"],
                             skip_images=src.get("skip_images", []))
    record = {"split": split, "dataset_path": src["dataset_path"], "annotator": src["annotator"],
              "images": len(ev.image_ids), "note": "scored once after selection; never used for choosing"}
    record |= _scores(ev.summary)
    (export_dir / "test_metrics.json").write_text(json.dumps(record, indent=2))
    return record


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def confirm_seeds(sweep: Sweep, trials: list[TrialRecord], winner: TrialRecord, n: int, dest: Path,
                  device: str = "auto") -> dict[str, Any]:
    """Re-run the winner's configuration, and every other arm's winner, from the same start with `n` new seeds
    (all on the same seeds), to show how much of the winner's margin is luck."""
    from .results import winners
    from .run import prepare_data
    from .stages import train_any

    base_seed = sweep.base.seed
    first = 1 + max([base_seed] + [int(t.params.get("seed", base_seed)) for t in trials])
    seeds = list(range(first, first + n))
    runs_of = [("winner", winner)] + [(f"best {arm}", t) for arm, t in winners(trials, sweep.settings.arms).items()
                                      if t is not winner]
    data = prepare_data(sweep.base, progress=False)
    out: dict[str, Any] = {"seeds": seeds, "arms": []}
    for name, trial in runs_of:
        runs = []
        for seed in seeds:
            run_dir = dest / "confirm" / f"{name.replace(' ', '_')}-seed{seed}"
            cfg = sweep.trial_config(trial.params, run_dir)
            cfg.out, cfg.seed, cfg.device = str(run_dir), seed, device
            with tempfile.TemporaryDirectory(prefix="tl-confirm-") as scratch:  # a sweep trial's files, not kept
                res = train_any(cfg, start_per_landmark=sweep.start_errors, data=data, scratch=Path(scratch))
            runs.append({"seed": seed, "best_val_mre": res.best.mre, "best_epoch": res.best_epoch,
                         "out": str(run_dir.relative_to(dest))})
            log.info(f"  {name} seed {seed}: best val MRE {res.best.mre:.3f} mm at epoch {res.best_epoch}")
        out["arms"].append({"arm": name, "trial_id": trial.trial_id, "trial_arm": trial.arm,
                            "sweep_val_mre": trial.best["val_mre"] if trial.best else None,
                            "runs": runs, **_spread([r["best_val_mre"] for r in runs])})
    (dest / "confirm_seeds.json").write_text(json.dumps(out, indent=2))
    return out


def format_confirm(result: dict[str, Any]) -> str:
    """The winner's (and the other arms' winners') sweep val MRE next to the mean and spread over the new seeds."""
    head = "".join(f"{h:>8}" for h in ("sweep", "seeds", "mean", "sd", "min", "max"))
    lines = [f"{'arm':<9}{'trial':<11}{head}   (val MRE mm)"]
    for a in result["arms"]:
        cells = "".join(f"{_mm(a[k]):>8}" for k in ("mean", "sd", "min", "max"))
        lines.append(f"{a['arm']:<9}{a['trial_id'] or '-':<11}{_mm(a['sweep_val_mre']):>8}{len(a['runs']):>8}"
                     + cells)
    return "\n".join(lines)




def export(experiment: Experiment | str | Path, out: str | Path, split: str | None = None, confirm: int = 0,
           device: str = "auto", force: bool = False, arm: str | None = None) -> Path:
    """Export the best trial's best epoch to `out` (see the module docstring); returns `out`. `arm` limits the
    choice to that arm's trials (e.g. the refine arm's winner, exported as its cascade). When the chosen trial did
    not improve on the start model on the selection split, nothing is exported unless `force`."""
    if confirm < 0:
        raise rule_error("confirm_seeds", confirm, ">= 0")
    exp = Experiment.of(experiment)
    out = Path(out).resolve()
    sweep = exp.load_sweep()
    if arm is not None and arm not in sweep.settings.arms:
        raise rule_error("arm", arm, f"one of this sweep's arms ({', '.join(sweep.settings.arms)})")
    if sweep.settings.mlflow:  # a sweep tracked in MLflow: its tracking server answers before any work (tracking.py)
        from .tracking import connect

        connect(sweep.settings.mlflow)
    _check_out(out)
    source = _validation_source(sweep)
    if split is not None:
        _check_split(split, sweep, source)
    start = Path(sweep.start)
    if not start.exists():
        raise FileNotFoundError(f"{start}: the sweep's start checkpoint is missing "
                                "(its sha256 goes into the export)")
    trials = collect(exp)
    sel = select([t for t in trials if arm is None or t.arm == arm], exp, force)
    b = sel.epoch
    if b["val_mre"] >= sweep.start_mre and not force:
        raise ValueError(f"no fine-tuned trial improved on the start model on {source['split']} (start "
                         f"{sweep.start_mre:.3f} mm, best {b['val_mre']:.3f} mm); nothing exported — use --force to "
                         "export the best trial anyway")
    log.info(f"best {sel.trial.arm} (trial {sel.trial.trial_id}): {source['split']} MRE {b['val_mre']:.3f} mm at epoch "
             f"{int(b['epoch'])} of {len(sel.trial.epochs)} ({exp.uri_of(sel.checkpoint)})")
    words = choice_words(sel, choose(trials) if arm is not None else None, arm)
    if words:
        log.info(words)
    if b["val_mre"] >= sweep.start_mre:
        log.info(f"note: --force: no trial improved on the start model ({sweep.start_mre:.3f} mm); exported anyway")
    with staged_dir(out) as tmp:
        _write_model(tmp, sel, sweep, exp, source)
        log.info(f"verified: the exported files' {_verified(verify(tmp, device))}")
        if split:
            test = _held_out(tmp, split, source, device)
            log.info(f"held-out {split!r} ({test['images']} images, scored once): MRE {test['mre']:.3f} mm, "
                     f"SDR@2mm {test['sdr']['2mm']:.1f}%")
        if confirm:
            log.info(f"confirming with {confirm} further seed(s) from the same start:")
            log.info(format_confirm(confirm_seeds(sweep, trials, sel.trial, confirm, tmp, device)))
    cascade = f", {START_DIR}/ (the cascade's start model)" if (out / START_DIR).is_dir() else ""
    log.info(f"exported {out}: {WEIGHTS}, {MODEL_JSON}{cascade}, best_hyperparameters.yaml, landmarks.parquet/.md, "
             "verification.json" + (", test_metrics.json" if split else "")
             + (", confirm_seeds.json" if confirm else ""))
    if sweep.settings.mlflow:
        from .tracking import export_logged

        export_logged(exp, sweep, out, sel.trial.trial_id)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A training run's checkpoint (e.g. `finetune --mode refine`'s best.pt) as a model folder without a sweep: the
    same files `export` writes (a refinement stage as its whole cascade), written atomically. There is no recorded
    selection to verify against: `evaluate` the folder on the images you choose."""
    from .infer import config_of
    from .model import read_checkpoint, sha256_file

    checkpoint, out = Path(checkpoint), Path(out).resolve()
    _check_out(out)
    ckpt = read_checkpoint(checkpoint)
    if "arch" not in ckpt or "symbols" not in ckpt:
        raise ValueError(f"{checkpoint}: names no architecture or landmark symbols (a best.pt/last.pt written by "
                         "tune-landmarks is needed)")
    with staged_dir(out) as tmp:
        write_model(tmp, ckpt, config_of(ckpt), {
            "difficult": list(ckpt.get("difficult") or []), "epoch": ckpt.get("epoch"),
            "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)}})
    log.info(f"exported {checkpoint} -> {out}" + (f" (a cascade: its start model in {out / START_DIR})"
                                                  if (out / START_DIR).is_dir() else ""))
    return out


def cmd_export(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if args.experiment or args.verify or not args.out:
            raise ValueError("export: give --checkpoint FILE --out DIR (without an EXPERIMENT or --verify)")
        export_checkpoint(args.checkpoint, args.out)
        return 0
    if args.verify:
        if args.experiment or args.out:
            raise ValueError("export: give either EXPERIMENT --out DIR, or --verify DIR alone")
        log.info(f"verified {args.verify}: {_verified(verify(args.verify, args.device))}")
        return 0
    if not args.experiment or not args.out:
        raise ValueError("export needs EXPERIMENT and --out DIR (or --verify DIR to re-check an export)")
    export(Experiment.find(args.experiment, args.storage), args.out, args.split, args.confirm_seeds, args.device,
           args.force, args.arm)
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("export", help="export the best trial's best epoch as a verified model folder")
    add_experiment_options(p, optional=True)
    p.add_argument("--out", help="export folder (an earlier export there is replaced)")
    p.add_argument("--split", help="held-out split spec scored once after the choice (e.g. test, or the sweep's "
                   "verdict split); refused if it shares an image with the training or selection split")
    p.add_argument("--confirm-seeds", "--confirm_seeds", type=int, default=0, dest="confirm_seeds",
                   metavar="N",
                   help="re-run the winner (and each other arm's winner) with N further seeds from the same start")
    p.add_argument("--verify", metavar="DIR",
                   help="only re-check an existing export against its recorded metrics")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="export one training run's checkpoint (e.g. finetune --mode refine's best.pt) to --out instead")
    p.add_argument("--arm", help="export the best trial of this arm (default: the best of all arms)")
    p.add_argument("--force", action="store_true",
                   help="export the best trial even when no trial improved on the start model")
    add_device_options(p)
    p.set_defaults(func=cmd_export)
