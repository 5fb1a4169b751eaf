"""Radial errors in millimetres and their summaries (MRE +- SD, SDR, per-landmark, difficult vs rest).

A hit for SDR is error <= threshold, as in the ISBI 2015 official evaluation code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

SDR_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)


def finite_or_none(v: object) -> float | None:
    """A metric as a float, or None where it does not apply (NaN, missing): JSON and Parquet have no NaN."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def radial_errors_mm(pred: np.ndarray, true: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """pred, true (N, K, 2) original pixels; spacing (N,) mm/px per image -> (N, K) mm."""
    return np.linalg.norm(np.asarray(pred, float) - np.asarray(true, float), axis=-1) * np.asarray(spacing_mm, float)[:, None]


@dataclass
class Summary:
    mre: float
    sd: float
    sdr: dict[float, float]
    per_landmark: dict[str, float]
    mre_difficult: float = float("nan")
    mre_other: float = float("nan")
    drift: dict[str, float] = field(default_factory=dict)  # error - start error, for the untrained landmarks

    @property
    def max_drift(self) -> float:
        return max(self.drift.values()) if self.drift else float("nan")

    def flat(self) -> dict[str, float]:
        """The scalar metrics a trial reports each epoch."""
        out = {"val_mre": self.mre, "val_sd": self.sd, "val_mre_difficult": self.mre_difficult,
               "val_mre_other": self.mre_other, "max_drift": self.max_drift,
               "mean_drift": float(np.mean(list(self.drift.values()))) if self.drift else float("nan")}
        for t, v in self.sdr.items():
            out[f"sdr_{t:g}mm".replace(".", "_")] = v
        return out


def summarize(errors: np.ndarray, symbols: list[str], difficult: list[str] | None = None,
              start_per_landmark: dict[str, float] | None = None, trained: list[str] | None = None) -> Summary:
    """errors (N, K) mm. `trained` are the landmarks in the loss; drift is reported for the rest."""
    errors = np.asarray(errors, float)
    per = {s: float(errors[:, i].mean()) for i, s in enumerate(symbols)}
    hard = [i for i, s in enumerate(symbols) if difficult and s in difficult]
    rest = [i for i in range(len(symbols)) if i not in hard]
    summ = Summary(
        mre=float(errors.mean()),
        sd=float(errors.std()),
        sdr={t: float((errors <= t).mean() * 100) for t in SDR_THRESHOLDS_MM},
        per_landmark=per,
        mre_difficult=float(errors[:, hard].mean()) if hard else float("nan"),
        mre_other=float(errors[:, rest].mean()) if rest and hard else float("nan"),
    )
    if start_per_landmark:
        untrained = [s for s in symbols if trained is not None and s not in trained]
        summ.drift = {s: per[s] - start_per_landmark[s] for s in untrained if s in start_per_landmark}
    return summ


def format_table(summ: Summary, difficult: list[str] | None = None, start: dict[str, float] | None = None) -> str:
    """Per-landmark table sorted by error (worst first), then the totals."""
    lines = [f"{'landmark':<9}{'MRE mm':>9}" + (f"{'start':>9}{'change':>9}" if start else "") + "  difficult"]
    for s, v in sorted(summ.per_landmark.items(), key=lambda kv: -kv[1]):
        row = f"{s:<9}{v:>9.3f}"
        if start:
            row += f"{start.get(s, float('nan')):>9.3f}{v - start.get(s, float('nan')):>+9.3f}"
        lines.append(row + ("  *" if difficult and s in difficult else ""))
    lines.append(f"MRE {summ.mre:.3f} +- {summ.sd:.3f} mm; " + ", ".join(f"SDR@{t:g}mm {v:.1f}%" for t, v in summ.sdr.items()))
    if difficult:
        lines.append(f"difficult MRE {summ.mre_difficult:.3f} mm, others {summ.mre_other:.3f} mm"
                     + (f", max drift {summ.max_drift:+.3f} mm" if summ.drift else ""))
    return "\n".join(lines)


def format_landmark_sdr(errors: np.ndarray, symbols: list[str]) -> str:
    """Per landmark, in the model's order: MRE +- SD and the SDR at each threshold (what a user's own evaluation
    script prints, to hold an import against)."""
    errors = np.asarray(errors, float)
    head = "".join(f"{f'SDR@{t:g}':>10}" for t in SDR_THRESHOLDS_MM)
    lines = [f"{'landmark':<9}{'MRE mm':>9}{'SD':>8}{head}"]
    for i, s in enumerate(symbols):
        e = errors[:, i]
        sdr = "".join(f"{(e <= t).mean() * 100:>9.1f}%" for t in SDR_THRESHOLDS_MM)
        lines.append(f"{s:<9}{e.mean():>9.3f}{e.std():>8.3f}{sdr}")
    return "\n".join(lines)


def predictions_table(image_ids: list[str], symbols: list[str], pred: np.ndarray, true: np.ndarray,
                      errors: np.ndarray) -> pa.Table:
    """One row per image x landmark (what `evaluate --out` writes)."""
    n, k = errors.shape
    return pa.table({
        "image_id": np.repeat(np.asarray(image_ids, dtype=object), k).tolist(),
        "symbol": list(symbols) * n,
        "pred_x": pred[..., 0].ravel().astype(float), "pred_y": pred[..., 1].ravel().astype(float),
        "true_x": true[..., 0].ravel().astype(float), "true_y": true[..., 1].ravel().astype(float),
        "error_mm": errors.ravel().astype(float),
    })
