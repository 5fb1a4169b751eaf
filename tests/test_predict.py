"""`predict` on real ISBI 2015 cephalograms (and re-encoded copies), with a corrupt file among them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import cli

from tune_landmarks.landmarks import ISBI2015, symbols, title_of
from tune_landmarks.predict import OVERLAY_SUFFIX, find_images, predict

ISBI_SYMBOLS = symbols(ISBI2015)


@pytest.fixture(scope="module")
def inputs(isbi_root, tmp_path_factory) -> Path:
    """Three real cephalograms as jpg (RGB, as shipped), png (grey, smaller) and bmp (RGB, other aspect),
    plus a corrupt .jpg."""
    d = tmp_path_factory.mktemp("inputs")
    imgs = [cv2.imread(str(isbi_root / "images" / f"{i}.jpg"), cv2.IMREAD_UNCHANGED) for i in (151, 152, 153)]
    (d / "a151.jpg").write_bytes((isbi_root / "images" / "151.jpg").read_bytes())
    cv2.imwrite(str(d / "b152.png"), cv2.resize(cv2.cvtColor(imgs[1], cv2.COLOR_BGR2GRAY), (968, 1200)))
    cv2.imwrite(str(d / "c153.bmp"), cv2.resize(imgs[2], (1500, 1400)))
    (d / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    return d


GOOD = ("a151.jpg", "b152.png", "c153.bmp")


def test_predict_writes_json_csv_and_overlays_and_lists_the_corrupt_file(isbi_model, inputs, tmp_path):
    out = tmp_path / "pred"
    proc = cli("predict", "--model", isbi_model, "--out", out, inputs, tmp_path / "missing.png")
    assert proc.returncode == 1, proc.stderr
    assert f"{inputs / 'd_corrupt.jpg'}: image is truncated or corrupt" in proc.stderr
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in proc.stderr
    assert "2 input(s) not predicted" in proc.stderr
    for name in GOOD:
        h, w = cv2.imread(str(inputs / name), cv2.IMREAD_UNCHANGED).shape[:2]
        ann = json.loads((out / f"{Path(name).stem}.json").read_text())
        assert set(ann) == {"ceph_id", "landmarks", "pixel_size_mm", "pixel_size_source"} and ann["ceph_id"] == Path(name).stem
        assert ann["pixel_size_mm"] is None and ann["pixel_size_source"] is None  # no spacing given, none in a JPEG
        assert [lm["symbol"] for lm in ann["landmarks"]] == ISBI_SYMBOLS
        for i, lm in enumerate(ann["landmarks"]):
            assert set(lm) == {"landmark_id", "symbol", "title", "value"}
            assert lm["landmark_id"] == i and lm["title"] == title_of(lm["symbol"])
            x, y = lm["value"]["x"], lm["value"]["y"]
            assert isinstance(x, float) and 0 <= x < w and 0 <= y < h
        overlay = cv2.imread(str(out / f"{Path(name).stem}{OVERLAY_SUFFIX}"))
        assert overlay is not None and overlay.shape[:2] == (h, w)
        assert not np.array_equal(overlay[..., 2], overlay[..., 0])  # red marks on a grey picture
    assert not (out / f"d_corrupt{OVERLAY_SUFFIX}").exists() and not (out / "d_corrupt.json").exists()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "symbol", "x", "y"] and len(rows) == len(GOOD) * 19
    assert sorted({Path(r["image"]).name for r in rows}) == list(GOOD)
    first = json.loads((out / "a151.json").read_text())["landmarks"][0]["value"]
    assert (float(rows[0]["x"]), float(rows[0]["y"])) == (first["x"], first["y"])
    assert not list(out.glob(".*")), "temporary files left behind"


def test_predictions_match_evaluate_and_round_with_integer(isbi_model, isbi_small, tmp_path):
    """A file predicted here gets exactly the landmarks `evaluate` scores for it (same preprocessing)."""
    from tune_landmarks.infer import evaluate_checkpoint

    ev = evaluate_checkpoint(isbi_model, isbi_small, "test1")
    files = [isbi_small / "images" / f"{i}.jpg" for i in ev.image_ids]
    rep = predict(isbi_model, files, tmp_path / "f")
    assert not rep.failed and [p.path for p in rep.predicted] == files
    np.testing.assert_allclose(np.stack([p.points for p in rep.predicted]), ev.pred, atol=1e-3)
    predict(isbi_model, files[:1], tmp_path / "i", integer=True)
    ann = json.loads((tmp_path / "i" / f"{files[0].stem}.json").read_text())
    assert [(lm["value"]["x"], lm["value"]["y"]) for lm in ann["landmarks"]] == \
        [(round(x), round(y)) for x, y in ev.pred[0]]


def test_bad_inputs_are_named(isbi_model, inputs, tmp_path):
    (tmp_path / "empty").mkdir()
    images, failed = find_images([inputs, tmp_path / "empty", inputs / "a151.jpg"])
    # a file given twice counts once
    assert sorted(p.name for p in images) == sorted((*GOOD, "d_corrupt.jpg"))
    assert failed == [(str(tmp_path / "empty"), "folder holds no images (.png, .jpg, .jpeg, .bmp, .dcm, "
                                                         "or suffix-less DICOM files)")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a151.png").write_bytes((inputs / "b152.png").read_bytes())
    with pytest.raises(ValueError, match=r"would overwrite each other .*a151\.jpg, .*a151\.png"):
        predict(isbi_model, [inputs / "a151.jpg", tmp_path / "other"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"`batch_size` is 0, but must be > 0"):
        predict(isbi_model, [inputs], tmp_path / "out", batch_size=0)
    with pytest.raises(Exception, match=rf"{tmp_path / 'nope'}: checkpoint file not found"):
        predict(tmp_path / "nope", [inputs], tmp_path / "out")
    assert not (tmp_path / "out").exists()
