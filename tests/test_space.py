"""Search spaces without Ray: the define-by-run function on an in-memory Optuna study, every refusal
of an invalid entry (each naming the file, the key and the rule), rules between options, and the dict
form a sweep stores. Milliseconds each: no dataset, no model."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import optuna
import pytest

from tune_landmarks.config import MODES, TrainConfig
from tune_landmarks.space import SearchSpace, SpaceError, load_space, space_from_dict

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))

SPACE = """\
lr: {type: loguniform, low: 1.0e-6, high: 1.0e-3}
warmup_epochs: {type: int, low: 0, high: 3}
difficult_weight: {type: int, low: 1, high: 8, log: true}
awing_theta: {type: uniform, low: 0.3, high: 0.7}
mode: {type: categorical, choices: [masked, weighted]}
difficult_threshold: {type: uniform, low: 1.5, high: 3.0}
loss: {type: fixed, value: adaptive_wing}
bn_eval: {type: categorical, choices: [false, true]}
"""

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "space.yaml"
    f.write_text(text)
    return f


@pytest.fixture
def space(tmp_path: Path) -> SearchSpace:
    return load_space(write(tmp_path, SPACE))


def test_define_by_run_samples_inside_the_ranges(space: SearchSpace) -> None:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    fn = space.define_by_run()
    for _ in range(12):
        trial = study.ask()
        assert fn(trial) == {"loss": "adaptive_wing"}
        p = trial.params
        assert set(p) == {"lr", "warmup_epochs", "difficult_weight", "awing_theta", "mode", "difficult_threshold", "bn_eval"}
        assert 1e-6 <= p["lr"] <= 1e-3 and 0.3 <= p["awing_theta"] <= 0.7 and 1.5 <= p["difficult_threshold"] <= 3.0
        assert isinstance(p["warmup_epochs"], int) and 0 <= p["warmup_epochs"] <= 3
        assert isinstance(p["difficult_weight"], int) and 1 <= p["difficult_weight"] <= 8
        assert p["mode"] in ("masked", "weighted") and p["bn_eval"] in (False, True)
        study.tell(trial, math.log(p["lr"]))
    assert len(study.trials) == 12 and study.best_value == min(t.value for t in study.trials)


def test_define_by_run_tells_optuna_which_ranges_are_log(space: SearchSpace) -> None:
    trial = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask()
    space.define_by_run()(trial)
    d = trial.distributions
    assert d["lr"].log and d["difficult_weight"].log
    assert not d["awing_theta"].log and not d["warmup_epochs"].log
    assert d["difficult_weight"].step == 1 and d["mode"].choices == ("masked", "weighted")


def test_space_parts(space: SearchSpace) -> None:
    assert space.path.is_absolute()
    assert space.searched == ["lr", "warmup_epochs", "difficult_weight", "awing_theta", "mode", "difficult_threshold",
                              "bn_eval"]
    assert space.fixed() == {"loss": "adaptive_wing"}
    d = space.defaults()
    assert d["lr"] == pytest.approx(math.sqrt(1e-6 * 1e-3)) and d["warmup_epochs"] == 1 and d["mode"] == "masked"
    assert space.max_warmup() == 3.0 and space.get("bogus") is None


def test_max_warmup_of_each_entry_type(tmp_path: Path) -> None:
    for spec, expected in (("{type: categorical, choices: [2, 0.5]}", 2.0), ("{type: fixed, value: 1.5}", 1.5),
                           ("{type: uniform, low: 0, high: 2.5}", 2.5)):
        s = load_space(write(tmp_path, f"warmup_epochs: {spec}\nlr: {{type: loguniform, low: 1.0e-5, high: 1.0e-3}}\n"))
        assert s.max_warmup() == expected
    assert load_space(write(tmp_path, "lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}\n")).max_warmup() == 0.0


@pytest.mark.parametrize("text, message", [
    # endpoints against the option's rule
    ("lr: {type: uniform, low: -1.0e-3, high: 1.0e-2}", "`lr`: The value of `low` is -0.001, but must be > 0."),
    ("lr: {type: uniform, low: -1.0e-2, high: -1.0e-3}", "`lr`: The value of `low` is -0.01, but must be > 0."),
    ("weight_decay: {type: uniform, low: -0.1, high: 0.1}", "`weight_decay`: The value of `low` is -0.1, but must be >= 0."),
    ("warmup_epochs: {type: int, low: -1, high: 3}", "`warmup_epochs`: The value of `low` is -1, but must be >= 0."),
    ("awing_theta: {type: uniform, low: 0.0, high: 0.7}", "`awing_theta`: The value of `low` is 0.0, but must be > 0."),
    ("awing_omega: {type: uniform, low: -5, high: 20}", "`awing_omega`: The value of `low` is -5, but must be > 0."),
    ("awing_epsilon: {type: uniform, low: -1.0, high: 2.0}", "`awing_epsilon`: The value of `low` is -1.0, but must be > 0."),
    ("awing_alpha: {type: uniform, low: 0.5, high: 2.4}", "`awing_alpha`: The value of `low` is 0.5, but must be > 1."),
    ("awing_alpha: {type: uniform, low: 1.0, high: 2.4}", "`awing_alpha`: The value of `low` is 1.0, but must be > 1."),
    ("freeze_stages: {type: int, low: 0, high: 7}", "`freeze_stages`: The value of `high` is 7, but must be between 0 and 4."),
    ("aug_clahe_p: {type: uniform, low: 0.5, high: 1.5}",
     "`aug_clahe_p`: The value of `high` is 1.5, but must be between 0 and 1."),
    ("difficult_threshold: {type: uniform, low: -1.0, high: 3.0}",
     "`difficult_threshold`: The value of `low` is -1.0, but must be > 0 mm."),
    ("distill_weight: {type: uniform, low: -1, high: 1}", "`distill_weight`: The value of `low` is -1, but must be >= 0."),
    # fixed values and choices against the option's rule
    ("freeze_stages: {type: fixed, value: 7}",
     "`freeze_stages`: The value of `freeze_stages` is 7, but must be between 0 and 4."),
    ("awing_omega: {type: fixed, value: 0}", "`awing_omega`: The value of `awing_omega` is 0.0, but must be > 0."),
    ("mode: {type: categorical, choices: [masked, half]}",
     f"`mode`: The value of `mode` is 'half', but must be one of {', '.join(MODES)}."),
    ("distill_weight: {type: categorical, choices: [0.0, -1.0]}",
     "`distill_weight`: The value of `distill_weight` is -1.0, but must be >= 0."),
    ("batch_size: {type: categorical, choices: [2, 2.5]}",
     "`batch_size`: The value of `batch_size` is 2.5, but must be a valid int."),
    # the shape of a range
    ("lr: {type: loguniform, low: 0, high: 0.1}", "`lr`: a log range needs low > 0 (got 0)"),
    ("lr: {type: loguniform, low: -1, high: 0.1}", "`lr`: a log range needs low > 0 (got -1)"),
    ("warmup_epochs: {type: int, low: 0, high: 3, log: true}", "`warmup_epochs`: a log range needs low > 0 (got 0)"),
    ("lr: {type: uniform, low: 1.0, high: 0.5}", "`lr`: low (1.0) must be < high (0.5)"),
    ("lr: {type: uniform, low: 1.0e-4, high: .inf}", "`lr`: The value of `high` is inf, but must be a finite number."),
    ("lr: {type: uniform, low: 1.0e-4, high: abc}", "`lr`: The value of `high` is 'abc', but must be a number."),
    ("warmup_epochs: {type: int, low: 0, high: 3, log: yes please}",
     "`warmup_epochs`: The value of `log` is 'yes please', but must be true or false."),
    # the option's type
    ("freeze_stages: {type: uniform, low: 0, high: 4}", "`freeze_stages`: option is an integer; use type int"),
    ("batch_size: {type: loguniform, low: 1, high: 8}", "`batch_size`: option is an integer; use type int"),
    ("batch_size: {type: int, low: 1.5, high: 4}", "`batch_size`: The value of `low` is 1.5, but must be an integer."),
    ("loss: {type: uniform, low: 0, high: 1}", "`loss`: option is not numeric; use categorical or fixed"),
    ("bn_eval: {type: int, low: 0, high: 1}", "`bn_eval`: option is not numeric; use categorical or fixed"),
    ("difficult: {type: categorical, choices: [[UMT], [UPM]]}", "`difficult`: option is a list"),
    # the entry itself
    ("bogus: {type: uniform, low: 0, high: 1}", "`bogus`: unknown option"),
    ("epochs: {type: int, low: 1, high: 5}", "`epochs`: set by the search command for every trial, not searchable"),
    ("image_size: {type: fixed, value: [64, 64]}", "`image_size`: set by the search command"),
    ("lr: 0.1", "`lr`: must be a mapping with `type`"),
    ("lr: {low: 0.1, high: 0.2}", "`lr`: must be a mapping with `type`"),
    ("lr: {type: gaussian, low: 0, high: 1}", "`lr`: type 'gaussian' is not one of loguniform, uniform, int"),
    ("lr: {type: uniform, low: 1.0e-4, choices: [1]}", "`lr`: key(s) choices do not belong to type uniform"),
    ("lr: {type: uniform, low: 1.0e-4}", "`lr`: type uniform needs high"),
    ("mode: {type: categorical, choices: []}", "`mode`: `choices` must be a non-empty list"),
    # the whole space
    ("mode: {type: fixed, value: masked}", "nothing to search (every entry is fixed)"),
    ("difficult: {type: fixed, value: [UMT]}\ndifficult_threshold: {type: uniform, low: 1.5, high: 3.0}",
     "`difficult_threshold`: The value of `low` is 1.5, but must be unset when `difficult` is given"),
    ("[1, 2]", "must be a mapping of option: value"),
    ("", "empty search space"),
    ("lr: [unclosed", "cannot read YAML"),
])
def test_invalid_entry_is_refused_with_file_key_and_rule(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path, text + "\n")
    with pytest.raises(SpaceError, match=re.escape(f"{f}: {message}")):
        load_space(f)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=re.escape(f"{tmp_path / 'nope.yaml'}: search space file not found")):
        load_space(tmp_path / "nope.yaml")


def test_fixed_empty_difficult_does_not_clash_with_a_threshold(tmp_path: Path) -> None:
    text = "difficult: {type: fixed, value: []}\ndifficult_threshold: {type: uniform, low: 1, high: 2}\n"
    s = load_space(write(tmp_path, text))
    assert s.fixed() == {"difficult": []}


BASE = TrainConfig(dataset_path="data", resume="start.pt", mode="masked", epochs=20)


@pytest.mark.parametrize("text, base, message", [
    ("warmup_epochs: {type: int, low: 0, high: 30}", BASE,
     "`warmup_epochs`: The value of `high` is 30, but must be <= epochs (20)."),
    ("warmup_epochs: {type: uniform, low: 0, high: 20.5}", BASE,
     "`warmup_epochs`: The value of `high` is 20.5, but must be <= epochs (20)."),
    ("warmup_epochs: {type: categorical, choices: [0, 25]}", BASE,
     "`warmup_epochs`: One of `choices` is 25.0, but must be <= epochs (20)"),
    ("mode: {type: categorical, choices: [all, masked]}", TrainConfig(dataset_path="data", resume="start.pt"),
     "`mode`: One of `choices` is 'masked', but must be 'all' unless the difficult set is picked by `difficult`"),
    ("difficult_threshold: {type: uniform, low: 1.5, high: 3.0}", TrainConfig(dataset_path="data", difficult=["UMT"]),
     "`difficult_threshold`: The value of `low` is 1.5, but must be unset when `difficult` is given"),
    ("difficult: {type: fixed, value: [UMT]}\nlr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}",
     TrainConfig(dataset_path="data", difficult_threshold=2.0),
     "`difficult`: The value of `value` is ['UMT']; then the value of `difficult_threshold` is 2.0, but must be unset"),
    ("distill_weight: {type: categorical, choices: [0.0, 0.5]}", TrainConfig(dataset_path="data"),
     "`distill_weight`: One of `choices` is 0.5, but must be 0 without a start model (--resume)"),
    ("lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}", TrainConfig(dataset_path="data", mode="masked"),
     "The value of `mode` is 'masked', but must be 'all' unless"),
])
def test_check_against_refuses_trials_that_break_a_relation(tmp_path: Path, text: str, base: TrainConfig,
                                                            message: str) -> None:
    f = write(tmp_path, text + "\n")
    space = load_space(f)
    with pytest.raises(SpaceError, match=re.escape(f"{f.resolve()}: {message}")):
        space.check_against(base)


def test_check_against_accepts_a_consistent_space(tmp_path: Path) -> None:
    load_space(write(tmp_path, "warmup_epochs: {type: int, low: 0, high: 20}\n")).check_against(
        TrainConfig(dataset_path="data", difficult=["UMT"], mode="masked", epochs=20))
    load_space(write(tmp_path, "mode: {type: categorical, choices: [all, masked]}\n")).check_against(
        TrainConfig(dataset_path="data", difficult=["UMT"]))
    for f in SHIPPED:
        load_space(f).check_against(BASE)


@pytest.mark.parametrize("f", SHIPPED, ids=lambda f: f.name)
def test_shipped_space_round_trips_through_json(f: Path) -> None:
    s = load_space(f)
    assert space_from_dict(json.loads(json.dumps(s.to_dict())), s.path) == s


def test_every_entry_type_round_trips(space: SearchSpace, tmp_path: Path) -> None:
    extra = "difficult: {type: fixed, value: [UMT, UPM]}\nfreeze_stages: {type: categorical, choices: [0, 2]}\n"
    other = load_space(write(tmp_path, extra + "difficult_weight: {type: int, low: 1, high: 8, log: true}\n"))
    for s in (space, other):
        d = s.to_dict()
        assert space_from_dict(json.loads(json.dumps(d)), s.path) == s and space_from_dict(d, s.path).to_dict() == d
    assert other.to_dict()["difficult"] == {"type": "fixed", "value": ["UMT", "UPM"]}
    assert other.to_dict()["difficult_weight"] == {"type": "int", "low": 1, "high": 8, "log": True}


def test_space_from_dict_names_its_source() -> None:
    with pytest.raises(SpaceError, match=re.escape("sweep.json: `lr`: The value of `low` is -1.0, but must be > 0.")):
        space_from_dict({"lr": {"type": "uniform", "low": -1.0, "high": 1.0}}, "sweep.json")


def test_with_threshold_below_clips_the_range(space: SearchSpace) -> None:
    clipped, note = space.with_threshold_below(2.0)
    assert clipped.get("difficult_threshold").high == pytest.approx(1.998) and clipped.get("difficult_threshold").low == 1.5
    assert note.startswith("difficult_threshold: high 3.0 mm clipped to 1.998 mm")
    others = [p for p in space.params if p.name != "difficult_threshold"]
    assert [p for p in clipped.params if p.name != "difficult_threshold"] == others
    assert space_from_dict(clipped.to_dict(), clipped.path) == clipped


def test_with_threshold_below_keeps_a_range_under_every_error(space: SearchSpace) -> None:
    assert space.with_threshold_below(3.5) == (space, None)


def test_with_threshold_below_refuses_a_range_above_every_error(space: SearchSpace) -> None:
    with pytest.raises(SpaceError, match=r"`difficult_threshold` range 1.5..3.0 mm lies above every start error"):
        space.with_threshold_below(1.2)



ARM_SECTIONS = SPACE.replace("mode: {type: categorical, choices: [masked, weighted]}\n", "") + """\
refine_offset_scale: {type: uniform, low: 1.0, high: 2.0}
arms:
  refine:
    lr: {type: loguniform, low: 5.0e-4, high: 5.0e-3}
    warmup_epochs: {type: int, low: 0, high: 5}
    refine_model: {type: categorical, choices: [hrnet_w18_small, resnet18]}
    difficult_threshold: {type: uniform, low: 2.0, high: 4.0}
"""


def test_an_arm_section_replaces_and_adds_entries_for_that_arm_only(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, ARM_SECTIONS))
    refine, masked = space.for_arm("refine"), space.for_arm("masked")
    assert (refine.get("lr").low, refine.get("lr").high) == (5e-4, 5e-3)  # its own range
    assert (masked.get("lr").low, masked.get("lr").high) == (1e-6, 1e-3)  # the shared one
    assert refine.get("refine_model").choices == ("hrnet_w18_small", "resnet18") and masked.get("refine_model") is None
    assert refine.get("refine_offset_scale") is not None and masked.get("refine_offset_scale") is None  # refine only
    assert refine.get("difficult_weight") is None and refine.get("awing_theta") is not None  # unusable / shared
    assert refine.get("mode").value == "refine" and [p.name for p in refine.params].count("lr") == 1
    assert space.max_warmup() == 5.0 and "refine_model" in space.searched
    assert space_from_dict(json.loads(json.dumps(space.to_dict())), space.path) == space  # what sweep.json holds
    clipped, note = space.with_threshold_below(3.0)  # both the shared range and the arm's own are clipped
    assert clipped.get("difficult_threshold").high == clipped.for_arm("refine").get("difficult_threshold").high == 2.997
    assert "arms.refine.difficult_threshold: high 4.0 mm clipped" in note


@pytest.mark.parametrize(("section", "message"), [
    ("  half:\n    lr: {type: uniform, low: 0.1, high: 0.2}\n", "`arms.half`: not an arm (masked, weighted, all, refine)"),
    ("  refine:\n    difficult_weight: {type: uniform, low: 1, high: 2}\n",
     "`arms.refine`: difficult_weight cannot be searched by this arm"),
    ("  masked:\n    mode: {type: fixed, value: all}\n", "`arms.masked`: mode cannot be searched by this arm"),
    ("  all:\n    refine_crop_mm: {type: uniform, low: 10, high: 20}\n",
     "`arms.all`: refine_crop_mm cannot be searched by this arm"),
    ("  refine: {}\n", "`arms.refine`: must be a non-empty mapping of option: spec"),
    ("  refine:\n    lr: {type: uniform, low: 0, high: 1}\n", "arms.refine: `lr`: The value of `low` is 0, but must be > 0."),
    ("  refine:\n    warmup_epochs: {type: int, low: 3, high: 1}\n", "arms.refine: `warmup_epochs`: low (3) must be < high"),
])
def test_a_bad_arm_section_is_refused_naming_file_arm_and_key(tmp_path: Path, section: str, message: str) -> None:
    f = write(tmp_path, "lr: {type: loguniform, low: 1.0e-6, high: 1.0e-3}\narms:\n" + section)
    with pytest.raises(SpaceError, match=re.escape(message)) as err:
        load_space(f)
    assert str(err.value).startswith(str(f))


def test_an_arm_sections_relation_is_checked_on_that_arm(tmp_path: Path) -> None:
    text = ("lr: {type: loguniform, low: 1.0e-6, high: 1.0e-3}\narms:\n  refine:\n"
            "    refine_mm_per_px: {type: fixed, value: 0.1}\n    refine_crop_mm: {type: uniform, low: 10, high: 60}\n")
    with pytest.raises(SpaceError, match=r"arms.refine: `refine_crop_mm`: The value of `high` is 60, "
                                         r"but must be <= 512 crop pixels"):
        load_space(write(tmp_path, text))


def test_a_crop_side_per_landmark_is_searched_as_entries_of_their_own(tmp_path: Path) -> None:
    """`refine_crop_mm.Go` is an entry of its own: validated at both endpoints, sampled by Optuna under that name, and
    turned back into the trial's per-landmark mapping; `refine_crop_mm` alone sets every other landmark's side."""
    from tune_landmarks.config import from_dict

    space = load_space(write(tmp_path, "lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\narms:\n  refine:\n"
                                       "    refine_crop_mm.Go: {type: uniform, low: 35, high: 55}\n"
                                       "    refine_crop_mm: {type: categorical, choices: [25.6, 32.0]}\n"))
    assert space_from_dict(space.to_dict(), space.path) == space
    refine = space.for_arm("refine")
    assert "refine_crop_mm.Go" not in {p.name for p in space.for_arm("masked").params}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fn = refine.define_by_run()
    for _ in range(5):
        trial = study.ask()
        fixed = fn(trial)
        cfg = from_dict(trial.params | fixed)
        assert 35 <= cfg.refine_crop_mm["Go"] <= 55 and cfg.refine_crop_mm["default"] in (25.6, 32.0)
        assert set(cfg.refine_crop_mm) == {"Go", "default"} and cfg.mode == "refine"
        study.tell(trial, 1.0)
    assert len({t.params["refine_crop_mm.Go"] for t in study.trials}) == 5  # Optuna searched Gonion's side itself


@pytest.mark.parametrize("entry, message", [
    ("refine_crop_mm.Go: {type: uniform, low: -5, high: 55}",
     "`refine_crop_mm.Go`: The value of `low` is -5, but must be > 0 mm."),
    ("refine_crop_mm.Go: {type: uniform, low: 35, high: 600}",
     "`refine_crop_mm.Go`: The value of `high` is 600, but must be <= 512 crop pixels"),
    ("refine_crop_mm.Go: {type: fixed, value: 0}",
     "`refine_crop_mm.Go`: The value of `refine_crop_mm.Go` is 0.0, but must be > 0 mm."),
    ("lr.Go: {type: uniform, low: 1, high: 2}", "`lr.Go`: unknown option"),
    ("refine_crop_mm.: {type: uniform, low: 1, high: 2}", "`refine_crop_mm.`: unknown option"),
])
def test_a_bad_per_landmark_entry_is_refused_naming_it(tmp_path: Path, entry: str, message: str) -> None:
    text = f"lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}\nrefine_mm_per_px: {{type: fixed, value: 0.5}}\n{entry}\n"
    with pytest.raises(SpaceError, match=re.escape(message)):
        load_space(write(tmp_path, text))


def test_a_landmarks_crop_is_checked_at_its_own_resolution(tmp_path: Path) -> None:
    """Gonion's 150 mm crop fits 512 px at its own 0.5 mm/px, not at the others' 0.2."""
    text = ("lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\nrefine_mm_per_px: {type: fixed, value: 0.2}\n"
            "refine_crop_mm.Go: {type: uniform, low: 35, high: 150}\n")
    with pytest.raises(SpaceError, match=re.escape("`refine_crop_mm.Go`: The value of `high` is 150, but must be <= 512 "
                                                   "crop pixels at `refine_mm_per_px` 0.2")):
        load_space(write(tmp_path, text))
    space = load_space(write(tmp_path, text + "refine_mm_per_px.Go: {type: categorical, choices: [0.5, 0.6]}\n"))
    assert {p.name for p in space.params} >= {"refine_mm_per_px.Go", "refine_crop_mm.Go"}
