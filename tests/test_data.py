"""Data layer on real files: ISBI 2015 images and CSVs, the Aariz archive's own metadata, the synthetic
Aariz-format set, the decoded-image cache and augmentation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ISBI_COPIES, cli

from tune_landmarks.augment import AugmentConfig, LandmarkDataset, train_transform
from tune_landmarks.cache import build_cache, decode_image, resize, to_original, to_target
from tune_landmarks.landmarks import AARIZ, ISBI2015, parse_symbols, symbols
from tune_landmarks.read import DatasetError, describe, detect_format, load_split, read_mapping, read_split


def test_isbi_real_split_sizes_and_annotations(isbi_root):
    info = describe(isbi_root)
    assert info.format == "isbi" and info.splits == ("train", "test1")
    assert symbols(info.catalogue) == ["S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "Ls",
                                       "Li", "Sn", "Pog`", "PNS", "ANS", "Ar"]
    senior = read_split(info, "train", "senior")
    junior = read_split(info, "train", "junior")
    assert len(senior.records) == 150 and not senior.problems
    assert len(read_split(info, "test1", "senior").records) == 150
    r = next(r for r in senior.records if r.image_id == "001")
    assert tuple(r.keypoints[0]) == (835, 996) and r.spacing_mm == 0.1
    assert tuple(next(r for r in junior.records if r.image_id == "001").keypoints[0]) == (829, 991)
    mean = next(r for r in read_split(info, "train", "mean").records if r.image_id == "001")
    assert tuple(mean.keypoints[0]) == (832, 994)  # ceil((835 + 829) / 2), ceil((996 + 991) / 2)


def test_isbi_subset_of_splits_is_valid(isbi_root, tmp_path):
    """A folder holding only test2_*.csv and its images is a valid dataset."""
    (tmp_path / "images").mkdir()
    rows = (isbi_root / "test1_senior.csv").read_text().splitlines()[:3]
    for line in rows[1:]:
        name = line.split(",")[0]
        os.symlink(isbi_root / "images" / name, tmp_path / "images" / name)
    (tmp_path / "test2_senior.csv").write_text("\n".join(rows) + "\n")
    info = describe(tmp_path)
    assert info.splits == ("test2",)
    sp = read_split(info, "test2", "senior")
    assert len(sp.records) == 2 and not sp.problems
    missing = read_split(info, "train", "senior")
    assert missing.problems and "split 'train' is missing" in missing.problems[0]


def test_real_aariz_mapping_csv(aariz_meta):
    m = read_mapping(aariz_meta / "cephalogram_machine_mappings.csv")
    assert len(m) == 1000
    assert len({machine for _, machine in m.values()}) == 7
    sizes = [ps for ps, _ in m.values()]
    assert min(sizes) == pytest.approx(0.089) and max(sizes) == pytest.approx(0.144)


def test_real_aariz_annotation_parses_by_symbol(aariz_meta, tmp_path):
    """The official example, with its entries shuffled, still maps each symbol to its own point."""
    src = aariz_meta / "example_annotation" / "landmarks_cks2ip8fq2a0o0yufhfuo7clg.json"
    data = json.loads(src.read_text())
    by_symbol = {lm["symbol"]: (lm["value"]["x"], lm["value"]["y"]) for lm in data["landmarks"]}
    assert sorted(by_symbol) == sorted(symbols(AARIZ))
    data["landmarks"] = data["landmarks"][::-1]
    from tune_landmarks.read import _read_aariz_json

    shuffled = tmp_path / "x.json"
    shuffled.write_text(json.dumps(data))
    kps, problems = _read_aariz_json(shuffled, symbols(AARIZ))
    assert not problems
    for s, (x, y) in zip(symbols(AARIZ), kps):
        assert (x, y) == by_symbol[s]


def test_synthetic_round_trip(synth_root):
    info = describe(synth_root)
    assert info.format == "aariz" and set(info.splits) == {"train", "valid", "test"}
    total = 0
    exts, channels = set(), set()
    for split in info.splits:
        sp = read_split(info, split, "mean")
        assert not sp.problems
        total += len(sp.records)
        for r in sp.records:
            exts.add(r.image_path.suffix)
            import cv2

            channels.add(cv2.imread(str(r.image_path), cv2.IMREAD_UNCHANGED).ndim)
            assert r.keypoints.shape == (29, 2)
    assert total == 20
    assert {".png", ".jpg", ".bmp"} <= exts and channels == {2, 3}
    spacings = {r.spacing_mm for r in read_split(info, "train", "mean").records}
    assert len(spacings) >= 3


def test_synthetic_is_deterministic(tmp_path):
    from tune_landmarks.synth import make_synthetic

    a = make_synthetic(tmp_path / "a", num_images=4, seed=7, size=96)
    b = make_synthetic(tmp_path / "b", num_images=4, seed=7, size=96)
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_capitalised_split_folders_and_parent_root(copy_synth):
    for s in ("train", "valid", "test"):
        (copy_synth / s).rename(copy_synth / s.capitalize())
    info = describe(copy_synth.parent)  # the folder holding Aariz/
    assert info.root == copy_synth and info.format == "aariz"
    assert len(read_split(info, "train", "senior").records) == 12


def test_cache_matches_direct_decoding_and_inverts(synth_root, tmp_path):
    info = describe(synth_root)
    sp = load_split(info, "train", "mean")
    cached = build_cache(sp.records, "train", (96, 64), "mean", tmp_path / "c", progress=False)
    again = build_cache(sp.records, "train", (96, 64), "mean", tmp_path / "c", progress=False)
    assert again.path == cached.path  # reused, not rebuilt
    for i, r in enumerate(sp.records):
        img, scale = resize(decode_image(r.image_path), (96, 64))
        assert np.array_equal(np.asarray(cached.images[i]), img)
        assert np.allclose(cached.keypoints[i], to_target(r.keypoints, scale))
        back = to_original(cached.keypoints[i], cached.scale[i])
        assert np.abs(back - r.keypoints).max() < 0.01
    assert cached.images.shape == (len(sp.records), 64, 96) and cached.images.dtype == np.uint8


def test_cache_rebuilt_when_source_changes(copy_synth, tmp_path):
    info = describe(copy_synth)
    sp = load_split(info, "valid", "mean")
    first = build_cache(sp.records, "valid", (64, 64), "mean", tmp_path / "c", progress=False)
    img = sp.records[0].image_path
    import cv2

    arr = cv2.imread(str(img), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(img), 255 - arr)
    second = build_cache(load_split(info, "valid", "mean").records, "valid", (64, 64), "mean", tmp_path / "c",
                         progress=False)
    assert second.path != first.path
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(first.images[0]))


def test_augmentation_keeps_every_keypoint(synth_root, tmp_path):
    info = describe(synth_root)
    sp = load_split(info, "train", "mean")
    cached = build_cache(sp.records, "train", (64, 64), "mean", tmp_path / "c", progress=False)
    # a large shift pushes some points out of the frame: they must stay, not be dropped
    ds = LandmarkDataset(cached, train_transform(AugmentConfig(translate=0.45, p=1.0)))
    ds.transform.set_random_seed(0)
    outside = 0
    for i in range(len(ds)):
        img, kps, _ = ds[i]
        assert img.shape == (1, 64, 64) and kps.shape == (29, 2)
        outside += int(((kps < 0) | (kps > 63)).any())
    assert outside > 0
    plain = LandmarkDataset(cached, None)
    _, kps, _ = plain[0]
    assert np.allclose(kps.numpy(), cached.keypoints[0], atol=1e-4)


def test_check_dataset_cli_on_real_isbi(isbi_root):
    """The archive holds 20 training films again in test1 (docs/duplicates.md): each is a problem; the documented
    skip list leaves a clean set."""
    p = cli("check-dataset", isbi_root, "--no-progress")
    assert p.returncode == 1 and "20 problem(s)" in p.stdout
    assert "split 'train' 001 and split 'test1' 275 are the same radiograph" in p.stdout
    assert "train    150 images  19 landmarks" in p.stdout
    assert "test1    150 images" in p.stdout and "spacing 0.1-0.1 mm/px" in p.stdout
    ok = cli("check-dataset", isbi_root, "--no-progress", "--skip-images", f"@{ISBI_COPIES}", check=True)
    assert "test1    127 images" in ok.stdout and "same radiograph" not in ok.stdout


def _break_dataset(root: Path) -> dict[str, str]:
    """Damage a copy of the synthetic set in every way check-dataset must report; returns name -> fragment."""
    ann = root / "train" / "Annotations" / "Cephalometric Landmarks" / "Senior Orthodontists"
    imgs = sorted((root / "train" / "Cephalograms").iterdir())
    expected = {}
    # 1 missing image
    imgs[0].unlink()
    expected["missing image"] = f"{imgs[0].parent / imgs[0].stem}.<png|jpg|jpeg|bmp|dcm>: image is missing (annotated in"
    # 2 unreadable image
    imgs[1].write_bytes(b"not an image")
    expected["unreadable"] = f"{imgs[1]}: image is missing or unreadable"
    # 3 missing / duplicate / unknown symbol and a point outside the image
    j = ann / f"{imgs[2].stem}.json"
    d = json.loads(j.read_text())
    d["landmarks"] = d["landmarks"][1:]
    j.write_text(json.dumps(d))
    expected["missing symbol"] = f"{j}: missing landmark symbol(s) A"
    j = ann / f"{imgs[3].stem}.json"
    d = json.loads(j.read_text())
    d["landmarks"].append(dict(d["landmarks"][0]))
    d["landmarks"].append({**d["landmarks"][1], "symbol": "XX"})
    j.write_text(json.dumps(d))
    expected["duplicate"] = f"{j}: landmark symbol 'A' appears twice"
    expected["unknown"] = f"{j}: unknown landmark symbol 'XX'"
    j = ann / f"{imgs[4].stem}.json"
    d = json.loads(j.read_text())
    d["landmarks"][0]["value"] = {"x": 99999, "y": 5}
    j.write_text(json.dumps(d))
    expected["outside"] = "landmark A at (99999"
    # 4 missing annotation file
    (ann / f"{imgs[5].stem}.json").unlink()
    expected["missing annotation"] = f"{ann / (imgs[5].stem + '.json')}: annotation file is missing"
    # 5 no pixel_size row
    csv = root / "cephalogram_machine_mappings.csv"
    lines = [ln for ln in csv.read_text(encoding="utf-8-sig").splitlines() if not ln.startswith(imgs[6].stem)]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    expected["no pixel_size"] = f"no pixel_size row for {imgs[6].stem!r}"
    return expected


def test_check_dataset_collects_every_problem(copy_synth):
    expected = _break_dataset(copy_synth)
    p = cli("check-dataset", copy_synth, "--annotator", "senior")
    assert p.returncode == 1
    for name, fragment in expected.items():
        assert fragment in p.stdout, f"{name}: {fragment!r} not in\n{p.stdout}"


def test_training_refuses_bad_dataset_before_work(copy_synth, tmp_path):
    _break_dataset(copy_synth)
    out = tmp_path / "run"
    p = cli("train", "--dataset_path", copy_synth, "--annotator", "senior", "--model", "hrnet_w18_small_v2",
            "--image_size", "64", "64", "--epochs", "1", "--out", out)
    assert p.returncode == 1
    assert "problem(s)" in p.stderr and "missing landmark symbol(s) A" in p.stderr
    assert not out.exists()  # nothing half-written
    ok = cli("train", "--dataset_path", copy_synth, "--annotator", "senior", "--model", "hrnet_w18_small_v2",
             "--image_size", "64", "64", "--epochs", "1", "--max-steps-per-epoch", "1", "--out", out, "--skip-bad",
             "--no-progress")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "--skip-bad: dropped 6 image(s)" in ok.stdout  # the 7th problem is an image that is not there


def test_detect_format_errors(tmp_path):
    with pytest.raises(DatasetError, match="neither an Aariz layout"):
        detect_format(tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        detect_format(tmp_path / "nope")


def test_synth_cli_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    p = cli("synth", "--out", tmp_path / "x", "--num-images", "3", "--size", "96")
    assert p.returncode == 1 and "not empty" in p.stderr
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    assert cli("synth", "--out", tmp_path / "y", "--num-images", "3", "--size", "96", check=True).returncode == 0
    assert describe(tmp_path / "y").format == "aariz"


def test_symbols_parse():
    known = symbols(ISBI2015)
    assert parse_symbols("Or, Po,Go", known) == ["Or", "Po", "Go"]
    with pytest.raises(ValueError, match="unknown landmark symbol"):
        parse_symbols("Or,UMT", known)
    with pytest.raises(ValueError, match="given twice"):
        parse_symbols("Or,Or", known)
