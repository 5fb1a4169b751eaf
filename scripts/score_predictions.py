"""Score `tune-landmarks predict` JSON files against ISBI 2015 CSV annotations, independently of the
training code's metric path (only the csv/json standard library and numpy are used).

    python scripts/score_predictions.py --pred OUT_DIR --csv ../shared/data/isbi2015/test1_senior.csv \
        [--csv ../shared/data/isbi2015/test1_junior.csv]   # two CSVs: scored against ceil(mean)
    python scripts/score_predictions.py --smoke-test
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

ISBI_ORDER = ["S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "Ls", "Li", "Sn", "Pog`", "PNS",
              "ANS", "Ar"]
SPACING_MM = 0.1


def read_truth(paths: list[Path]) -> dict[str, np.ndarray]:
    """image stem -> (19, 2); with two annotators, ceil of their mean (the tool's default ground truth)."""
    tables = []
    for p in paths:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))[1:]
        tables.append({Path(r[0]).stem: np.array([float(v) for v in r[1:]]).reshape(19, 2) for r in rows if r})
    if len(tables) == 1:
        return tables[0]
    return {k: np.ceil((tables[0][k] + tables[1][k]) / 2) for k in tables[0] if k in tables[1]}


def score(pred_dir: Path, truth: dict[str, np.ndarray]) -> dict[str, float]:
    errors = []
    for stem, true in sorted(truth.items()):
        f = pred_dir / f"{stem}.json"
        if not f.is_file():
            sys.exit(f"{f}: no prediction for image {stem}")
        by_symbol = {lm["symbol"]: (lm["value"]["x"], lm["value"]["y"]) for lm in json.loads(f.read_text())["landmarks"]}
        pred = np.array([by_symbol[s] for s in ISBI_ORDER], dtype=float)
        errors.append(np.linalg.norm(pred - true, axis=1) * SPACING_MM)
    e = np.array(errors)
    out = {"images": len(e), "mre_mm": float(e.mean()), "sd_mm": float(e.std())}
    out |= {f"sdr_{t:g}mm": float((e <= t).mean() * 100) for t in (2.0, 2.5, 3.0, 4.0)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, help="folder of predicted <image>.json files")
    p.add_argument("--csv", type=Path, action="append", help="ISBI annotation CSV (give two to score the mean)")
    p.add_argument("--smoke-test", action="store_true", help="score the annotation itself as a prediction (MRE 0)")
    a = p.parse_args()
    if a.smoke_test:
        import tempfile

        root = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "isbi2015"
        a.csv = [root / "test1_senior.csv"]
        a.pred = Path(tempfile.mkdtemp())
        for stem, kps in list(read_truth(a.csv).items())[:5]:
            (a.pred / f"{stem}.json").write_text(json.dumps({"ceph_id": stem, "landmarks": [
                {"symbol": s, "value": {"x": x, "y": y}} for s, (x, y) in zip(ISBI_ORDER, kps)]}))
        truth = {k: v for k, v in read_truth(a.csv).items() if (a.pred / f"{k}.json").is_file()}
        res = score(a.pred, truth)
        assert math.isclose(res["mre_mm"], 0.0), res
    else:
        if not (a.pred and a.csv):
            p.error("--pred and --csv are required (or --smoke-test)")
        res = score(a.pred, read_truth(a.csv))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
