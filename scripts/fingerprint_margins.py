"""How far apart copies and different films lie under fingerprint.py's two scores, on a folder of real films
(docs/duplicates.md): every pair's overview and fine-structure correlations, the copies found, the most alike pair
of different films, and how many pairs a 64-bit DCT hash would put within 10 bits.

    .venv/bin/python scripts/fingerprint_margins.py ../shared/data/isbi2015/images
    .venv/bin/python scripts/fingerprint_margins.py ../shared/data/isbi2015/images --smoke-test   # 20 films
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from tune_landmarks.cache import decode_image
from tune_landmarks.fingerprint import DETAIL_MIN, OVERVIEW_MIN, _detail, _overview, find_copies, thumbnail


def dct_hash(img: np.ndarray) -> np.ndarray:
    """The classic perceptual hash: the 8 x 8 lowest DCT frequencies of a 32 x 32 thumbnail above their median."""
    d = cv2.dct(cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))[:8, :8].ravel()[1:]
    return d > np.median(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--smoke-test", action="store_true", help="the first 20 films only")
    args = p.parse_args()
    paths = sorted(q for q in Path(args.folder).iterdir() if q.suffix.lower() in (".jpg", ".png", ".bmp"))
    paths = paths[:20] if args.smoke_test else paths
    films = [decode_image(q) for q in paths]
    thumbs = np.stack([thumbnail(f) for f in films])
    copies = find_copies(thumbs, [("", q.stem) for q in paths])
    pairs = {(c.first[1], c.second[1]) for c in copies}
    ov, dt = _overview(thumbs), _detail(thumbs)
    overview, detail = ov @ ov.T, dt @ dt.T
    bits = np.stack([dct_hash(f) for f in films])
    i, j = np.triu_indices(len(paths), 1)
    other = np.array([(paths[a].stem, paths[b].stem) not in pairs for a, b in zip(i, j)])
    print(f"{len(paths)} films, {len(i)} pairs; thresholds: overview >= {OVERVIEW_MIN}, fine structure >= {DETAIL_MIN}")
    print(f"copies found: {len(copies)}" + (f"; their lowest overview {min(c.overview for c in copies):.4f}, lowest fine "
                                             f"structure {min(c.detail for c in copies):.4f}" if copies else ""))
    for c in copies:
        print(f"  {c.first[1]} = {c.second[1]}  overview {c.overview:.4f}  fine structure {c.detail:.4f}")
    if other.any():
        cand = other & (overview[i, j] >= OVERVIEW_MIN)
        print(f"different films: highest overview {overview[i, j][other].max():.4f}; {int(cand.sum())} of them pass the "
              "overview; highest fine structure among those: "
              + (f"{detail[i, j][cand].max():.4f}" if cand.any() else "none"))
    ham = (bits[i] != bits[j]).sum(1)
    print(f"a 64-bit DCT hash puts {int((ham[other] <= 10).sum())} pairs of different films within 10 bits")


if __name__ == "__main__":
    main()
