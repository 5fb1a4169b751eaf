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

from .config import rule_error

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
        raise rule_error("len(errors_ref)", 0, "> 0 (images)")
    if len(symbols) != a.shape[1]:
        raise rule_error("len(symbols)", len(symbols), f"{a.shape[1]}, the errors' columns")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("The errors contain non-finite values, but must all be finite.")
    unknown = [s for s in difficult if s not in symbols]
    if unknown:
        raise rule_error("difficult", list(difficult), f"a subset of `symbols` ({unknown} are not)")
    if n_boot < 1:
        raise rule_error("n_boot", n_boot, "> 0")
    if not 0 < confidence < 1:
        raise rule_error("confidence", confidence, "in (0, 1)")
    if seed < 0:
        raise rule_error("seed", seed, ">= 0")

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


def change_text(r: PairedDiff, unit: str = " mm") -> str:
    """candidate - reference in mm with its interval, as the sentences and the report write it (a table whose
    header names the unit leaves it out)."""
    return f"{r.diff_mm:+.3f}{unit} [{r.diff_low_mm:+.3f}, {r.diff_high_mm:+.3f}]"


def _judge_words(r: PairedDiff) -> str:
    return "no clear difference" if not r.significant else "better" if r.diff_mm < 0 else "worse"


@dataclass
class Comparison:
    """`a` against `b` on the verdict split ("best masked" vs "start"): rows are a - b."""

    a: str
    b: str
    rows: list[PairedDiff]

    def group(self, name: str) -> PairedDiff | None:
        return next((r for r in self.rows if r.is_group and r.landmark == name), None)


def compare_models(scored: dict[str, Scored], difficult: Sequence[str], n_boot: int, seed: int) -> list[Comparison]:
    """Each arm's winner against the start, then the winners against each other (in the order given), all
    on the same images. `scored` maps "start", "best masked", "best all", ... to errors on the verdict split."""
    names = [n for n in scored if n != "start"]
    pairs = [(n, "start") for n in names if "start" in scored]
    pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    out = []
    for a, b in pairs:
        ref = scored[b]
        out.append(Comparison(a, b, paired_bootstrap(ref.errors, aligned(ref, scored[a]), ref.symbols,
                                                     [s for s in difficult if s in ref.symbols], n_boot=n_boot,
                                                     seed=seed)))
    return out


def verdict_sentences(comparisons: Sequence[Comparison], split: str, selection: dict[str, float],
                      selection_split: str) -> list[str]:
    """The verdict in words, following the intervals. First whether anything beat the start model on the
    verdict split; then each headline comparison (the difficult set, chosen on the selection split, and all
    landmarks); where the selection split said otherwise, that is said too. `selection` maps the same names
    to their selection-split MRE."""
    vs_start = [c for c in comparisons if c.b == "start"]
    better = [c.a for c in vs_start if (g := c.group("all")) is not None and g.significant and g.diff_mm < 0]
    if vs_start and not better:
        lines = [f"Verdict: nothing beat the start model on {split} (all landmarks): keep the start model."]
    elif vs_start:
        lines = [f"Verdict: {' and '.join(better)} beat the start model on {split} (all landmarks)."]
    else:
        lines = []
    for c in comparisons:
        for name in ("difficult", "all"):
            g = c.group(name)
            if g is None:
                continue
            lines.append(f"{c.a} vs {c.b}, {name} landmarks: {_judge_words(g)} ({change_text(g)}).")
        g = c.group("all")
        if g is not None and c.a in selection and c.b in selection:
            said = selection[c.a] - selection[c.b]
            if (said < 0) != (g.diff_mm < 0) or (g.significant and not said):
                lines.append(f"  note: on the selection split ({selection_split}) {c.a} was "
                             f"{'lower' if said < 0 else 'not lower'} than {c.b} ({said:+.3f} mm); on {split} it is "
                             f"{g.diff_mm:+.3f} mm: the selection split and the verdict split disagree.")
    lines.append("Per-landmark intervals are exploratory (many comparisons); the headline is the difficult set "
                 "and all landmarks.")
    return lines


def others_unchanged(c: Comparison) -> bool:
    """Every landmark outside the difficult set scores the same in both models: equal MRE and SDR and a [0, 0]
    paired interval, which is what bit-identical errors give (a refinement stage leaves those points alone).
    The verdict keeps no per-image errors, so this is read from its per-landmark rows."""
    others = [r for r in c.rows if not r.is_group and not r.difficult]
    return bool(others) and all(r.diff_mm == r.diff_low_mm == r.diff_high_mm == 0 and r.cand_mre_mm == r.ref_mre_mm
                                and r.cand_sdr_2mm == r.ref_sdr_2mm for r in others)


def verdict_headline(comparisons: Sequence[Comparison], split: str) -> str:
    """The report's first sentence: which model to use and what it changes. An arm's winner qualifies only when
    its paired interval against the start lies below 0 on the difficult set (the set a sweep exists to improve;
    all landmarks when there is none) and all landmarks are not clearly worse; of those, the largest gain wins, else
    "keep the start model"."""
    vs_start = [c for c in comparisons if c.b == "start"]
    group = "difficult" if any(c.group("difficult") is not None for c in vs_start) else "all"
    where = "the difficult landmarks" if group == "difficult" else "all landmarks"
    scored = [(c, g) for c in vs_start if (g := c.group(group)) is not None]
    better = sorted(((c, g) for c, g in scored if g.significant and g.diff_mm < 0), key=lambda cg: cg[1].diff_mm)
    harmful = [(c, a) for c, _ in better if group == "difficult" and (a := c.group("all")) is not None
               and a.significant and a.diff_mm > 0]  # a gain bought with the healthy landmarks is no answer
    better = [(c, g) for c, g in better if c not in [h for h, _ in harmful]]
    if not better and harmful:
        return (f"Keep the start model: {harmful[0][0].a} beat it on {where} of {split} but made all landmarks worse "
                f"({change_text(harmful[0][1])}).")
    if not better:
        said = "; ".join(f"{c.a} {change_text(g)}, {_judge_words(g)}" for c, g in scored)
        return (f"Keep the start model: nothing beat it on {where} of {split} "
                f"({f'{scored[0][1].n_images} images; {said}' if scored else 'no arm had a scored trial'}).")
    (c, g), others = better[0], better[1:]
    parts = [f"{where} {change_text(g)}"]
    if group == "difficult" and (a := c.group("all")) is not None:
        parts.append(f"all landmarks {change_text(a)} ({_judge_words(a)})")
    text = (f"Use {c.a}: against the start model on {split} ({g.n_images} images, paired {CONFIDENCE:.0%} "
            f"intervals), {', '.join(parts)}")
    if group == "difficult" and others_unchanged(c):
        text += "; the other landmarks unchanged"
    for o, og in others:
        text += f"; {o.a} also beat it there ({change_text(og)})"
    return text + "."


def verdict_record(comparisons: Sequence[Comparison], split: str, image_ids: Sequence[str],
                   difficult: Sequence[str], n_boot: int, seed: int, **extra: Any) -> dict[str, Any]:
    """What verdict.json holds: the split and its images, the difficult set, and per comparison and group the
    mean difference with its interval (mm) and the SDR@2mm difference with its interval (pp)."""
    rows = [{"a": c.a, "b": c.b, "group": r.landmark, "is_group": r.is_group, "difficult": r.difficult,
             "a_mre_mm": r.cand_mre_mm, "b_mre_mm": r.ref_mre_mm, "a_sdr_2mm": r.cand_sdr_2mm,
             "b_sdr_2mm": r.ref_sdr_2mm, "mean_difference_mm": r.diff_mm,
             "ci_low_mm": r.diff_low_mm, "ci_high_mm": r.diff_high_mm, "sdr_difference_pp": r.sdr_diff_pp,
             "sdr_ci_low_pp": r.sdr_low_pp, "sdr_ci_high_pp": r.sdr_high_pp, "n_images": r.n_images}
            for c in comparisons for r in c.rows]
    return {"split": split, "image_ids": list(image_ids), "difficult": list(difficult), "confidence": CONFIDENCE,
            "bootstrap": n_boot, "seed": seed, **extra, "comparisons": rows}


def comparisons_of(record: dict[str, Any]) -> list[Comparison]:
    """verdict.json's rows back as Comparisons (for the report's figures), in their order."""
    out: dict[tuple[str, str], Comparison] = {}
    for r in record["comparisons"]:
        c = out.setdefault((r["a"], r["b"]), Comparison(r["a"], r["b"], []))
        c.rows.append(PairedDiff(r["group"], r["is_group"], r["difficult"], r["n_images"], r["b_mre_mm"], r["a_mre_mm"],
                                 r["mean_difference_mm"], r["ci_low_mm"], r["ci_high_mm"], r["b_sdr_2mm"],
                                 r["a_sdr_2mm"], r["sdr_difference_pp"], r["sdr_ci_low_pp"], r["sdr_ci_high_pp"]))
    return list(out.values())


def format_verdict(record: dict[str, Any]) -> str:
    """The headline rows of a verdict as a short table."""
    head = f"{'comparison':<28}{'group':<11}{'a mm':>8}{'b mm':>8}{'a - b mm':>10}  {CONFIDENCE:.0%} interval   SDR@2mm pp"
    lines = [head]
    for r in record["comparisons"]:
        if not r["is_group"]:
            continue
        lines.append(f"{r['a'] + ' vs ' + r['b']:<28}{r['group']:<11}{r['a_mre_mm']:>8.3f}{r['b_mre_mm']:>8.3f}"
                     f"{r['mean_difference_mm']:>+10.3f}  [{r['ci_low_mm']:+.3f}, {r['ci_high_mm']:+.3f}]"
                     f"{r['sdr_difference_pp']:>+9.1f}")
    return "\n".join(lines)
