"""The verdict: paired statistics on per-image error tables, and what they say in words.

Models scored on the same images are compared pairwise: the difference of their mean radial errors
(candidate - reference) and of their SDR@2mm, each with a 95 % percentile interval from a bootstrap that
resamples images (an image's landmarks stay together, since errors on one image are correlated). Pure
functions on numpy arrays: `compare`, `report`, `export` and the end-of-sweep summary all call them, and
importing this module imports neither torch nor Ray.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SDR_MM = 2.0
CONFIDENCE = 0.95
GROUPS = ("difficult", "other", "all")


@dataclass
class Scored:
    """One model's radial errors (mm) on one split: rows are images, columns landmarks."""

    source: Path
    image_ids: list[str]
    symbols: list[str]
    errors: np.ndarray
    difficult: list[str]
    split: str = ""  # the split scored, when known (an `evaluate` table does not record it)


@dataclass(frozen=True)
class PairedDiff:
    """candidate - reference on one landmark (`is_group` False) or a set of them, with bootstrap intervals."""

    landmark: str
    is_group: bool
    difficult: bool
    n_images: int
    ref_mre_mm: float
    cand_mre_mm: float
    diff_mm: float
    diff_low_mm: float
    diff_high_mm: float
    ref_sdr_2mm: float
    cand_sdr_2mm: float
    sdr_diff_pp: float
    sdr_low_pp: float
    sdr_high_pp: float

    @property
    def significant(self) -> bool:
        """The interval of the mm difference excludes zero."""
        return self.diff_low_mm > 0 or self.diff_high_mm < 0

    @property
    def sdr_significant(self) -> bool:
        return self.sdr_low_pp > 0 or self.sdr_high_pp < 0


def paired_bootstrap(errors_ref: np.ndarray, errors_cand: np.ndarray, symbols: Sequence[str],
                     difficult: Sequence[str] = (), *, n_boot: int = 2000, seed: int = 0,
                     confidence: float = CONFIDENCE, sdr_mm: float = SDR_MM) -> list[PairedDiff]:
    """Per-landmark rows (in `symbols` order), then the difficult / other / all groups (the first two only
    when `difficult` splits the landmarks). errors_* are (N images, K landmarks) mm, rows paired by image.

    Each bootstrap replicate draws N images with replacement; as every statistic is a mean over images of a
    per-image value, a replicate is the multinomial image counts times that (N, columns) matrix."""
    a, b = np.asarray(errors_ref, float), np.asarray(errors_cand, float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"The shapes of `errors_ref` {a.shape} and `errors_cand` {b.shape} must be equal (N, K).")
    if a.shape[0] < 1:
        raise ValueError("The value of `errors_ref` has 0 images, but must have > 0.")
    if len(symbols) != a.shape[1]:
        raise ValueError(f"The value of `symbols` has {len(symbols)} names, but the errors have {a.shape[1]} columns.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("The errors contain non-finite values, but must all be finite.")
    unknown = [s for s in difficult if s not in symbols]
    if unknown:
        raise ValueError(f"The value of `difficult` names {unknown}, but must be a subset of `symbols`.")
    if n_boot < 1:
        raise ValueError(f"The value of `n_boot` is {n_boot}, but must be > 0.")
    if not 0 < confidence < 1:
        raise ValueError(f"The value of `confidence` is {confidence}, but must be in (0, 1).")
    if seed < 0:
        raise ValueError(f"The value of `seed` is {seed}, but must be >= 0.")

    hard = [i for i, s in enumerate(symbols) if s in difficult]
    rest = [i for i in range(len(symbols)) if i not in hard]
    columns: list[tuple[str, bool, bool, list[int]]] = [(s, False, i in hard, [i]) for i, s in enumerate(symbols)]
    if hard and rest:
        columns += [("difficult", True, True, hard), ("other", True, False, rest)]
    columns.append(("all", True, False, list(range(len(symbols)))))

    hits_a, hits_b = (a <= sdr_mm) * 100.0, (b <= sdr_mm) * 100.0
    per_image = np.stack([m[:, c].mean(1) for m in (a, b, hits_a, hits_b) for _, _, _, c in columns], 1)
    g = len(columns)
    ma, mb, sa, sb = (per_image[:, i * g:(i + 1) * g] for i in range(4))
    diffs = np.hstack([mb - ma, sb - sa])  # (N, 2G): mm differences, then SDR differences
    n = a.shape[0]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    boot = counts @ diffs / n
    tail = 50 * (1 - confidence)
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    est = diffs.mean(0)
    return [PairedDiff(name, grp, dif, n, float(ma[:, j].mean()), float(mb[:, j].mean()),
                       float(est[j]), float(low[j]), float(high[j]),
                       float(sa[:, j].mean()), float(sb[:, j].mean()),
                       float(est[g + j]), float(low[g + j]), float(high[g + j]))
            for j, (name, grp, dif, _) in enumerate(columns)]


def aligned(ref: Scored, other: Scored) -> np.ndarray:
    """`other`'s errors in `ref`'s image and landmark order; fails unless both hold the same images and
    the same landmarks."""
    if set(other.symbols) != set(ref.symbols):
        lost = [s for s in ref.symbols if s not in other.symbols]
        extra = [s for s in other.symbols if s not in ref.symbols]
        raise ValueError(f"{other.source}: not the same landmarks as {ref.source}"
                         + (f"; missing {', '.join(lost)}" if lost else "")
                         + (f"; extra {', '.join(extra)}" if extra else ""))
    if set(other.image_ids) != set(ref.image_ids):
        lost = [s for s in ref.image_ids if s not in set(other.image_ids)]
        extra = [s for s in other.image_ids if s not in set(ref.image_ids)]
        raise ValueError(f"{other.source}: not the same images as {ref.source} (a paired comparison needs the "
                         f"same images): {len(lost)} only in the reference (e.g. {', '.join(lost[:3]) or '-'}), "
                         f"{len(extra)} only here (e.g. {', '.join(extra[:3]) or '-'})")
    rows = {v: i for i, v in enumerate(other.image_ids)}
    cols = {v: i for i, v in enumerate(other.symbols)}
    return other.errors[np.ix_([rows[v] for v in ref.image_ids], [cols[v] for v in ref.symbols])]


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


def group_table(comparisons: list[tuple[str, list[PairedDiff]]]) -> Any:
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


def compute_verdict(scored: dict[str, Scored], n_boot: int, seed: int) -> tuple[Verdict, list[str]]:
    """Compare the start, the best trial and the control (roles of `scored`, each scored on the same images)
    pairwise; returns {(candidate, reference): rows} and the difficult set (the best trial's)."""
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
