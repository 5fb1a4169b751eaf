"""Images have roles, and roles never mix: carving a split, the defaults per layout, overlap refused."""
from __future__ import annotations

import pytest
from conftest import cli

from tune_landmarks.read import carve, describe, load_roles, parse_split, read_split


def test_carving_is_deterministic_disjoint_and_covers_the_split(isbi_root):
    info = describe(isbi_root)
    ids = [r.image_id for r in read_split(info, "train").records]
    part = carve(ids, 0.2)
    assert len(part) == 30 and part <= set(ids)
    assert carve(list(reversed(ids)), 0.2) == part  # file order does not matter
    assert carve(ids, 0.1) < part  # a smaller fraction is a part of the larger one (the same order)
    roles = load_roles(info)
    train, val = ({r.image_id for r in sp.records} for sp in (roles.train, roles.val))
    assert val == part and not train & val and train | val == set(ids)  # disjoint, and together the whole split
    assert roles.test.name == "test1" and len(roles.test.records) == 150
    again = load_roles(describe(isbi_root))
    assert again.ids() == roles.ids()


def test_default_roles_per_layout(synth_root, isbi_root):
    aariz = load_roles(describe(synth_root)).ids()
    assert (aariz["train"]["spec"], aariz["val"]["spec"], aariz["test"]["spec"]) == ("train", "valid", "test")
    isbi = load_roles(describe(isbi_root)).ids()
    assert (isbi["train"]["spec"], isbi["val"]["spec"], isbi["test"]["spec"]) == ("train", "train:0.2", "test1")


def test_overlapping_roles_are_refused_naming_both(isbi_root):
    info = describe(isbi_root)
    with pytest.raises(ValueError, match=r"the selection split 'train:0.2' \(--val-split\) and the verdict split "
                                         r"'train:0.1' \(--test-split\) share 15 image\(s\)"):
        load_roles(info, val="train:0.2", test="train:0.1")
    with pytest.raises(ValueError, match="share 150 image"):
        load_roles(info, val="test1", test="test1")
    with pytest.raises(ValueError, match=r"The value of `split` is 'train:1.5', but must be NAME or NAME:FRACTION"):
        parse_split("train:1.5")
    # a verdict split carved from train also leaves training
    roles = load_roles(info, val="test1", test="train:0.1")
    assert not {r.image_id for r in roles.train.records} & {r.image_id for r in roles.test.records}


def test_check_dataset_shows_the_roles_and_a_refusal(isbi_root):
    p = cli("check-dataset", isbi_root, "--no-progress")
    assert "roles a run or sweep would use: training train 120 images, selection (--val-split) train:0.2 30 images, " \
           "verdict (--test-split) test1 150 images" in p.stdout
    p = cli("check-dataset", isbi_root, "--no-progress", "--val-split", "test1")
    assert "roles: refused — the selection split 'test1' (--val-split) and the verdict split 'test1'" in p.stdout


def test_finetune_refuses_overlapping_roles_before_any_work(synth_root, start_ckpt, tmp_path):
    p = cli("finetune", "--resume", start_ckpt, "--dataset_path", synth_root, "--val-split", "test",
            "--out", tmp_path / "run", "--difficult", "Go")
    assert p.returncode == 1 and "the selection split 'test' (--val-split) and the verdict split 'test'" in p.stderr
    assert not (tmp_path / "run").exists()
