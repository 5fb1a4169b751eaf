"""The sweep's results, read from the experiment alone (so `resume` can refresh them and a copied or remote
experiment reads its own files): the trials Ray recorded, the one rule for "best", the kept checkpoints,
and the tables trials.parquet (one row per trial), epochs.parquet (trial x epoch) and landmarks.parquet
(trial x landmark)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa

from .experiment import ARM_KEY, METRIC, TABLES, TERMINAL, Experiment, Sweep
from .metrics import finite_or_none

T = TypeVar("T")
EPOCH_JSON = "epoch.json"  # beside each reported checkpoint: its epoch, val MRE, and checkpoint.pt's bytes and sha256
# what a trial reports at each epoch: the columns of epochs.parquet, and its MLflow run's metrics (tracking.py)
EPOCH_SCALARS = ("epoch", "train_loss", "lr", "val_mre", "best_val_mre", "val_sd", "val_mre_difficult",
                 "val_mre_other", "max_drift", "mean_drift", "sdr_2mm", "sdr_2_5mm", "sdr_3mm", "sdr_4mm", "epoch_seconds",
                 "train_seconds", "validate_seconds", "checkpoint_seconds", "data_wait_seconds", "peak_memory_mb", "threads",
                 "cpu_seconds", "time_this_iter_s")


def lowest(items: Iterable[T], value: Callable[[T], Any]) -> T | None:
    """The item whose value is lowest among the finite ones: the one rule for "best" (a trial's best epoch,
    a sweep's best trial), so that the summary, the report and export always agree."""
    items = list(items)
    scored = [(v, i) for i, item in enumerate(items) if (v := finite_or_none(value(item))) is not None]
    return items[min(scored)[1]] if scored else None


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    arm: str
    params: dict[str, Any]
    path: str
    epochs: list[dict[str, Any]]
    error: str

    @property
    def best(self) -> dict[str, Any] | None:
        """The reported results of the epoch with the lowest val MRE (not the last: ASHA and overfitting make
        the last epoch a poor proxy)."""
        return lowest(self.epochs, lambda e: e.get(METRIC))


def best_trial(trials: list[TrialRecord], arm: str | None = None) -> TrialRecord | None:
    """The best trial of the sweep, or of one arm: the same rule on the selection split for every arm."""
    return lowest([t for t in trials if arm in (None, t.arm)], lambda t: t.best[METRIC] if t.best else None)


def winners(trials: list[TrialRecord], arms: list[str]) -> dict[str, TrialRecord]:
    """Each arm's best trial (arms without a scored trial are left out), in the sweep's arm order."""
    found = {arm: best_trial(trials, arm) for arm in arms}
    return {arm: t for arm, t in found.items() if t is not None}


def best_row(rows: list[dict[str, Any]], arm: str | None = None) -> dict[str, Any] | None:
    """best_trial for rows of trials.parquet."""
    return lowest([r for r in rows if arm in (None, r["arm"])], lambda r: r.get("best_val_mre"))


def _error_line(text: str | None) -> str:
    if not text:
        return ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (named or lines or [""])[-1][:500]


def collect(experiment: Experiment | str) -> list[TrialRecord]:
    """Every trial Ray knows of, with its per-epoch results, from the saved experiment state."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(Experiment.of(experiment).uri)
    out = []
    for t in ea.trials:
        df = ea.trial_dataframes.get(t.trial_id)
        rows = df.to_dict("records") if df is not None and len(df) else []
        # an epoch reported after Ray's last saved state is run again on resume: keep its last report only
        rows = list({r.get("epoch", i): r for i, r in enumerate(rows)}.values())
        err = ""
        if t.status == "ERROR":
            try:
                err = _error_line(t.get_error())
            except Exception as exc:  # the error file can be missing after a hard kill
                err = f"(error file unreadable: {exc})"
        out.append(TrialRecord(t.trial_id, t.status, str(t.config.get(ARM_KEY, "masked")),
                               {k: v for k, v in t.config.items() if k != ARM_KEY}, str(t.path), rows, err))
    return out  # in the order Ray created the trials (its ids are random hex)


def kept_checkpoints(exp: Experiment, trial_id: str) -> dict[int, tuple[float, str]]:
    """epoch (1-based) -> (val MRE, folder relative to the experiment) of every checkpoint Ray kept for a trial
    (a sweep keeps the best --keep-checkpoints by val MRE, and the latest)."""
    from .experiment import trial_dirname

    kept = {}
    trial = trial_dirname(trial_id)
    for name in exp.listdir(trial):
        rel = f"{trial}/{name}"
        if name.startswith("checkpoint_") and exp.exists(rel, EPOCH_JSON) and exp.exists(rel, "checkpoint.pt"):
            meta = json.loads(exp.read_text(rel, EPOCH_JSON))
            kept[int(meta["epoch"])] = (float(meta["val_mre"]), rel)
    return kept


def checkpoint_record(path: str | os.PathLike[str], epoch: int, val_mre: float) -> dict[str, Any]:
    """What epoch.json records of a checkpoint as it is written: its epoch and val MRE, and the checkpoint file's size
    and sha256, so that a copy cut short or altered later (a killed upload, a full disk) is never trusted."""
    data = open(path, "rb").read()
    return {"epoch": epoch, "val_mre": val_mre, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def checkpoint_damage(exp: Experiment, rel: str) -> str | None:
    """Why the kept checkpoint folder `rel` cannot be trusted, or None: its checkpoint.pt is not the size or the sha256
    epoch.json recorded when it was written. A checkpoint of a sweep that recorded no digest is read as before
    (model.read_checkpoint still refuses one cut short)."""
    meta = json.loads(exp.read_text(rel, EPOCH_JSON))
    return damage_of(meta, exp.read_bytes(rel, "checkpoint.pt")) if "sha256" in meta else None


def damage_of(meta: dict[str, Any], data: bytes) -> str | None:
    """checkpoint_damage for a checkpoint's epoch.json record and bytes already at hand."""
    if "sha256" not in meta:
        return None
    if len(data) != meta["bytes"]:
        return f"{len(data)} of the {meta['bytes']} bytes it was written with"
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        return "its sha256 is not the one recorded when it was written"
    return None


def latest_intact(exp: Experiment, trial_id: str, before: int) -> tuple[int, str] | None:
    """(epoch, folder) of a trial's latest kept checkpoint before epoch `before` whose bytes are the recorded ones."""
    for epoch, (_, rel) in sorted(kept_checkpoints(exp, trial_id).items(), reverse=True):
        if epoch < before and checkpoint_damage(exp, rel) is None:
            return epoch, rel
    return None


def write_tables(experiment: Experiment | str, sweep: Sweep, trials: list[TrialRecord]) -> dict[str, str]:
    exp = Experiment.of(experiment)
    names = sorted({k for t in trials for k in t.params})
    max_epochs = sweep.settings.epochs
    trow: dict[str, list] = {k: [] for k in ("trial_id", "status", "arm", "difficult", "epochs_done",
                                              "stopped_early", "best_epoch", "error", "path")}
    for k in names:
        trow[f"param_{k}"] = []
    at_best = [k for k in EPOCH_SCALARS if k not in ("epoch", "best_val_mre")]
    for k in at_best:
        trow[f"best_{k}"] = []
    for t in trials:
        b = t.best or {}
        trow["trial_id"].append(t.trial_id)
        trow["status"].append(t.status)
        trow["arm"].append(t.arm)
        trow["difficult"].append(str((t.epochs[-1].get("difficult") if t.epochs else "") or ""))
        trow["epochs_done"].append(len(t.epochs))
        trow["stopped_early"].append(t.status == "TERMINATED" and len(t.epochs) < max_epochs)
        trow["best_epoch"].append(int(b["epoch"]) if b else None)
        trow["error"].append(t.error)
        trow["path"].append(t.path)
        for k in names:
            v = t.params.get(k)
            trow[f"param_{k}"].append(None if v is None else (v if isinstance(v, (int, float, bool)) else str(v)))
        for k in at_best:
            trow[f"best_{k}"].append(finite_or_none(b.get(k)))
    erow: dict[str, list] = {"trial_id": [], "arm": []} | {k: [] for k in EPOCH_SCALARS}
    lrow: dict[str, list] = {k: [] for k in ("trial_id", "arm", "symbol", "start_mre_mm", "best_mre_mm",
                                             "change_mm", "difficult")}
    for t in trials:
        for e in t.epochs:
            erow["trial_id"].append(t.trial_id)
            erow["arm"].append(t.arm)
            for k in EPOCH_SCALARS:
                erow[k].append(finite_or_none(e.get(k)))
        b = t.best
        if not b:
            continue
        hard = set(str(b.get("difficult") or "").split(","))
        for s in sweep.symbols:
            start = sweep.start_errors.get(s)
            best = finite_or_none(b.get(f"mre_{s}"))
            lrow["trial_id"].append(t.trial_id)
            lrow["arm"].append(t.arm)
            lrow["symbol"].append(s)
            lrow["start_mre_mm"].append(start)
            lrow["best_mre_mm"].append(best)
            lrow["change_mm"].append(None if best is None or start is None else best - start)
            lrow["difficult"].append(s in hard)
    tables = {"trials": pa.table(trow), "epochs": pa.table(erow), "landmarks": pa.table(lrow)}
    return {k: exp.write_table(TABLES[k], t) for k, t in tables.items()}


def unfinished(sweep: Sweep, trials: list[TrialRecord]) -> int:
    """Trials of the sweep's budget that have not ended (never started, pending or running)."""
    return sweep.total_trials - sum(t.status in TERMINAL for t in trials)


def summary_text(sweep: Sweep, trials: list[TrialRecord]) -> str:
    """End-of-sweep summary on the selection split: first whether anything beat the start model, then each
    arm's winner with its budget, then the best trial's landmarks. (The verdict, on unseen images, follows.)"""
    sel = sweep.roles.get("val", {}).get("spec") or "the selection split"
    done = sum(t.status in TERMINAL for t in trials)
    err = sum(t.status == "ERROR" for t in trials)
    early = sum(t.status == "TERMINATED" and len(t.epochs) < sweep.settings.epochs for t in trials)
    lines = []
    bt = best_trial(trials)
    if bt is None or bt.best[METRIC] >= sweep.start_mre:
        best = "no trial reported a result" if bt is None else f"best {bt.arm} {bt.best[METRIC]:.3f} mm"
        lines.append(f"No fine-tuned trial improved on the start model on {sel} (start {sweep.start_mre:.3f} mm, "
                     f"{best}): keep the start model.")
    lines.append(f"{len(trials)} trials: {done} finished ({err} errored, {early} stopped early by ASHA)")
    lines.append(f"start: {sel} MRE {sweep.start_mre:.3f} mm")
    for arm, t in winners(trials, sweep.settings.arms).items():
        b = t.best
        lines.append(f"best {arm} ({t.trial_id}, {sweep.settings.budget(arm)} trials x {sweep.settings.epochs_of(arm)} "
                     f"epochs): {sel} MRE {b[METRIC]:.3f} mm "
                     f"at epoch {int(b['epoch'])}; difficult {_mm(b.get('val_mre_difficult'))}, others "
                     f"{_mm(b.get('val_mre_other'))}, max drift {_mm(b.get('max_drift'), signed=True)}")
        lines.append("  parameters: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items())))
    if bt is None:
        return "\n".join(lines)
    b = bt.best
    hard = set(str(b.get("difficult") or "").split(","))
    lines.append(f"  {'landmark':<9}{'start':>8}{'best ' + bt.arm:>14}{'change':>9}   (best trial {bt.trial_id}, {sel})")
    for s in sorted(sweep.symbols, key=lambda s: -(finite_or_none(b.get(f"mre_{s}")) or 0)):
        v = finite_or_none(b.get(f"mre_{s}"))
        st = sweep.start_errors.get(s, float("nan"))
        lines.append(f"  {s:<9}{st:>8.3f}{(v or float('nan')):>14.3f}{((v or float('nan')) - st):>+9.3f}"
                     + ("  *" if s in hard else ""))
    return "\n".join(lines)


def _mm(v: Any, signed: bool = False) -> str:
    f = finite_or_none(v)
    return "n/a" if f is None else (f"{f:+.3f}" if signed else f"{f:.3f}") + " mm"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
