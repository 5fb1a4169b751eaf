"""`tune-landmarks report`: one HTML page (index.html + PNGs) that says what a sweep found.

It reads only the experiment directory: sweep.json, the tables, the Optuna journal and the trials'
kept checkpoints. The verdict on masking re-scores the start checkpoint, the best searched trial and
the control on the validation split, image by image, because only paired intervals can tell a real
gain from the noise of a small validation set.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compare import (
    CONFIDENCE,
    SDR_MM,
    PairedDiff,
    Scored,
    aligned,
    evaluated,
    forest_figure,
    paired_bootstrap,
    png_bytes,
)

DIFFICULT_COLOR, OTHER_COLOR, CONTROL_COLOR = "tab:red", "tab:blue", "tab:orange"
MIN_IMPORTANCE_TRIALS = 2  # below this an importance is not defined
FEW_IMPORTANCE_TRIALS = 10  # below this it is noise-dominated; the page says so


@dataclass
class Page:
    """index.html under construction, and the files it will need beside it."""

    stage: Path
    parts: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p{f' class={cls!r}' if cls else ''}>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.text(text, "note")

    def figure(self, fig: Any, name: str, caption: str) -> None:
        """Save a matplotlib Figure as `name` and embed it."""
        (self.stage / name).write_bytes(png_bytes(fig))
        self.images.append(name)
        self.parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, table: Any) -> None:
        """A pyarrow table as an HTML table (floats to 4 significant digits)."""
        df = table.to_pandas()
        self.parts.append(df.to_html(index=False, border=0, classes="t", na_rep="",
                                     float_format=lambda v: f"{v:.4g}"))


# ---------------------------------------------------------------- the experiment

def experiment_dir(experiment: str | Path, storage: str | None = None) -> Path:
    """EXPERIMENT as a path, else as a name under --storage (default ./sweeps)."""
    from .search import SWEEP_FILE, is_local

    if storage is not None and not is_local(storage):
        raise ValueError(f"--storage {storage}: report reads a local experiment directory; copy it here first")
    tried = [Path(str(experiment).removeprefix("file://"))]
    if storage is not None or not tried[0].is_absolute():
        tried.append(Path(str(storage or "./sweeps").removeprefix("file://")) / str(experiment))
    for p in tried:
        if (p / SWEEP_FILE).is_file():
            return p
    raise FileNotFoundError(f"{experiment}: not a tune-landmarks experiment (no {SWEEP_FILE} in "
                            f"{' or '.join(str(p) for p in tried)})")


def trial_dir(exp: Path, row: dict[str, Any]) -> Path:
    """The trial's folder beside sweep.json (so a copied experiment reads its own copies), else where Ray
    recorded it."""
    from types import SimpleNamespace

    from .search import trial_dirname

    here = exp / trial_dirname(SimpleNamespace(trial_id=row["trial_id"]))
    return here if here.is_dir() or not row.get("path") else Path(str(row["path"]).removeprefix("file://"))


def best_checkpoint(folder: Path) -> Path | None:
    """The kept checkpoint with the lowest val_mre (Ray keeps the best ones), or None."""
    import json

    kept = []
    for meta in folder.glob("checkpoint_*/epoch.json"):
        ckpt = meta.parent / "checkpoint.pt"
        if ckpt.is_file():
            kept.append((float(json.loads(meta.read_text())["val_mre"]), str(ckpt)))
    return Path(min(kept)[1]) if kept else None


def load_study(exp: Path, name: str) -> tuple[Any, str]:
    """The sweep's Optuna study from its journal, or (None, why not)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from .search import JOURNAL_FILE

    journal = exp / JOURNAL_FILE
    if not journal.is_file():
        return None, f"No Optuna journal ({journal} is missing)"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    if name not in optuna.get_all_study_names(storage):
        return None, f"{journal} holds no study named {name!r}"
    return optuna.load_study(study_name=name, storage=storage), ""


def _read_table(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; `tune-landmarks resume {path.parent}` writes the sweep's tables")
    return pq.read_table(path)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rows if r.get("best_val_mre") is not None and math.isfinite(r["best_val_mre"])]
    return min(scored, key=lambda r: r["best_val_mre"]) if scored else None


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


# ---------------------------------------------------------------- figures

def _figure(width: float, height: float, cols: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols, **kw)


def landmark_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Start vs best MRE per landmark (left) and the change (right): the difficult ones should drop, the
    others should stay put; a blue bar to the right is drift."""
    rows = sorted(rows, key=lambda r: r["start_mre_mm"] if r["start_mre_mm"] is not None else -1)
    fig, (left, right) = _figure(9, 1.2 + 0.24 * len(rows), 2, sharey=True)
    y = np.arange(len(rows))
    for yi, r in zip(y, rows):
        color = DIFFICULT_COLOR if r["difficult"] else OTHER_COLOR
        left.plot([r["start_mre_mm"], r["best_mre_mm"]], [yi, yi], color=color, lw=1, alpha=0.6)
        left.plot(r["start_mre_mm"], yi, "o", mfc="white", mec="grey", ms=5)
        left.plot(r["best_mre_mm"], yi, "o", color=color, ms=5)
        right.barh(yi, r["change_mm"] or 0.0, color=color, alpha=0.8)
    left.set_yticks(y, [r["symbol"] for r in rows])
    for tick, r in zip(left.get_yticklabels(), rows):
        tick.set_color(DIFFICULT_COLOR if r["difficult"] else "black")
    left.set_xlabel("validation MRE (mm): hollow = start, filled = best trial")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("change (mm), best - start")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def history_figure(study: Any, start_mre: float, controls: Sequence[float]) -> Any:
    from matplotlib.ticker import MaxNLocator

    trials = sorted(_complete(study), key=lambda t: t.number)
    x = np.array([t.number for t in trials])
    v = np.array([t.value for t in trials])
    fig, ax = _figure(7, 3.6)
    ax.plot(x, v, "o", color=OTHER_COLOR, label="searched trial (best val MRE)")
    if len(v):
        ax.step(x, np.minimum.accumulate(v), where="post", color="black", label="running best")
    ax.axhline(start_mre, color="grey", ls="--", label=f"start checkpoint {start_mre:.3f} mm")
    for i, c in enumerate(controls):
        ax.axhline(c, color=CONTROL_COLOR, ls=":", label="control (all landmarks)" if i == 0 else None)
    ax.set_xlabel("Optuna trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("best val MRE (mm)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def importance_figure(importances: dict[str, float], n_trials: int) -> Any:
    names = list(importances)[::-1]
    fig, ax = _figure(6, 1.2 + 0.35 * len(names))
    ax.barh(names, [importances[n] for n in names], color=OTHER_COLOR)
    ax.set_xlabel(f"importance for best val MRE (PED-ANOVA, {n_trials} complete trials)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _unit(value: Any, dist: Any) -> float:
    """A parameter value on its distribution's [0, 1] axis (log axes for log distributions)."""
    from optuna.distributions import CategoricalDistribution

    if value is None:
        return math.nan
    if isinstance(dist, CategoricalDistribution):
        return dist.choices.index(value) / max(1, len(dist.choices) - 1)
    lo, hi, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def _ends(dist: Any) -> list[tuple[float, str]]:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return [(_unit(c, dist), str(c)) for c in dist.choices]
    return [(0.0, f"{dist.low:.3g}"), (1.0, f"{dist.high:.3g}")]


def parallel_figure(trials: list[Any]) -> Any:
    """One line per complete searched trial across its parameters (each on its own normalised axis) to
    the val MRE; colour = val MRE, the best trial drawn thick."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    dists = {k: d for t in trials for k, d in t.distributions.items() if not d.single()}
    names = sorted(dists)
    values = np.array([t.value for t in trials])
    lo, hi = float(values.min()), float(values.max())
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    cmap = "viridis_r"
    sm = ScalarMappable(norm, cmap)
    fig, ax = _figure(1.8 + 1.6 * (len(names) + 1), 4.2)
    x = np.arange(len(names) + 1)
    best = int(values.argmin())
    for i, t in enumerate(trials):
        y = [_unit(t.params.get(n), dists[n]) for n in names] + [(t.value - lo) / (hi - lo) if hi > lo else 0.5]
        ax.plot(x, y, color=sm.to_rgba(t.value), lw=3 if i == best else 1.2, alpha=0.9, zorder=3 if i == best else 2)
    for xi, n in enumerate(names):
        ax.axvline(xi, color="black", lw=0.6)
        for yv, label in _ends(dists[n]):
            ax.annotate(label, (xi, yv), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.axvline(len(names), color="black", lw=0.6)
    for yv, label in ((0.0, f"{lo:.3f}"), (1.0, f"{hi:.3f}")):
        ax.annotate(label, (len(names), yv), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(x, [*names, "val MRE (mm)"])
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(names) + 0.4)
    fig.colorbar(sm, ax=ax, label="best val MRE (mm)")
    return fig


def epochs_figure(rows: list[dict[str, Any]], budget: int) -> tuple[Any, str]:
    """Epochs each trial ran against the full budget, and what early stopping saved."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    kinds = {"control": CONTROL_COLOR, "ran the full budget": OTHER_COLOR, "stopped early by ASHA": "tab:green",
             "errored": "tab:red"}

    def kind(r: dict[str, Any]) -> str:
        if r["status"] == "ERROR":
            return "errored"
        if r["control"]:
            return "control"
        return "stopped early by ASHA" if r["stopped_early"] else "ran the full budget"

    run = sum(r["epochs_done"] for r in rows)
    saved = sum(budget - r["epochs_done"] for r in rows if r["stopped_early"])
    total = budget * len(rows)
    summary = (f"{run} of {total} epochs run ({len(rows)} trials x {budget}); early stopping saved {saved} "
               f"epochs ({saved / total:.0%} of the budget)")

    fig, ax = _figure(max(5.0, 0.45 * len(rows) + 2), 3.6)
    ax.bar(range(len(rows)), [r["epochs_done"] for r in rows], color=[kinds[kind(r)] for r in rows])
    line = ax.axhline(budget, color="black", ls="--", lw=0.8, label=f"budget ({budget} epochs)")
    ax.set_xticks(range(len(rows)), [r["trial_id"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("epochs run")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(summary.replace("; ", "\n"), fontsize=9)
    used = {kind(r) for r in rows}
    ax.legend(handles=[Patch(color=c, label=k) for k, c in kinds.items() if k in used] + [line], fontsize=8,
              loc="upper left", bbox_to_anchor=(1, 1))
    return fig, summary


# ---------------------------------------------------------------- the verdict

def _interval(value: float, low: float, high: float, unit: str, digits: int) -> str:
    return f"{value:+.{digits}f} {unit} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _judge(r: PairedDiff, better: str, worse: str) -> str:
    """One phrase for one interval: lower MRE is better."""
    where = _interval(r.diff_mm, r.diff_low_mm, r.diff_high_mm, "mm", 3)
    if not r.significant:
        return f"no clear difference ({where})"
    return f"{better if r.diff_mm < 0 else worse} ({where})"


def verdict_sentences(vs_start: list[PairedDiff] | None, vs_control: list[PairedDiff] | None) -> list[str]:
    """Plain-language reading of the group intervals: did masking help the difficult landmarks, did the
    rest drift, and did it beat plain fine-tuning?"""
    out = []
    if vs_start:
        g = {r.landmark: r for r in vs_start if r.is_group}
        if "difficult" in g:
            out.append("Difficult landmarks, best trial vs start: " + _judge(g["difficult"], "improved", "worse") + ".")
            out.append("Landmarks outside the loss, best trial vs start: "
                       + _judge(g["other"], "improved too", "drifted (worse)") + ".")
        out.append("All landmarks, best trial vs start: " + _judge(g["all"], "improved", "worse") + ".")
    if vs_control:
        g = {r.landmark: r for r in vs_control if r.is_group}
        for name in ("difficult", "all"):
            if name in g:
                out.append(f"{name.capitalize()} landmarks, best trial vs control: "
                           + _judge(g[name], "masking better", "control better") + ".")
        a, d = g["all"], g.get("difficult")
        if a.significant:
            out.append("Verdict: " + ("masking beat plain fine-tuning on all landmarks." if a.diff_mm < 0 else
                                      "plain fine-tuning (the control) beat masking on all landmarks."))
        elif d is not None and d.significant and d.diff_mm < 0:
            out.append("Verdict: masking did better than the control on the difficult landmarks, with no clear "
                       "difference over all landmarks.")
        else:
            out.append("Verdict: no clear difference between masking and plain fine-tuning at this budget "
                       "and number of validation images.")
    return out


def _group_table(comparisons: list[tuple[str, list[PairedDiff]]]) -> Any:
    """The verdict's intervals for the landmark sets, one row per comparison x set."""
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in ("comparison", "landmarks", "reference mm", "candidate mm",
                                             f"difference mm ({CONFIDENCE:.0%} CI)",
                                             f"SDR@{SDR_MM:g}mm difference pp ({CONFIDENCE:.0%} CI)")}
    for name, rows in comparisons:
        for r in (r for r in rows if r.is_group):
            cols["comparison"].append(name)
            cols["landmarks"].append(r.landmark)
            cols["reference mm"].append(r.ref_mre_mm)
            cols["candidate mm"].append(r.cand_mre_mm)
            cols[f"difference mm ({CONFIDENCE:.0%} CI)"].append(
                _interval(r.diff_mm, r.diff_low_mm, r.diff_high_mm, "", 3) + (" *" if r.significant else ""))
            cols[f"SDR@{SDR_MM:g}mm difference pp ({CONFIDENCE:.0%} CI)"].append(
                _interval(r.sdr_diff_pp, r.sdr_low_pp, r.sdr_high_pp, "", 1) + (" *" if r.sdr_significant else ""))
    return pa.table(cols)


Verdict = dict[tuple[str, str], list[PairedDiff]]


def compute_verdict(models: dict[str, tuple[Path | None, str]], evaluate: dict[str, Any], n_boot: int,
                    seed: int) -> tuple[Verdict, list[str]]:
    """Score the start, the best trial and the control on the same images and compare them pairwise;
    returns {(candidate, reference): rows} and the difficult set (the best trial's)."""
    scored: dict[str, Scored] = {role: evaluated(path, **evaluate) for role, (path, _) in models.items() if path}
    best = scored.get("best trial")
    hard = best.difficult if best else []
    results: Verdict = {}
    for cand, ref in (("best trial", "start"), ("control", "start"), ("best trial", "control")):
        if cand in scored and ref in scored:
            results[(cand, ref)] = paired_bootstrap(scored[ref].errors, aligned(scored[ref], scored[cand]),
                                                    scored[ref].symbols, hard, n_boot=n_boot, seed=seed)
    return results, hard


def verdict_lines(results: Verdict) -> list[str]:
    """The sentences, then each comparison's group intervals, as plain text (the end-of-sweep summary)."""
    lines = verdict_sentences(results.get(("best trial", "start")), results.get(("best trial", "control")))
    for (cand, ref), rows in results.items():
        for r in (r for r in rows if r.is_group):
            lines.append(f"  {cand} vs {ref}, {r.landmark}: {_interval(r.diff_mm, r.diff_low_mm, r.diff_high_mm, 'mm', 3)}"
                         + (" *" if r.significant else ""))
    return lines


def verdict_section(page: Page, models: dict[str, tuple[Path | None, str]], evaluate: dict[str, Any],
                    n_boot: int, seed: int) -> None:
    """The page's verdict: `models` maps role -> (checkpoint or None, why it is missing)."""
    page.heading("Verdict on masking")
    for role, (path, why) in models.items():
        page.text(f"{role}: {path}" if path else f"{role}: not available — {why}", "" if path else "note")
    if sum(path is not None for path, _ in models.values()) < 2:
        page.note("No comparison possible: fewer than two of the start, best trial and control checkpoints exist.")
        return
    results, hard = compute_verdict(models, evaluate, n_boot, seed)
    n = next(iter(results.values()))[0].n_images
    page.text(f"Paired differences on the {n} images of the validation split (candidate - reference; negative = "
              f"lower error), {n_boot} bootstrap resamples of images, {CONFIDENCE:.0%} percentile intervals; "
              f"* = the interval excludes 0. Difficult set: {', '.join(hard) or 'none'} (the best trial's).")
    for line in verdict_sentences(results.get(("best trial", "start")), results.get(("best trial", "control"))):
        page.text(line, "verdict" if line.startswith("Verdict") else "")
    page.table(_group_table([(f"{c} vs {r}", rows) for (c, r), rows in results.items()]))
    page.note("The best trial was chosen on this same validation split, so its intervals are optimistic; confirm "
              "on held-out images with `tune-landmarks compare`.")
    for (cand, ref), rows in results.items():
        name = f"forest_{cand.replace(' ', '_')}_vs_{ref}.png"
        page.figure(forest_figure(rows, f"{cand} vs {ref} ({rows[0].n_images} validation images)"), name,
                    f"Per-landmark paired difference, {cand} vs {ref} (red: difficult landmarks).")


# ---------------------------------------------------------------- the page

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.note{color:#8a5a00;background:#fff6e0;padding:.4em .6em}.verdict{font-weight:bold;font-size:1.1em}
table.t{border-collapse:collapse;font-size:.85em}table.t td,table.t th{border:1px solid #ddd;padding:2px 6px}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}"""


def checkpoints(exp: Path, resume: str | None, best: dict[str, Any] | None,
                control: dict[str, Any] | None) -> dict[str, tuple[Path | None, str]]:
    """role -> (checkpoint, or None and why it is missing) for the start, the best trial and the control."""
    start = Path(resume) if resume else None
    models = {"start": (start, "") if start and start.exists() else
              (None, f"{start} not found" if start else "sweep.json names no start checkpoint")}
    for role, row in (("best trial", best), ("control", control)):
        if row is None:
            models[role] = (None, f"no {'searched' if role == 'best trial' else 'control'} trial with a result")
        else:
            folder = trial_dir(exp, row)
            models[role] = (best_checkpoint(folder), f"trial {row['trial_id']} has no kept checkpoint in {folder}")
    return models


def study_sections(page: Page, study: Any, no_study: str, start_mre: float, controls: list[float]) -> None:
    """Optimisation history, parameter importances and parallel coordinates, all from the Optuna study."""
    page.heading("Optimisation history")
    if study is None:
        page.note(f"{no_study}: history, importances and parallel coordinates need the study.")
        return
    page.figure(history_figure(study, start_mre, controls), "history.png",
                "Best val MRE of each searched trial in Optuna's order, and the running best.")
    complete = _complete(study)
    searched = {k for t in complete for k, d in t.distributions.items() if not d.single()}
    page.heading("Parameter importances")
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        page.note(f"Importances need at least {MIN_IMPORTANCE_TRIALS} complete trials; the study has "
                  f"{len(complete)}.")
    elif not searched:
        page.note("No searched parameter varies in the complete trials, so there is no importance to rank.")
    else:
        import optuna

        page.figure(importance_figure(optuna.importance.get_param_importances(study), len(complete)),
                    "importances.png", "optuna.importance.get_param_importances on the sweep's study.")
        if len(complete) < FEW_IMPORTANCE_TRIALS:
            page.note(f"Estimated from only {len(complete)} complete trials: treat the ranking as rough.")
    page.heading("Parameters vs val MRE")
    if complete and searched:
        page.figure(parallel_figure(complete), "parallel.png",
                    "Parallel coordinates of the searched trials (the control is not a sample of the space); "
                    "each axis spans its range in the search space (log axes for log-uniform parameters).")
    else:
        page.note("No complete searched trial with a varying parameter to draw.")


def _scoring(base: dict[str, Any], split: str, device: str) -> dict[str, Any]:
    """How the verdict scores checkpoints: the sweep's own dataset, validation split and annotator."""
    return {"dataset_path": base["dataset_path"], "split": split, "fmt": base.get("format"),
            "annotator": base.get("annotator", "mean"), "device": device, "cache_dir": base.get("cache_dir")}


def sweep_verdict(exp: str | Path, n_boot: int = 1000, seed: int = 0, device: str = "auto") -> list[str]:
    """The verdict as text lines for the end-of-sweep summary (empty when fewer than two models exist)."""
    from .read import describe
    from .results import load_sweep

    exp = Path(exp)
    sweep = load_sweep(exp)
    base = sweep.base
    split = base.get("val_split") or describe(base["dataset_path"], base.get("format")).default_splits[1]
    rows = _read_table(exp / "trials.parquet").to_pylist()
    models = checkpoints(exp, base.get("resume"), _best([r for r in rows if not r["control"]]),
                         _best([r for r in rows if r["control"]]))
    if sum(path is not None for path, _ in models.values()) < 2:
        return []
    results, hard = compute_verdict(models, _scoring(base, split, device), n_boot, seed)
    n = next(iter(results.values()))[0].n_images
    return [f"verdict on masking ({n} {split} images, paired bootstrap, 95% intervals; difficult: "
            f"{', '.join(hard) or 'none'}):"] + verdict_lines(results)


def report(exp: str | Path, out: str | Path, *, storage: str | None = None, n_boot: int = 2000, seed: int = 0,
           device: str = "auto") -> Path:
    """Write `out`/index.html and its PNGs for one experiment; returns the page's path. Every input is read
    and checked before anything is written, and `out` only appears once the page is complete."""
    import pyarrow.compute as pc

    from .read import describe
    from .results import load_sweep

    if n_boot < 1:
        raise ValueError(f"The value of `bootstrap` is {n_boot}, but must be > 0.")
    if seed < 0:
        raise ValueError(f"The value of `seed` is {seed}, but must be >= 0.")
    exp = experiment_dir(exp, storage)
    sweep = load_sweep(exp)
    trials_t = _read_table(exp / "trials.parquet")
    landmarks_t = _read_table(exp / "landmarks.parquet")
    base, s = sweep.base, sweep.settings
    split = base.get("val_split") or describe(base["dataset_path"], base.get("format")).default_splits[1]
    rows = trials_t.to_pylist()
    best = _best([r for r in rows if not r["control"]])
    control = _best([r for r in rows if r["control"]])
    study, no_study = load_study(exp, s.name)
    start_mre = float(np.mean(list(sweep.start_errors.values())))

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    page = Page(Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent)))
    try:
        page.parts.append(f"<h1>Sweep {html.escape(s.name)}</h1>")
        page.text(f"{exp} — {len(rows)} trials ({s.num_samples} searched + {len(sweep.controls)} control), "
                  f"{s.epochs} epochs each; start checkpoint {base.get('resume')}: {split} MRE {start_mre:.3f} mm.")
        for n in sweep.notes:
            page.note(n)
        if best is None:
            page.note("No searched trial reported a result.")
        else:
            page.text(f"Best searched trial {best['trial_id']}: val MRE {best['best_val_mre']:.3f} mm at epoch "
                      f"{best['best_epoch']}, difficult set {best['difficult'] or 'none'}.")
        if control is not None and (best is None or control["best_val_mre"] < best["best_val_mre"]):
            page.note(f"The control {control['trial_id']} (all landmarks) has the lowest val MRE of all trials.")

        verdict_section(page, checkpoints(exp, base.get("resume"), best, control), _scoring(base, split, device),
                        n_boot, seed)

        page.heading("Per-landmark error: start vs best trial")
        lm = landmarks_t.filter(pc.equal(landmarks_t["trial_id"], best["trial_id"])) if best else None
        if lm is None:
            page.note("No best trial, so no per-landmark comparison.")
        else:
            page.figure(landmark_figure(lm.to_pylist(), f"best trial {best['trial_id']} vs start "
                                                        "(red: difficult, in the loss; blue: the others)"),
                        "landmarks.png", "Validation MRE per landmark at the start and at the best trial's best "
                                         "epoch; the right panel is the change (blue bars right of 0 = drift).")

        study_sections(page, study, no_study, start_mre,
                       [r["best_val_mre"] for r in rows if r["control"] and r["best_val_mre"] is not None])

        page.heading("Epochs spent per trial")
        fig, summary = epochs_figure(rows, int(s.epochs))
        page.figure(fig, "epochs.png", summary)

        page.heading("Trials")
        page.table(trials_t.drop_columns([c for c in ("path",) if c in trials_t.column_names]))
        if lm is not None:
            page.heading(f"Best trial {best['trial_id']}: landmarks")
            page.table(lm.select(["symbol", "start_mre_mm", "best_mre_mm", "change_mm", "difficult"])
                       .sort_by([("change_mm", "ascending")]))

        (page.stage / "index.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(s.name)} report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")
        out.mkdir(exist_ok=True)
        for name in [*page.images, "index.html"]:  # the page last: it never points at a missing image
            os.replace(page.stage / name, out / name)
    finally:
        shutil.rmtree(page.stage, ignore_errors=True)
    return out / "index.html"


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.experiment, args.out, storage=args.storage, n_boot=args.bootstrap, seed=args.seed,
                  device=args.device)
    print(f"wrote {path}")
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("report", help="HTML report of a sweep: plots, tables and a verdict on masking")
    s.add_argument("experiment", help="experiment directory, or its name under --storage")
    s.add_argument("--out", required=True, help="folder for index.html and its PNGs")
    s.add_argument("--storage", help="where the experiment's name is looked up (default ./sweeps)")
    s.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the images for the verdict")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_report)
