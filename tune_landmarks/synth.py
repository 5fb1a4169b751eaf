"""A synthetic Aariz-format dataset: the embedded default for the demo and the tests.

The images are learnable on purpose: the 29 points sit on drawn anatomy-like structures (jaw, palate,
teeth, orbit, sella, soft-tissue profile) under a random per-image affine and intensity change.
The landmarks the hand-tuned workflow finds hard on Aariz are made hard here too (faint or no
local marker, lying along an edge), so a trained model shows a real spread of per-landmark errors.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import staged_dir
from .config import rule_error
from .landmarks import AARIZ, WORKFLOW_DIFFICULT
from .read import MAPPING_CSV

# Canonical positions in a unit frame (x right, y down, face to the right), authors' symbol order.
_TEMPLATE = {
    "A": (0.74, 0.55), "ANS": (0.77, 0.50), "B": (0.70, 0.75), "Me": (0.65, 0.89), "N": (0.73, 0.29),
    "Or": (0.63, 0.38), "Pog": (0.715, 0.82), "PNS": (0.50, 0.52), "Pn": (0.90, 0.46), "R": (0.40, 0.64),
    "S": (0.36, 0.34), "Ar": (0.33, 0.50), "Co": (0.35, 0.45), "Gn": (0.69, 0.865), "Go": (0.39, 0.79),
    "Po": (0.25, 0.42), "LPM": (0.62, 0.665), "LIT": (0.725, 0.635), "LMT": (0.55, 0.665), "UPM": (0.62, 0.625),
    "UIA": (0.70, 0.535), "UIT": (0.735, 0.62), "UMT": (0.55, 0.625), "LIA": (0.665, 0.74), "Li": (0.81, 0.70),
    "Ls": (0.825, 0.60), "N`": (0.79, 0.28), "Pog`": (0.78, 0.85), "Sn": (0.82, 0.52),
}
# (name, [points], thickness as fraction of size, brightness)
_CURVES = (
    ("mandible", ["Co", "Ar", "R", "Go", "Me", "Gn", "Pog", "B", "LIA"], 0.010, 0.85),
    ("palate", ["PNS", "ANS"], 0.008, 0.55),
    ("maxilla", ["ANS", "A", "UIA"], 0.006, 0.75),
    ("cranial_base", ["Po", "S", "N"], 0.006, 0.7),
    ("upper_incisor", ["UIA", "UIT"], 0.012, 0.95),
    ("lower_incisor", ["LIA", "LIT"], 0.012, 0.95),
    ("occlusal", ["UMT", "UPM", "UIT"], 0.004, 0.45),
    ("lower_occlusal", ["LMT", "LPM", "LIT"], 0.004, 0.45),
)
_PROFILE = ["N`", "Pn", "Sn", "Ls", "Li", "Pog`"]
_MACHINES = (("ART Plus", 0.1), ("Hyperion X5", 0.089), ("ProMax 2D", 0.139), ("Veraviewepocs 2D", 0.144),
             ("Rotograph EVO", 0.135), ("Smart3D", 0.1), ("ProMax with ProTouch", 0.139))
_FORMATS = ("png", "jpg", "bmp", "jpeg")
_ALNUM = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


def _affine(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Unit frame -> pixel frame: a random rotation, scale and shift (the head position varies)."""
    ang = np.deg2rad(rng.uniform(-8, 8))
    s = rng.uniform(0.85, 1.05)
    tx, ty = rng.uniform(-0.05, 0.05, size=2)
    c, si = np.cos(ang) * s, np.sin(ang) * s
    # rotate/scale about the unit centre, then stretch to the image
    m = np.array([[c, -si, 0.5 - 0.5 * c + 0.5 * si + tx], [si, c, 0.5 - 0.5 * si - 0.5 * c + ty]])
    return np.diag([w, h]) @ m


def _draw(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32 0..1) and its 29 true landmark positions in pixels."""
    syms = [lm.symbol for lm in AARIZ]
    unit = np.array([_TEMPLATE[s] for s in syms]) + rng.normal(0, 0.008, size=(len(syms), 2))
    m = _affine(rng, w, h)
    pts = unit @ m[:, :2].T + m[:, 2]
    size = min(w, h)
    # hard landmarks: the drawn anatomy passes a few pixels off the true point (ambiguous along the
    # structure); only a faint local marker pins the exact position
    anchors = pts.copy()
    hard = np.array([s in WORKFLOW_DIFFICULT for s in syms])
    anchors[hard] += rng.normal(0, 0.012 * size, size=(int(hard.sum()), 2))
    at = dict(zip(syms, anchors))
    img = np.zeros((h, w), np.float32)
    # skull vault and a soft-tissue region behind the facial profile
    centre = (unit[syms.index("S")] + unit[syms.index("N")]) / 2 @ m[:, :2].T + m[:, 2]
    cv2.ellipse(img, (int(centre[0]), int(centre[1] + 0.05 * size)), (int(0.38 * w), int(0.42 * h)),
                0, 0, 360, 0.25, -1, cv2.LINE_AA)
    prof = np.array([at[s] for s in _PROFILE] + [at["Pog`"] + [-0.3 * size, 0.1 * size], at["N`"] + [-0.3 * size, -0.1 * size]])
    cv2.fillPoly(img, [np.round(prof * 16).astype(np.int32)], 0.3, cv2.LINE_AA, shift=4)
    cv2.polylines(img, [np.round(np.array([at[s] for s in _PROFILE]) * 16).astype(np.int32)], False, 0.45,
                  max(1, int(0.004 * size)), cv2.LINE_AA, shift=4)
    for _, names, thick, val in _CURVES:
        line = np.round(np.array([at[s] for s in names]) * 16).astype(np.int32)
        cv2.polylines(img, [line], False, float(val), max(1, int(thick * size)), cv2.LINE_AA, shift=4)
    # sella turcica (a cup), orbit (an ellipse with Or at its floor), ear rod ring near porion
    r = int(0.03 * size)
    cv2.ellipse(img, (int(at["S"][0]), int(at["S"][1] - r)), (r, r), 0, 0, 180, 0.8, max(1, int(0.006 * size)), cv2.LINE_AA)
    cv2.ellipse(img, (int(at["Or"][0]), int(at["Or"][1] - 1.6 * r)), (int(1.6 * r), int(1.6 * r)), 0, 0, 360, 0.35,
                max(1, int(0.004 * size)), cv2.LINE_AA)
    ear = (int(at["Po"][0] - 0.5 * r), int(at["Po"][1] + 0.6 * r))
    cv2.circle(img, ear, int(0.8 * r), 0.3, max(1, int(0.004 * size)), cv2.LINE_AA)
    # molars and premolars: blocks whose cusp tips are the landmarks
    for s, dy, bw in (("UMT", -1, 0.035), ("LMT", 1, 0.035), ("UPM", -1, 0.02), ("LPM", 1, 0.02)):
        x, y = at[s]
        bwp, bhp = bw * size, 0.05 * size
        cv2.rectangle(img, (int(x - bwp / 2), int(y)), (int(x + bwp / 2), int(y + dy * bhp)), 0.55, -1, cv2.LINE_AA)
    # local markers: crisp dots on the easy landmarks, faint or none on the hard ones
    for s, (x, y) in zip(syms, pts):
        val = rng.uniform(0.05, 0.2) if s in WORKFLOW_DIFFICULT else 1.0
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), max(16, int(0.008 * size * 16)), val, -1, cv2.LINE_AA, shift=4)
    # acquisition: blur, gradient, gamma/contrast, noise
    img = cv2.GaussianBlur(img, (0, 0), 0.002 * size + 0.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img += 0.1 * (xx / w) * rng.uniform(-1, 1) + 0.1 * (yy / h) * rng.uniform(-1, 1)
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)
    img = img * rng.uniform(0.7, 1.0) + rng.uniform(0.0, 0.15)
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1), pts


def _annotation(ceph_id: str, kps: np.ndarray) -> dict:
    return {"ceph_id": ceph_id, "landmarks": [
        {"landmark_id": f"synth-{i}", "title": lm.title, "symbol": lm.symbol, "value": {"x": int(x), "y": int(y)}}
        for i, (lm, (x, y)) in enumerate(zip(AARIZ, kps))]}


def make_synthetic(out: str | Path, num_images: int = 30, seed: int = 0, size: int = 512,
                   splits: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """Write a complete Aariz-layout dataset to `out` (atomically: a temp dir renamed at the end)."""
    if num_images < 3:
        raise rule_error("num_images", num_images, ">= 3")
    if size < 64:
        raise rule_error("size", size, ">= 64")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose another --out")
    rng = np.random.default_rng(seed)
    n_train = max(1, int(round(num_images * splits[0])))
    n_valid = max(1, int(round(num_images * splits[1])))
    split_of = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (num_images - n_train - n_valid)
    with staged_dir(out) as tmp:
        rows = []
        for i, split in enumerate(split_of):
            ceph_id = "ck" + "".join(rng.choice(_ALNUM, 23))
            aspect = rng.uniform(0.85, 1.2)
            w = int(size * rng.uniform(0.9, 1.1))
            h = int(w * aspect)
            img, pts = _draw(rng, w, h)
            machine, ps = _MACHINES[i % len(_MACHINES)]
            fmt = _FORMATS[i % len(_FORMATS)]
            u8 = (img * 255).astype(np.uint8)
            if i % 3 == 1:  # some files are 3-channel, as in the archive
                u8 = np.dstack([u8, u8, u8])
            d = tmp / split
            (d / "Cephalograms").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / "Cephalograms" / f"{ceph_id}.{fmt}"), u8)
            lim = np.array([w - 1, h - 1])
            for who, noise in (("Senior Orthodontists", 0.7), ("Junior Orthodontists", 1.5)):
                kps = np.clip(np.round(pts + rng.normal(0, noise, pts.shape)), 0, lim)
                adir = d / "Annotations" / "Cephalometric Landmarks" / who
                adir.mkdir(parents=True, exist_ok=True)
                (adir / f"{ceph_id}.json").write_text(json.dumps(_annotation(ceph_id, kps)))
            rows.append((ceph_id, machine, ps, fmt, split.capitalize()))
        with open(tmp / MAPPING_CSV, "w", newline="", encoding="utf-8-sig") as f:
            wr = csv.writer(f)
            wr.writerow(["cephalogram_id", "machine", "pixel_size", "image_format", "mode"])
            wr.writerows(rows)
        (tmp / "Readme.txt").write_text(f"Synthetic Aariz-format dataset made by tune_landmarks (seed {seed}).\n")
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    out = make_synthetic(args.out, args.num_images, args.seed, args.size)
    print(f"wrote a synthetic Aariz-format dataset with {args.num_images} images to {out}")
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("synth", help="write a synthetic Aariz-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", "--num_images", type=int, default=30, dest="num_images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=512, help="approximate image width in pixels")
    s.set_defaults(func=cmd_synth)
