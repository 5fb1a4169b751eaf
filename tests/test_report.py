"""`tune-landmarks report` on a real tiny sweep (two trials in each of the arms masked and all, on the synthetic
set), and on a copy of it with pieces missing (no verdict and no start checkpoint, too few Optuna trials); its
first sentence on hand-built verdicts."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import cv2
import pytest
from conftest import cli

from tune_landmarks.verdict import Comparison, PairedDiff, verdict_headline


@pytest.fixture(scope="module")
def experiment(tiny_sweep) -> Path:
    return tiny_sweep


@pytest.fixture(scope="module")
def rendered(experiment, tmp_path_factory) -> tuple[Path, str]:
    """The real sweep's report, written once for the tests that read it: (its folder, the CLI's stdout)."""
    out = tmp_path_factory.mktemp("rendered") / "report"
    proc = cli("report", experiment.name, "--storage", experiment.parent, "--out", out, "--bootstrap", "300",
               check=True)
    return out, proc.stdout


def page_images(out: Path) -> tuple[str, list[str]]:
    page = (out / "index.html").read_text()
    return page, re.findall(r'<img src="([^"]+)"', page)


def assert_valid_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, name


@pytest.mark.slow
def test_report_of_a_real_sweep(experiment, rendered):
    out, stdout = rendered
    assert f"wrote {out / 'index.html'}" in stdout
    page, shown = page_images(out)
    on_disk = sorted(p.name for p in out.glob("*.png"))
    assert sorted(shown) == on_disk  # every PNG is on the page, every image on the page exists
    assert {"verdict_landmarks.png", "landmarks.png", "history.png", "importances_masked.png", "parallel_masked.png",
            "importances_all.png", "parallel_all.png", "epochs.png", "forest_best_masked_vs_start.png",
            "forest_best_all_vs_start.png", "forest_best_masked_vs_best_all.png"} == set(on_disk)
    assert_valid_pngs(out, on_disk)
    assert "<h2>Verdict on test (images never used for a choice)</h2>" in page
    assert page.index("Verdict on test") < page.index("Per-landmark error")  # the verdict comes first
    assert re.search(r"<p class='verdict'>Verdict: ", page)
    assert "best masked vs best all" in page and "difficult" in page
    trial_ids = [p.name.removeprefix("trial_") for p in experiment.glob("trial_*")]
    assert len(trial_ids) == 4 and all(t in page for t in trial_ids)  # the trials table
    assert page.count("<table") == 3 and page.count("<pre>") == 1  # verdict per landmark, trials, best trial; verdict
    assert not list(out.parent.glob(".report*"))  # the staging folder is gone
    assert "annotators_median_mm" in page  # the annotators' own disagreement beside each landmark's error


def _interval(row: dict) -> str:
    return f"{row['mean_difference_mm']:+.3f} mm [{row['ci_low_mm']:+.3f}, {row['ci_high_mm']:+.3f}]"


def expected_headline(record: dict) -> list[str]:
    """What the first sentence must say, read from verdict.json: the winner (the largest gain among the arms
    whose difficult-set interval against the start lies below 0) with its difficult-set and all-landmark
    numbers, or "keep the start model" with every arm's difficult-set numbers."""
    vs_start = {(r["a"], r["group"]): r for r in record["comparisons"] if r["b"] == "start" and r["is_group"]}
    hard = {a: r for (a, group), r in vs_start.items() if group == "difficult"}
    better = sorted((r["mean_difference_mm"], a) for a, r in hard.items() if r["ci_high_mm"] < 0)
    if not better:
        return [f"Keep the start model: nothing beat it on the difficult landmarks of {record['split']}",
                *(f"{a} {_interval(r)}" for a, r in hard.items())]
    winner = better[0][1]
    return [f"Use {winner}:", f"the difficult landmarks {_interval(hard[winner])}",
            f"all landmarks {_interval(vs_start[winner, 'all'])}"]


@pytest.mark.slow
def test_first_screen_answers_which_model_and_what_changes(experiment, rendered):
    out, _ = rendered
    page = (out / "index.html").read_text()
    record = json.loads((experiment / "verdict.json").read_text())
    sentence = html.unescape(re.search(r"<p class='headline'>(.*?)</p>", page).group(1))
    for part in expected_headline(record):
        assert part in sentence, (part, sentence)

    marks = [page.index("<p class='headline'>"), page.index('<img src="verdict_landmarks.png"'),
             page.index(f"<h2>Per landmark on {record['split']}"), page.index('<img src="forest_'),
             page.index("<h2>The search, on the selection split"), page.index('<img src="history.png"')]
    assert marks == sorted(marks)  # sentence, figure, table, forest plots, then the search's diagnostics
    assert page.index("<table", marks[2]) < marks[3]  # the per-landmark table sits before the forest plots

    imgs = re.findall(r"<img [^>]*>", page)
    alts = [html.unescape(m) for img in imgs for m in re.findall(r'alt="([^"]*)"', img)]
    assert len(alts) == len(imgs) and all(re.search(r"\d", a) for a in alts)  # every figure stated, numbers too
    all_rows = [r for r in record["comparisons"] if r["b"] == "start" and r["group"] == "all"]
    assert all(f"{r['a_mre_mm']:.3f} mm (change {_interval(r)})" in alts[0] for r in all_rows)

    assert page.count("<table") == page.count('<div class="scroll"><table')
    assert page.count("<pre>") == page.count('<div class="scroll"><pre>')
    assert ".scroll{overflow-x:auto" in page
    assert not re.search(r"https?://|src=\"//|url\(|@import|<script|<link", page, re.I)  # self-contained


@pytest.mark.slow
def test_report_says_what_is_missing(experiment, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from tune_landmarks.experiment import JOURNAL_FILE, SWEEP_FILE, VERDICT_FILES, load_sweep

    exp = tmp_path / "rep"
    shutil.copytree(experiment, exp)
    sweep = load_sweep(exp)
    sweep.base.resume = str(tmp_path / "gone.pt")
    (exp / SWEEP_FILE).write_text(sweep.to_json())
    (exp / VERDICT_FILES["json"]).unlink()  # no recorded verdict, and none can be computed without the start
    (exp / JOURNAL_FILE).unlink()  # the masked arm's study with a single complete trial; no study for `all`
    journal = JournalStorage(JournalFileBackend(str(exp / JOURNAL_FILE)))
    study = optuna.create_study(study_name=f"{sweep.settings.name}.masked", storage=journal)
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 3e-3, log=True), n_trials=1)

    out = tmp_path / "report"
    cli("report", exp, "--out", out, check=True)
    page, shown = page_images(out)
    assert f"Verdict not available — {tmp_path / 'gone.pt'}" in page
    assert f"holds no study named &#x27;{sweep.settings.name}.all&#x27;" in page
    assert "Importances need at least 2 complete trials; the masked study has 1." in page
    assert "importances_masked.png" not in shown and "landmarks.png" in shown and "parallel_masked.png" in shown
    assert not any(name.startswith("forest_") for name in shown) and "verdict_landmarks.png" not in shown
    assert_valid_pngs(out, shown)


def test_report_refuses_a_folder_that_is_no_experiment(tmp_path):
    proc = cli("report", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert f"{tmp_path}: not a tune-landmarks experiment (no sweep.json in {tmp_path})" in proc.stderr
    assert not (tmp_path / "out").exists()


def _row(name: str, diff: float, low: float, high: float, group: bool = False, difficult: bool = False) -> PairedDiff:
    """candidate - start on one landmark or set: the start at 1.5 mm and 80 % SDR, the candidate moved by `diff`."""
    return PairedDiff(name, group, difficult, 12, 1.5, 1.5 + diff, diff, low, high, 80.0, 80.0 - 10 * diff, -10 * diff,
                      -10 * high, -10 * low)


def _arm(name: str, hard: tuple[float, float, float], other: tuple[float, float, float],
         every: tuple[float, float, float]) -> Comparison:
    """An arm's winner against the start on two difficult and two other landmarks, the sets after."""
    return Comparison(name, "start", [_row("S", *hard, difficult=True), _row("Ar", *hard, difficult=True),
                                      _row("N", *other), _row("Me", *other), _row("difficult", *hard, True, True),
                                      _row("other", *other, True), _row("all", *every, True)])


def test_headline_keeps_the_start_model_when_nothing_beat_it_on_the_difficult_set():
    comparisons = [_arm("best masked", (-0.2, -0.5, 0.1), (0.0, -0.1, 0.1), (-0.1, -0.3, -0.01)),
                   _arm("best all", (0.1, -0.1, 0.3), (-0.3, -0.4, -0.2), (-0.1, -0.2, -0.05))]
    assert verdict_headline(comparisons, "test") == (
        "Keep the start model: nothing beat it on the difficult landmarks of test (12 images; best masked -0.200 mm "
        "[-0.500, +0.100], no clear difference; best all +0.100 mm [-0.100, +0.300], no clear difference).")
    assert verdict_headline([], "test") == (
        "Keep the start model: nothing beat it on all landmarks of test (no arm had a scored trial).")


def test_headline_names_the_winner_and_says_when_the_other_landmarks_are_unchanged():
    refine = _arm("best refine", (-0.4, -0.6, -0.2), (0.0, 0.0, 0.0), (-0.2, -0.3, -0.1))
    masked = _arm("best masked", (-0.3, -0.5, -0.1), (0.05, -0.1, 0.2), (-0.1, -0.3, 0.1))
    assert verdict_headline([masked, refine], "test") == (
        "Use best refine: against the start model on test (12 images, paired 95% intervals), the difficult landmarks "
        "-0.400 mm [-0.600, -0.200], all landmarks -0.200 mm [-0.300, -0.100] (better); the other landmarks "
        "unchanged; best masked also beat it there (-0.300 mm [-0.500, -0.100]).")
    alone = verdict_headline([masked], "test")  # its other landmarks moved: nothing is said to be unchanged
    assert alone.startswith("Use best masked:") and "unchanged" not in alone and "(no clear difference)." in alone


def test_headline_does_not_recommend_a_gain_bought_with_the_other_landmarks():
    masked = _arm("best masked", (-0.3, -0.5, -0.1), (0.4, 0.2, 0.6), (0.2, 0.1, 0.3))
    assert verdict_headline([masked], "test") == (
        "Keep the start model: best masked beat it on the difficult landmarks of test but made all landmarks worse "
        "(+0.200 mm [+0.100, +0.300]).")
