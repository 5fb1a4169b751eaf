"""The refinement stage (`--mode refine`): crop geometry, training on the synthetic set, the cascade on real ISBI
images, and the checks that refuse bad settings or a mismatched checkpoint before any work."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import REFINED, TINY, cli, run_sweep

from tune_landmarks.cache import to_target
from tune_landmarks.config import TrainConfig
from tune_landmarks.crops import CropGeometry, build_physical_cache, from_crop, physical_size, take, to_crop
from tune_landmarks.infer import evaluate_checkpoint, load_cascade
from tune_landmarks.landmarks import ISBI2015, WORKFLOW_DIFFICULT, symbols
from tune_landmarks.model import CheckpointError, read_checkpoint, sha256_file
from tune_landmarks.predict import predict
from tune_landmarks.read import Record
from tune_landmarks.refine import CropObjective, train_refine

ISBI_SYMBOLS = symbols(ISBI2015)


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize(("size", "spacing", "mm_per_px", "crop_mm"), [
    ((1935, 2400), 0.1, 0.3, 38.4), ((97, 131), 0.144, 0.144, 9.0), ((640, 480), 0.089, 0.5, 100.0),
    ((1968, 1937), 0.139, 0.2, 20.0), ((33, 2000), 0.1, 0.35, 3.0)])
def test_point_to_crop_and_back_is_the_identity(size, spacing, mm_per_px, crop_mm):
    w, h = size
    geo = CropGeometry.from_mm(crop_mm, mm_per_px)
    wp, hp = physical_size(w, h, spacing, mm_per_px)
    scale = np.array([wp / w, hp / h])
    rng = np.random.default_rng(0)
    edges = [[0, 0], [w - 1, h - 1], [0.3, h - 1.2], [w - 0.5, 0.49], [-40.5, 10], [w + 25.25, h + 3], [-1e3, -7.7]]
    pts = np.concatenate([rng.uniform(0, 1, (200, 2)) * [w - 1, h - 1], edges])
    for centres in (pts, pts + rng.normal(0, 50, pts.shape), np.zeros_like(pts)):  # on, near and far from the crop
        origin = geo.origins(to_target(centres, scale))
        assert np.abs(from_crop(to_crop(pts, scale, origin), scale, origin) - pts).max() < 0.01
    on = to_crop(pts, scale, geo.origins(to_target(pts, scale)))
    assert np.abs(on - (geo.size - 1) / 2).max() <= 0.5 + 1e-9  # a crop is centred on its point within half a pixel


@pytest.mark.parametrize(("spacing", "mm_per_px"), [(0.1, 0.3), (0.144, 0.3), (0.089, 0.089)])
def test_crops_of_the_cached_image_put_a_drawn_point_where_the_mapping_says(tmp_path, spacing, mm_per_px):
    """Pixels, not only arithmetic: a blob drawn at a sub-pixel original position is found, through the physical
    cache, the crop and the inverse mapping, where it was drawn; a crop beyond the border is zero-padded."""
    w, h, truth, sigma = 401, 357, np.array([[203.3, 151.7], [2.2, 350.4]]), 6.0
    yy, xx = np.mgrid[0:h, 0:w]
    img = sum(250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in truth)
    path = tmp_path / "blob.png"
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
    rec = Record("blob", path, truth, spacing)
    phys = build_physical_cache([rec], "t", mm_per_px, "mean", tmp_path / "cache", progress=False)
    assert tuple(phys.shape[0]) == physical_size(w, h, spacing, mm_per_px)
    geo = CropGeometry(64, mm_per_px)
    origin = geo.origins(to_target(truth[0] + [7.4, -5.1], phys.scale[0]))  # the point off the crop's centre
    crop = take(phys.image(0), origin, geo.size).astype(np.float64)
    peak = np.array(np.unravel_index(np.argmax(crop), crop.shape))[::-1]
    r = int(np.ceil(3.5 * sigma * spacing / mm_per_px))
    gy, gx = np.mgrid[-r:r + 1, -r:r + 1]
    win = crop[peak[1] - r:peak[1] + r + 1, peak[0] - r:peak[0] + r + 1]
    found = peak + [(win * gx).sum() / win.sum(), (win * gy).sum() / win.sum()]
    assert np.abs(from_crop(found, phys.scale[0], origin) - truth[0]).max() < 0.1
    corner = geo.origins(to_target(truth[1], phys.scale[0]))  # near the bottom-left corner: half the crop is outside
    c = take(phys.image(0), corner, geo.size)
    assert corner[0] < 0 and (c[:, :-corner[0]] == 0).all() and c.any()


def test_crop_objective_trains_only_each_crops_own_channel():
    """Channels other than a crop's own landmark get exactly no gradient from it, whatever they predict."""
    pred = torch.rand(3, 2, 8, 8, requires_grad=True)
    target = torch.rand(3, 2, 8, 8)
    target[0, 1] = target[1, 0] = target[2, 1] = float("nan")
    loss = CropObjective.from_config(TrainConfig(), torch.ones(2))(None, pred, target)  # crops need no model
    loss.backward()
    assert torch.isfinite(loss)
    for b, k in ((0, 1), (1, 0), (2, 1)):
        assert (pred.grad[b, k] == 0).all()
    assert pred.grad[0, 0].abs().sum() > 0 and pred.grad[1, 1].abs().sum() > 0


# ---------------------------------------------------------------- training on the synthetic set

def _refine_cfg(dataset: Path, start: Path, out: Path, **kw) -> TrainConfig:
    base = {"dataset_path": str(dataset), "resume": str(start), "mode": "refine", "out": str(out), "progress": False,
            "model": TINY["model"], "image_size": TINY["image_size"]}
    return TrainConfig(**(base | kw))


def test_bad_refine_settings_fail_before_any_training(synth_root, start_ckpt, tmp_path):
    hard = {"difficult": ["Go", "Ar"]}
    with pytest.raises(ValueError, match=r"`mode` is 'refine', but must be not 'refine' without a start model"):
        train_refine(TrainConfig(dataset_path=str(synth_root), mode="refine", **hard))
    # the synthetic machines' pixels are 0.089-0.144 mm: a 0.1 mm/px crop would interpolate the coarser ones
    with pytest.raises(ValueError, match=r"`refine_mm_per_px` is 0.1, but must be >= 0.144 mm/px, the coarsest pixel "
                                         r"spacing of the images \(ck"):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "a", refine_mm_per_px=0.1, **hard))
    # ~150-px images at 0.089 mm/px are ~11-13 mm across: a 38.4-mm crop is larger than the image
    with pytest.raises(ValueError, match=r"`refine_crop_mm` is 38\.4, but must be <= [0-9.]+ mm, the shorter side of "
                                         r"the smallest image \(ck\w+: \d+ x \d+ px at 0\.089 mm/px\)"):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_mm_per_px=0.15,
                                 refine_crop_mm={"default": 38.4}, **hard))
    with pytest.raises(ValueError, match=r"`refine_crop_mm.Ar` is 38\.4, but must be <= [0-9.]+ mm, the shorter side"):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_mm_per_px=0.15,
                                 refine_crop_mm={"Go": 9.6, "Ar": 38.4}, **hard))
    # an entry must name a landmark this stage refines (here the set is named: Go, Ar), or `default`
    with pytest.raises(ValueError, match=r"`refine_crop_mm` is \{'Po': 9\.6\}, but must be keyed by a landmark this "
                                         r"stage refines \(Go, Ar\) or `default`"):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_crop_mm={"Po": 9.6}, **hard))
    with pytest.raises(ValueError, match=r"`refine_mm_per_px.Go` is 0\.1, but must be >= 0\.144 mm/px, the coarsest"):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_mm_per_px={"Go": 0.1, "default": 0.15},
                                 refine_crop_mm=4.8, **hard))
    with pytest.raises(ValueError, match=r"`refine_mm_per_px` is \{'Po': 0\.2\}, but must be keyed by a landmark this "):
        train_refine(_refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_mm_per_px={"Po": 0.2}, **hard))
    with pytest.raises(ValueError, match=r"`refine_tta` is 0, but must be between 1 and 16"):
        _refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_tta=0, **hard).validate()
    with pytest.raises(ValueError, match=r"`refine_crop_mm.Go` is -3\.0, but must be > 0 mm"):
        _refine_cfg(synth_root, start_ckpt, tmp_path / "b", refine_crop_mm={"Go": -3.0}, **hard).validate()
    with pytest.raises(ValueError, match=r"`refine_crop_mm` is 300.0, but must be <= 512 crop pixels"):
        _refine_cfg(synth_root, start_ckpt, tmp_path / "c", refine_crop_mm={"default": 300.0}, **hard).validate()
    with pytest.raises(ValueError, match=r"`refine_crop_min_mm` is 40.0, but must be <= `refine_crop_max_mm` \(30 mm\)"):
        _refine_cfg(synth_root, start_ckpt, tmp_path / "c", refine_crop_min_mm=40.0, refine_crop_max_mm=30.0,
                    **hard).validate()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_derived_crop_sides_follow_the_start_points_own_errors(synth_root, given_points, tmp_path):
    """Start points that miss Go, Ar and Po by exactly 1, 2 and 4 mm (in a random direction per image): each derived
    side is refine_crop_k x that landmark's 99th-percentile error, so the sides come in that order and size; an
    explicit entry overrides its landmark's alone."""
    from tune_landmarks.read import describe, load_split

    info = describe(synth_root)
    radius = {"Go": 1.0, "Ar": 2.0, "Po": 4.0}
    rng = np.random.default_rng(0)
    missed = tmp_path / "missed"
    missed.mkdir()
    for split in info.splits:
        for r in load_split(info, split, "mean").records:
            ann = json.loads((given_points / f"{r.image_id}.json").read_text())
            for lm in ann["landmarks"]:
                truth = r.keypoints[info.symbols.index(lm["symbol"])]
                turn = rng.uniform(0, 2 * np.pi)
                shift = radius.get(lm["symbol"], 0.0) / r.spacing_mm * np.array([np.cos(turn), np.sin(turn)])
                lm["value"] = {"x": float(truth[0] + shift[0]), "y": float(truth[1] + shift[1])}
            (missed / f"{r.image_id}.json").write_text(json.dumps(ann))
    cfg = TrainConfig(dataset_path=str(synth_root), start_predictions=str(missed), mode="refine", difficult=list(radius),
                      refine_crop_k=2.0, refine_crop_min_mm=1.0, refine_crop_max_mm=12.0, refine_mm_per_px=0.15,
                      refine_model="resnet18", epochs=1, max_steps_per_epoch=1, batch_size=4, progress=False,
                      out=str(tmp_path / "derived"))
    res = train_refine(cfg)
    sides = yaml.safe_load((res.out / "config.yaml").read_text())["refine_crop_mm"]
    assert sides == pytest.approx({"Go": 2.0, "Ar": 4.0, "Po": 8.0}, abs=1e-3)
    assert read_checkpoint(res.out / "best.pt")["refine"]["crop_px"] == {"Go": 32, "Ar": 32, "Po": 64}  # 32-px blocks
    res = train_refine(dataclasses.replace(cfg, refine_crop_mm={"Ar": 9.6}, out=str(tmp_path / "given")))
    sides = yaml.safe_load((res.out / "config.yaml").read_text())["refine_crop_mm"]
    assert sides == pytest.approx({"Go": 2.0, "Ar": 9.6, "Po": 8.0}, abs=1e-3)


SYNTH_HARD = [s for s in ("Go", "Ar", "Po", "Or") if s in WORKFLOW_DIFFICULT]  # four of those synth.py draws hard
SYNTH_REFINE = {"refine_mm_per_px": 0.15, "refine_crop_mm": 9.6, "refine_model": "hrnet_w18_small", "epochs": 16,
                "batch_size": 8, "lr": 3e-3, "sigma": 1.5, "refine_offset_scale": 1.5}


@pytest.fixture(scope="module")
def synth_refine(synth_root, start_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_refine")
    return train_refine(_refine_cfg(synth_root, start_ckpt, out, difficult=SYNTH_HARD, **SYNTH_REFINE))


def test_a_short_refine_run_beats_the_start_model_on_the_difficult_landmarks(synth_refine):
    """The synthetic difficult landmarks sit a few pixels off their drawn structure, pinned by a faint marker that
    the 64-px start model cannot resolve; the refinement stage sees it at the images' own resolution."""
    res = synth_refine
    start = np.mean([res.start_per_landmark[s] for s in res.difficult])
    assert res.best.mre_difficult < 0.8 * start, (res.best.mre_difficult, start)
    assert res.best.drift and set(res.best.drift.values()) == {0.0}  # the others are the start model's own points
    assert set(res.best.drift) == set(res.best.per_landmark) - set(SYNTH_HARD)


def test_evaluate_reproduces_the_run_and_a_last_pt_continues_it(synth_refine, synth_root, start_ckpt):
    res = synth_refine
    ev = evaluate_checkpoint(res.out / "best.pt", synth_root, "valid", start=start_ckpt)
    assert ev.summary.mre == pytest.approx(res.best.mre, abs=1e-9)
    assert ev.difficult == res.difficult and set(ev.summary.drift.values()) == {0.0}
    ckpt = read_checkpoint(res.out / "best.pt")
    assert ckpt["refine"]["refined"] == res.difficult and ckpt["arch"]["num_landmarks"] == len(res.difficult)
    more = train_refine(_refine_cfg(synth_root, res.out / "last.pt", res.out, difficult=SYNTH_HARD, **(SYNTH_REFINE | {
        "epochs": SYNTH_REFINE["epochs"] + 1})))
    assert [h["epoch"] for h in more.history] == list(range(1, SYNTH_REFINE["epochs"] + 2))
    assert more.history[:-1] == res.history  # continued from last.pt: the first epochs are the run's own, not re-run
    # the continuing run read the start model's points the first run kept; evaluate computes them afresh
    assert list(Path(os.environ["TUNE_LANDMARKS_CACHE"]).glob("*/start-points-*.npy"))
    again = evaluate_checkpoint(res.out / "best.pt", synth_root, "valid")
    assert again.summary.mre == pytest.approx(more.best.mre, abs=1e-9)
    assert more.difficult == res.difficult


# ---------------------------------------------------------------- the refine arm of a sweep

REFINE_ARM_SPACE = """\
lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
difficult_threshold: {type: uniform, low: 1.0, high: 5.0}
arms:
  refine:
    lr: {type: loguniform, low: 2.0e-3, high: 4.0e-3}
    sigma: {type: fixed, value: 1.5}
    refine_mm_per_px: {type: fixed, value: 0.15}
    refine_crop_mm: {type: categorical, choices: [9.6]}
    refine_model: {type: fixed, value: hrnet_w18_small}
"""


@pytest.fixture(scope="module")
def refine_sweep(synth_root, start_ckpt, tmp_path_factory) -> Path:
    """A real sweep of the arms masked and refine (conftest.run_sweep): the refine arm with its own section and
    its own epochs."""
    return run_sweep(tmp_path_factory.mktemp("refine_sweep"), REFINE_ARM_SPACE, synth_root, start_ckpt, "arms",
                     ["masked", "refine"], 3, arm_epochs={"refine": 4})


@pytest.mark.slow
def test_the_refine_arm_is_searched_in_its_own_ranges_and_judged_with_the_others(refine_sweep):
    import pyarrow.parquet as pq

    trials = pq.read_table(refine_sweep / "trials.parquet").to_pandas()
    refine, masked = trials[trials.arm == "refine"], trials[trials.arm == "masked"]
    assert len(refine) == len(masked) == 2 and (refine.param_mode == "refine").all()
    assert refine.param_lr.between(2e-3, 4e-3).all() and refine.param_lr.nunique() == 2  # its own section's range
    assert (refine.param_refine_crop_mm == 9.6).all() and masked.param_refine_crop_mm.isna().all()
    assert (refine.best_max_drift == 0).all()  # the landmarks it does not refine are the start model's own
    assert refine.epochs_done.max() <= 4 and masked.epochs_done.max() <= 3 and 4 in set(refine.epochs_done)
    verdict = json.loads((refine_sweep / "verdict.json").read_text())
    pairs = {(r["a"], r["b"]) for r in verdict["comparisons"]}
    assert pairs == {("best masked", "start"), ("best refine", "start"), ("best masked", "best refine")}
    arms = verdict["arms"]
    assert (arms["refine"]["budget"], arms["refine"]["epochs"], arms["masked"]["epochs"]) == (2, 4, 3)
    assert arms["refine"]["train_seconds"] > 0 and arms["masked"]["train_seconds"] > 0
    assert set(verdict["difficult"]) == {s for a in arms.values() for s in a["difficult"].split(",") if s}  # the union


@pytest.mark.slow
def test_the_refine_arms_winner_exports_as_a_cascade_that_reproduces_its_metrics(refine_sweep, synth_root, start_ckpt,
                                                                                 tmp_path):
    proc = cli("export", refine_sweep, "--arm", "refine", "--force", "--out", tmp_path / "model", "--split", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: the exported files' val MRE" in proc.stdout and "start/ (the cascade's start model)" in proc.stdout
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["arm"] == "refine" and meta["refine"]["start"]["sha256"] == sha256_file(tmp_path / "model" / "start")
    assert meta["start_checkpoint"]["sha256"] == meta["refine"]["start"]["source_sha256"] == sha256_file(start_ckpt)
    assert json.loads((tmp_path / "model" / "verification.json").read_text())["passed"]
    ev_start = evaluate_checkpoint(start_ckpt, synth_root, "test")
    ev = evaluate_checkpoint(tmp_path / "model", synth_root, "test")
    others = [i for i, s in enumerate(ev.symbols) if s not in meta["refine"]["refined"]]
    assert np.array_equal(ev.pred[:, others], ev_start.pred[:, others])
    test = json.loads((tmp_path / "model" / "test_metrics.json").read_text())
    assert test["mre"] == pytest.approx(ev.summary.mre, abs=1e-6)  # another process: float noise only
    bad = cli("export", refine_sweep, "--arm", "weighted", "--out", tmp_path / "w")
    assert bad.returncode != 0 and "`arm` is 'weighted', but must be one of this sweep's arms (masked, refine)" in bad.stderr
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- the cascade on real ISBI images

def test_cascade_predicts_all_19_and_leaves_every_other_landmark_bit_identical(isbi_small, isbi_model, isbi_refine,
                                                                                tmp_path):
    refined = [ISBI_SYMBOLS.index(s) for s in REFINED]
    others = [i for i in range(19) if i not in refined]
    ev_s = evaluate_checkpoint(isbi_model, isbi_small, "test1")
    ev_c = evaluate_checkpoint(isbi_refine, isbi_small, "test1")
    assert ev_c.image_ids == ev_s.image_ids and ev_c.difficult == REFINED
    assert np.array_equal(ev_s.pred[:, others], ev_c.pred[:, others])
    assert np.array_equal(ev_s.errors[:, others], ev_c.errors[:, others])
    assert not np.array_equal(ev_s.pred[:, refined], ev_c.pred[:, refined])

    files = [isbi_small / "images" / f"{i}.jpg" for i in ev_c.image_ids[:3]]
    start = predict(isbi_model, files, tmp_path / "start")
    casc = predict(isbi_refine, files, tmp_path / "cascade")
    assert not casc.failed and [c.path for c in casc.predicted] == files
    for s, c in zip(start.predicted, casc.predicted, strict=True):
        ann = json.loads((tmp_path / "cascade" / f"{c.path.stem}.json").read_text())
        assert [lm["symbol"] for lm in ann["landmarks"]] == ISBI_SYMBOLS
        assert np.array_equal(s.points[others], c.points[others])
        assert np.isfinite(c.points).all()
    # predict (any image, decoded and cropped on its own) gives the points evaluate scores
    np.testing.assert_allclose(np.stack([c.points for c in casc.predicted]), ev_c.pred[:3], atol=1e-3)

    # exported, the cascade is one self-contained folder (moved elsewhere, its own start model inside) that predicts
    # the same points; its model.json names the exported start model's sha256 and the checkpoint it came from
    cli("export", "--checkpoint", isbi_refine, "--out", tmp_path / "export", check=True)
    moved = Path(shutil.move(tmp_path / "export", tmp_path / "elsewhere"))
    stage = json.loads((moved / "model.json").read_text())["refine"]["start"]
    assert (stage["path"], stage["sha256"]) == ("start", sha256_file(moved / "start"))
    assert stage["source_sha256"] == sha256_file(isbi_model)
    meta = json.loads((moved / "model.json").read_text())
    assert meta["refine"]["refined"] == REFINED and meta["symbols"] == ISBI_SYMBOLS
    # each landmark's own crop (`--refine-crop-mm Go=48,default=32 --refine-mm-per-px Ar=0.6,default=0.5`) is the
    # run's record, the export's, and what the exported cascade crops with, from one physical cache per resolution
    run_cfg = yaml.safe_load((isbi_refine.parent / "config.yaml").read_text())
    assert run_cfg["refine_crop_mm"] == meta["config"]["refine_crop_mm"] == {"Go": 48.0, "Ar": 32.0}
    assert meta["refine"]["crop_px"] == {"Go": 96, "Ar": 64} and meta["refine"]["mm_per_px"] == {"Go": 0.5, "Ar": 0.6}
    loaded = load_cascade(moved, torch.device("cpu"))
    assert {s: (g.size, g.mm_per_px) for s, g in loaded.crops.items()} == {"Go": (96, 0.5), "Ar": (64, 0.6)}
    assert loaded.resolutions == [0.5, 0.6]
    exported = predict(moved, files, tmp_path / "exported")
    assert not exported.failed
    for c, e in zip(casc.predicted, exported.predicted, strict=True):
        assert np.array_equal(c.points, e.points)


def test_averaged_crops_move_only_the_refined_points_and_one_crop_is_the_cascade_itself(isbi_small, isbi_refine,
                                                                                       tmp_path):
    """`refine_tta` 3: three crops per landmark (one unshifted, two shifted by whole pixels on a ring of size/8), their
    points averaged: the refined landmarks move, every other landmark is the start model's, bit for bit."""
    from tune_landmarks.cache import build_cache
    from tune_landmarks.crops import ring_shifts
    from tune_landmarks.read import describe, load_split

    assert ring_shifts(1, 64).tolist() == [[0, 0]]
    assert ring_shifts(3, 96).tolist() == [[0, 0], [12, 0], [-12, 0]]
    cascade = load_cascade(isbi_refine, torch.device("cpu"))
    info = describe(isbi_small)
    records = load_split(info, "test1").records[:4]
    cached = build_cache(records, "test1", tuple(cascade.start_cfg.image_size), "mean", tmp_path, False,
                         cascade.start_cfg.resize, cascade.start_cfg.interpolation)
    phys = cascade.physical(records, "test1", "mean", tmp_path, progress=False)
    one = cascade.predict_cached(cached, phys)
    ev = evaluate_checkpoint(isbi_refine, isbi_small, "test1")
    assert np.array_equal(one, ev.pred[:4])  # refine_tta 1 is the cascade as evaluated
    averaged = dataclasses.replace(cascade, cfg=dataclasses.replace(cascade.cfg, refine_tta=3)).predict_cached(cached, phys)
    refined = [ISBI_SYMBOLS.index(s) for s in REFINED]
    others = [i for i in range(19) if i not in refined]
    assert np.array_equal(averaged[:, others], one[:, others])
    assert np.isfinite(averaged).all() and not np.array_equal(averaged[:, refined], one[:, refined])


def test_labels_as_they_are_draw_one_annotator_per_crop_and_judge_on_the_mean(isbi_small, isbi_model, tmp_path):
    """`--annotator both`: the training crops learn the senior's or the junior's point (each item draws one), while
    the difficult set, the selection and the verdict stay on their mean (the same start errors as `mean`)."""
    from tune_landmarks.config import from_dict
    from tune_landmarks.read import describe, load_split
    from tune_landmarks.run import prepare_data, training_labels

    cfg = from_dict({"dataset_path": str(isbi_small), "resume": str(isbi_model), "mode": "refine", "difficult": "Go",
                     "annotator": "both", "refine_model": "resnet18", "refine_mm_per_px": 0.5, "refine_crop_mm": 32,
                     "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4, "progress": False, "out": str(tmp_path / "b"),
                     "model": TINY["model"], "image_size": TINY["image_size"]})
    data = prepare_data(cfg, False)
    labels = training_labels(cfg, data)
    info = describe(isbi_small)
    senior = {r.image_id: r.keypoints for r in load_split(info, "train", "senior").records}
    assert labels.shape == (2, len(data.train.image_ids), 19, 2)
    assert np.array_equal(labels[0], np.stack([senior[i] for i in data.train.image_ids]))
    assert not np.array_equal(labels[0], labels[1])
    both = train_refine(cfg)
    mean = train_refine(dataclasses.replace(cfg, annotator="mean", out=str(tmp_path / "m")))
    assert both.start_per_landmark == mean.start_per_landmark  # judged on the mean
    assert yaml.safe_load((both.out / "config.yaml").read_text())["annotator"] == "both"
    assert both.history[0]["train_loss"] != mean.history[0]["train_loss"]  # it learnt other points


def test_a_mismatched_refine_checkpoint_is_refused_before_any_work(isbi_small, isbi_model, isbi_refine, synth_root,
                                                                     tmp_path):
    changed = tmp_path / "start.pt"
    shutil.copy(isbi_model, changed)
    with open(changed, "ab") as f:
        f.write(b"\0")  # another file: the stage was not trained on it
    with pytest.raises(CheckpointError, match=r"refines the start model with sha256 [0-9a-f]{16}\.\.\. .* but "
                                              rf"{changed} has sha256 [0-9a-f]{{16}}\.\.\.: a refinement stage fits only"):
        load_cascade(isbi_refine, torch.device("cpu"), start=changed)
    with pytest.raises(CheckpointError, match=r"landmark symbols \['S', 'N', .*\] differ from the dataset's \['A', 'ANS'"):
        evaluate_checkpoint(isbi_refine, synth_root, "valid", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # refused before anything was decoded
    proc = cli("predict", "--model", isbi_refine, "--out", tmp_path / "p", isbi_small / "images" / "151.jpg",
               "--pixel-size", "0.6")
    assert proc.returncode == 1 and "`refine_mm_per_px` is 0.5, but must be >= 0.6 mm/px" in proc.stderr


# ---------------------------------------------------------------- refinement from another detector's predictions

@pytest.fixture(scope="module")
def given_points(synth_root, start_ckpt, tmp_path_factory) -> Path:
    """Another detector's points for every image of the synthetic set: `predict`'s JSON files (here the start model's,
    written by `predict` as any detector's would be)."""
    from tune_landmarks.predict import predict
    from tune_landmarks.read import describe, load_split

    info = describe(synth_root)
    images = [r.image_path for split in info.splits for r in load_split(info, split).records]
    out = tmp_path_factory.mktemp("given")
    assert not predict(start_ckpt, images, out).failed
    return out


@pytest.mark.slow
def test_a_refine_sweep_on_predictions_alone_judges_them_as_the_start(synth_root, given_points, tmp_path):
    import ray

    from tune_landmarks.experiment import SweepSettings
    from tune_landmarks.read import describe, load_split, read_predictions
    from tune_landmarks.search import run_search

    (tmp_path / "space.yaml").write_text(REFINE_ARM_SPACE)
    base = TrainConfig(dataset_path=str(synth_root), start_predictions=str(given_points), mode="refine", epochs=2,
                       batch_size=4, max_steps_per_epoch=2, progress=False)
    with pytest.raises(ValueError, match="`arms` is 'masked,refine', but must be 'refine' with --start-predictions"):
        run_search(str(tmp_path / "space.yaml"), base, SweepSettings(name="no", storage=str(tmp_path / "s"),
                                                                     arms=["masked", "refine"]))
    settings = SweepSettings(name="given", storage=str(tmp_path / "s"), num_samples=1, max_concurrent=1,
                             cpus_per_trial=1, arms=["refine"], seed=0)
    try:
        assert run_search(str(tmp_path / "space.yaml"), base, settings) == 0
    finally:
        ray.shutdown()
    exp = tmp_path / "s" / "given"
    verdict = json.loads((exp / "verdict.json").read_text())
    assert {(c["a"], c["b"]) for c in verdict["comparisons"]} == {("best refine", "start")}
    start = evaluate_checkpoint(given_points, synth_root, "test")  # the predictions, scored as they are
    assert verdict["selection_mre_mm"]["start"] == pytest.approx(
        evaluate_checkpoint(given_points, synth_root, "valid").summary.mre, abs=1e-9)
    p = cli("export", exp, "--force", "--out", tmp_path / "stage", "--split", "test")
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / "stage" / "model.json").read_text())
    assert meta["refine"]["start"]["predictions"] == str(given_points) and not (tmp_path / "stage" / "start").exists()
    ev = evaluate_checkpoint(tmp_path / "stage", synth_root, "test")
    refined = [i for i, s in enumerate(ev.symbols) if s in meta["refine"]["refined"]]
    others = [i for i in range(len(ev.symbols)) if i not in refined]
    assert np.array_equal(ev.pred[:, others], start.pred[:, others])
    assert not np.array_equal(ev.pred[:, refined], start.pred[:, refined])
    # predict refines given points for new images; every other landmark is the given one, bit for bit
    info = describe(synth_root)
    images = [r.image_path for r in load_split(info, "test").records]
    p = cli("predict", *images, "--model", tmp_path / "stage", "--start-predictions", given_points, "--out",
            tmp_path / "p", "--pixel-size", "0.1")
    assert p.returncode == 0, p.stderr
    out = read_predictions(tmp_path / "p", [i.stem for i in images], info.symbols)
    src = read_predictions(given_points, [i.stem for i in images], info.symbols)
    assert np.array_equal(out[:, others], src[:, others]) and not np.array_equal(out[:, refined], src[:, refined])
    # `finetune --mode refine --start-predictions`: a missing image or landmark is one error listing them, before
    # any training
    partial = tmp_path / "partial"
    shutil.copytree(given_points, partial)
    valid = [r.image_id for r in load_split(info, "valid").records]
    missing, damaged = valid[:2], partial / f"{valid[2]}.json"
    for image_id in missing:
        (partial / f"{image_id}.json").unlink()
    data = json.loads(damaged.read_text())
    damaged.write_text(json.dumps(data | {"landmarks": data["landmarks"][1:]}))  # landmark A left out
    p = cli("finetune", "--mode", "refine", "--start-predictions", partial, "--dataset_path", synth_root,
            "--difficult", "Go", "--refine-mm-per-px", "0.15", "--refine-crop-mm", "9.6", "--out", tmp_path / "x")
    assert p.returncode == 1 and f"no prediction for 2 image(s) the run uses: {', '.join(missing)}" in p.stderr
    assert f"{damaged}: missing landmark symbol(s) A" in p.stderr
    assert not (tmp_path / "x" / "last.pt").exists()
