"""DICOM radiographs: the tool's 8-bit grey pixels and the pixel spacing from the header.

Cephalometric units and PACS export DICOM, and the spacing a millimetre figure depends on travels in the file.
The pixel pipeline is fixed so that a film gives the same grey values wherever it is read: stored values ->
modality LUT (RescaleSlope/Intercept) -> the VOI LUT, else the first window, else the full range of the values
present -> MONOCHROME1 inverted -> 0..255. pydicom decodes RLE Lossless itself; the JPEG family needs a plug-in
(pylibjpeg), and a file that needs a missing one is named with the plug-in to install.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIX = ".dcm"
PREAMBLE_END = 132  # 128-byte preamble, then b"DICM"
JPEG_PLUGINS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


@dataclass(frozen=True)
class Spacing:
    """A pixel spacing in mm/px and where it came from (csv, dicom:PixelSpacing, dicom:ImagerPixelSpacing, flag,
    model), which `predict` records beside every prediction."""

    mm: float
    source: str


def has_preamble(head: bytes) -> bool:
    return len(head) >= PREAMBLE_END and head[128:PREAMBLE_END] == b"DICM"


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """A `.dcm` file, or any file whose first bytes are the DICOM preamble (PACS exports often have no suffix)."""
    path = Path(path)
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(PREAMBLE_END)
        except OSError:
            return False
    return has_preamble(head)


def _dataset(path: Path, source: Any, header_only: bool) -> Any:
    """The parsed file, refused with one message for what no radiograph can be: not DICOM, not an image object,
    more than one frame, no pixels."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(source, stop_before_pixels=header_only, force=path.suffix.lower() == DICOM_SUFFIX)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise OSError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if not len(ds) and not getattr(ds, "file_meta", None):  # `force` reads any bytes as an empty dataset
        raise OSError(f"{path}: not a readable DICOM file (no DICOM elements in it)")
    sop = ds.get("SOPClassUID")
    if sop is not None and sop.name != str(sop) and "Image" not in sop.name:
        raise OSError(f"{path}: its SOP class is {sop.name}, not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise OSError(f"{path}: is a multi-frame image ({frames} frames): one radiograph per file is expected")
    if not ds.get("Rows") or not ds.get("Columns") or (not header_only and "PixelData" not in ds):
        raise OSError(f"{path}: has no pixel data")
    return ds


def read_header(path: str | Path) -> Any:
    """The dataset without its pixels: size and spacing at the cost of a header read."""
    return _dataset(Path(path), str(path), header_only=True)


def size_of(ds: Any) -> tuple[int, int]:
    return int(ds.Columns), int(ds.Rows)


def header_spacing(ds: Any, path: str | Path) -> Spacing | None:
    """PixelSpacing, else ImagerPixelSpacing divided by EstimatedRadiographicMagnificationFactor when present
    (the detector's spacing is magnified by the beam's divergence); None when the header has neither. Non-square
    or non-positive spacings are refused: every figure in mm would be wrong along one axis."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is None:
            continue
        try:
            rows, cols = (float(v) for v in value)
        except (TypeError, ValueError):
            raise OSError(f"{path}: {tag} {value!r} is not two numbers (mm between rows, columns)") from None
        if not (rows > 0 and cols > 0):
            raise OSError(f"{path}: {tag} is {rows:g} x {cols:g} mm, but must be > 0")
        if abs(rows - cols) > 1e-6 * max(rows, cols):
            raise OSError(f"{path}: {tag} is {rows:g} x {cols:g} mm: non-square pixels are not supported")
        if tag == "ImagerPixelSpacing":
            magnification = float(ds.get("EstimatedRadiographicMagnificationFactor") or 1.0)
            if not magnification > 0:
                raise OSError(f"{path}: EstimatedRadiographicMagnificationFactor is {magnification:g}, but must be > 0")
            rows /= magnification
        return Spacing(rows, f"dicom:{tag}")
    return None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2's window functions onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """The first of a multi-valued window attribute (one window is what the file offers first)."""
    return float(value[0] if isinstance(value, Sequence) else value)


def _unit(values: np.ndarray, ds: Any) -> np.ndarray:
    """Modality values onto [0, 1]: the VOI LUT (indexed by the values as they are), else the first window, else the
    full range present."""
    from pydicom.pixels import apply_voi

    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.asarray(apply_voi(values, ds, index=0), np.float64) / (2 ** bits - 1)
    values = values.astype(np.float64)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        width = _first(ds.WindowWidth)
        if not width > 0:
            raise ValueError(f"WindowWidth is {width:g}, but must be > 0")
        return _window(values, _first(ds.WindowCenter), width, str(ds.get("VOILUTFunction") or "LINEAR").upper())
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """The stored values, decompressed; a compressed file whose decoder plug-in is missing is named with it."""
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError, ValueError, NotImplementedError... per plug-in
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is not None and syntax.is_compressed and "plugin" in str(exc).lower() and "missing" in str(exc).lower():
            raise OSError(f"{path}: its pixels are compressed as {syntax.name}, which needs a decoder plug-in: "
                          f"{JPEG_PLUGINS}") from None
        raise OSError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def decode_dicom(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """The radiograph as a 2-D uint8 array, through the module's fixed pipeline; OSError naming the file."""
    import cv2
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = _dataset(path, io.BytesIO(data) if data is not None else str(path), header_only=False)
    stored = _pixels(ds, path)
    if stored.ndim == 3:  # colour (RGB after pydicom's YBR conversion): the grey the tool reads everywhere
        if stored.dtype != np.uint8:
            raise OSError(f"{path}: colour pixels of {stored.dtype} are not supported (8-bit colour or grey expected)")
        stored = cv2.cvtColor(stored, cv2.COLOR_RGB2GRAY)
    try:
        unit = _unit(np.asarray(apply_modality_lut(stored, ds)), ds)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise OSError(f"{path}: its grey-level transform cannot be applied ({exc})") from None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # 0 is white
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)
