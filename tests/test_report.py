"""`tune-landmarks report` on a real tiny sweep (two trials in each of the arms masked and all, on the synthetic
set), and on a copy of it with pieces missing (no verdict and no start checkpoint, too few Optuna trials)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import pytest
from conftest import cli


@pytest.fixture(scope="module")
def experiment(tiny_sweep) -> Path:
    return tiny_sweep


def page_images(out: Path) -> tuple[str, list[str]]:
    page = (out / "index.html").read_text()
    return page, re.findall(r'<img src="([^"]+)"', page)


def assert_valid_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, name


@pytest.mark.slow
def test_report_of_a_real_sweep(experiment, tmp_path):
    out = tmp_path / "report"
    proc = cli("report", experiment.name, "--storage", experiment.parent, "--out", out, "--bootstrap", "300",
               check=True)
    assert f"wrote {out / 'index.html'}" in proc.stdout
    page, shown = page_images(out)
    on_disk = sorted(p.name for p in out.glob("*.png"))
    assert sorted(shown) == on_disk  # every PNG is on the page, every image on the page exists
    assert {"landmarks.png", "history.png", "importances_masked.png", "parallel_masked.png", "importances_all.png",
            "parallel_all.png", "epochs.png", "forest_best_masked_vs_start.png", "forest_best_all_vs_start.png",
            "forest_best_masked_vs_best_all.png"} == set(on_disk)
    assert_valid_pngs(out, on_disk)
    assert "<h2>Verdict on test (images never used for a choice)</h2>" in page
    assert page.index("Verdict on test") < page.index("Per-landmark error")  # the verdict comes first
    assert re.search(r"<p class='verdict'>Verdict: ", page)
    assert "best masked vs best all" in page and "difficult" in page
    trial_ids = [p.name.removeprefix("trial_") for p in experiment.glob("trial_*")]
    assert len(trial_ids) == 4 and all(t in page for t in trial_ids)  # the trials table
    assert page.count("<table") == 2 and page.count("<pre>") == 1  # trials, landmarks; the verdict's table
    assert not list(tmp_path.glob(".report*"))  # the staging folder is gone
    assert "annotators_median_mm" in page  # the annotators' own disagreement beside each landmark's error


@pytest.mark.slow
def test_report_says_what_is_missing(experiment, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from tune_landmarks.experiment import JOURNAL_FILE, SWEEP_FILE, VERDICT_FILES, load_sweep

    exp = tmp_path / "rep"
    shutil.copytree(experiment, exp)
    sweep = load_sweep(exp)
    sweep.base["resume"] = str(tmp_path / "gone.pt")
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
    assert not any(name.startswith("forest_") for name in shown)
    assert_valid_pngs(out, shown)


def test_report_refuses_a_folder_that_is_no_experiment(tmp_path):
    proc = cli("report", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert f"{tmp_path}: not a tune-landmarks experiment (no sweep.json in {tmp_path})" in proc.stderr
    assert not (tmp_path / "out").exists()
