"""`export`: a real tiny sweep on the synthetic set, exported, proven, tampered with, and used again."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY, cli

from tune_landmarks.config import FIELDS
from tune_landmarks.experiment import Experiment
from tune_landmarks.export import ALL_WON, TOLERANCE_MM, checkpoint_for_epoch, choice_words, choose, export, select
from tune_landmarks.model import sha256_file

pytestmark = pytest.mark.slow  # every test here needs a real Ray sweep


@pytest.fixture(scope="module")
def experiment(tiny_sweep) -> Path:
    """Two trials in each of the arms masked and all, three epochs each, on the synthetic set (conftest)."""
    return tiny_sweep


@pytest.fixture(scope="module")
def trials(experiment):
    from tune_landmarks.results import collect

    return collect(experiment)


@pytest.fixture(scope="module")
def exported(experiment, tmp_path_factory) -> tuple[Path, str]:
    """The export with the held-out split and one confirmation seed; (folder, what it logged for the console)."""
    out = tmp_path_factory.mktemp("export") / "model"
    printed = io.StringIO()
    handler, logger = logging.StreamHandler(printed), logging.getLogger("tune_landmarks")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        # force: whether 3 tiny epochs beat the start is not this test's question (the refusal has its own)
        assert export(experiment, out, split="test", confirm=1, force=True) == out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, printed.getvalue()


def test_export_writes_the_best_epoch_of_the_best_trial(exported, trials, start_ckpt):
    from safetensors.torch import load_file

    from tune_landmarks.model import read_checkpoint

    out, stdout = exported
    winner, best = choose(trials)
    meta = json.loads((out / "model.json").read_text())
    assert (meta["trial_id"], meta["epoch"]) == (winner.trial_id, int(best["epoch"]))
    assert meta["arm"] == winner.arm
    assert meta["metrics"]["val_mre"] == pytest.approx(best["val_mre"])
    assert meta["hyperparameters"] == winner.params
    assert set(meta["config"]) == set(FIELDS) and meta["config"]["lr"] == pytest.approx(winner.params["lr"])
    assert meta["arch"] == {"model": TINY["model"], "num_landmarks": 29} and meta["image_size"] == [64, 64]
    assert meta["heatmap"] == {"sigma": 2.0, "decoder": "dark", "stride": 4}
    assert meta["start_checkpoint"]["sha256"] == sha256_file(start_ckpt)
    # the weights are exactly those of the checkpoint Ray kept for that epoch
    source = read_checkpoint(Path(meta["source"]["checkpoint"]) / "checkpoint.pt")
    assert source["epoch"] + 1 == meta["epoch"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == source["model"].keys()
    assert all((weights[k] == v).all() for k, v in source["model"].items())
    assert meta["difficult"] == source["difficult"]

    proof = json.loads((out / "verification.json").read_text())
    assert proof["passed"] and proof["split"] == "valid" and proof["max_abs_difference_mm"] <= TOLERANCE_MM
    assert "verified" in stdout and (ALL_WON in stdout) == (winner.arm == "all")

    test = json.loads((out / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["images"] > 0 and test["mre"] > 0
    assert yaml.safe_load((out / "best_hyperparameters.yaml").read_text()) == winner.params
    table = pq.read_table(out / "landmarks.parquet").to_pylist()
    assert [r["symbol"] for r in table] == meta["symbols"]
    assert all(r["change_mm"] == pytest.approx(r["best_mre_mm"] - r["start_mre_mm"]) for r in table)
    assert {r["symbol"] for r in table if r["difficult"]} == set(meta["difficult"])
    assert (out / "landmarks.md").read_text().count("\n|") == 2 + 29  # header, rule, one row per landmark

    confirm = json.loads((out / "confirm_seeds.json").read_text())
    arms = {a["arm"]: a for a in confirm["arms"]}
    other = ({"masked", "all"} - {winner.arm}).pop()
    assert set(arms) == {"winner", f"best {other}"}  # every other arm's winner, on the same seeds
    assert arms["winner"]["trial_id"] == winner.trial_id and len(arms["winner"]["runs"]) == 1
    assert confirm["seeds"] == [1]  # the sweep's trials all ran seed 0
    for a in arms.values():
        assert a["mean"] == pytest.approx(a["runs"][0]["best_val_mre"])
        assert (out / a["runs"][0]["out"]).is_dir()
    assert not list(out.parent.glob(".model.*")), "the temporary folder was left behind"


def test_selection_takes_each_trials_best_epoch_not_its_last(trials, experiment):
    _, best = choose(trials)
    assert best["val_mre"] == min(e["val_mre"] for t in trials for e in t.epochs)
    # a trial that ended worse than it peaked must still win on its peak
    a = next(t for t in trials if len(t.epochs) >= 2)
    b = next(t for t in trials if t is not a)
    rows = a.epochs[:2]
    peaked = dataclasses.replace(a, epochs=[{**rows[0], "val_mre": 0.9}, {**rows[1], "val_mre": 0.5},
                                            {**rows[1], "epoch": 3, "val_mre": 0.95}])
    steady = dataclasses.replace(b, trial_id="steady", epochs=[{**e, "val_mre": 0.6} for e in b.epochs])
    chosen, epoch = choose([steady, peaked])
    assert chosen is peaked and epoch["epoch"] == rows[1]["epoch"] and epoch["val_mre"] == 0.5

    # the checkpoint Ray kept for each epoch is found by its epoch.json
    for t in trials:
        trial_dir = experiment / Path(t.path).name
        for d in trial_dir.glob("checkpoint_*"):
            e = json.loads((d / "epoch.json").read_text())["epoch"]
            assert experiment / checkpoint_for_epoch(Experiment(str(experiment)), t.trial_id, e) == d


def test_export_words_follow_the_choice_actually_made(trials, experiment):
    """`--arm all` when another arm won names that arm; the overall winner's own arm says it is also the best."""
    exp = Experiment(str(experiment))
    best, epoch = choose(trials)
    other = next(a for a in ("masked", "all") if a != best.arm)
    sel = select([t for t in trials if t.arm == other], exp)
    words = choice_words(sel, (best, epoch), other)
    assert words == (f"--arm {other}: exported that arm's winner as asked; the best trial on the selection split is of "
                     f"arm '{best.arm}' (trial {best.trial_id}, {epoch['val_mre']:.3f} mm against "
                     f"{sel.epoch['val_mre']:.3f} mm).")
    assert ALL_WON not in words
    own = select([t for t in trials if t.arm == best.arm], exp)
    assert choice_words(own, (best, epoch), best.arm) == (f"--arm {best.arm}: its winner is also the best trial of "
                                                         "every arm on the selection split.")
    overall = select(trials, exp)
    assert (choice_words(overall, None, None) == f"The best trial is of arm 'all': {ALL_WON}.") == (best.arm == "all")


def test_a_dropped_best_checkpoint_fails_clearly(experiment, trials, tmp_path):
    """Ray keeps only the best few checkpoints (and the latest): if the winner's is gone, say so, write
    nothing."""
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy)
    winner, best = choose(trials)
    shutil.rmtree(copy / checkpoint_for_epoch(Experiment(str(copy)), winner.trial_id, int(best["epoch"])))
    gone = rf"epoch {int(best['epoch'])} \(the trial's best\) was not kept"
    with pytest.raises(FileNotFoundError, match=gone):
        export(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tampered_weights_fail_verification(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported[0], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["backbone.conv1.weight"][0, 0, 1, 1] += 5.0  # one weight of the stem
    save_file(weights, str(bad / "model.safetensors"))
    proc = cli("export", "--verify", bad)
    assert proc.returncode == 1
    assert f"{bad / 'model.safetensors'}: does not reproduce" in proc.stderr and "> 0.001 mm" in proc.stderr
    assert json.loads((bad / "verification.json").read_text())["passed"] is False


def test_finetune_and_evaluate_take_the_exported_folder(exported, synth_root, tmp_path):
    out = exported[0]
    meta = json.loads((out / "model.json").read_text())
    ev = cli("evaluate", "--checkpoint", out, "--dataset-path", synth_root, "--split", "valid", check=True)
    mre = float(re.search(r"^MRE ([\d.]+) ", ev.stdout, re.MULTILINE).group(1))
    assert mre == pytest.approx(meta["metrics"]["val_mre"], abs=1e-3)
    cli("finetune", "--resume", out, "--dataset-path", synth_root, "--model", TINY["model"],
        "--image-size", "64", "64", "--batch-size", "4", "--mode", "all", "--epochs", "1",
        "--max-steps-per-epoch", "1", "--no-progress",
        "--out", tmp_path / "ft", check=True)
    assert (tmp_path / "ft" / "best.pt").is_file()


def test_bad_requests_fail_before_any_work(experiment, tmp_path):
    not_exp = rf"{re.escape(str(tmp_path))}: not a tune-landmarks experiment"
    with pytest.raises(FileNotFoundError, match=not_exp):
        export(tmp_path, tmp_path / "out")
    for split in ("valid", "train", "nope"):
        wrong = rf"`split` is '{split}', but must be images neither trained on nor used to choose \(e\.g\. the sweep's " \
                rf"verdict split 'test'\): "
        with pytest.raises(ValueError, match=wrong):
            export(experiment, tmp_path / "out", split=split)
    with pytest.raises(ValueError, match=r"`confirm_seeds` is -1, but must be >= 0"):
        export(experiment, tmp_path / "out", confirm=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy: folder is not empty and holds no earlier export"):
        export(experiment, tmp_path / "busy")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["busy"]
    # the command line: the experiment by name under --storage, and one clear message with exit 1
    proc = cli("export", experiment.name, "--storage", experiment.parent, "--out", tmp_path / "out",
               "--split", "valid")
    assert proc.returncode == 1 and "error: The value of `split` is 'valid'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_refuses_when_nothing_beat_the_start_unless_forced(experiment, tmp_path):
    """A sweep whose trials are all worse than the start model on the selection split: keeping the start model
    is the honest outcome, so nothing is exported without --force."""
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy)
    sweep = json.loads((copy / "sweep.json").read_text())
    sweep["start_errors"] = {s: 0.001 for s in sweep["start_errors"]}  # a start no trial can beat
    (copy / "sweep.json").write_text(json.dumps(sweep))
    p = cli("export", copy, "--out", tmp_path / "out")
    assert p.returncode == 1
    assert re.search(r"error: no fine-tuned trial improved on the start model on valid \(start 0\.001 mm, best "
                     r"[\d.]+ mm\); nothing exported — use --force to export the best trial anyway", p.stderr), p.stderr
    assert not (tmp_path / "out").exists()
    p = cli("export", copy, "--out", tmp_path / "out", "--force", check=True)
    assert "exported anyway" in p.stdout and (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------- a checkpoint cut short is never trusted

def _damaged_copy(experiment: Path, dst: Path, trials) -> tuple[Path, str, int]:
    """A copy of the finished sweep whose best trial's chosen checkpoint is cut short (a killed upload): (the copy,
    that trial's id, its epoch)."""
    shutil.copytree(experiment, dst, symlinks=True)
    best, epoch = choose(trials)
    rel = checkpoint_for_epoch(Experiment(str(dst)), best.trial_id, int(epoch["epoch"]))
    ckpt = dst / rel / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:4096])
    return dst, best.trial_id, int(epoch["epoch"])


def test_a_damaged_checkpoint_is_refused_by_name_and_force_takes_the_next_intact(experiment, trials, tmp_path):
    from tune_landmarks.compare import sweep_verdict
    from tune_landmarks.model import CheckpointError

    exp, trial, epoch = _damaged_copy(experiment, tmp_path / "exp", trials)
    wrong = rf"the checkpoint of trial {trial} epoch {epoch} is damaged \(4096 of the \d+ bytes it was written with\)"
    with pytest.raises(CheckpointError, match=wrong + "; nothing exported"):
        export(exp, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = export(exp, tmp_path / "forced", force=True)
    meta = json.loads((out / "model.json").read_text())
    assert meta["trial_id"] != trial and json.loads((out / "verification.json").read_text())["passed"]
    with pytest.raises(CheckpointError, match=rf"trial {trial} epoch {epoch} \(best \w+\) is damaged"):
        sweep_verdict(exp, n_boot=50)


def test_a_restored_trial_falls_back_to_its_latest_intact_checkpoint(experiment, trials, tmp_path):
    """resume names the trial and both epochs; the trial itself continues from the earlier checkpoint's bytes."""
    from tune_landmarks.results import kept_checkpoints
    from tune_landmarks.search import _restore_from
    from tune_landmarks.sweeps import damaged_restarts

    shutil.copytree(experiment, tmp_path / "exp", symlinks=True)
    exp = Experiment(str(tmp_path / "exp"))
    trial = next(t for t in trials if len(kept_checkpoints(exp, t.trial_id)) >= 2)
    kept = kept_checkpoints(exp, trial.trial_id)
    last, earlier = max(kept), max(e for e in kept if e < max(kept))
    ckpt = tmp_path / "exp" / kept[last][1] / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    running = dataclasses.replace(trial, status="RUNNING")  # as an interrupted sweep records it
    assert damaged_restarts(exp, [running]) == [
        f"trial {trial.trial_id}: the checkpoint of epoch {last} is damaged (its sha256 is not the one recorded when it "
        f"was written); it continues from epoch {earlier}, its latest intact checkpoint"]
    sweep = exp.load_sweep()
    sweep.settings.storage, sweep.settings.name = str(tmp_path), "exp"
    _restore_from(ckpt.parent, sweep, trial.trial_id, tmp_path / "resume.pt")
    assert (tmp_path / "resume.pt").read_bytes() == (tmp_path / "exp" / kept[earlier][1] / "checkpoint.pt").read_bytes()


def test_a_damaged_checkpoint_in_object_storage_is_refused_too(experiment, trials, s3_env, monkeypatch, tmp_path):
    import pyarrow.fs as pafs
    from conftest import S3_BUCKET, s3_fs

    from tune_landmarks.model import CheckpointError

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    local, trial, epoch = _damaged_copy(experiment, tmp_path / "exp", trials)
    pafs.copy_files(str(local), f"{S3_BUCKET}/damaged", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_fs(s3_env))
    with pytest.raises(CheckpointError, match=rf"s3://{S3_BUCKET}/damaged/.*trial {trial} epoch {epoch} is damaged"):
        export(f"s3://{S3_BUCKET}/damaged", tmp_path / "refused")
