"""Dataset checks beyond reading the files: one full decode of every image, and how far the two annotators
(senior, junior) disagree per landmark.

The disagreement bounds what a model can reach on a landmark: an error close to the annotators' own
distance has little left to gain. A pair far beyond the usual spread is more likely a stray click.

The `check-dataset` command is audit.py's: these checks, then (`--audit MODEL`) a model's look at every annotation,
which predicts and so sits above this module.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cache import CachedSplit, decode_pass
from .fingerprint import THUMB, Copy, find_copies, thumbnail
from .read import DatasetError, DatasetInfo, Record, Split, read_split

log = logging.getLogger(__name__)

# On ISBI 2015 (train + test1, 5,700 pairs) 15 mm lies above the largest senior-junior distance of 16 of the
# 19 landmarks and flags 10 pairs (0.18 %): seven soft-tissue pogonions, one sella, one nasion. The 99th
# percentile (10.8 mm) would flag 87 pairs, most of them Pog`, whose median is already 7.3 mm.
DEFAULT_MAX_DISAGREEMENT_MM = 15.0

PAIR_SCHEMA = pa.schema([("split", pa.string()), ("image_id", pa.string()), ("landmark", pa.string()),
                         ("senior_x", pa.float64()), ("senior_y", pa.float64()), ("junior_x", pa.float64()),
                         ("junior_y", pa.float64()), ("spacing_mm", pa.float64()), ("distance_mm", pa.float64())])


def decode_check(records: Sequence[Record], split: str, progress: bool = True) -> tuple[list[str], list[tuple[int, int]],
                                                                                     list[str], np.ndarray]:
    """Decode every record's image completely, once (the cache build's pass, same progress bar): the problems,
    each naming its file, and of the images that decoded their (width, height), ids and fingerprints (N, 64, 64)."""
    problems, sizes, ids, thumbs = [], [], [], []
    for r, (img, problem) in zip(records, decode_pass([r.image_path for r in records], f"checking {split}: decoding",
                                                      progress)):
        if img is None:
            problems.append(problem or "")
        else:
            sizes.append((img.shape[1], img.shape[0]))
            ids.append(r.image_id)
            thumbs.append(thumbnail(img))
    return problems, sizes, ids, np.array(thumbs, np.uint8).reshape(-1, THUMB, THUMB)


ROLE_WORDS = {"train": "training", "val": "selection", "test": "verdict"}


def shared_films(cached: dict[str, tuple[str, CachedSplit]]) -> tuple[list[Copy], list[Copy]]:
    """Radiographs found twice among the roles' cached images (role -> (split spec, cache)), by their fingerprints:
    (copies across two roles, copies inside one role)."""
    labels = [(f"{ROLE_WORDS[role]} split {spec!r}", i) for role, (spec, c) in cached.items() for i in c.image_ids]
    copies = find_copies(np.concatenate([c.thumbs for _, c in cached.values()]), labels)
    return [c for c in copies if c.first[0] != c.second[0]], [c for c in copies if c.first[0] == c.second[0]]


def refuse_shared_films(root: Path, cached: dict[str, tuple[str, CachedSplit]], allow: bool) -> list[Copy]:
    """A radiograph in two roles trains on, or chooses with, what then judges: refused (one DatasetError naming every
    pair and both roles), unless `allow` (--allow-duplicates), which goes on with a warning; a copy inside one role is
    a warning. Returns the copies across roles that were allowed."""
    across, within = shared_films(cached)
    for c in within:
        log.warning(f"a copy inside one role: {c.describe()}")
    if across and not allow:
        held = sorted({side[1] for c in across for side in (c.first, c.second) if not side[0].startswith("training")})
        raise DatasetError(root, [c.describe() for c in across] + [
            f"{len(across)} radiograph(s) are in two roles: every figure judged on them is inflated. Leave one of each "
            f"pair out with --skip-images (e.g. the held-out copies: --skip-images {','.join(held)}), or go on anyway "
            "with --allow-duplicates (recorded in the run's config and the verdict)"])
    if across:
        log.warning(f"--allow-duplicates: going on with {len(across)} radiograph(s) in two roles: "
                    + "; ".join(c.describe() for c in across))
    return across


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


@dataclass
class Checked:
    """What `check_dataset` read and found: the problems, and per split the images a command that goes on from the
    check (the audit) can use as they are: readable annotations, decoded completely."""

    info: DatasetInfo
    records: dict[str, list[Record]]  # split -> its usable records, in order
    problems: list[str]


def check_dataset(args: argparse.Namespace) -> Checked:
    """`check-dataset`'s checks (its options in `args`): read every split, decode every image once, find radiographs
    in two splits, measure the annotators' disagreement; print what it finds, warnings included. Pairs beyond
    --max-disagreement-mm are problems with --strict. `finish` reports the problems."""
    from .atomic import write_parquet
    from .read import describe, spacing_range

    info = describe(args.path, args.format)
    print(f"{info.root}: {info.format} layout, {len(info.symbols)} landmarks, splits: {', '.join(info.splits)}")
    problems: list[str] = []
    usable: dict[str, list[Record]] = {}
    pair_tables = [PAIR_SCHEMA.empty_table()]
    labels, thumbs = [], []
    for split in info.splits:
        sp = read_split(info, split, args.annotator, frozenset(args.skip_images))
        broken, sizes, ids, fingerprints = decode_check(sp.records, split, args.progress)
        decoded = set(ids)
        usable[split] = [r for r in sp.records if r.image_id in decoded]
        labels += [(f"split {split!r}", i) for i in ids]
        thumbs.append(fingerprints)
        problems += sp.problems + broken
        pair_tables.append(pair_distances(sp, info.symbols))
        ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
        lo, hi = spacing_range(sp.records)
        bad = len(sp.bad_images) + len(broken)
        print(f"  {split:<6} {len(sizes):>5} images  {len(info.symbols)} landmarks  "
              + (f"size {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px  spacing {lo:g}-{hi:g} mm/px" if ws else "")
              + (f"  ({bad} with problems)" if bad else ""))
    _print_roles(info, args)
    copies = find_copies(np.concatenate(thumbs), labels)
    problems += [c.describe() for c in copies if c.first[0] != c.second[0]]
    within = [c.describe() for c in copies if c.first[0] == c.second[0]]
    if within:
        print(f"{len(within)} warning(s): a radiograph twice inside one split (roles carved from it may hold one each):")
        for w in within:
            print(f"  - {w}")
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
    return Checked(info, usable, problems)


def finish(problems: Sequence[str]) -> int:
    """`check-dataset`'s last word: every problem and exit 1, or "ok" and 0."""
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
        roles = load_roles(info, args.train_split, args.val_split, args.test_split, args.annotator, skip_bad=True,
                           skip_images=args.skip_images)
    except ValueError as exc:
        print(f"roles: refused — {str(exc).splitlines()[0]}")
        return
    names = {"train": "training", "val": "selection (--val-split)", "test": "verdict (--test-split)"}
    print("roles a run or sweep would use: " + ", ".join(f"{names[role]} {v['spec']} {len(v['image_ids'])} images"
                                                          for role, v in roles.ids().items()))
