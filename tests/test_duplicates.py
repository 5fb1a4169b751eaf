"""The same radiograph in two splits, on real ISBI 2015 films: a byte copy, a re-encoded copy and a rescaled copy
under new ids are each named with both ids and both splits; the real archive's own copies are found and nothing
else; training refuses such roles before any model is built, unless the copies are skipped or allowed (recorded)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY, cli

from tune_landmarks.cache import decode_image
from tune_landmarks.fingerprint import DETAIL_MIN, find_copies, thumbnail
from tune_landmarks.read import DatasetError, describe, load_roles

# The archive's own copies (tests/test_duplicates.py::test_the_real_archive_holds_exactly_its_known_copies; the
# numbers are in docs/duplicates.md): 20 training films again in test1 under other ids, and 3 films twice in test1.
ISBI_COPIES = {("001", "275"), ("007", "293"), ("010", "295"), ("014", "287"), ("028", "296"), ("038", "283"),
               ("056", "280"), ("062", "288"), ("080", "282"), ("088", "297"), ("103", "201"), ("108", "289"),
               ("118", "285"), ("123", "276"), ("126", "299"), ("132", "291"), ("137", "292"), ("138", "281"),
               ("141", "279"), ("144", "173"), ("159", "278"), ("188", "294"), ("196", "277")}
CLEAN = ["002.jpg", "003.jpg", "004.jpg", "005.jpg", "006.jpg"]  # in none of the pairs above
HELD = ["151.jpg", "152.jpg", "153.jpg"]


def _rows(root: Path, split: str, who: str) -> dict[str, list[str]]:
    with open(root / f"{split}_{who}.csv", newline="") as f:
        return {row[0]: row for row in list(csv.reader(f))[1:]}


def _layout(isbi_root: Path, dst: Path, train: list[str], test1: list[str],
            copies: dict[str, tuple[str, np.ndarray, float]] | None = None) -> Path:
    """An ISBI layout of real films (symlinked), plus `copies` in test1: new name -> (source, image, scale), the
    annotation the source's scaled by the copy's scale."""
    (dst / "images").mkdir(parents=True)
    header = (isbi_root / "train_senior.csv").read_text().splitlines()[0]
    for split, names in (("train", train), ("test1", test1)):
        for who in ("senior", "junior"):
            rows = _rows(isbi_root, split, who)
            lines = [",".join(rows[n]) for n in names]
            if split == "test1":
                src_rows = _rows(isbi_root, "train", who)
                for new, (source, _, scale) in (copies or {}).items():
                    vals = [str(round(float(v) * scale)) for v in src_rows[source][1:]]
                    lines.append(",".join([new, *vals]))
            (dst / f"{split}_{who}.csv").write_text("\n".join([header, *lines]) + "\n")
        for n in names:
            os.symlink(isbi_root / "images" / n, dst / "images" / n)
    for new, (_, img, _) in (copies or {}).items():
        path = dst / "images" / new
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return dst


@pytest.fixture(scope="module")
def with_copies(isbi_root, tmp_path_factory) -> Path:
    """Five training films; in test1 three real films and three copies of training films under new ids: 901 the same
    bytes as 002, 902 film 003 saved as PNG then re-encoded as JPEG q90, 903 film 004 at 0.8 x its size."""
    images = isbi_root / "images"
    png = cv2.imdecode(cv2.imencode(".png", cv2.imread(str(images / "003.jpg"), cv2.IMREAD_GRAYSCALE))[1], 0)
    small = cv2.resize(cv2.imread(str(images / "004.jpg"), cv2.IMREAD_GRAYSCALE), None, fx=0.8, fy=0.8,
                       interpolation=cv2.INTER_AREA)
    copies = {"901.jpg": ("002.jpg", (images / "002.jpg").read_bytes(), 1.0), "902.jpg": ("003.jpg", png, 1.0),
              "903.jpg": ("004.jpg", small, 0.8)}
    return _layout(isbi_root, tmp_path_factory.mktemp("copies") / "isbi", CLEAN, HELD, copies)


def test_copies_are_found_and_different_films_are_not(isbi_root):
    images = isbi_root / "images"
    films = [decode_image(images / n) for n in CLEAN + HELD]
    labels = [("a", n) for n in CLEAN + HELD]
    assert find_copies(np.stack([thumbnail(f) for f in films]), labels) == []
    base = films[0]
    jpeg = cv2.imdecode(cv2.imencode(".jpg", base, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], 0)
    small = cv2.resize(base, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    toned = np.clip(255 * (base / 255.0) ** 0.6, 0, 255).astype(np.uint8)  # another tone curve, every edge in place
    for name, copy in (("re-encoded", jpeg), ("rescaled", small), ("re-toned", toned)):
        found = find_copies(np.stack([thumbnail(base), thumbnail(copy), thumbnail(films[1])]),
                            [("train", "x"), ("test", "y"), ("test", "z")])
        assert [(c.first, c.second) for c in found] == [(("train", "x"), ("test", "y"))], name
        assert found[0].detail >= DETAIL_MIN


@pytest.mark.slow
def test_the_real_archive_holds_exactly_its_known_copies(isbi_root):
    """All 300 films (44,850 pairs): exactly the 23 known copies, each a pair the eye confirms (docs/duplicates.md);
    the next most alike pair of different films is far below the threshold."""
    info = describe(isbi_root)
    paths = sorted((isbi_root / "images").glob("*.jpg"))
    thumbs = np.stack([thumbnail(decode_image(p)) for p in paths])
    found = find_copies(thumbs, [("isbi", p.stem) for p in paths])
    assert {(c.first[1], c.second[1]) for c in found} == ISBI_COPIES
    assert min(c.detail for c in found) > 0.95 and len(info.splits) == 2


def test_check_dataset_names_each_copy_with_both_ids_and_splits(with_copies, isbi_root, tmp_path):
    p = cli("check-dataset", with_copies, "--no-progress")
    assert p.returncode == 1, p.stdout + p.stderr
    for copy, source in (("901", "002"), ("902", "003"), ("903", "004")):
        assert f"split 'train' {source} and split 'test1' {copy} are the same radiograph" in p.stdout, p.stdout
    assert "3 problem(s)" in p.stdout
    clean = cli("check-dataset", _layout(isbi_root, tmp_path / "clean", CLEAN, HELD), "--no-progress")
    assert clean.returncode == 0 and "same radiograph" not in clean.stdout, clean.stdout
    skipped = cli("check-dataset", with_copies, "--no-progress", "--skip-images", "901,902,903")
    assert skipped.returncode == 0 and "same radiograph" not in skipped.stdout, skipped.stdout


def test_skip_images_leaves_them_out_of_every_role(with_copies, tmp_path):
    info = describe(with_copies)
    listed = tmp_path / "copies.txt"
    listed.write_text("# the test1 copies of training films\n901\n902  # re-encoded\n\n903\n")
    from tune_landmarks.config import coerce

    assert coerce("skip_images", f"@{listed}") == ["901", "902", "903"]
    roles = load_roles(info, skip_images=["901", "002"])
    ids = {role: v["image_ids"] for role, v in roles.ids().items()}
    assert not {"901", "002"} & set().union(*ids.values())
    assert "902" in ids["test"]
    with pytest.raises(DatasetError, match=r"--skip-images names 1 image\(s\) that no split of the roles .* holds: 999"):
        load_roles(info, skip_images=["901", "999"])


@pytest.mark.slow
def test_training_refuses_roles_that_share_a_radiograph_unless_skipped_or_allowed(with_copies, tmp_path):
    common = ["--dataset_path", with_copies, "--model", TINY["model"], "--image_size", "64", "64", "--epochs", "1",
              "--max-steps-per-epoch", "1", "--batch_size", "2", "--val-split", "train:0.4", "--no-progress"]
    refused = cli("train", *common, "--out", tmp_path / "refused")
    assert refused.returncode == 1
    assert "training split 'train' 002 and verdict split 'test1' 901 are the same radiograph" in refused.stderr \
        or "selection split 'train:0.4' 002 and verdict split 'test1' 901 are the same radiograph" in refused.stderr
    assert "--skip-images 901,902,903" in refused.stderr and not (tmp_path / "refused").exists()
    ok = cli("train", *common, "--skip-images", "903", "--allow-duplicates", "--out", tmp_path / "allowed")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "--allow-duplicates: going on with 2 radiograph(s) in two roles" in ok.stderr
    recorded = yaml.safe_load((tmp_path / "allowed" / "config.yaml").read_text())
    assert recorded["skip_images"] == ["903"] and recorded["allow_duplicates"] is True
