"""Decoded-image cache: decode each image once per (dataset content, split, size, annotator).

Decoding a 2000-px JPEG/BMP costs far more than augmenting it, so a sweep decodes every image once
and all trials (processes) read the resized uint8 pixels from one memory-mapped `.npy` file.

Resize convention (invertible, documented in the README): `x_t = (x + 0.5) * sx - 0.5` with `sx = W_t / W` the
scale of the resized content (pixel centres aligned, as cv2.resize does), so `x = (x_t + 0.5) / sx - 0.5` maps
predictions back to original pixels exactly. `stretch` scales each axis on its own to the input size; `letterbox`
keeps the aspect ratio and pads the right or bottom with zeros, which leaves the same formulas exact.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from .atomic import staged_dir
from .config import truth_of
from .dicom import PREAMBLE_END, decode_dicom, is_dicom
from .fingerprint import THUMB, thumbnail
from .read import DatasetError, Record, completeness_problem

CACHE_VERSION = 2  # 2: each image's fingerprint (fingerprint.thumbnail) in meta.arrow
T = TypeVar("T")


def default_cache_root() -> Path:
    return Path(os.environ.get("TUNE_LANDMARKS_CACHE", Path.home() / ".cache" / "tune_landmarks")).resolve()


def to_target(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Original pixels -> resized frame; points (..., 2), scale (..., 2) as (sx, sy)."""
    return (points + 0.5) * scale - 0.5


def to_original(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Resized frame -> original pixels (the exact inverse of `to_target`)."""
    return (points + 0.5) / scale - 0.5


def decode_image(path: str | Path) -> np.ndarray:
    """Any png/jpg/bmp, grey or 3-channel, or a DICOM file (dicom.decode_dicom), as a 2-D uint8 array; OSError if
    it does not decode completely.

    The file's structure is checked before decoding because cv2.imread returns a cut JPEG with its missing
    rows grey; the bytes are read once and decoded from memory."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        raise OSError(f"{path}: image is missing or unreadable") from None
    if is_dicom(path, data[:PREAMBLE_END]):
        return decode_dicom(path, data)
    why = completeness_problem(data)
    if why:
        raise OSError(f"{path}: image is truncated or corrupt ({why})")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"{path}: image is truncated or corrupt (OpenCV cannot decode it)")
    return img


def decode_pass(paths: Sequence[Path], desc: str, progress: bool = True) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """(image, None) or (None, problem) per path, in order, under one progress bar: the single full decode
    that both the cache build and `check-dataset` run, so no image is decoded twice to be checked."""
    for path in tqdm(paths, desc=desc, disable=not progress, leave=False):
        try:
            yield decode_image(path), None
        except (OSError, cv2.error) as exc:
            yield None, str(exc)


def decoded_records(records: list[Record], split: str, desc: str, progress: bool) -> Iterator[tuple[int, Record, np.ndarray]]:
    """(index, record, image) of each record in order, for a cache build (decode_pass). After a bad file the
    pass goes on decoding only to name every bad one, then one DatasetError names them all: nothing is cached."""
    problems: list[str] = []
    for i, (r, (img, problem)) in enumerate(zip(records, decode_pass([r.image_path for r in records], desc, progress))):
        if problem:
            problems.append(problem)
        elif not problems:
            yield i, r, img
    if problems:
        root_dir = Path(os.path.commonpath([r.image_path.parent for r in records]))
        raise DatasetError(root_dir, problems + [f"nothing cached for split {split!r}: fix or remove the image(s) "
                                                 "named above"])


def write_meta(folder: Path, cols: dict[str, list]) -> None:
    """A cache entry's per-image table, meta.arrow; written last, so its presence marks the entry complete."""
    with ipc.new_file(str(folder / "meta.arrow"), (t := pa.table(cols)).schema) as w:
        w.write_table(t)


INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def resize(img: np.ndarray, size: tuple[int, int], mode: str = "stretch",
           interpolation: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Resize to (W, H) (`mode` stretch or letterbox, see the module docstring); returns the image and the per-axis
    scale (sx, sy) of its content. `auto` interpolation: area when shrinking, else linear."""
    h, w = img.shape[:2]
    tw, th = size
    if mode == "letterbox":
        f = min(tw / w, th / h)
        cw, ch = min(tw, max(1, round(w * f))), min(th, max(1, round(h * f)))
    else:
        cw, ch = tw, th
    interp = INTERPOLATION.get(interpolation, cv2.INTER_AREA if cw < w or ch < h else cv2.INTER_LINEAR)
    content = cv2.resize(img, (cw, ch), interpolation=interp)
    if (cw, ch) != (tw, th):
        out = np.zeros((th, tw), img.dtype)
        out[:ch, :cw] = content
        content = out
    return content, np.array([cw / w, ch / h], dtype=np.float64)


@dataclass
class CachedSplit:
    """A split's decoded images (memory-mapped, shared between processes) and their geometry."""

    path: Path
    image_ids: list[str]
    images: np.ndarray  # (N, H, W) uint8, memory-mapped read-only
    keypoints: np.ndarray  # (N, K, 2) float64 in the resized frame
    keypoints_orig: np.ndarray  # (N, K, 2) float64 in original pixels
    scale: np.ndarray  # (N, 2) sx, sy
    orig_size: np.ndarray  # (N, 2) W, H
    spacing_mm: np.ndarray  # (N,)
    thumbs: np.ndarray  # (N, 64, 64) uint8: each image's fingerprint, made in the decode pass (fingerprint.py)

    def __len__(self) -> int:
        return len(self.image_ids)


def cache_key(records: list[Record], *what: Any) -> str:
    """A cache entry's key: `what` it holds (JSON values: the kind, split, size or resolution, annotator) and every
    record's image (path, size, mtime) and annotation, so an edited file or annotation makes a new entry."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, *what]).encode())
    for r in records:
        st = r.image_path.stat()
        h.update(json.dumps([r.image_id, str(r.image_path), st.st_size, st.st_mtime_ns, r.spacing_mm,
                             np.round(r.keypoints, 4).tolist()]).encode())
    return h.hexdigest()[:24]


def _load(path: Path) -> CachedSplit:
    with pa.memory_map(str(path / "meta.arrow")) as src:
        t = ipc.open_file(src).read_all()
    n = t.num_rows
    kps = np.asarray(t.column("keypoints").to_pylist(), dtype=np.float64).reshape(n, -1, 2)
    kps_o = np.asarray(t.column("keypoints_orig").to_pylist(), dtype=np.float64).reshape(n, -1, 2)
    return CachedSplit(
        path=path,
        image_ids=t.column("image_id").to_pylist(),
        images=np.load(path / "images.npy", mmap_mode="r"),
        keypoints=kps,
        keypoints_orig=kps_o,
        scale=np.stack([t.column("scale_x").to_numpy(), t.column("scale_y").to_numpy()], 1),
        orig_size=np.stack([t.column("width").to_numpy(), t.column("height").to_numpy()], 1),
        spacing_mm=t.column("spacing_mm").to_numpy().astype(np.float64),
        thumbs=np.frombuffer(b"".join(t.column("thumb").to_pylist()), np.uint8).reshape(n, THUMB, THUMB),
    )


def built_once(cache_root: str | Path | None, name: str, build: Callable[[Path], None],
               load: Callable[[Path], T]) -> T:
    """The cache entry `name`: loaded when complete (its meta.arrow is written last), else built by `build` into a
    staged folder renamed into place, under a file lock, so a second builder on this node waits, then reuses it.
    The one home of that protocol for both caches (this one and crops.build_physical_cache)."""
    root = Path(cache_root).resolve() if cache_root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if not (final / "meta.arrow").is_file():
        with open(root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (final / "meta.arrow").is_file():
                with staged_dir(final) as tmp:
                    build(tmp)
    return load(final)


def build_cache(records: list[Record], split: str, size: tuple[int, int], annotator: str,
                cache_root: str | Path | None = None, progress: bool = True, mode: str = "stretch",
                interpolation: str = "auto") -> CachedSplit:
    """Return the cached split at `size` (`resize` as `mode` and `interpolation` say), building it (atomically, under
    a file lock) if absent or stale."""
    if not records:
        raise ValueError(f"split {split!r}: nothing to cache (no records)")

    def build(tmp: Path) -> None:
        tw, th = size
        imgs = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(records), th, tw))
        cols: dict[str, list] = {k: [] for k in ("image_id", "path", "width", "height", "scale_x", "scale_y",
                                                 "spacing_mm", "keypoints", "keypoints_orig", "thumb")}
        for i, r, img in decoded_records(records, split, f"caching {split} at {tw}x{th}", progress):
            imgs[i], scale = resize(img, size, mode, interpolation)
            cols["image_id"].append(r.image_id)
            cols["path"].append(str(r.image_path))
            cols["width"].append(img.shape[1])
            cols["height"].append(img.shape[0])
            cols["scale_x"].append(float(scale[0]))
            cols["scale_y"].append(float(scale[1]))
            cols["spacing_mm"].append(float(r.spacing_mm))
            cols["keypoints"].append(to_target(r.keypoints, scale).ravel().tolist())
            cols["keypoints_orig"].append(r.keypoints.ravel().tolist())
            cols["thumb"].append(thumbnail(img).tobytes())
        imgs.flush()
        del imgs
        write_meta(tmp, cols)

    how = [] if (mode, interpolation) == ("stretch", "auto") else [mode, interpolation]  # earlier entries stay valid
    annotator = truth_of(annotator)  # `both` is judged on the mean: the same entry
    key = cache_key(records, split, list(size), annotator, *how)
    return built_once(cache_root, f"{split}-{size[0]}x{size[1]}-{annotator}-{key}", build, _load)
