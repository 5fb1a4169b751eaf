"""Dataset checks beyond reading the files: one full decode of every image, and how far the two annotators
(senior, junior) disagree per landmark.

The disagreement bounds what a model can reach on a landmark: an error close to the annotators' own
distance has little left to gain. A pair far beyond the usual spread is more likely a stray click.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cache import decode_pass
from .read import DatasetInfo, Record, Split, read_split

log = logging.getLogger(__name__)

# On ISBI 2015 (train + test1, 5,700 pairs) 15 mm lies above the largest senior-junior distance of 16 of the
# 19 landmarks and flags 10 pairs (0.18 %): seven soft-tissue pogonions, one sella, one nasion. The 99th
# percentile (10.8 mm) would flag 87 pairs, most of them Pog`, whose median is already 7.3 mm.
DEFAULT_MAX_DISAGREEMENT_MM = 15.0

PAIR_SCHEMA = pa.schema([("split", pa.string()), ("image_id", pa.string()), ("landmark", pa.string()),
                         ("senior_x", pa.float64()), ("senior_y", pa.float64()), ("junior_x", pa.float64()),
                         ("junior_y", pa.float64()), ("spacing_mm", pa.float64()), ("distance_mm", pa.float64())])


def decode_check(records: Sequence[Record], split: str, progress: bool = True) -> tuple[list[str], list[tuple[int, int]]]:
    """Decode every record's image completely, once (the cache build's pass, same progress bar): the problems,
    each naming its file, and the (width, height) of the images that decoded."""
    problems, sizes = [], []
    for img, problem in decode_pass([r.image_path for r in records], f"checking {split}: decoding", progress):
        if img is None:
            problems.append(problem or "")
        else:
            sizes.append((img.shape[1], img.shape[0]))
    return problems, sizes


def pair_distances(sp: Split, syms: Sequence[str]) -> pa.Table:
    """One row per usable image x landmark: both annotators' points and their distance in mm (pixels times the
    image's spacing). Empty when the split was not read with both annotators (`annotator="mean"`)."""
    senior, junior = sp.annotations.get("senior", {}), sp.annotations.get("junior", {})
    rows = [r for r in sp.records if r.image_id in senior and r.image_id in junior]
    if not rows:
        return PAIR_SCHEMA.empty_table()
    s = np.stack([senior[r.image_id] for r in rows])  # (N, K, 2)
    j = np.stack([junior[r.image_id] for r in rows])
    spacing = np.repeat([r.spacing_mm for r in rows], len(syms))
    dist = np.linalg.norm(s - j, axis=2).ravel() * spacing
    return pa.table({
        "split": [sp.name] * dist.size,
        "image_id": np.repeat([r.image_id for r in rows], len(syms)).tolist(),
        "landmark": list(syms) * len(rows),
        "senior_x": s[..., 0].ravel(), "senior_y": s[..., 1].ravel(),
        "junior_x": j[..., 0].ravel(), "junior_y": j[..., 1].ravel(),
        "spacing_mm": spacing, "distance_mm": dist,
    }, schema=PAIR_SCHEMA)


def summarise(pairs: pa.Table, syms: Sequence[str], max_mm: float = DEFAULT_MAX_DISAGREEMENT_MM) -> pa.Table:
    """Per landmark, in catalogue order: pairs, mean, median, 95th percentile (numpy's linear interpolation) and
    max distance in mm, where the max is, and how many pairs lie beyond `max_mm`."""
    lm = pairs.column("landmark").to_numpy(zero_copy_only=False)
    dist = pairs.column("distance_mm").to_numpy()
    where = [f"{a}/{b}" for a, b in zip(pairs.column("split").to_pylist(), pairs.column("image_id").to_pylist())]
    cols: dict[str, list] = {k: [] for k in ("landmark", "pairs", "mean_mm", "median_mm", "p95_mm", "max_mm",
                                             "max_image", "over_max")}
    for sym in syms:
        idx = np.flatnonzero(lm == sym)
        d = dist[idx]
        cols["landmark"].append(sym)
        cols["pairs"].append(int(d.size))
        cols["mean_mm"].append(float(d.mean()) if d.size else None)
        cols["median_mm"].append(float(np.median(d)) if d.size else None)
        cols["p95_mm"].append(float(np.percentile(d, 95)) if d.size else None)
        cols["max_mm"].append(float(d.max()) if d.size else None)
        cols["max_image"].append(where[idx[d.argmax()]] if d.size else None)
        cols["over_max"].append(int((d > max_mm).sum()))
    table = pa.table(cols, schema=pa.schema([("landmark", pa.string()), ("pairs", pa.int64()), ("mean_mm", pa.float64()),
                                             ("median_mm", pa.float64()), ("p95_mm", pa.float64()),
                                             ("max_mm", pa.float64()), ("max_image", pa.string()),
                                             ("over_max", pa.int64())]))
    return table.replace_schema_metadata({"max_disagreement_mm": str(max_mm)})


def far_pairs(pairs: pa.Table, max_mm: float = DEFAULT_MAX_DISAGREEMENT_MM) -> pa.Table:
    """The pairs beyond `max_mm`, farthest first."""
    far = pairs.filter(pc.greater(pairs.column("distance_mm"), max_mm))
    return far.sort_by([("distance_mm", "descending")])


def disagreement_table(info: DatasetInfo, splits: Sequence[str] | None = None,
                       max_mm: float = DEFAULT_MAX_DISAGREEMENT_MM) -> pa.Table:
    """Per-landmark senior-junior distance (the `summarise` columns) over `splits` (default: every split
    present), to set beside a model's per-landmark error. Images with problems are left out (and logged)."""
    tables = []
    for name in splits or info.splits:
        sp = read_split(info, name, "mean")
        if sp.problems:
            log.warning("split %s: %d problem(s); %d image(s) left out of the disagreement", name, len(sp.problems),
                        len(sp.bad_images))
        tables.append(pair_distances(sp, info.symbols))
    pairs = pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()
    return summarise(pairs, info.symbols, max_mm)


def format_summary(summary: pa.Table, max_mm: float) -> str:
    """The per-landmark table as text, for `check-dataset --report`."""
    lines = [f"{'landmark':<9}{'pairs':>6}{'mean':>7}{'median':>8}{'p95':>7}{'max':>7}  {'(where)':<16}{f'> {max_mm:g} mm':>9}"]
    for row in summary.to_pylist():
        if not row["pairs"]:
            lines.append(f"{row['landmark']:<9}{0:>6}")
            continue
        lines.append(f"{row['landmark']:<9}{row['pairs']:>6}{row['mean_mm']:>7.2f}{row['median_mm']:>8.2f}{row['p95_mm']:>7.2f}"
                     f"{row['max_mm']:>7.2f}  {row['max_image']:<16}{row['over_max']:>9}")
    return "\n".join(lines)
