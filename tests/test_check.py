"""Dataset checks on real files: ISBI images cut short, emptied or undecodable, one annotator's stray point
(ISBI CSV and Aariz JSON), and the senior-junior disagreement report against a hand computation on the real
ISBI 2015 CSVs. Damaged images are copies in tmp_path; intact ones are symlinks to ../shared/data."""
from __future__ import annotations

import csv
import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cli

from tune_landmarks.cache import build_cache
from tune_landmarks.check import DEFAULT_MAX_DISAGREEMENT_MM, disagreement_table
from tune_landmarks.read import DatasetError, completeness_problem, describe, load_split, read_split

TRUNCATED = "image is truncated or corrupt ("


def _rows(isbi_root: Path, split: str, who: str) -> dict[str, list[str]]:
    with open(isbi_root / f"{split}_{who}.csv", newline="") as f:
        return {row[0]: row for row in list(csv.reader(f))[1:]}


def _isbi_subset(isbi_root: Path, dst: Path, names: dict[str, list[str]]) -> Path:
    """An ISBI layout holding only `names` (split -> image names), the images symlinked to the real ones."""
    (dst / "images").mkdir(parents=True)
    header = (isbi_root / "train_senior.csv").read_text().splitlines()[0]
    for split, chosen in names.items():
        for who in ("senior", "junior"):
            rows = _rows(isbi_root, split, who)
            (dst / f"{split}_{who}.csv").write_text("\n".join([header] + [",".join(rows[n]) for n in chosen]) + "\n")
        for n in chosen:
            os.symlink(isbi_root / "images" / n, dst / "images" / n)
    return dst


def _rename(root: Path, old: str, new: str) -> None:
    """Point every CSV row of image `old` at `new` (a converted copy)."""
    for f in root.glob("*.csv"):
        f.write_text(f.read_text().replace(f"{old},", f"{new},"))


def _own_copy(root: Path, name: str, png: bool = False) -> Path:
    """Replace the symlink `name` by a private copy (as it is, or converted to PNG with the CSV rows renamed)."""
    link = root / "images" / name
    real = link.resolve()
    link.unlink()
    if not png:
        link.write_bytes(real.read_bytes())
        return link
    path = link.with_suffix(".png")
    cv2.imwrite(str(path), cv2.imread(str(real), cv2.IMREAD_GRAYSCALE))
    _rename(root, name, path.name)
    return path


def _cut(path: Path, kind: str) -> Path:
    """Empty the file, or cut it to a third, as an interrupted copy leaves it."""
    path.write_bytes(b"" if kind == "empty" else path.read_bytes()[: path.stat().st_size // 3])
    return path


def _damage(root: Path, name: str, kind: str) -> Path:
    return _cut(_own_copy(root, name, png=kind == "png"), kind)


def _cached(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] if cache.exists() else []


def test_completeness_of_real_image_bytes(isbi_root):
    """Complete real files pass; every cut is caught, wherever it falls; bytes after the end marker are fine."""
    jpg = (isbi_root / "images" / "003.jpg").read_bytes()
    grey = cv2.imread(str(isbi_root / "images" / "003.jpg"), cv2.IMREAD_GRAYSCALE)
    progressive = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    png = cv2.imencode(".png", grey[:600, :500])[1].tobytes()
    bmp = cv2.imencode(".bmp", grey[:300, :301])[1].tobytes()
    for data in (jpg, progressive, png, bmp, jpg + b"\0" * 64):
        assert completeness_problem(data) is None
    for data in (jpg, progressive):
        for cut in (300, len(data) // 3, int(len(data) * 0.9), len(data) - 2):
            assert "JPEG" in completeness_problem(data[:cut]), cut
    for cut in (20, len(png) // 3, len(png) - 1):
        assert "PNG" in completeness_problem(png[:cut]), cut
    assert "BMP pixel data cut short" in completeness_problem(bmp[: len(bmp) // 3])
    assert completeness_problem(b"") == "empty file, 0 bytes"


def test_cut_and_empty_images_are_named_and_refused(isbi_root, tmp_path):
    """check-dataset and train both name each damaged file, exit 1, and nothing is cached."""
    root = _isbi_subset(isbi_root, tmp_path / "isbi", {"train": ["001.jpg", "002.jpg", "003.jpg", "004.jpg"]})
    damaged = [_damage(root, "002.jpg", "jpeg"), _damage(root, "003.jpg", "png"), _damage(root, "004.jpg", "empty")]
    p = cli("check-dataset", root, "--no-progress")
    assert p.returncode == 1, p.stdout
    for path in damaged:
        assert f"{path}: {TRUNCATED}" in p.stdout, p.stdout
    assert "train      1 images" in p.stdout and "(3 with problems)" in p.stdout
    cache, out = tmp_path / "cache", tmp_path / "run"
    t = cli("train", "--dataset_path", root, "--model", "hrnet_w18_small_v2", "--image_size", "64", "64", "--epochs", "1",
            "--cache_dir", cache, "--out", out, "--no-progress")
    assert t.returncode == 1
    for path in damaged:
        assert f"{path}: {TRUNCATED}" in t.stderr, t.stderr[-3000:]
    assert not out.exists() and _cached(cache) == []


@pytest.mark.parametrize("cached", ["resized", "physical"])
@pytest.mark.parametrize("kind", ["jpeg", "png", "empty"])
def test_cache_build_refuses_a_file_damaged_after_reading(isbi_root, tmp_path, kind, cached):
    """Records read while the file was whole, then the file is cut: the build (of the training cache, or of the
    refinement stage's physical-resolution one) names it and caches nothing; read again, the file is named there
    and --skip-bad drops it."""
    from tune_landmarks.crops import build_physical_cache

    root = _isbi_subset(isbi_root, tmp_path / "isbi", {"train": ["001.jpg", "002.jpg"]})
    path = _own_copy(root, "002.jpg", png=kind == "png")
    info = describe(root)
    records = load_split(info, "train").records
    _cut(path, kind)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        if cached == "resized":
            build_cache(records, "train", (64, 64), "mean", cache, progress=False)
        else:
            build_physical_cache(records, "train", 0.5, "mean", cache, progress=False)
    assert err.value.problems[0].startswith(f"{path}: {TRUNCATED}")
    assert "nothing cached for split 'train'" in err.value.problems[-1]
    assert _cached(cache) == []
    kept = load_split(info, "train", skip_bad=True)
    assert [r.image_id for r in kept.records] == ["001"] and kept.problems[0].startswith(f"{path}: {TRUNCATED}")


def test_undecodable_png_is_caught_by_the_decode_pass(isbi_root, tmp_path):
    """Chunks and CRCs intact, compressed data garbled: only a full decode finds it, in check-dataset and the build."""
    root = _isbi_subset(isbi_root, tmp_path / "isbi", {"train": ["001.jpg", "002.jpg"]})
    grey = cv2.imread(str(isbi_root / "images" / "002.jpg"), cv2.IMREAD_GRAYSCALE)
    png = bytearray(cv2.imencode(".png", grey)[1].tobytes())
    pos = 8
    while png[pos + 4:pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", png[pos:pos + 4])[0]
    n = struct.unpack(">I", png[pos:pos + 4])[0]
    png[pos + 8 + n // 2:pos + 8 + n // 2 + 64] = bytes(range(64))
    png[pos + 8 + n:pos + 12 + n] = struct.pack(">I", zlib.crc32(png[pos + 4:pos + 8 + n]))
    (root / "images" / "002.jpg").unlink()
    path = root / "images" / "002.png"
    path.write_bytes(bytes(png))
    _rename(root, "002.jpg", "002.png")
    assert completeness_problem(bytes(png)) is None and not read_split(describe(root), "train").problems
    p = cli("check-dataset", root, "--no-progress")
    assert p.returncode == 1 and f"{path}: {TRUNCATED}OpenCV cannot decode it)" in p.stdout, p.stdout
    with pytest.raises(DatasetError, match="OpenCV cannot decode it"):
        build_cache(load_split(describe(root), "train").records, "train", (64, 64), "mean", tmp_path / "c", progress=False)
    assert _cached(tmp_path / "c") == []


def test_isbi_stray_point_named_with_its_annotators_file(isbi_root, tmp_path):
    """Senior x -40 and junior x 200 average to 80, inside: the senior CSV's row is named, the junior's is not."""
    root = _isbi_subset(isbi_root, tmp_path / "isbi", {"train": ["001.jpg", "002.jpg"]})
    senior, junior = root / "train_senior.csv", root / "train_junior.csv"
    rows = [line.split(",") for line in senior.read_text().splitlines()]
    rows[2][1] = "-40"  # 002.jpg, landmark 1 (S), x
    senior.write_text("\n".join(",".join(r) for r in rows) + "\n")
    rows = [line.split(",") for line in junior.read_text().splitlines()]
    rows[2][1] = "200"
    rows[1][20] = "nan"  # 001.jpg, landmark 10 (Go), y
    junior.write_text("\n".join(",".join(r) for r in rows) + "\n")
    p = cli("check-dataset", root, "--no-progress")
    assert p.returncode == 1
    assert f"{senior}:3 (002.jpg): landmark S at (-40, " in p.stdout and "lies outside the 1935x2400 image" in p.stdout
    assert f"{junior}:2 (001.jpg): landmark Go has a non-finite coordinate (" in p.stdout
    assert f"{junior}:3" not in p.stdout, p.stdout  # the junior's point for 002 is inside
    assert read_split(describe(root), "train", "mean").records == []


def test_aariz_stray_point_named_with_its_annotators_file(copy_synth):
    """The junior's Go is moved outside the image so that the mean with the senior's lies inside."""
    lm = copy_synth / "train" / "Annotations" / "Cephalometric Landmarks"
    iid = sorted((copy_synth / "train" / "Cephalograms").iterdir())[0].stem
    sx = next(x["value"]["x"] for x in json.loads((lm / "Senior Orthodontists" / f"{iid}.json").read_text())["landmarks"]
              if x["symbol"] == "Go")
    assert sx > 2
    jfile = lm / "Junior Orthodontists" / f"{iid}.json"
    data = json.loads(jfile.read_text())
    for item in data["landmarks"]:
        if item["symbol"] == "Go":
            item["value"]["x"] = 2 - sx  # mean ceil(1) = 1: inside
    jfile.write_text(json.dumps(data))
    p = cli("check-dataset", copy_synth, "--no-progress")
    assert p.returncode == 1
    assert f"{jfile}: landmark Go at ({2 - sx:g}, " in p.stdout, p.stdout
    assert "Senior Orthodontists" not in p.stdout
    assert iid in read_split(describe(copy_synth), "train", "mean").bad_images


def _hand(isbi_root: Path, names: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    """(images, 19) senior-junior distances in mm straight from the CSVs, and 'split/id' per image."""
    dist, where = [], []
    for split, chosen in names.items():
        s, j = _rows(isbi_root, split, "senior"), _rows(isbi_root, split, "junior")
        for n in chosen:
            a = np.array(s[n][1:], float).reshape(19, 2)
            b = np.array(j[n][1:], float).reshape(19, 2)
            dist.append(np.hypot(*(a - b).T) * 0.1)
            where.append(f"{split}/{Path(n).stem}")
    return np.array(dist), where


def test_disagreement_report_matches_hand_computation(isbi_root, tmp_path):
    """Two real images (train 001, test1 181): the Parquet report and pairs equal numpy on the two CSVs;
    181's sella pair (21.7 mm) is a warning, and an error with --strict."""
    names = {"train": ["001.jpg"], "test1": ["181.jpg"]}
    root = _isbi_subset(isbi_root, tmp_path / "isbi", names)
    dist, where = _hand(isbi_root, names)
    rep, pairs = tmp_path / "out" / "report.parquet", tmp_path / "out" / "pairs.parquet"
    p = cli("check-dataset", root, "--report", "--report-out", rep, "--pairs-out", pairs, "--no-progress", check=True)
    table = pq.read_table(rep).to_pylist()
    syms = describe(root).symbols
    assert [r["landmark"] for r in table] == syms
    for k, row in enumerate(table):
        assert row["pairs"] == 2
        assert row["median_mm"] == pytest.approx(np.median(dist[:, k]))
        assert row["p95_mm"] == pytest.approx(np.percentile(dist[:, k], 95))
        assert row["max_mm"] == pytest.approx(dist[:, k].max())
        assert row["max_image"] == where[int(dist[:, k].argmax())]
        assert row["over_max"] == int((dist[:, k] > DEFAULT_MAX_DISAGREEMENT_MM).sum())
    got = pq.read_table(pairs)
    assert got.num_rows == 38
    assert np.allclose(got.column("distance_mm").to_numpy(), dist.ravel())
    s = table[0]
    assert s["max_image"] == "test1/181" and s["max_mm"] == pytest.approx(21.69, abs=0.01)
    printed = next(line.split() for line in p.stdout.splitlines() if line.startswith("S "))
    assert printed == ["S", "2"] + [f"{s[c]:.2f}" for c in ("mean_mm", "median_mm", "p95_mm", "max_mm")] + ["test1/181", "1"]
    assert "test1 181 S: senior (860, 986) and junior (682, 1110) are 21.7 mm apart (> 15 mm)" in p.stdout
    strict = cli("check-dataset", root, "--strict", "--no-progress")
    assert strict.returncode == 1 and "  - test1 181 S: senior (860, 986)" in strict.stdout
    assert cli("check-dataset", root, "--strict", "--max-disagreement-mm", "25", "--no-progress").returncode == 0


def test_disagreement_table_on_all_real_isbi(isbi_root):
    """All 300 images: medians, 95th percentiles and maxima equal numpy on the four CSVs; the landmarks the
    annotators themselves place more than 2 mm apart (median) are the ones docs/annotators.md lists."""
    info = describe(isbi_root)
    names = {s: sorted(_rows(isbi_root, s, "senior")) for s in info.splits}
    dist, where = _hand(isbi_root, names)
    table = disagreement_table(info).to_pylist()
    assert [r["pairs"] for r in table] == [300] * 19
    assert np.allclose([r["median_mm"] for r in table], np.median(dist, axis=0))
    assert np.allclose([r["p95_mm"] for r in table], np.percentile(dist, 95, axis=0))
    assert [r["max_image"] for r in table] == [where[i] for i in dist.argmax(axis=0)]
    assert sum(r["over_max"] for r in table) == 10
    assert [r["landmark"] for r in table if r["median_mm"] > 2] == ["Or", "Po", "A", "B", "Go", "Ls", "Li", "Pog`"]
