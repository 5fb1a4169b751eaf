"""Is this the same radiograph? Content fingerprints that survive re-encoding, re-scaling and tone changes, so a
film copied into two splits under another name is found before it inflates a verdict.

A perceptual hash cannot tell cephalograms apart: every lateral skull film has the same layout, and on the 300
real ISBI 2015 films 5,848 of the 44,850 pairs of different images lie within 10 of the 64 bits of a DCT hash. So
the fingerprint is the image itself, small: a 64 x 64 thumbnail (4 KB, kept in the decoded-image cache's metadata,
made in the decode pass that reads every image anyway), compared in two steps (docs/duplicates.md has the numbers):
- overview: the correlation of the 32 x 32 thumbnails (each normalised, so size and brightness do not matter)
  finds candidates, >= OVERVIEW_MIN;
- detail: the correlation of the 64 x 64 thumbnails' fine structure (each minus its Gaussian blur) confirms,
  >= DETAIL_MIN: a copy keeps every edge where it was, even under another tone curve; another film of the same
  head, taken another time, does not.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

THUMB = 64  # the fingerprint's side in pixels
OVERVIEW = 32
DETAIL_SIGMA = 2.0  # px of the 64-px thumbnail: what the fine structure is the thumbnail minus
OVERVIEW_MIN = 0.95
DETAIL_MIN = 0.92
BLOCK = 2048  # rows of the overview correlation at a time: memory stays flat for any number of images


@dataclass(frozen=True)
class Copy:
    """Two images that are one radiograph: each as (where, image id), `where` a split or a role; both scores."""

    first: tuple[str, str]
    second: tuple[str, str]
    overview: float
    detail: float

    def describe(self) -> str:
        (wa, a), (wb, b) = self.first, self.second
        return (f"{wa} {a} and {wb} {b} are the same radiograph (thumbnail correlation {self.overview:.4f}, fine "
                f"structure {self.detail:.4f})")


def thumbnail(img: np.ndarray) -> np.ndarray:
    """An image's fingerprint: its 64 x 64 thumbnail (area-averaged, aspect not kept: a rescaled copy gives the same)."""
    return cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _overview(thumbs: np.ndarray) -> np.ndarray:
    return _unit_rows(np.stack([cv2.resize(t, (OVERVIEW, OVERVIEW), interpolation=cv2.INTER_AREA) for t in thumbs]))


def _detail(thumbs: np.ndarray) -> np.ndarray:
    f = thumbs.astype(np.float32)
    return _unit_rows(np.stack([t - cv2.GaussianBlur(t, (0, 0), DETAIL_SIGMA) for t in f]))


def find_copies(thumbs: np.ndarray, labels: Sequence[tuple[str, str]]) -> list[Copy]:
    """Every pair of images whose fingerprints (N, 64, 64) say they are one radiograph, most alike first; `labels`
    names each image as (where, image id)."""
    if len(thumbs) != len(labels):
        raise ValueError(f"{len(thumbs)} fingerprints for {len(labels)} images")
    if len(thumbs) < 2:
        return []
    ov = _overview(np.asarray(thumbs))
    pairs = []
    for start in range(0, len(ov), BLOCK):
        corr = ov[start:start + BLOCK] @ ov.T
        i, j = np.nonzero(corr >= OVERVIEW_MIN)
        keep = j > i + start
        pairs += [(a + start, b, corr[a, b]) for a, b in zip(i[keep], j[keep])]
    if not pairs:
        return []
    involved = sorted({k for a, b, _ in pairs for k in (a, b)})
    detail = dict(zip(involved, _detail(np.asarray(thumbs)[involved])))
    found = [Copy(tuple(labels[a]), tuple(labels[b]), float(o), d) for a, b, o in pairs
             if (d := float(detail[a] @ detail[b])) >= DETAIL_MIN]
    return sorted(found, key=lambda c: -c.detail)
