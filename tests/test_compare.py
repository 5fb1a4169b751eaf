"""`tune-landmarks compare`: hand-computed paired differences from Parquet tables, each bad input's
message, and a real start checkpoint against a real one-epoch fine-tune of it."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, cli

SYMBOLS = ["S", "N", "Or"]
IMAGES = ["i0", "i1", "i2", "i3", "i4"]
REF = np.array([[1.0, 1.5, 3.0],
                [1.2, 2.5, 2.0],
                [0.8, 1.9, 4.0],
                [1.1, 2.2, 1.0],
                [0.9, 1.7, 2.6]])
CAND = np.array([[0.5, 1.7, 1.5],
                 [0.9, 2.1, 2.5],
                 [0.4, 2.2, 1.5],
                 [0.5, 1.7, 1.5],
                 [0.7, 2.1, 2.1]])
# by hand: per-landmark CAND - REF means; S,N difficult, Or the rest; SDR@2mm hits (<= 2 mm) per landmark
DIFF = {"S": -0.4, "N": 0.0, "Or": -0.7, "difficult": -0.2, "other": -0.7, "all": -1.1 / 3}
SDR_DIFF = {"S": 0.0, "N": -20.0, "Or": 20.0, "difficult": -10.0, "other": 20.0, "all": 0.0}


def write_table(path: Path, errors: np.ndarray, images: list[str] = IMAGES, symbols: list[str] = SYMBOLS,
                order: np.ndarray | None = None) -> Path:
    """An `evaluate --out` table written with pyarrow; `order` permutes its rows."""
    ids = [i for i in images for _ in symbols]
    syms = [s for _ in images for s in symbols]
    err = np.asarray(errors, float).ravel()
    order = np.arange(len(ids)) if order is None else order
    zeros = [0.0] * len(ids)
    pq.write_table(pa.table({"image_id": [ids[k] for k in order], "symbol": [syms[k] for k in order],
                             "pred_x": zeros, "pred_y": zeros, "true_x": zeros, "true_y": zeros,
                             "error_mm": err[order].tolist()}), path)
    return path


def rows_by_name(path: Path) -> dict[str, dict]:
    return {r["landmark"]: r for r in pq.read_table(path).to_pylist()}


def test_known_errors_give_the_hand_computed_difference(tmp_path):
    ref = write_table(tmp_path / "ref.parquet", REF)
    shuffled = np.random.default_rng(3).permutation(REF.size)  # pairing is by image and symbol, not row order
    cand = write_table(tmp_path / "cand.parquet", CAND, order=shuffled)
    proc = cli("compare", ref, cand, "--out", tmp_path / "out", "--difficult", "S,N", "--bootstrap", "500", check=True)

    rows = rows_by_name(tmp_path / "out" / "compare.parquet")
    assert set(rows) == set(DIFF)
    for name, want in DIFF.items():
        r = rows[name]
        assert r["diff_mm"] == pytest.approx(want, abs=1e-9), name
        assert r["diff_low_mm"] <= r["diff_mm"] <= r["diff_high_mm"], name
        assert r["sdr_diff_pp"] == pytest.approx(SDR_DIFF[name], abs=1e-9), name
        assert r["sdr_low_pp"] <= r["sdr_diff_pp"] <= r["sdr_high_pp"], name
        assert r["n_images"] == 5 and r["reference"] == "ref.parquet" and r["candidate"] == "cand.parquet"
    assert rows["S"]["ref_mre_mm"] == pytest.approx(1.0) and rows["S"]["cand_mre_mm"] == pytest.approx(0.6)
    assert rows["S"]["difficult"] and rows["N"]["difficult"] and not rows["Or"]["difficult"]
    assert [rows[n]["is_group"] for n in DIFF] == [False, False, False, True, True, True]
    # S improves on every image, so its interval lies within the per-image range and excludes 0; N's holds 0
    assert -0.6 <= rows["S"]["diff_low_mm"] and rows["S"]["diff_high_mm"] <= -0.2
    assert rows["N"]["diff_low_mm"] < 0 < rows["N"]["diff_high_mm"]
    printed = [ln for ln in proc.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in DIFF]
    assert [ln.split()[0] for ln in printed] == ["Or", "S", "N", "difficult", "other", "all"]  # by difference
    marked = {ln.split()[0]: ln.split("]")[1].startswith("*") for ln in printed}  # the mm interval's mark
    assert marked["S"] and not marked["N"]
    png = cv2.imread(str(tmp_path / "out" / "forest_cand.parquet.png"))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 100


def test_identical_inputs_give_zero_difference_and_zero_width_interval(tmp_path):
    a = write_table(tmp_path / "a.parquet", REF)
    b = write_table(tmp_path / "b.parquet", REF, order=np.arange(REF.size)[::-1])
    cli("compare", a, b, "--out", tmp_path / "out", check=True)
    rows = pq.read_table(tmp_path / "out" / "compare.parquet").to_pylist()
    assert {r["landmark"] for r in rows} == {"S", "N", "Or", "all"}  # no difficult set: no difficult/other rows
    for r in rows:
        for k in ("diff_mm", "diff_low_mm", "diff_high_mm", "sdr_diff_pp", "sdr_low_pp", "sdr_high_pp"):
            assert r[k] == 0.0, (r["landmark"], k)


@pytest.mark.parametrize("case", ["images", "landmarks", "missing"])
def test_mismatched_or_missing_input_fails_with_one_message(tmp_path, case):
    ref = write_table(tmp_path / "ref.parquet", REF)
    cand = tmp_path / "cand.parquet"
    if case == "images":
        write_table(cand, CAND, images=["i0", "i1", "i2", "i3", "other"])
        expect = f"{cand}: not the same images as {ref}"
    elif case == "landmarks":
        write_table(cand, CAND, symbols=["S", "N", "Po"])
        expect = f"{cand}: not the same landmarks as {ref}; missing Or; extra Po"
    else:
        expect = f"{cand}: no such file or directory"
    proc = cli("compare", ref, cand, "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert expect in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_broken_table_and_bad_arguments_are_refused(tmp_path):
    from tune_landmarks.compare import compare
    from tune_landmarks.verdict import paired_bootstrap

    ref = write_table(tmp_path / "ref.parquet", REF)
    dup = write_table(tmp_path / "dup.parquet", CAND, order=np.r_[np.arange(REF.size - 1), 0])
    with pytest.raises(ValueError, match=re.escape(f"{dup}: image 'i0' has 2 rows for landmark 'S'")):
        compare([ref, dup], tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape("The value of `bootstrap` is 0, but must be > 0.")):
        compare([ref, ref], tmp_path / "out", n_boot=0)
    with pytest.raises(ValueError, match=re.escape("--difficult: unknown landmark symbol(s) Xx")):
        compare([ref, ref], tmp_path / "out", difficult="S,Xx")
    with pytest.raises(ValueError, match=re.escape("The value of `seed` is -1, but must be >= 0.")):
        paired_bootstrap(REF, CAND, SYMBOLS, seed=-1)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finetuned(synth_root, start_ckpt, tmp_path_factory) -> Path:
    """One masked epoch from the start checkpoint: a real candidate with a stored difficult set."""
    from tune_landmarks.config import TrainConfig
    from tune_landmarks.run import train

    out = tmp_path_factory.mktemp("ft")
    train(TrainConfig(dataset_path=str(synth_root), resume=str(start_ckpt), epochs=1, lr=1e-3, mode="masked",
                      difficult=["Co", "Ar", "Po"], out=str(out), progress=False, **TINY))
    return out / "best.pt"


def test_real_checkpoints(tmp_path, synth_root, start_ckpt, finetuned):
    table = tmp_path / "start.parquet"
    cli("evaluate", "--checkpoint", start_ckpt, "--dataset_path", synth_root, "--out", table, check=True)
    out = tmp_path / "out"
    proc = cli("compare", table, finetuned, start_ckpt, "--dataset_path", synth_root, "--split", "valid",
               "--out", out, check=True)

    rows = pq.read_table(out / "compare.parquet").to_pylist()
    ft = [r for r in rows if r["candidate"] == f"{finetuned.parent.name}/best.pt"]
    same = [r for r in rows if r["candidate"] == f"{start_ckpt.parent.name}/best.pt"]
    assert len(ft) == 29 + 3 and len(same) == 29 + 1  # the start stores no difficult set: only "all"
    # the candidate checkpoint's own difficult set is used
    assert {r["landmark"] for r in ft if r["difficult"] and not r["is_group"]} == {"Co", "Ar", "Po"}
    assert all(r["n_images"] == ft[0]["n_images"] > 0 for r in rows)
    for r in ft:
        assert r["diff_low_mm"] <= r["diff_mm"] <= r["diff_high_mm"]
    # the start checkpoint scored again equals its own `evaluate` table: zero difference everywhere
    assert all(r["diff_mm"] == 0 and r["diff_low_mm"] == r["diff_high_mm"] == 0 for r in same)
    pngs = sorted(out.glob("forest_*.png"))
    assert len(pngs) == 2
    for p in pngs:
        img = cv2.imread(str(p))
        assert img is not None and img.shape[0] > 300
    assert "difficult: Ar, Co, Po;" in proc.stdout
