"""The refinement stage's view of an image: resampled once to a fixed physical resolution, then square crops.

Why a second cache: the start model sees the whole image at its input size (256 px on ISBI: 0.76 x 0.94 mm per
input pixel), the refinement stage sees a few millimetres around a landmark at several times that resolution.
Resampling each image to `mm_per_px` from its own pixel spacing makes images of different machines (Aariz has
seven) look alike to the crop network. Like cache.build_cache, each split is decoded once per (dataset content,
split, resolution, annotator), written atomically under a file lock, and memory-mapped by every trial.

Frames, each with pixel centres at integer coordinates (the cache's convention):

    original px  --cache.to_target(scale)-->  physical px  --minus origin-->  crop px

`scale = (W_p / W, H_p / H)` with `W_p = round(W * spacing / mm_per_px)` (cache.resize), and `origin` the crop's
top-left physical pixel: a crop is an affine warp whose linear part is the identity and whose shift is a whole
number of pixels, so taking it resamples nothing (the one resampling is the cached one) and its inverse is exact.
Rotation and scale, for training only, are albumentations' (augment.train_transform) on the crop itself.
Pixels outside the image are 0 (border padding).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .cache import built_once, cache_key, decoded_records, resize, to_original, to_target, write_meta
from .config import DEFAULT_MM_PER_PX, crop_pixels, entry_name, entry_of, rule_message, truth_of
from .read import Record


@dataclass(frozen=True)
class CropGeometry:
    """A square crop of `size` pixels at `mm_per_px`."""

    size: int
    mm_per_px: float

    @classmethod
    def from_mm(cls, crop_mm: float, mm_per_px: float) -> CropGeometry:
        return cls(crop_pixels(crop_mm, mm_per_px), float(mm_per_px))

    @property
    def field_mm(self) -> float:
        return self.size * self.mm_per_px

    def origins(self, centres: np.ndarray) -> np.ndarray:
        """Top-left physical pixel (int) of the crop around each centre (..., 2), physical px: the centre lands
        within half a pixel of the crop's middle, (size - 1) / 2."""
        return np.round(np.asarray(centres, np.float64) - (self.size - 1) / 2).astype(np.int64)


View = tuple[Sequence[np.ndarray], np.ndarray]  # images at one crop resolution, and each one's scale (original -> there)


def crop_side_mm(crop_mm: dict[str, float], symbol: str) -> float:
    """A landmark's crop side from a resolved `refine_crop_mm` (its own entry, else `default`)."""
    side = entry_of(crop_mm, symbol)
    if side is None:
        raise ValueError(f"no crop side for {symbol} in refine_crop_mm {crop_mm}")
    return side


def resolution(mm_per_px: dict[str, float], symbol: str) -> float:
    """A landmark's crop resolution from `refine_mm_per_px` (its own entry, else `default`, else 0.3 mm/px)."""
    return entry_of(mm_per_px, symbol, DEFAULT_MM_PER_PX)


def geometries(crop_mm: dict[str, float], refined: Sequence[str], mm_per_px: dict[str, float]) -> dict[str, CropGeometry]:
    """Each refined landmark's crop: its side (crop_side_mm) at its resolution."""
    return {s: CropGeometry.from_mm(crop_side_mm(crop_mm, s), resolution(mm_per_px, s)) for s in refined}


def views(phys: Mapping[float, PhysicalSplit], idx: Sequence[int] | None = None) -> dict[float, View]:
    """Each resolution's images and scales (of images `idx`, default all) for infer.refine_points."""
    idx = range(len(next(iter(phys.values())))) if idx is None else idx
    return {res: ([p.image(i) for i in idx], p.scale[list(idx)]) for res, p in phys.items()}


def ring_shifts(count: int, size: int) -> np.ndarray:
    """(count, 2) whole-pixel shifts of a landmark's crops for `refine_tta`: the first unshifted, the others evenly
    round a circle of size/8 px. Whole pixels, so a shifted crop still resamples nothing; the same shifts for every
    image and run, so a cascade's points are reproducible."""
    turns = 2 * np.pi * np.arange(count - 1) / max(count - 1, 1)
    ring = np.round(size / 8 * np.stack([np.cos(turns), np.sin(turns)], 1)).astype(np.int64)
    return np.concatenate([np.zeros((1, 2), np.int64), ring])


def size_groups(sizes: Sequence[int]) -> dict[int, list[int]]:
    """Indices by crop size, so that a batch holds crops of one size: crops of different sides are batched apart,
    not padded (padding a 64-px incisor crop to Gonion's 192 px would cost 9x its own forward)."""
    out: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        out.setdefault(int(size), []).append(i)
    return out


def physical_size(width: int, height: int, spacing_mm: float, mm_per_px: float) -> tuple[int, int]:
    """(W_p, H_p): the image's size at `mm_per_px`."""
    f = spacing_mm / mm_per_px
    return max(1, round(width * f)), max(1, round(height * f))


def to_crop(points: np.ndarray, scale: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Original px -> crop px; points (..., 2), scale and origin broadcast against them."""
    return to_target(np.asarray(points, np.float64), scale) - origin


def from_crop(points: np.ndarray, scale: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Crop px -> original px: the exact inverse of `to_crop`."""
    return to_original(np.asarray(points, np.float64) + origin, scale)


def take(image: np.ndarray, origin: Sequence[int], size: int) -> np.ndarray:
    """The (size, size) uint8 crop whose top-left pixel is `origin` (x, y); 0 where it leaves the image."""
    h, w = image.shape[:2]
    x0, y0 = int(origin[0]), int(origin[1])
    out = np.zeros((size, size), np.uint8)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if xb > xa and yb > ya:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya:yb, xa:xb]
    return out


def smallest_extent_mm(spacing_mm: np.ndarray, sizes: np.ndarray) -> float:
    """The shorter side (mm) of the smallest image: no crop may be wider."""
    return float((np.asarray(sizes, np.float64).min(axis=1) * np.asarray(spacing_mm, np.float64)).min())


def check_geometry(mm_per_px: dict[str, float], crops: dict[str, CropGeometry], spacing_mm: np.ndarray,
                   sizes: np.ndarray, image_ids: Sequence[str]) -> None:
    """Refuse crop settings the images cannot serve, before any training: a resolution finer than an image's own
    pixel spacing (the crop would only interpolate), or a landmark's crop wider than an image's shorter side.
    `mm_per_px`: the resolutions by entry (`default` or a landmark), `crops` the crops by landmark (or entry)."""
    spacing_mm = np.asarray(spacing_mm, np.float64)
    coarse = int(np.argmax(spacing_mm))
    for key, res in mm_per_px.items():
        if res < spacing_mm[coarse] - 1e-9:
            raise ValueError(rule_message(entry_name("refine_mm_per_px", key), res,
                                          f">= {spacing_mm[coarse]:g} mm/px, the coarsest pixel spacing of the images "
                                          f"({image_ids[coarse]}): a crop finer than its image only interpolates"))
    extent = np.asarray(sizes, np.float64).min(axis=1) * spacing_mm
    small = int(np.argmin(extent))
    for symbol, geometry in crops.items():
        if geometry.field_mm > extent[small] + 1e-9:
            w, h = np.asarray(sizes)[small]
            raise ValueError(rule_message(entry_name("refine_crop_mm", symbol), round(geometry.field_mm, 6),
                                          f"<= {extent[small]:g} mm, the shorter side of the smallest image "
                                          f"({image_ids[small]}: {w} x {h} px at {spacing_mm[small]:g} mm/px) "
                                          f"(the crop is {geometry.size} px at {geometry.mm_per_px:g} mm/px)"))


@dataclass
class PhysicalSplit:
    """A split's images at `mm_per_px` (one flat memory-mapped uint8 array, shared between processes) and their
    geometry; images are in the records' order, as in cache.CachedSplit."""

    path: Path
    image_ids: list[str]
    pixels: np.ndarray  # (sum of W_p * H_p,) uint8, memory-mapped read-only (raw bytes: written as decoded)
    offset: np.ndarray  # (N,) start of each image in `pixels`
    shape: np.ndarray  # (N, 2) W_p, H_p
    scale: np.ndarray  # (N, 2) original px -> physical px, as cache.to_target takes it
    orig_size: np.ndarray  # (N, 2) W, H
    spacing_mm: np.ndarray  # (N,)
    keypoints_orig: np.ndarray  # (N, K, 2) original px

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, i: int) -> np.ndarray:
        w, h = self.shape[i]
        return self.pixels[self.offset[i]:self.offset[i] + w * h].reshape(h, w)

    def images(self) -> list[np.ndarray]:
        return [self.image(i) for i in range(len(self))]


def _load(path: Path) -> PhysicalSplit:
    with pa.memory_map(str(path / "meta.arrow")) as src:
        t = ipc.open_file(src).read_all()
    n = t.num_rows
    col = t.column
    return PhysicalSplit(
        path=path, image_ids=col("image_id").to_pylist(),
        pixels=np.memmap(path / "pixels.u8", dtype=np.uint8, mode="r"), offset=col("offset").to_numpy().astype(np.int64),
        shape=np.stack([col("width_p").to_numpy(), col("height_p").to_numpy()], 1).astype(np.int64),
        scale=np.stack([col("scale_x").to_numpy(), col("scale_y").to_numpy()], 1),
        orig_size=np.stack([col("width").to_numpy(), col("height").to_numpy()], 1),
        spacing_mm=col("spacing_mm").to_numpy().astype(np.float64),
        keypoints_orig=np.asarray(col("keypoints_orig").to_pylist(), dtype=np.float64).reshape(n, -1, 2))


def build_physical_cache(records: list[Record], split: str, mm_per_px: float, annotator: str,
                         cache_root: str | Path | None = None, progress: bool = True) -> PhysicalSplit:
    """The split at `mm_per_px`, built (atomically, under a file lock) if absent or stale; keyed like
    cache.build_cache by every image's path, size, mtime and annotation."""
    if not records:
        raise ValueError(f"split {split!r}: nothing to cache (no records)")

    def build(tmp: Path) -> None:
        cols: dict[str, list] = {k: [] for k in ("image_id", "offset", "width_p", "height_p", "scale_x", "scale_y",
                                                 "width", "height", "spacing_mm", "keypoints_orig")}
        offset = 0
        with open(tmp / "pixels.u8", "wb") as out:
            for _, r, img in decoded_records(records, split, f"caching {split} at {mm_per_px:g} mm/px", progress):
                small, scale = resize(img, physical_size(img.shape[1], img.shape[0], r.spacing_mm, mm_per_px))
                out.write(np.ascontiguousarray(small).tobytes())
                for k, v in (("image_id", r.image_id), ("offset", offset), ("width_p", small.shape[1]),
                             ("height_p", small.shape[0]), ("scale_x", float(scale[0])), ("scale_y", float(scale[1])),
                             ("width", img.shape[1]), ("height", img.shape[0]), ("spacing_mm", float(r.spacing_mm)),
                             ("keypoints_orig", r.keypoints.ravel().tolist())):
                    cols[k].append(v)
                offset += small.size
        write_meta(tmp, cols)

    annotator = truth_of(annotator)  # `both` is judged on the mean: the same entry
    key = cache_key(records, "physical", split, mm_per_px, annotator)
    return built_once(cache_root, f"{split}-{mm_per_px:g}mmpx-{annotator}-{key}", build, _load)
