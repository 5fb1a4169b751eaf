"""Readers for the Aariz and ISBI 2015 layouts.

A reader returns `Record`s (image path, keypoints in original pixels, pixel spacing) and collects
every problem it sees instead of stopping at the first one, so a user fixes a dataset in one pass.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ANNOTATORS, rule_error, truth_of
from .dicom import header_spacing, is_dicom, read_header, size_of
from .landmarks import AARIZ, ISBI2015, Landmark, symbols

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".dcm")
AARIZ_SPLITS = ("train", "valid", "test")
ISBI_SPLITS = ("train", "test1", "test2")
ISBI_SPACING_MM = 0.1
MAPPING_CSV = "cephalogram_machine_mappings.csv"
_AARIZ_ANNOTATOR_DIRS = {"senior": "Senior Orthodontists", "junior": "Junior Orthodontists"}


class DatasetError(ValueError):
    """A dataset that cannot be used; `problems` lists every problem, each naming its file."""

    def __init__(self, root: Path, problems: list[str]):
        self.root = Path(root)
        self.problems = list(problems)
        head = f"dataset {self.root}: {len(problems)} problem(s)"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


@dataclass(frozen=True)
class Record:
    image_id: str
    image_path: Path
    keypoints: np.ndarray  # (K, 2) float64, x right / y down, original pixels
    spacing_mm: float
    machine: str = ""


@dataclass
class Split:
    """One split of a dataset, with the problems found while reading it.

    `annotations` keeps each annotator's own points (annotator -> image id -> (K, 2)) for the usable
    records, so the senior-junior disagreement can be measured without reading the files again."""

    name: str
    records: list[Record]
    problems: list[str] = field(default_factory=list)
    bad_images: set[str] = field(default_factory=set)
    annotations: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    format: str  # "aariz" or "isbi"
    catalogue: tuple[Landmark, ...]
    splits: tuple[str, ...]  # the splits present

    @property
    def symbols(self) -> list[str]:
        return symbols(self.catalogue)

    def train_split(self, given: str | None = None) -> str:
        """The split trained on: `given`, else `train`. (Images of the other roles carved from it are left out.)"""
        return given or "train"

    def val_split(self, given: str | None = None) -> str:
        """The selection split (difficulty threshold, Optuna's objective, ASHA, export's choice): `given`, else
        Aariz's `valid`, or for ISBI (which ships no validation split) 20 % carved from `train`."""
        return given or ("valid" if self.format == "aariz" else "train:0.2")

    def test_split(self, given: str | None = None) -> str | None:
        """The verdict split (judged on, never chosen on): `given`, else Aariz's `test` / ISBI's `test1` when
        present."""
        return given or next((s for s in (("test",) if self.format == "aariz" else ("test1",)) if s in self.splits), None)


def _find_dir(parent: Path, name: str) -> Path | None:
    """A child directory matched case-insensitively (the archive is lower case, the authors' loader capitalised)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if parent.is_dir():
        for child in sorted(parent.iterdir()):
            if child.is_dir() and child.name.lower() == name.lower():
                return child
    return None


def _aariz_root(root: Path) -> Path:
    """Accept both the folder holding the splits and its parent holding `Aariz/`."""
    if any(_find_dir(root, s) for s in AARIZ_SPLITS):
        return root
    inner = _find_dir(root, "Aariz")
    return inner if inner is not None else root


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, [f"{root}: not a directory"])
    if any((root / f"{s}_{a}.csv").is_file() for s in ISBI_SPLITS for a in ("senior", "junior")):
        return "isbi"
    aroot = _aariz_root(root)
    if any(_find_dir(aroot, s) for s in AARIZ_SPLITS):
        return "aariz"
    raise DatasetError(root, [f"{root}: neither an Aariz layout ({{train,valid,test}}/Cephalograms) nor an "
                              f"ISBI 2015 layout ({{train,test1,test2}}_{{senior,junior}}.csv)"])


def describe(root: str | Path, fmt: str | None = None) -> DatasetInfo:
    root = Path(root).resolve()
    fmt = fmt or detect_format(root)
    if fmt == "isbi":
        present = tuple(s for s in ISBI_SPLITS if any((root / f"{s}_{a}.csv").is_file() for a in ("senior", "junior")))
        return DatasetInfo(root, "isbi", ISBI2015, present)
    if fmt == "aariz":
        aroot = _aariz_root(root)
        present = tuple(s for s in AARIZ_SPLITS if _find_dir(aroot, s) is not None)
        return DatasetInfo(aroot, "aariz", AARIZ, present)
    raise rule_error("format", fmt, "one of 'aariz', 'isbi'")


def _combine(senior: np.ndarray | None, junior: np.ndarray | None, annotator: str) -> np.ndarray | None:
    if annotator == "senior":
        return senior
    if annotator == "junior":
        return junior
    if senior is None or junior is None:
        return None
    # The Aariz authors' ground truth: ceil((junior + senior) / 2) per coordinate.
    return np.ceil((senior + junior) / 2.0)


def _check_annotator(annotator: str) -> None:
    if annotator not in ANNOTATORS:
        raise rule_error("annotator", annotator, f"one of {', '.join(ANNOTATORS)}")


def _check_points(source: str, kps: np.ndarray, image: Path, size: tuple[int, int] | None, syms: list[str]) -> list[str]:
    """Finiteness and bounds of one annotator's points, each problem naming that annotator's file (`source`):
    checking the combined point instead lets a stray click average back inside the image."""
    out = []
    for s, (x, y) in zip(syms, kps):
        if not (math.isfinite(x) and math.isfinite(y)):
            out.append(f"{source}: landmark {s} has a non-finite coordinate ({x:g}, {y:g})")
        elif size is not None and not (0 <= x < size[0] and 0 <= y < size[1]):
            out.append(f"{source}: landmark {s} at ({x:g}, {y:g}) lies outside the {size[0]}x{size[1]} image {image}")
    return out


def _jpeg_problem(data: bytes) -> str | None:
    """Walk the marker segments to the first start-of-scan, then require an end-of-image marker after it.

    Entropy-coded data never holds 0xFFD9 (0xFF is always stuffed), so a file cut anywhere in or before
    its scans has none; bytes appended after the end-of-image marker are tolerated."""
    pos = 2
    while True:
        if pos + 4 > len(data):
            return f"JPEG ends inside its header, at byte {len(data)}"
        if data[pos] != 0xFF:
            return f"JPEG header is damaged at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker == 0xDA:
            break
        if marker == 0xD9:
            return "JPEG ends before its first scan"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    if data.rfind(b"\xff\xd9") < pos + 2:  # searched from the end, where a complete file has it
        return f"JPEG has no end-of-image marker after its scan data: cut short at {len(data)} bytes"
    return None


def _png_problem(data: bytes) -> str | None:
    """Walk the chunks to IEND, checking each chunk's CRC (a cut or overwritten file fails one or the other)."""
    pos, view = 8, memoryview(data)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        end = pos + 12 + length
        name = kind.decode("latin-1")
        if end > len(data):
            return f"PNG ends inside chunk {name}: cut short at {len(data)} of at least {end} bytes"
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", view[end - 4:end])[0]:
            return f"PNG chunk {name} at byte {pos} fails its CRC"
        if kind == b"IEND":
            return None
        pos = end
    return f"PNG has no IEND chunk: cut short at {len(data)} bytes"


def _bmp_problem(data: bytes) -> str | None:
    """An uncompressed BMP's pixel array must fit in the file (its header gives offset, size and depth)."""
    if len(data) < 26:
        return f"BMP ends inside its header, at byte {len(data)}"
    offset, header = struct.unpack("<II", data[10:18])
    if header == 12:
        w, h, _, bpp = struct.unpack("<HHHH", data[18:26])
        compression = 0
    elif len(data) >= 34:
        w, h, _, bpp, compression = struct.unpack("<iiHHI", data[18:34])
    else:
        return f"BMP ends inside its header, at byte {len(data)}"
    if compression not in (0, 3, 6):  # RLE and embedded JPEG/PNG: sizes unknown here, left to the decoder
        return None
    need = offset + (abs(w) * bpp + 31) // 32 * 4 * abs(h)
    if len(data) < need:
        return f"BMP pixel data cut short: {len(data)} of {need} bytes"
    return None


def completeness_problem(data: bytes) -> str | None:
    """Why `data` is not a complete PNG, JPEG or BMP file, or None (also None for other formats).

    Decoders are no guide: OpenCV's imread fills a cut JPEG's missing rows with grey and returns it."""
    if not data:
        return "empty file, 0 bytes"
    if data.startswith(b"\xff\xd8"):
        return _jpeg_problem(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_problem(data)
    if data.startswith(b"BM"):
        return _bmp_problem(data)
    return None


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or a suffix-less file with the DICOM preamble (as PACS exports name them)."""
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom(path)))


def inspect_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) from the header, problem) without decoding pixels, so reading a split stays cheap
    (about 0.04 ms per ISBI image, as the old header read): a file cut short is found from its structure,
    so --skip-bad can drop it before the cache build; the full decode comes later, once. A DICOM file's size
    is its header's, and what makes it no radiograph (another object, several frames) is found there too."""
    if is_dicom(path):
        try:
            return size_of(read_header(path)), None
        except OSError as exc:
            return None, str(exc)
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, f"{path}: image is missing or unreadable"
    if not data:
        return None, f"{path}: image is truncated or corrupt (empty file, 0 bytes)"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Exception:
        return None, f"{path}: image is missing or unreadable"
    why = completeness_problem(data)
    return size, (f"{path}: image is truncated or corrupt ({why})" if why else None)


def read_mapping(path: str | Path) -> dict[str, tuple[float, str]]:
    """cephalogram_id -> (pixel_size mm/px, machine) from the archive's CSV (BOM-prefixed, hence utf-8-sig)."""
    path = Path(path)
    out: dict[str, tuple[float, str]] = {}
    problems = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        need = {"cephalogram_id", "pixel_size"}
        if not need <= set(reader.fieldnames or []):
            raise DatasetError(path.parent, [f"{path}: header must contain {sorted(need)}, got {reader.fieldnames}"])
        for i, row in enumerate(reader, start=2):
            try:
                ps = float(row["pixel_size"])
                if not ps > 0:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{path}:{i}: pixel_size {row.get('pixel_size')!r} is not a positive number")
                continue
            out[row["cephalogram_id"].strip()] = (ps, (row.get("machine") or "").strip())
    if problems:
        raise DatasetError(path.parent, problems)
    return out


def _read_aariz_json(path: Path, known: list[str]) -> tuple[np.ndarray | None, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        items = data["landmarks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, [f"{path}: unreadable annotation ({type(exc).__name__}: {exc})"]
    found: dict[str, tuple[float, float]] = {}
    problems = []
    for item in items:
        try:
            sym = item["symbol"]
            xy = (float(item["value"]["x"]), float(item["value"]["y"]))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: landmark entry without symbol/value.x/value.y: {item!r}"[:300])
            continue
        if sym not in known:
            problems.append(f"{path}: unknown landmark symbol {sym!r}")
        elif sym in found:
            problems.append(f"{path}: landmark symbol {sym!r} appears twice")
        else:
            found[sym] = xy
    missing = [s for s in known if s not in found]
    if missing:
        problems.append(f"{path}: missing landmark symbol(s) {', '.join(missing)}")
    if problems:
        return None, problems
    return np.array([found[s] for s in known], dtype=np.float64), []


def read_predictions(folder: str | Path, image_ids: list[str], known: list[str]) -> np.ndarray:
    """Another detector's points (N, K, 2) in original pixels, from a folder of Aariz-schema JSON files as `predict`
    writes them, one per image (file stem = image id). Every missing image, unreadable file and missing landmark is
    listed in one DatasetError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, [f"{folder}: the start predictions folder does not exist"])
    out, problems, absent = np.zeros((len(image_ids), len(known), 2)), [], []
    for n, image_id in enumerate(image_ids):
        path = folder / f"{image_id}.json"
        if not path.is_file():
            absent.append(image_id)
            continue
        pts, why = _read_aariz_json(path, known)
        problems += why
        if pts is not None:
            out[n] = pts
    if absent:
        problems.insert(0, f"{folder}: no prediction for {len(absent)} image(s) the run uses: {', '.join(absent[:20])}"
                           + (" ..." if len(absent) > 20 else ""))
    if problems:
        raise DatasetError(folder, problems)
    return out


def predictions_sha256(folder: str | Path) -> str:
    """One digest of a predictions folder's JSON files (names and contents): what a refinement stage trained on."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.json")):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _read_aariz_split(info: DatasetInfo, split: str, annotator: str, skip: frozenset[str] = frozenset()) -> Split:
    known = info.symbols
    sdir = _find_dir(info.root, split)
    if sdir is None:
        return Split(split, [], [f"{info.root / split}: split folder is missing"])
    mapping_path = info.root / MAPPING_CSV
    problems: list[str] = []
    mapping: dict[str, tuple[float, str]] = {}
    if mapping_path.is_file():
        try:
            mapping = read_mapping(mapping_path)
        except DatasetError as exc:
            problems.extend(exc.problems)
    img_dir = _find_dir(sdir, "Cephalograms")
    if img_dir is None:
        return Split(split, [], problems + [f"{sdir / 'Cephalograms'}: image folder is missing"])
    ann_dir = _find_dir(sdir, "Annotations")
    lm_dir = _find_dir(ann_dir, "Cephalometric Landmarks") if ann_dir else None
    records, bad = [], set()
    whos = ("senior", "junior") if annotator == "mean" else (annotator,)
    annotations: dict[str, dict[str, np.ndarray]] = {who: {} for who in whos}
    images = sorted(p for p in img_dir.iterdir() if is_image_file(p))
    if not images:
        problems.append(f"{img_dir}: no images ({'/'.join(IMAGE_SUFFIXES)})")
    stems = {p.stem for p in images}
    for who in whos:
        sub = _find_dir(lm_dir, _AARIZ_ANNOTATOR_DIRS[who]) if lm_dir else None
        for j in sorted(sub.glob("*.json")) if sub else []:
            if j.stem not in stems:
                problems.append(f"{img_dir / j.stem}.<png|jpg|jpeg|bmp|dcm>: image is missing (annotated in {j})")
                stems.add(j.stem)  # report once, not once per annotator
    for img in images:
        iid = img.stem
        if iid in skip:
            continue
        own: list[str] = []
        size, image_problem = inspect_image(img)
        if image_problem:
            own.append(image_problem)
        per_annot: dict[str, np.ndarray | None] = {}
        for who in whos:
            sub = _find_dir(lm_dir, _AARIZ_ANNOTATOR_DIRS[who]) if lm_dir else None
            jpath = (sub or (sdir / "Annotations" / "Cephalometric Landmarks" / _AARIZ_ANNOTATOR_DIRS[who])) / f"{iid}.json"
            if not jpath.is_file():
                own.append(f"{jpath}: annotation file is missing")
                per_annot[who] = None
                continue
            kps, errs = _read_aariz_json(jpath, known)
            own.extend(errs)
            if kps is not None:
                own.extend(_check_points(str(jpath), kps, img, size, known))
            per_annot[who] = kps
        spacing, why = mapping.get(iid), None
        if spacing is None and not image_problem:
            try:
                spacing = _header_spacing(img)
            except OSError as exc:
                why = str(exc)
        if why:
            own.append(why)
        elif spacing is None and not image_problem:
            own.append(f"{img}: no pixel_size row for {iid!r} in {mapping_path}" if mapping_path.is_file() else
                       f"{img}: no pixel size: {mapping_path} (the pixel-size table) is missing"
                       + (" and the DICOM header gives none" if is_dicom(img) else ""))
        kps = _combine(per_annot.get("senior"), per_annot.get("junior"), annotator)
        if own or kps is None or spacing is None:
            problems.extend(own)
            bad.add(iid)
            continue
        records.append(Record(iid, img, kps, *spacing))
        for who in whos:
            annotations[who][iid] = per_annot[who]
    return Split(split, records, problems, bad, annotations)


def _header_spacing(img: Path) -> tuple[float, str] | None:
    """(pixel size, machine) from a DICOM image's own header, for an image the pixel-size table does not list (the
    table wins where it has a row: the archive's curated value)."""
    if not is_dicom(img):
        return None
    ds = read_header(img)
    spacing = header_spacing(ds, img)
    machine = " ".join(str(ds.get(t) or "") for t in ("Manufacturer", "ManufacturerModelName")).strip()
    return (spacing.mm, machine) if spacing else None


def _read_isbi_csv(path: Path, k: int) -> tuple[dict[str, tuple[int, np.ndarray]], list[str]]:
    """image name -> (line number, (K, 2) points); the line lets a problem name its row."""
    out: dict[str, tuple[int, np.ndarray]] = {}
    problems = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        return {}, [f"{path}: unreadable ({exc})"]
    if not rows or rows[0][:1] != ["image_path"] or len(rows[0]) != 1 + 2 * k:
        return {}, [f"{path}: header must be image_path,1_x,1_y,...,{k}_x,{k}_y"]
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 1 + 2 * k:
            problems.append(f"{path}:{i}: expected {1 + 2 * k} columns, got {len(row)}")
            continue
        try:
            vals = np.array([float(v) for v in row[1:]], dtype=np.float64).reshape(k, 2)
        except ValueError:
            problems.append(f"{path}:{i}: non-numeric coordinate")
            continue
        if row[0] in out:
            problems.append(f"{path}:{i}: image {row[0]} listed twice")
        out[row[0]] = (i, vals)
    return out, problems


def _read_isbi_split(info: DatasetInfo, split: str, annotator: str, skip: frozenset[str] = frozenset()) -> Split:
    k = len(info.catalogue)
    problems: list[str] = []
    tables: dict[str, dict[str, tuple[int, np.ndarray]]] = {}
    for who in (("senior", "junior") if annotator == "mean" else (annotator,)):
        path = info.root / f"{split}_{who}.csv"
        if not path.is_file():
            problems.append(f"{path}: annotation file is missing")
            continue
        tables[who], errs = _read_isbi_csv(path, k)
        problems.extend(errs)
    if problems and not tables:
        return Split(split, [], problems)
    names = sorted(n for n in set().union(*[set(t) for t in tables.values()]) if Path(n).stem not in skip)
    records, bad = [], set()
    annotations: dict[str, dict[str, np.ndarray]] = {who: {} for who in tables}
    for name in names:
        img = info.root / "images" / name
        iid = Path(name).stem
        own = [f"{info.root / f'{split}_{who}.csv'}: no row for {name}" for who, t in tables.items() if name not in t]
        size, image_problem = inspect_image(img)
        if image_problem:
            own.append(image_problem)
        points = {who: t[name][1] for who, t in tables.items() if name in t}
        for who, pts in points.items():
            own.extend(_check_points(f"{info.root / f'{split}_{who}.csv'}:{tables[who][name][0]} ({name})", pts, img, size,
                                     info.symbols))
        kps = _combine(points.get("senior"), points.get("junior"), annotator)
        if own or kps is None:
            problems.extend(own)
            bad.add(iid)
            continue
        records.append(Record(iid, img, kps, ISBI_SPACING_MM))
        for who, pts in points.items():
            annotations[who][iid] = pts
    return Split(split, records, problems, bad, annotations)


def read_split(info: DatasetInfo, split: str, annotator: str = "mean", skip: frozenset[str] = frozenset()) -> Split:
    """Read one split spec (`name`, or `name:fraction`: its carved part, see `carve`); problems are collected
    in `Split.problems`, never raised one by one. Images named in `skip` (--skip-images) are left out as if absent,
    before carving."""
    _check_annotator(annotator)
    annotator = truth_of(annotator)
    name, fraction = parse_split(split)
    if name not in info.splits:
        return Split(split, [], [f"{info.root}: split {name!r} is missing (present: {', '.join(info.splits) or 'none'})"])
    reader = _read_aariz_split if info.format == "aariz" else _read_isbi_split
    sp = reader(info, name, annotator, skip)
    if fraction is None:
        return sp
    keep = carve([r.image_id for r in sp.records], fraction) if sp.records else set()
    return Split(split, [r for r in sp.records if r.image_id in keep], sp.problems, sp.bad_images,
                 {a: {i: v for i, v in pts.items() if i in keep} for a, pts in sp.annotations.items()})


def load_split(info: DatasetInfo, split: str, annotator: str = "mean", skip_bad: bool = False,
               skip: frozenset[str] = frozenset()) -> Split:
    """Read a split for training: any problem raises `DatasetError`, unless `skip_bad` drops the named images."""
    sp = read_split(info, split, annotator, skip)
    if not sp.records:
        raise DatasetError(info.root, sp.problems or [f"{info.root}: split {split!r} has no usable images"])
    if sp.problems and not skip_bad:
        raise DatasetError(info.root, sp.problems + ["(--skip-bad drops the images named above)"])
    if sp.problems:
        log.info(f"--skip-bad: dropped {len(sp.bad_images)} image(s) of split {split!r} with problems")
    return sp


CARVE_SALT = "tune_landmarks:carve:v1"  # changing it changes every carved split: never change it silently


def parse_split(spec: str) -> tuple[str, float | None]:
    """A split spec: `name` (the whole split) or `name:fraction` (a deterministic part of it, see `carve`)."""
    name, sep, frac = str(spec).partition(":")
    if not sep:
        return name, None
    try:
        fraction = float(frac)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:
        raise rule_error("split", spec, "NAME or NAME:FRACTION with 0 < FRACTION < 1 (e.g. train:0.2)")
    return name, fraction


def carve(image_ids: list[str], fraction: float) -> set[str]:
    """The `fraction` of `image_ids` with the smallest salted sha256: the same on every node and every run,
    whatever the file order, and stable when images are added (an image's place depends on its id alone)."""
    k = max(1, round(fraction * len(image_ids)))
    return set(sorted(image_ids, key=lambda i: hashlib.sha256(f"{CARVE_SALT}:{i}".encode()).hexdigest())[:k])


@dataclass
class Roles:
    """The images of each role of a run or sweep. They never mix: the selection split chooses (threshold,
    trial, epoch), the verdict split judges, and training sees neither."""

    train: Split
    val: Split
    test: Split | None = None

    def ids(self) -> dict[str, dict[str, list[str]]]:
        """{role: {"spec": ..., "image_ids": [...]}}, what sweep.json records."""
        return {role: {"spec": sp.name, "image_ids": [r.image_id for r in sp.records]}
                for role, sp in (("train", self.train), ("val", self.val), ("test", self.test)) if sp is not None}


def load_roles(info: DatasetInfo, train: str | None = None, val: str | None = None, test: str | None = None,
               annotator: str = "mean", skip_bad: bool = False, with_test: bool = True,
               skip_images: Sequence[str] = ()) -> Roles:
    """The train / selection / verdict splits from their specs (defaults per layout). The selection and verdict
    splits must be disjoint (refused, naming both, before any work); training loses every image they carve
    from its split. `skip_images` (--skip-images) leaves those images out of every role; an id that none of the
    roles' splits holds is refused (a typo would otherwise keep the image in)."""
    specs = {"train": info.train_split(train), "val": info.val_split(val)}
    if with_test and info.test_split(test):
        specs["test"] = info.test_split(test)
    skip = frozenset(skip_images)
    if skip:
        read = [read_split(info, name, annotator) for name in {parse_split(spec)[0] for spec in specs.values()}]
        present = {r.image_id for sp in read for r in sp.records} | {i for sp in read for i in sp.bad_images}
        unknown = sorted(skip - present)
        if unknown:
            raise DatasetError(info.root, [f"--skip-images names {len(unknown)} image(s) that no split of the roles "
                                           f"({', '.join(sorted(set(specs.values())))}) holds: {', '.join(unknown[:20])}"])
    held = {role: load_split(info, specs[role], annotator, skip_bad, skip) for role in specs if role != "train"}
    if "test" in held:
        shared = _shared(held["val"], held["test"])
        if shared:
            raise ValueError(f"the selection split {specs['val']!r} (--val-split) and the verdict split {specs['test']!r} "
                             f"(--test-split) share {len(shared)} image(s) (e.g. {', '.join(sorted(shared)[:3])}): "
                             "they must be disjoint, or the verdict judges what chose it")
    tr = load_split(info, specs["train"], annotator, skip_bad, skip)
    taken = set().union(*(_shared(tr, sp) for sp in held.values()))
    tr.records = [r for r in tr.records if r.image_id not in taken]
    if not tr.records:
        raise ValueError(f"the training split {specs['train']!r} has no image left once the selection and verdict "
                         f"splits ({', '.join(repr(s) for r, s in specs.items() if r != 'train')}) are taken out")
    return Roles(tr, held["val"], held.get("test"))


def _shared(a: Split, b: Split) -> set[str]:
    """Image ids two split specs share (only specs of the same dataset split can)."""
    if parse_split(a.name)[0] != parse_split(b.name)[0]:
        return set()
    return {r.image_id for r in a.records} & {r.image_id for r in b.records}


def spacing_range(records: list[Record]) -> tuple[float, float]:
    if not records:
        return (math.nan, math.nan)
    vals = [r.spacing_mm for r in records]
    return (min(vals), max(vals))
