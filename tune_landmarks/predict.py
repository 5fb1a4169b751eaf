"""`tune-landmarks predict`: landmarks for new cephalograms of any size and format.

Per image: `<stem>.json` in the Aariz annotation schema (so the dataset readers and scoring scripts take it
as it is), `<stem>.overlay.png` with each landmark marked and labelled; one `predictions.csv` for the batch.
Coordinates are original-image pixels; each JSON also records the image's pixel size and where it came from
(resolve_spacing). Inputs may be DICOM (`.dcm`, or suffix-less files with the DICOM preamble). Preprocessing
and decoding are the evaluation's own (cache.decode_image, cache.resize, infer.predict_batch, cache.to_original),
so a prediction here equals the one `evaluate` scores.
An unreadable input is listed and skipped; the others are still predicted.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import write_bytes
from .config import rule_error
from .dicom import Spacing, header_spacing, is_dicom, read_header
from .landmarks import title_of
from .options import add_device_options
from .read import IMAGE_SUFFIXES, is_image_file, read_mapping

CSV_NAME = "predictions.csv"
OVERLAY_SUFFIX = ".overlay.png"


@dataclass
class Prediction:
    path: Path
    points: np.ndarray  # (K, 2) original pixels, x right / y down
    spacing: Spacing | None = None


@dataclass
class PredictReport:
    predicted: list[Prediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, why)


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given (the decoder decides), folders scanned (not recursively) for image suffixes and suffix-less
    DICOM files; missing paths and folders without images are returned as failures."""
    images: dict[Path, Path] = {}
    failed = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if is_image_file(q))
            if not found:
                failed.append((str(p), f"folder holds no images ({', '.join(IMAGE_SUFFIXES)}, or suffix-less DICOM files)"))
            images.update((q.resolve(), q) for q in found)
        elif p.is_file():
            images.setdefault(p.resolve(), p)
        else:
            failed.append((str(p), "no such file or folder"))
    return list(images.values()), failed


def _check_names(images: list[Path]) -> None:
    """Outputs are named by the image's stem; two inputs with one stem would overwrite each other."""
    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = [ps for ps in by_stem.values() if len(ps) > 1]
    if clashes:
        raise ValueError("inputs whose outputs would overwrite each other (same file name stem): "
                         + "; ".join(", ".join(map(str, ps)) for ps in clashes))


def draw_overlay(grey: np.ndarray, points: np.ndarray, symbols: list[str]) -> np.ndarray:
    """The image with each landmark as a red dot and its symbol in yellow (outlined), scaled to the image."""
    img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    s = max(img.shape[:2]) / 1000
    radius, thick, font = max(2, round(5 * s)), max(1, round(2 * s)), max(0.35, 0.7 * s)
    for (x, y), sym in zip(points, symbols, strict=True):
        c = (round(x), round(y))
        cv2.circle(img, c, radius, (0, 0, 255), -1, cv2.LINE_AA)
        org = (c[0] + radius + 2, c[1] - radius - 2)
        cv2.putText(img, sym, org, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(img, sym, org, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 255, 255), thick, cv2.LINE_AA)
    return img


def _coord(v: float, integer: bool) -> int | float:
    return round(v) if integer else round(float(v), 3)


def annotation(ceph_id: str, points: np.ndarray, symbols: list[str], integer: bool = False) -> dict[str, Any]:
    """The Aariz annotation schema; landmark_id is the landmark's index in the model's order."""
    return {"ceph_id": ceph_id, "landmarks": [
        {"landmark_id": i, "symbol": s, "title": title_of(s),
         "value": {"x": _coord(x, integer), "y": _coord(y, integer)}}
        for i, (s, (x, y)) in enumerate(zip(symbols, points, strict=True))]}


def _write_image_outputs(out: Path, path: Path, grey: np.ndarray, points: np.ndarray, symbols: list[str],
                         integer: bool, spacing: Spacing | None) -> None:
    ann = annotation(path.stem, points, symbols, integer)
    ann["pixel_size_mm"] = spacing.mm if spacing else None
    ann["pixel_size_source"] = spacing.source if spacing else None
    write_bytes(out / f"{path.stem}.json", json.dumps(ann, indent=1))
    ok, png = cv2.imencode(".png", draw_overlay(grey, points, symbols))
    if not ok:
        raise OSError(f"{path}: could not encode the overlay PNG")
    write_bytes(out / f"{path.stem}{OVERLAY_SUFFIX}", png.tobytes())


def _csv_text(preds: list[Prediction], symbols: list[str], integer: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "symbol", "x", "y"])
    for p in preds:
        w.writerows([str(p.path), s, _coord(x, integer), _coord(y, integer)]
                    for s, (x, y) in zip(symbols, p.points, strict=True))
    return buf.getvalue()


def resolve_spacing(path: Path, table: dict[str, tuple[float, str]], flag: float | None,
                    model: float | None) -> Spacing | None:
    """An image's pixel size, by precedence: its row in --pixel-size-csv (by file stem, the Aariz mapping's id) > its
    DICOM header > --pixel-size > the spacing every training image of the model shared; None when none applies."""
    if path.stem in table:
        return Spacing(table[path.stem][0], "csv")
    if is_dicom(path):
        found = header_spacing(read_header(path), path)
        if found:
            return found
    if flag is not None:
        return Spacing(flag, "flag")
    return Spacing(model, "model") if model else None


def _model_spacing(cascade: Any) -> float | None:
    """The one spacing of every image a refinement cascade was trained on (ISBI's 0.1 mm/px), else None: images of
    several machines (Aariz) leave nothing to assume."""
    lo, hi = cascade.train_spacing_mm
    return float(lo) if lo and abs(hi - lo) <= 1e-9 else None


def predict(model_path: str | Path, inputs: Sequence[str | Path], out: str | Path, integer: bool = False,
            device: str = "auto", batch_size: int = 8, pixel_size: float | None = None,
            start_predictions: str | Path | None = None, pixel_size_csv: str | Path | None = None) -> PredictReport:
    """Predict every readable input and write its outputs to `out`; see the module docstring. Each image's pixel size
    comes from resolve_spacing (`pixel_size_csv`: the Aariz mapping layout, id -> pixel_size). A refinement checkpoint
    predicts with its cascade (the start model's points, then infer.Cascade.refine_coarse) at that spacing, and an
    image without one is listed, not guessed. `start_predictions`: a folder of another detector's predictions (one JSON per image,
    same stem) whose points the cascade refines instead of its start model's; every other landmark is copied."""
    from .cache import decode_image, resize, to_original
    from .crops import physical_size
    from .device import resolve_device
    from .infer import is_refine, load_cascade, load_model, predict_batch
    from .model import read_checkpoint
    from .read import read_predictions

    if batch_size < 1:
        raise rule_error("batch_size", batch_size, "> 0")
    if pixel_size is not None and not pixel_size > 0:
        raise rule_error("pixel_size", pixel_size, "> 0 (mm/px)")
    table = read_mapping(pixel_size_csv) if pixel_size_csv is not None else {}
    images, failed = find_images(inputs)
    _check_names(images)
    dev = resolve_device(device)
    ckpt = read_checkpoint(model_path)
    if start_predictions is not None and not is_refine(ckpt):
        raise ValueError(f"{model_path}: --start-predictions needs a refinement stage to refine them (this model is "
                         "not one)")
    cascade = load_cascade(model_path, dev, ckpt=ckpt, given=start_predictions) if is_refine(ckpt) else None
    if cascade is not None:  # the start model predicts as it would alone; the cascade then refines its points
        model, cfg, symbols = cascade.start, cascade.start_cfg, cascade.symbols
        if cascade.given is not None:  # every input's start points are there, or nothing is predicted
            given = dict(zip((p.stem for p in images), read_predictions(cascade.given, [p.stem for p in images], symbols)))
    else:
        model, cfg, symbols = load_model(model_path, dev, ckpt=ckpt)
    model_spacing = _model_spacing(cascade) if cascade is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport(failed=failed)
    for i in range(0, len(images), batch_size):
        batch = []
        for path in images[i:i + batch_size]:
            try:
                spacing = resolve_spacing(path, table, pixel_size, model_spacing)
                grey = decode_image(path)
                if cascade is not None:
                    if spacing is None:
                        raise ValueError(f"{path}: no pixel size, and the refinement stage crops in millimetres: give "
                                         "--pixel-size MM or --pixel-size-csv FILE (its training images had "
                                         f"{cascade.train_spacing_mm[0]:g}-{cascade.train_spacing_mm[1]:g} mm/px)")
                    cascade.check_images([spacing.mm], [grey.shape[::-1]], [str(path)])
            except (OSError, cv2.error, ValueError) as exc:
                report.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
                continue
            batch.append((path, grey, spacing) + resize(grey, tuple(cfg.image_size), cfg.resize, cfg.interpolation))
        if not batch:
            continue
        scale = np.stack([b[4] for b in batch])
        if model is None:  # a cascade on given start points
            pts = np.stack([given[b[0].stem] for b in batch])
        else:
            pts = to_original(predict_batch(model, np.stack([b[3] for b in batch]), dev, cfg.decoder, cfg.sigma,
                                            cfg.mixed_precision, scale), scale[:, None, :])
        if cascade is not None:
            at = {}
            for res in cascade.resolutions:  # each crop resolution's images, as the physical caches hold them
                phys, scale = zip(*(resize(g, physical_size(g.shape[1], g.shape[0], sp.mm, res)) for _, g, sp, *_ in batch))
                at[res] = (phys, np.stack(scale))
            pts = cascade.refine_coarse(pts, at)
        for (path, grey, spacing, *_), p in zip(batch, pts, strict=True):
            _write_image_outputs(out, path, grey, p, symbols, integer, spacing)
            report.predicted.append(Prediction(path, p, spacing))
    if report.predicted:
        write_bytes(out / CSV_NAME, _csv_text(report.predicted, symbols, integer))
    return report


def cmd_predict(args: argparse.Namespace) -> int:
    rep = predict(args.model, args.inputs, args.out, args.integer, args.device, args.batch_size, args.pixel_size,
                  args.start_predictions, args.pixel_size_csv)
    if rep.predicted:
        print(f"predicted {len(rep.predicted)} image(s) -> {args.out}: one JSON and one {OVERLAY_SUFFIX} per "
              f"image, {CSV_NAME}")
    if rep.failed:
        print(f"error: {len(rep.failed)} input(s) not predicted:\n"
              + "\n".join(f"  - {p}: {why}" for p, why in rep.failed), file=sys.stderr)
        return 1
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("predict", help="landmarks for new images: Aariz-style JSON, one CSV, overlay PNGs")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="png/jpg/bmp/DICOM files or folders of them (suffix-less DICOM files are found by their preamble)")
    p.add_argument("--model", required=True, help="exported model folder (or a best.pt/last.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--integer", action="store_true",
                   help="round coordinates to whole pixels (default: floats)")
    add_device_options(p)
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, dest="batch_size")
    p.add_argument("--pixel-size", "--pixel_size", type=float, dest="pixel_size", metavar="MM",
                   help="pixel spacing (mm/px) of images that have none of their own (a DICOM header's, or a row of "
                        "--pixel-size-csv, wins); a refinement cascade needs one (default: its training images' spacing "
                        "when they all share one)")
    p.add_argument("--pixel-size-csv", "--pixel_size_csv", dest="pixel_size_csv", metavar="FILE",
                   help="per-image pixel sizes in the Aariz mapping layout (columns cephalogram_id, pixel_size; the id "
                        "is the file stem); a row wins over the DICOM header and --pixel-size")
    p.add_argument("--start-predictions", "--start_predictions", dest="start_predictions", metavar="DIR",
                   help="with a refinement stage: refine these points (one JSON per image, as predict writes, matched by "
                        "file stem) instead of its start model's; every other landmark is copied as it is")
    p.set_defaults(func=cmd_predict)
