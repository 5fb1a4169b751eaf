"""Every figure the tool draws (matplotlib's object API, no global state, so it is safe in threads and
never opens a window): the verdict's per-landmark and forest plots and the report's landmark, history,
importance, parallel-coordinate and epoch figures."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .verdict import CONFIDENCE, PairedDiff

DIFFICULT_COLOR, OTHER_COLOR = "tab:red", "tab:blue"
ARM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def forest_figure(rows: Sequence[PairedDiff], title: str) -> Any:
    """One row per landmark (sorted by difference, difficult ones in red), the groups below; each a mean
    difference with its interval, and the zero line."""
    from matplotlib.figure import Figure

    marks = sorted((r for r in rows if not r.is_group), key=lambda r: r.diff_mm) + [r for r in rows if r.is_group]
    fig = Figure(figsize=(7, 1.4 + 0.26 * len(marks)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(marks))[::-1]
    for yi, r in zip(y, marks):
        color = "tab:red" if r.difficult else "tab:blue"
        ax.errorbar(r.diff_mm, yi, xerr=[[r.diff_mm - r.diff_low_mm], [r.diff_high_mm - r.diff_mm]], fmt="D" if
                    r.is_group else "o", color=color, ms=6 if r.is_group else 4, capsize=2, lw=1.2)
    ax.axvline(0, color="black", lw=0.8, ls="--")
    groups = sum(r.is_group for r in marks)
    if groups:
        ax.axhline(groups - 0.5, color="grey", lw=0.5)
    ax.set_yticks(y, [f"{r.landmark}{' *' if r.significant else ''}" for r in marks])
    for tick, r in zip(ax.get_yticklabels(), marks):
        tick.set_color("tab:red" if r.difficult else "black")
        tick.set_fontweight("bold" if r.is_group else "normal")
    ax.set_ylim(-0.7, len(marks) - 0.3)
    ax.set_xlabel(f"candidate - reference, mean radial error (mm); {CONFIDENCE:.0%} bootstrap interval\n"
                  "red: difficult landmarks; * interval excludes 0; below the line: landmark sets")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def verdict_landmarks_figure(by_model: dict[str, Sequence[PairedDiff]], title: str) -> Any:
    """Per landmark, in the order given (the landmark sets after a line): the start model's MRE (hollow) and
    each arm's winner's beside it, whose whisker is its paired interval of the change from the start placed on
    the start's value, so a whisker that misses the hollow dot is a change the images support. Difficult
    landmarks are shaded: the paper figure of what fine-tuning changed where."""
    from matplotlib.patches import Patch

    first = next(iter(by_model.values()))
    width = 0.8 / (len(by_model) + 1)
    fig, ax = _figure(10, 3.9)
    x = np.arange(len(first)) + np.array([r.is_group for r in first]) * 0.6  # a gap before the sets
    for xi, r in zip(x, first):
        if r.difficult:
            ax.axvspan(xi - 0.45, xi + 0.45, color=DIFFICULT_COLOR, alpha=0.08, lw=0)
    offset = (np.arange(len(by_model) + 1) - len(by_model) / 2) * width
    ax.plot(x + offset[0], [r.ref_mre_mm for r in first], "o", mfc="white", mec="dimgrey", ms=5, label="start")
    for (name, rows), dx, color in zip(by_model.items(), offset[1:], ARM_COLORS):
        cand = np.array([r.cand_mre_mm for r in rows])
        low = np.array([r.ref_mre_mm + r.diff_low_mm for r in rows])
        high = np.array([r.ref_mre_mm + r.diff_high_mm for r in rows])
        ax.errorbar(x + dx, cand, yerr=[np.maximum(cand - low, 0), np.maximum(high - cand, 0)], fmt="o", ms=4,
                    color=color, capsize=1.5, lw=1, label=name)
    if any(r.is_group for r in first):
        ax.axvline(x[[r.is_group for r in first].index(True)] - 0.8, color="grey", lw=0.6)
    ax.set_xticks(x, [r.landmark for r in first], rotation=90, fontsize=8)
    for tick, r in zip(ax.get_xticklabels(), first):
        tick.set_color(DIFFICULT_COLOR if r.difficult else "black")
        tick.set_fontweight("bold" if r.is_group else "normal")
    ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mean radial error (mm)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)
    handles = [*ax.get_legend_handles_labels()[0], Patch(color=DIFFICULT_COLOR, alpha=0.15, label="difficult")]
    ax.legend(handles=handles, fontsize=8, ncols=len(handles), loc="lower right", bbox_to_anchor=(1, 1),
              frameon=False)
    return fig


def png_bytes(fig: Any) -> bytes:
    """A matplotlib Figure as PNG (the size every report and compare figure uses)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


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


def history_figure(by_arm: dict[str, Sequence[Any]], start_mre: float) -> Any:
    """Each arm's complete Optuna trials in its study's order with the arm's running best, and the start."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(7, 3.6)
    for (arm, complete), color in zip(by_arm.items(), ARM_COLORS):
        trials = sorted(complete, key=lambda t: t.number)
        x, v = np.array([t.number for t in trials]), np.array([t.value for t in trials])
        ax.plot(x, v, "o", color=color, label=f"{arm}: trial (best val MRE)")
        if len(v):
            ax.step(x, np.minimum.accumulate(v), where="post", color=color, label=f"{arm}: running best")
    ax.axhline(start_mre, color="grey", ls="--", label=f"start checkpoint {start_mre:.3f} mm")
    ax.set_xlabel("Optuna trial number (per arm)")
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

    kinds = {"ran the full budget": OTHER_COLOR, "stopped early by ASHA": "tab:green", "errored": "tab:red"}

    def kind(r: dict[str, Any]) -> str:
        if r["status"] == "ERROR":
            return "errored"
        return "stopped early by ASHA" if r["stopped_early"] else "ran the full budget"

    run = sum(r["epochs_done"] for r in rows)
    saved = sum(budget - r["epochs_done"] for r in rows if r["stopped_early"])
    total = budget * len(rows)
    summary = (f"{run} of {total} epochs run ({len(rows)} trials x {budget}); early stopping saved {saved} "
               f"epochs ({saved / total:.0%} of the budget)")

    fig, ax = _figure(max(5.0, 0.45 * len(rows) + 2), 3.6)
    ax.bar(range(len(rows)), [r["epochs_done"] for r in rows], color=[kinds[kind(r)] for r in rows])
    line = ax.axhline(budget, color="black", ls="--", lw=0.8, label=f"budget ({budget} epochs)")
    ax.set_xticks(range(len(rows)), [f"{r['arm']} {r['trial_id']}" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("epochs run")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(summary.replace("; ", "\n"), fontsize=9)
    used = {kind(r) for r in rows}
    ax.legend(handles=[Patch(color=c, label=k) for k, c in kinds.items() if k in used] + [line], fontsize=8,
              loc="upper left", bbox_to_anchor=(1, 1))
    return fig, summary

