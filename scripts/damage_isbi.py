"""A copy of ISBI 2015 with annotations that do not belong to their film, to see what `check-dataset --audit` finds
(docs/audit.md): test1 160 stored mirrored, train 050's points scaled by 0.8 (both annotators, as if annotated at
another resolution), the rows of test1 170 and 230 swapped in both annotators' CSVs. Every other film is a symlink to
the real one; nothing is copied into the repository.

    .venv/bin/python scripts/damage_isbi.py ../shared/data/isbi2015 /tmp/isbi_damaged
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import cv2

MIRRORED, SCALED, SWAPPED = "160.jpg", "050.jpg", ("170.jpg", "230.jpg")


def damage(src: Path, dst: Path) -> None:
    (dst / "images").mkdir(parents=True)
    for p in sorted((src / "images").iterdir()):
        if p.name != MIRRORED:
            os.symlink(p.resolve(), dst / "images" / p.name)
    film = cv2.imread(str(src / "images" / MIRRORED), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(dst / "images" / MIRRORED), cv2.flip(film, 1))
    for table in sorted(src.glob("*_*.csv")):
        rows = list(csv.reader(open(table, newline="")))
        at = {r[0]: i for i, r in enumerate(rows)}
        if SCALED in at:
            row = rows[at[SCALED]]
            rows[at[SCALED]] = [row[0]] + [str(round(int(v) * 0.8)) for v in row[1:]]
        if all(name in at for name in SWAPPED):
            a, b = (at[name] for name in SWAPPED)
            rows[a], rows[b] = [rows[a][0]] + rows[b][1:], [rows[b][0]] + rows[a][1:]
        with open(dst / table.name, "w", newline="") as f:
            csv.writer(f).writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("isbi", type=Path, help="the real ISBI 2015 folder")
    p.add_argument("out", type=Path, help="the damaged copy to write (must not exist)")
    args = p.parse_args()
    damage(args.isbi, args.out)
    print(f"wrote {args.out}: {MIRRORED} mirrored, {SCALED} scaled by 0.8, {' and '.join(SWAPPED)} swapped")


if __name__ == "__main__":
    main()
