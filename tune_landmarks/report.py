"""`tune-landmarks report`: one HTML page (index.html + PNGs) that says what a sweep found.

It reads only the experiment (wherever it is stored): sweep.json, the tables, the Optuna journal and the
trials' kept checkpoints. The verdict on masking re-scores the start checkpoint, the best searched trial and
the control on the validation split, image by image, because only paired intervals can tell a real gain
from the noise of a small validation set.
"""
from __future__ import annotations

import argparse
import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .experiment import JOURNAL_FILE, Experiment, Sweep
from .plots import (
    epochs_figure,
    forest_figure,
    history_figure,
    importance_figure,
    landmark_figure,
    parallel_figure,
    png_bytes,
)
from .results import best_row, kept_checkpoints
from .verdict import CONFIDENCE, Scored, compute_verdict, group_table, verdict_lines, verdict_sentences

log = logging.getLogger(__name__)
MIN_IMPORTANCE_TRIALS = 2  # below this an importance is not defined
FEW_IMPORTANCE_TRIALS = 10  # below this it is noise-dominated; the page says so
Models = dict[str, tuple[Path | None, str]]  # role -> (local checkpoint, or None and why it is missing)


@dataclass
class Page:
    """index.html under construction, and the files it will need beside it."""

    stage: Path
    parts: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p{f' class={cls!r}' if cls else ''}>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.text(text, "note")

    def figure(self, fig: Any, name: str, caption: str) -> None:
        """Save a matplotlib Figure as `name` and embed it."""
        (self.stage / name).write_bytes(png_bytes(fig))
        self.images.append(name)
        self.parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, table: Any) -> None:
        """A pyarrow table as an HTML table (floats to 4 significant digits)."""
        df = table.to_pandas()
        self.parts.append(df.to_html(index=False, border=0, classes="t", na_rep="",
                                     float_format=lambda v: f"{v:.4g}"))



# ---------------------------------------------------------------- the experiment

def load_study(exp: Experiment, name: str) -> tuple[Any, str]:
    """The sweep's Optuna study from its journal, or (None, why not)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not exp.exists(JOURNAL_FILE):
        return None, f"No Optuna journal ({exp.uri_of(JOURNAL_FILE)} is missing)"
    journal = exp.local_file(JOURNAL_FILE)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    if name not in optuna.get_all_study_names(storage):
        return None, f"{exp.uri_of(JOURNAL_FILE)} holds no study named {name!r}"
    return optuna.load_study(study_name=name, storage=storage), ""


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


def checkpoints(exp: Experiment, resume: str | None, best: dict[str, Any] | None,
                control: dict[str, Any] | None) -> Models:
    """role -> (checkpoint, or None and why it is missing) for the start, the best trial (its kept checkpoint
    with the lowest val MRE) and the control."""
    start = Path(resume) if resume else None
    models = {"start": (start, "") if start and start.exists() else
              (None, f"{start} not found" if start else "sweep.json names no start checkpoint")}
    for role, row in (("best trial", best), ("control", control)):
        if row is None:
            models[role] = (None, f"no {'searched' if role == 'best trial' else 'control'} trial with a result")
            continue
        kept = kept_checkpoints(exp, row["trial_id"])
        if kept:
            models[role] = (exp.local_file(min(kept.values())[1], "checkpoint.pt"), "")
        else:
            models[role] = (None, f"trial {row['trial_id']} has no kept checkpoint in {exp.trial_dir(row['trial_id'])}")
    return models


def with_annotators(table: Any, sweep: Sweep, split: str) -> Any:
    """A per-landmark table with the annotators' median disagreement on `split` beside it (null where the
    dataset is unreadable now: the report must not fail for it)."""
    import pyarrow as pa

    from .check import disagreement_table
    from .read import describe

    try:
        info = describe(sweep.base["dataset_path"], sweep.base.get("format"))
        agree = disagreement_table(info, [split]).to_pylist()
        median = {r["landmark"]: r["median_mm"] for r in agree}
    except (OSError, ValueError) as exc:
        log.warning(f"annotator disagreement not available: {exc}")
        median = {}
    return table.append_column("annotators_median_mm",
                               pa.array([median.get(s) for s in table["symbol"].to_pylist()], pa.float64()))


def score_models(models: Models, sweep: Sweep, device: str) -> dict[str, Scored]:
    """Each available model scored on the sweep's own dataset, validation split and annotator."""
    from .compare import evaluated

    base = sweep.base
    options = {"fmt": base.get("format"), "annotator": base.get("annotator", "mean"), "device": device,
               "cache_dir": base.get("cache_dir")}
    return {role: evaluated(path, base["dataset_path"], base.get("val_split"), **options)
            for role, (path, _) in models.items() if path}


# ---------------------------------------------------------------- the verdict

def verdict_section(page: Page, models: Models, scored: dict[str, Scored], n_boot: int, seed: int) -> None:
    """The page's verdict on the models that exist."""
    page.heading("Verdict on masking")
    for role, (path, why) in models.items():
        page.text(f"{role}: {path}" if path else f"{role}: not available — {why}", "" if path else "note")
    if len(scored) < 2:
        page.note("No comparison possible: fewer than two of the start, best trial and control checkpoints exist.")
        return
    results, hard = compute_verdict(scored, n_boot, seed)
    n = next(iter(results.values()))[0].n_images
    page.text(f"Paired differences on the {n} images of the validation split (candidate - reference; negative = "
              f"lower error), {n_boot} bootstrap resamples of images, {CONFIDENCE:.0%} percentile intervals; "
              f"* = the interval excludes 0. Difficult set: {', '.join(hard) or 'none'} (the best trial's).")
    for line in verdict_sentences(results.get(("best trial", "start")), results.get(("best trial", "control"))):
        page.text(line, "verdict" if line.startswith("Verdict") else "")
    page.table(group_table([(f"{c} vs {r}", rows) for (c, r), rows in results.items()]))
    page.note("The best trial was chosen on this same validation split, so its intervals are optimistic; confirm "
              "on held-out images with `tune-landmarks compare`.")
    for (cand, ref), rows in results.items():
        name = f"forest_{cand.replace(' ', '_')}_vs_{ref}.png"
        page.figure(forest_figure(rows, f"{cand} vs {ref} ({rows[0].n_images} validation images)"), name,
                    f"Per-landmark paired difference, {cand} vs {ref} (red: difficult landmarks).")


def sweep_verdict(experiment: Experiment | str, n_boot: int = 1000, seed: int = 0, device: str = "auto") -> list[str]:
    """The verdict as text lines for the end-of-sweep summary (empty when fewer than two models exist)."""
    exp = Experiment.of(experiment)
    sweep = exp.load_sweep()
    rows = exp.read_table("trials").to_pylist()
    models = checkpoints(exp, sweep.base.get("resume"), best_row([r for r in rows if not r["control"]]),
                         best_row([r for r in rows if r["control"]]))
    scored = score_models(models, sweep, device)
    if len(scored) < 2:
        return []
    results, hard = compute_verdict(scored, n_boot, seed)
    n = next(iter(results.values()))[0].n_images
    split = next(iter(scored.values())).split
    return [f"verdict on masking ({n} {split} images, paired bootstrap, 95% intervals; difficult: "
            f"{', '.join(hard) or 'none'}):"] + verdict_lines(results)


# ---------------------------------------------------------------- the page

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.note{color:#8a5a00;background:#fff6e0;padding:.4em .6em}.verdict{font-weight:bold;font-size:1.1em}
table.t{border-collapse:collapse;font-size:.85em}table.t td,table.t th{border:1px solid #ddd;padding:2px 6px}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}"""



def study_sections(page: Page, study: Any, no_study: str, start_mre: float, controls: list[float]) -> None:
    """Optimisation history, parameter importances and parallel coordinates, all from the Optuna study."""
    page.heading("Optimisation history")
    if study is None:
        page.note(f"{no_study}: history, importances and parallel coordinates need the study.")
        return
    complete = _complete(study)
    page.figure(history_figure(complete, start_mre, controls), "history.png",
                "Best val MRE of each searched trial in Optuna's order, and the running best.")
    searched = {k for t in complete for k, d in t.distributions.items() if not d.single()}
    page.heading("Parameter importances")
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        page.note(f"Importances need at least {MIN_IMPORTANCE_TRIALS} complete trials; the study has "
                  f"{len(complete)}.")
    elif not searched:
        page.note("No searched parameter varies in the complete trials, so there is no importance to rank.")
    else:
        import optuna

        page.figure(importance_figure(optuna.importance.get_param_importances(study), len(complete)),
                    "importances.png", "optuna.importance.get_param_importances on the sweep's study.")
        if len(complete) < FEW_IMPORTANCE_TRIALS:
            page.note(f"Estimated from only {len(complete)} complete trials: treat the ranking as rough.")
    page.heading("Parameters vs val MRE")
    if complete and searched:
        page.figure(parallel_figure(complete), "parallel.png",
                    "Parallel coordinates of the searched trials (the control is not a sample of the space); "
                    "each axis spans its range in the search space (log axes for log-uniform parameters).")
    else:
        page.note("No complete searched trial with a varying parameter to draw.")


def report(experiment: Experiment | str, out: str | Path, *, storage: str | None = None, n_boot: int = 2000,
           seed: int = 0, device: str = "auto") -> Path:
    """Write `out`/index.html and its PNGs for one experiment; returns the page's path. Every input is read
    and checked before anything is written, and `out` only appears once the page is complete."""
    import pyarrow.compute as pc

    from .atomic import staged_dir

    if n_boot < 1:
        raise ValueError(f"The value of `bootstrap` is {n_boot}, but must be > 0.")
    if seed < 0:
        raise ValueError(f"The value of `seed` is {seed}, but must be >= 0.")
    exp = experiment if isinstance(experiment, Experiment) else Experiment.find(experiment, storage)
    out = Path(out).resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no earlier report (index.html); "
                              "choose another --out")
    sweep = exp.load_sweep()
    trials_t, landmarks_t = exp.read_table("trials"), exp.read_table("landmarks")
    base, s = sweep.base, sweep.settings
    rows = trials_t.to_pylist()
    best = best_row([r for r in rows if not r["control"]])
    control = best_row([r for r in rows if r["control"]])
    study, no_study = load_study(exp, s.name)
    models = checkpoints(exp, base.get("resume"), best, control)
    scored = score_models(models, sweep, device)
    split = next(iter(scored.values())).split if scored else base.get("val_split") or "validation"

    with staged_dir(out) as stage:
        page = Page(stage)
        page.parts.append(f"<h1>Sweep {html.escape(s.name)}</h1>")
        page.text(f"{exp} — {len(rows)} trials ({s.num_samples} searched + {len(sweep.controls)} control), "
                  f"{s.epochs} epochs each; start checkpoint {base.get('resume')}: {split} MRE {sweep.start_mre:.3f} mm.")
        for n in sweep.notes:
            page.note(n)
        if best is None:
            page.note("No searched trial reported a result.")
        else:
            page.text(f"Best searched trial {best['trial_id']}: val MRE {best['best_val_mre']:.3f} mm at epoch "
                      f"{best['best_epoch']}, difficult set {best['difficult'] or 'none'}.")
        if control is not None and (best is None or control["best_val_mre"] < best["best_val_mre"]):
            page.note(f"The control {control['trial_id']} (all landmarks) has the lowest val MRE of all trials.")

        verdict_section(page, models, scored, n_boot, seed)

        page.heading("Per-landmark error: start vs best trial")
        lm = landmarks_t.filter(pc.equal(landmarks_t["trial_id"], best["trial_id"])) if best else None
        if lm is None:
            page.note("No best trial, so no per-landmark comparison.")
        else:
            page.figure(landmark_figure(lm.to_pylist(), f"best trial {best['trial_id']} vs start "
                                                        "(red: difficult, in the loss; blue: the others)"),
                        "landmarks.png", "Validation MRE per landmark at the start and at the best trial's best "
                                         "epoch; the right panel is the change (blue bars right of 0 = drift).")

        study_sections(page, study, no_study, sweep.start_mre,
                       [r["best_val_mre"] for r in rows if r["control"] and r["best_val_mre"] is not None])

        page.heading("Epochs spent per trial")
        fig, summary = epochs_figure(rows, int(s.epochs))
        page.figure(fig, "epochs.png", summary)

        page.heading("Trials")
        page.table(trials_t.drop_columns([c for c in ("path",) if c in trials_t.column_names]))
        if lm is not None:
            page.heading(f"Best trial {best['trial_id']}: landmarks")
            page.text("annotators_median_mm: the senior-junior distance on the same split, per landmark — what the "
                      "annotators themselves disagree by. A landmark whose error is near it has little left to gain.")
            page.table(with_annotators(lm.select(["symbol", "start_mre_mm", "best_mre_mm", "change_mm", "difficult"]),
                                       sweep, split).sort_by([("change_mm", "ascending")]))

        (stage / "index.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(s.name)} report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")
    return out / "index.html"


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.experiment, args.out, storage=args.storage, n_boot=args.bootstrap, seed=args.seed,
                  device=args.device)
    log.info(f"wrote {path}")
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("report", help="HTML report of a sweep: plots, tables and a verdict on masking")
    s.add_argument("experiment", help="experiment directory, or its name under --storage")
    s.add_argument("--out", required=True, help="folder for index.html and its PNGs")
    s.add_argument("--storage", help="where the experiment's name is looked up (default ./sweeps)")
    s.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the images for the verdict")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_report)
