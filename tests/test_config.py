"""Run options without a run: `--config` YAML under flags through the real parser, both flag spellings,
bad YAML named with its file, and each rule's uniform message. Milliseconds each: no dataset, no model."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tune_landmarks.cli import build_parser
from tune_landmarks.config import FIELDS, MODES, OPTIONS, TrainConfig, check_field, coerce, from_dict, load_yaml
from tune_landmarks.stages import run_config


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def yaml_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "run.yaml"
    f.write_text(text)
    return f


def test_flags_override_the_yaml_and_defaults_fill_the_rest(parser, tmp_path: Path) -> None:
    f = yaml_file(tmp_path, "lr: 1.0e-3\nepochs: 3\nimage_size: [128, 96]\n")
    cfg = run_config(parser.parse_args(["finetune", "--config", str(f), "--lr", "2e-4"]))
    assert cfg == TrainConfig(lr=2e-4, epochs=3, image_size=(128, 96))


def test_yaml_alone_and_flags_alone(parser, tmp_path: Path) -> None:
    f = yaml_file(tmp_path, "lr: 1.0e-3\ndifficult: [UMT, UPM]\nmixed_precision: true\n")
    assert run_config(parser.parse_args(["train", "--config", str(f)])) == TrainConfig(
        lr=1e-3, difficult=["UMT", "UPM"], mixed_precision=True)
    assert run_config(parser.parse_args(["train", "--epochs", "5", "--difficult", "UMT, UPM"])) == TrainConfig(
        epochs=5, difficult=["UMT", "UPM"])


def test_run_config_starts_from_the_commands_base(parser) -> None:
    cfg = run_config(parser.parse_args(["finetune", "--lr", "1e-6"]), TrainConfig(mode="masked"))
    assert cfg == TrainConfig(mode="masked", lr=1e-6)


@pytest.mark.parametrize("flags", [
    ["--image_size", "128", "96", "--warmup_epochs", "2", "--batch_size", "8", "--mixed_precision"],
    ["--image-size", "128", "96", "--warmup-epochs", "2", "--batch-size", "8", "--mixed-precision"],
])
def test_both_flag_spellings(parser, flags: list[str]) -> None:
    cfg = run_config(parser.parse_args(["finetune", *flags]))
    assert (cfg.image_size, cfg.warmup_epochs, cfg.batch_size, cfg.mixed_precision) == ((128, 96), 2.0, 8, True)


@pytest.mark.parametrize("flag", ["--no-mixed_precision", "--no-mixed-precision"])
def test_a_negative_flag_overrides_a_yaml_true(parser, tmp_path: Path, flag: str) -> None:
    f = yaml_file(tmp_path, "mixed_precision: true\n")
    assert run_config(parser.parse_args(["train", "--config", str(f), flag])) == TrainConfig()


@pytest.mark.parametrize("text, message", [
    ("- lr\n- epochs\n", "must be a mapping of option: value"),
    ("lr: 1.0e-3\nbogus: 1\nlearning_rate: 2\n", "unknown option(s) bogus, learning_rate"),
    ("lr: [unclosed\n", "cannot read YAML"),
])
def test_bad_yaml_is_named_with_its_file(parser, tmp_path: Path, text: str, message: str) -> None:
    f = yaml_file(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{f}: {message}")):
        run_config(parser.parse_args(["finetune", "--config", str(f)]))


def test_an_empty_yaml_is_no_options(tmp_path: Path) -> None:
    assert load_yaml(yaml_file(tmp_path, "")) == {}


@pytest.mark.parametrize("name, value, kind", [
    ("epochs", "three", "int"), ("epochs", 2.5, "int"), ("lr", "fast", "float"), ("lr", None, "float"),
    ("mixed_precision", "maybe", "bool"), ("image_size", [64, 64, 64], "tuple"), ("image_size", "big", "tuple"),
])
def test_a_value_of_the_wrong_type_says_so(name: str, value: object, kind: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"The value of `{name}` is {value!r}, but must be a valid {kind}.")):
        coerce(name, value)


def test_coerce_converts_yaml_and_flag_text() -> None:
    assert coerce("lr", "2e-4") == 2e-4 and coerce("epochs", 3.0) == 3 and coerce("mixed_precision", "yes") is True
    assert coerce("image_size", 64) == (64, 64) and coerce("image_size", ["128", 96]) == (128, 96)
    assert coerce("difficult", "UMT, UPM,") == ["UMT", "UPM"] and coerce("difficult_threshold", None) is None
    with pytest.raises(KeyError):
        coerce("bogus", 1)


BAD = [
    ("dataset_path", "", "a dataset directory"),
    ("format", "dicom", "one of aariz, isbi"),
    ("annotator", "resident", "one of senior, junior, mean, both"),
    ("image_size", (0, 0), "two sizes in pixels (width height), each >= 8"),
    ("epochs", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("lr", -0.001, "> 0"),
    ("lr", 0.0, "> 0"),
    ("weight_decay", -1e-4, ">= 0"),
    ("warmup_epochs", -1.0, ">= 0"),
    ("grad_clip", -1.0, ">= 0 (0 = off)"),
    ("seed", -1, ">= 0"),
    ("loss", "l1", "one of adaptive_wing, mse"),
    ("awing_omega", 0.0, "> 0"),
    ("awing_theta", -0.5, "> 0"),
    ("awing_epsilon", 0.0, "> 0"),
    ("awing_alpha", 1.0, "> 1"),
    ("awing_weight", -1.0, ">= 0"),
    ("sigma", 0.0, "> 0"),
    ("mode", "half", "one of " + ", ".join(MODES)),
    ("difficult_threshold", 0.0, "> 0 mm"),
    ("difficult_weight", 0.0, "> 0"),
    ("distill_weight", -0.5, ">= 0"),
    ("freeze_stages", 7, "between 0 and 4"),
    ("freeze_stages", -1, "between 0 and 4"),
    ("aug_scale", -0.1, ">= 0"),
    ("aug_clahe_p", 1.5, "between 0 and 1"),
    ("decoder", "soft", "one of dark, quarter, argmax"),
    ("device", "gpu", "auto, cpu or cuda[:N]"),
    ("device", "cuda:x", "auto, cpu or cuda[:N]"),
    ("num_workers", -1, ">= 0"),
    ("threads", -2, ">= 0"),
    ("max_steps_per_epoch", -1, ">= 0"),
    ("lr", None, "> 0"),
]


@pytest.mark.parametrize("name, value, must", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_rule_has_the_uniform_message(name: str, value: object, must: str) -> None:
    message = re.escape(f"The value of `{name}` is {value!r}, but must be {must}.")
    with pytest.raises(ValueError, match=message):
        check_field(name, value)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(dataset_path="data"), **{name: value}).validate()


def test_the_uniform_message_reaches_a_flag(parser) -> None:
    cfg = run_config(parser.parse_args(["finetune", "--dataset_path", "data", "--lr", "-0.001"]))
    with pytest.raises(ValueError, match=re.escape("The value of `lr` is -0.001, but must be > 0.")):
        cfg.validate()


@pytest.mark.parametrize("changes, message", [
    ({"image_size": (100, 64)}, "The value of `image_size` is (100, 64), but must be two multiples of 32 (width height), "
                                "each >= 32 (the built-in models' stride)."),
    ({"difficult": ["UMT"], "difficult_threshold": 2.0},
     "The value of `difficult_threshold` is 2.0, but must be unset when `difficult` is given"),
    ({"warmup_epochs": 30.0, "epochs": 20}, "The value of `warmup_epochs` is 30.0, but must be <= epochs (20)."),
    ({"mode": "masked"}, "The value of `mode` is 'masked', but must be 'all' unless the difficult set is picked"),
    ({"distill_weight": 0.5}, "The value of `distill_weight` is 0.5, but must be 0 without a start model (--resume)"),
])
def test_each_relation_between_options_has_the_uniform_message(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(dataset_path="data", **changes).validate()


def test_defaults_and_edges_are_valid() -> None:
    for cfg in (TrainConfig(dataset_path="data"),
                TrainConfig(dataset_path="data", format="isbi", mode="masked", difficult_threshold=2.0, warmup_epochs=20,
                            freeze_stages=4, aug_clahe_p=1.0, device="cuda:1", resume="s.pt", distill_weight=1.0),
                TrainConfig(dataset_path="data", mode="weighted", difficult=["UMT"], awing_alpha=1.01, device="cuda")):
        assert cfg.validate() is cfg


def test_options_carry_type_and_rule() -> None:
    assert set(OPTIONS) == set(FIELDS)
    assert (OPTIONS["lr"].type, OPTIONS["lr"].optional, OPTIONS["lr"].rule.must) == (float, False, "> 0")
    assert (OPTIONS["difficult_threshold"].type, OPTIONS["difficult_threshold"].optional) == (float, True)
    assert OPTIONS["freeze_stages"].type is int and OPTIONS["image_size"].type is tuple and OPTIONS["difficult"].type is list
    assert OPTIONS["bn_eval"].type is bool and not OPTIONS["bn_eval"].numeric and OPTIONS["warmup_epochs"].numeric
    assert check_field("format", None) is None and check_field("out", "x") == "x"


def test_a_saved_config_reads_back_equal(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset_path="data", image_size=(128, 96), difficult=["UMT"], difficult_threshold=None, lr=3e-5)
    cfg.save(tmp_path / "config.yaml")
    assert from_dict(load_yaml(tmp_path / "config.yaml")) == cfg == from_dict(cfg.to_dict())
    assert cfg.to_dict()["image_size"] == [128, 96]


def test_from_dict_leaves_its_base_alone() -> None:
    base = TrainConfig(lr=1e-3)
    assert from_dict({"epochs": 2}, base) == TrainConfig(lr=1e-3, epochs=2) and base == TrainConfig(lr=1e-3)
    with pytest.raises(ValueError, match=re.escape("trial parameters: unknown option(s) bogus")):
        from_dict({"bogus": 1}, base, source="trial parameters")


def test_a_crop_side_per_landmark_from_yaml_flags_and_keys(parser, tmp_path: Path) -> None:
    """`refine_crop_mm` takes a number (every landmark), a YAML mapping or `Go=45,default=30` on the command line, and
    `refine_crop_mm.Go` keys; a flag replaces the YAML's mapping, a key changes one entry."""
    f = yaml_file(tmp_path, "refine_crop_mm: {Go: 45, default: 30}\n")
    assert run_config(parser.parse_args(["finetune", "--config", str(f)])).refine_crop_mm == {"Go": 45.0, "default": 30.0}
    assert run_config(parser.parse_args(["finetune", "--config", str(f), "--refine-crop-mm", "Ar=40,Go=50"])
                      ).refine_crop_mm == {"Ar": 40.0, "Go": 50.0}
    assert run_config(parser.parse_args(["finetune", "--refine-crop-mm", "38.4"])).refine_crop_mm == {"default": 38.4}
    assert TrainConfig(refine_crop_mm=38.4) == TrainConfig(refine_crop_mm={"default": 38.4})
    assert TrainConfig().refine_crop_mm == {}  # every side derived from the start model's errors
    cfg = from_dict({"refine_crop_mm.Go": "52", "refine_crop_mm.default": 30}, TrainConfig(refine_crop_mm={"Ar": 40}))
    assert cfg.refine_crop_mm == {"Ar": 40.0, "Go": 52.0, "default": 30.0}
    cfg.save(tmp_path / "saved.yaml")
    assert from_dict(load_yaml(tmp_path / "saved.yaml")) == cfg


@pytest.mark.parametrize("values, message", [
    ({"refine_crop_mm": "Go=-3"}, "The value of `refine_crop_mm.Go` is -3.0, but must be > 0 mm."),
    ({"refine_crop_mm.Go": 0}, "The value of `refine_crop_mm.Go` is 0.0, but must be > 0 mm."),
    ({"refine_crop_mm": -1}, "The value of `refine_crop_mm` is -1.0, but must be > 0 mm."),
    ({"refine_crop_mm": "Go=wide"}, "The value of `refine_crop_mm` is 'Go=wide', but must be a valid number, or "
                                    "SYMBOL=number pairs (default=number for the others)."),
    ({"refine_crop_mm.Go": "x"}, "The value of `refine_crop_mm.Go` is 'x', but must be a valid float."),
    ({"refine_crop_k": 0}, "The value of `refine_crop_k` is 0.0, but must be > 0."),
    ({"refine_crop_mm": {"Go": 600}, "refine_mm_per_px": 1.0},
     "The value of `refine_crop_mm.Go` is 600.0, but must be <= 512 crop pixels at `refine_mm_per_px` 1"),
])
def test_a_bad_crop_side_is_one_clear_message(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_dict({"dataset_path": "d"} | values).validate()
    with pytest.raises(ValueError, match=r"unknown option\(s\) lr\.Go"):
        from_dict({"lr.Go": 1e-3})
