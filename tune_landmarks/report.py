"""`tune-landmarks report`: one HTML page (index.html + PNGs) that says what a sweep found.

It reads only the experiment (wherever it is stored): sweep.json, the tables, the Optuna journal, the verdict
and the arm winners' kept checkpoints. The first screen answers what the reader came for — which model to use
and what it changes where: one sentence, one per-landmark figure and its table, all from the verdict (each
arm's winner, chosen on the selection split, against the start model on the verdict split that no choice ever
saw, with paired intervals — the only way to tell a real gain from the winner's curse and the noise of a small
split). The pairwise forest plots and the search's diagnostics follow.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import rule_error
from .experiment import JOURNAL_FILE, VERDICT_FILES, Experiment, Sweep
from .options import add_bootstrap_options, add_device_options, add_experiment_options
from .plots import (
    epochs_figure,
    forest_figure,
    history_figure,
    importance_figure,
    landmark_figure,
    parallel_figure,
    png_bytes,
    verdict_landmarks_figure,
)
from .results import best_row
from .verdict import (
    CONFIDENCE,
    SDR_MM,
    Comparison,
    PairedDiff,
    change_text,
    comparisons_of,
    format_verdict,
    verdict_headline,
)

log = logging.getLogger(__name__)
MIN_IMPORTANCE_TRIALS = 2  # below this an importance is not defined
FEW_IMPORTANCE_TRIALS = 10  # below this it is noise-dominated; the page says so


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

    def figure(self, fig: Any, name: str, caption: str, alt: str) -> None:
        """Save a matplotlib Figure as `name` and embed it; `alt` states what it shows (its numbers) for a reader
        who cannot see it, the caption how to read it."""
        (self.stage / name).write_bytes(png_bytes(fig))
        self.images.append(name)
        self.parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, table: Any, classes: str = "t") -> None:
        """A pyarrow table as an HTML table (floats to 4 significant digits), scrolling sideways in its own box
        when wider than the page, so the page itself never does."""
        df = table.to_pandas()
        self.parts.append('<div class="scroll">' + df.to_html(index=False, border=0, classes=classes, na_rep="",
                                                             float_format=lambda v: f"{v:.4g}") + "</div>")



# ---------------------------------------------------------------- the experiment

def load_study(exp: Experiment, name: str) -> tuple[Any, str]:
    """One arm's Optuna study (`SWEEP.ARM`) from the sweep's journal, or (None, why not)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not exp.exists(JOURNAL_FILE):
        return None, f"No Optuna journal ({exp.uri_of(JOURNAL_FILE)} is missing)"
    storage = JournalStorage(JournalFileBackend(str(exp.local_file(JOURNAL_FILE))))
    if name not in optuna.get_all_study_names(storage):
        return None, f"{exp.uri_of(JOURNAL_FILE)} holds no study named {name!r}"
    return optuna.load_study(study_name=name, storage=storage), ""


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


def verdict_of(exp: Experiment, n_boot: int, seed: int, device: str) -> tuple[dict[str, Any] | None, str]:
    """The verdict the sweep recorded (verdict.json), else one computed now with `n_boot` and `seed` (and
    written); (None, why) when it cannot be computed, e.g. the start checkpoint is gone."""
    from .compare import sweep_verdict

    if exp.exists(VERDICT_FILES["json"]):
        return json.loads(exp.read_text(VERDICT_FILES["json"])), ""
    try:
        return sweep_verdict(exp, n_boot, seed, device), ""
    except (OSError, ValueError) as exc:
        return None, str(exc)


def with_annotators(table: Any, sweep: Sweep, split: str) -> Any:
    """A per-landmark table with the annotators' median disagreement on `split` beside it (null where the
    dataset is unreadable now: the report must not fail for it)."""
    import pyarrow as pa

    from .check import disagreement_table
    from .read import describe

    try:
        info = describe(sweep.base.dataset_path, sweep.base.format)
        median = {r["landmark"]: r["median_mm"] for r in disagreement_table(info, [split]).to_pylist()}
    except (OSError, ValueError) as exc:
        log.warning(f"annotator disagreement not available: {exc}")
        median = {}
    return table.append_column("annotators_median_mm",
                               pa.array([median.get(s) for s in table["symbol"].to_pylist()], pa.float64()))


# ---------------------------------------------------------------- the first screen

SET_NAMES = {"difficult": "difficult set", "other": "other landmarks", "all": "all landmarks"}


def winners_vs_start(record: dict[str, Any]) -> dict[str, list[PairedDiff]]:
    """Each arm's winner's verdict rows against the start, all in one order — landmarks by the start's error,
    largest first, then the sets — so the figure and the table read alike."""
    vs_start = [c for c in comparisons_of(record) if c.b == "start"]
    if not vs_start:
        return {}
    first = vs_start[0].rows
    keys = [(r.landmark, r.is_group) for r in sorted((r for r in first if not r.is_group), key=lambda r: -r.ref_mre_mm)
            + [r for r in first if r.is_group]]

    def ordered(c: Comparison) -> list[PairedDiff]:
        rows = {(r.landmark, r.is_group): r for r in c.rows}
        return [rows[k] for k in keys]

    return {c.a: ordered(c) for c in vs_start}


def landmark_table(by_model: dict[str, list[PairedDiff]]) -> Any:
    """The figure's numbers: per landmark and set, the start's MRE and SDR and each winner's with its change."""
    import pyarrow as pa

    sdr = f"SDR@{SDR_MM:g}mm %"
    out = []
    for i, s in enumerate(next(iter(by_model.values()))):
        row = {"landmark": SET_NAMES[s.landmark] if s.is_group else s.landmark, "difficult": "yes" if s.difficult else "",
               "start mm": f"{s.ref_mre_mm:.3f}", f"start {sdr}": f"{s.ref_sdr_2mm:.1f}"}
        for name, rows in by_model.items():
            r = rows[i]
            row |= {f"{name} mm": f"{r.cand_mre_mm:.3f}",
                    f"{name} - start mm ({CONFIDENCE:.0%} interval)": change_text(r, unit=""),
                    f"{name} {sdr}": f"{r.cand_sdr_2mm:.1f}"}
        out.append(row)
    return pa.Table.from_pylist(out)


def landmarks_alt(by_model: dict[str, list[PairedDiff]], split: str) -> str:
    """The per-landmark figure in words: its extent, the difficult landmarks, and every set's numbers."""
    first = next(iter(by_model.values()))
    marks = [r for r in first if not r.is_group]
    sets = [f"{SET_NAMES[g.landmark]}: start {g.ref_mre_mm:.3f} mm, "
            + ", ".join(f"{name} {rows[i].cand_mre_mm:.3f} mm (change {change_text(rows[i])})"
                        for name, rows in by_model.items())
            for i, g in enumerate(first) if g.is_group]
    return (f"Mean radial error per landmark on {split}, the start model beside {', '.join(by_model)}, "
            f"{len(marks)} landmarks ordered by the start's error from {marks[0].landmark} ({marks[0].ref_mre_mm:.3f} mm) "
            f"to {marks[-1].landmark} ({marks[-1].ref_mre_mm:.3f} mm); difficult landmarks shaded: "
            f"{', '.join(r.landmark for r in marks if r.difficult) or 'none'}. By set — " + "; ".join(sets)
            + ". The table below lists every landmark.")


def context_text(record: dict[str, Any]) -> str:
    """Where the numbers come from: the split, the winners, the difficult set and the intervals."""
    arms = ", ".join(f"best {arm}: trial {a['trial_id']} epoch {a['epoch']} ({a['budget']} trials"
                     + (f" of {a['epochs']} epochs, {a['train_seconds']:.0f} s training" if "epochs" in a else "")
                     + ")" for arm, a in record.get("arms", {}).items())
    return (f"Scored image by image on {len(record['image_ids'])} images of {record['split']} that no choice ever saw; "
            f"each arm's winner was chosen on {record.get('selection_split')} ({arms or 'no arm had a scored trial'}). "
            f"Difficult set (each winner's own, chosen on {record.get('selection_split')}): "
            f"{', '.join(record['difficult']) or 'none'}. Intervals: paired bootstrap, {record['bootstrap']} resamples "
            f"of the images, {record['confidence']:.0%}.")


def first_screen(page: Page, record: dict[str, Any] | None, why: str) -> None:
    """What the reader came for, on one screen: which model to use and what it changes where, on the verdict
    split — the sentence, the per-landmark figure and its table."""
    if record is None:
        page.note(f"Verdict not available — {why}")
        return
    split = record["split"]
    page.text(verdict_headline(comparisons_of(record), split), "headline")
    page.text(context_text(record), "context")
    by_model = winners_vs_start(record)
    if not by_model:
        return
    page.figure(verdict_landmarks_figure(by_model, f"Mean radial error per landmark on {split} "
                                                   f"({len(record['image_ids'])} images)"),
                "verdict_landmarks.png",
                f"Hollow: the start model; filled: each arm's winner, its whisker the paired bootstrap "
                f"{record['confidence']:.0%} interval of its change from the start (resampling the images) placed on "
                "the start's value — a whisker that misses the hollow dot is a change the images support. Red: "
                "difficult landmarks; after the line: the landmark sets. Per-landmark intervals are exploratory.",
                landmarks_alt(by_model, split))
    page.heading(f"Per landmark on {split}: the start model and each arm's winner")
    page.table(landmark_table(by_model), "t nums")


# ---------------------------------------------------------------- sections

def forest_alt(c: Comparison, split: str) -> str:
    """A forest plot in words: the sets' differences and the landmarks whose interval excludes 0."""
    sets = "; ".join(f"{SET_NAMES[r.landmark]} {change_text(r)}" for r in c.rows if r.is_group)
    clear = ", ".join(f"{r.landmark} {r.diff_mm:+.3f} mm" for r in c.rows if not r.is_group and r.significant)
    return (f"Forest plot of {c.a} minus {c.b}, mean radial error per landmark on {split} with paired "
            f"{CONFIDENCE:.0%} intervals: {sets}; landmarks whose interval excludes 0: {clear or 'none'}.")


def verdict_section(page: Page, record: dict[str, Any]) -> None:
    """The verdict in full after the first screen: its sentences, its headline table and one forest plot per
    comparison (the winners against each other too)."""
    page.heading(f"Verdict on {record['split']} (images never used for a choice)")
    for line in record["sentences"]:
        page.text(line, "verdict" if line.startswith("Verdict") else "note" if line.startswith("  note") else "")
    page.parts.append(f'<div class="scroll"><pre>{html.escape(format_verdict(record))}</pre></div>')
    for c in comparisons_of(record):
        name = f"forest_{c.a.replace(' ', '_')}_vs_{c.b.replace(' ', '_')}.png"
        page.figure(forest_figure(c.rows, f"{c.a} vs {c.b} ({c.rows[0].n_images} images of {record['split']})"), name,
                    f"Per-landmark paired difference, {c.a} vs {c.b} (red: difficult; per-landmark intervals are "
                    "exploratory).", forest_alt(c, record["split"]))


def parallel_alt(arm: str, trials: list[Any]) -> str:
    """A parallel-coordinates plot in words: its span of val MRE and the best trial's parameters."""
    best = min(trials, key=lambda t: t.value)
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best.params.items()))
    return (f"The {arm} arm's {len(trials)} complete trials across their parameters to val MRE, from "
            f"{best.value:.3f} mm (best: {params}) to {max(t.value for t in trials):.3f} mm.")


def selection_landmarks_alt(rows: list[dict[str, Any]], label: str, sel: str) -> str:
    """The selection-split landmark figure in words: each set's mean before and after, the largest moves."""
    done = [r for r in rows if r["start_mre_mm"] is not None and r["best_mre_mm"] is not None]
    sets = "; ".join(f"{name}: mean {sum(r['start_mre_mm'] for r in part) / len(part):.3f} mm at the start, "
                     f"{sum(r['best_mre_mm'] for r in part) / len(part):.3f} mm at {label}"
                     for name, part in (("difficult landmarks", [r for r in done if r["difficult"]]),
                                        ("the others", [r for r in done if not r["difficult"]])) if part)
    moved = sorted(done, key=lambda r: r["best_mre_mm"] - r["start_mre_mm"])
    ends = (f"; largest drop {moved[0]['symbol']} {moved[0]['best_mre_mm'] - moved[0]['start_mre_mm']:+.3f} mm, "
            f"largest rise {moved[-1]['symbol']} {moved[-1]['best_mre_mm'] - moved[-1]['start_mre_mm']:+.3f} mm"
            if moved else "")
    return f"{sel} MRE per landmark, start vs {label}: {sets or 'no landmark scored'}{ends}."


def study_sections(page: Page, exp: Experiment, sweep: Sweep) -> None:
    """Optimisation history of every arm, then each arm's parameter importances and parallel coordinates, all
    from the arms' Optuna studies."""
    import optuna

    studies = {arm: load_study(exp, f"{sweep.settings.name}.{arm}") for arm in sweep.settings.arms}
    page.heading("Optimisation history")
    missing = [f"{arm}: {why}" for arm, (study, why) in studies.items() if study is None]
    for why in missing:
        page.note(f"{why}: history, importances and parallel coordinates need the study.")
    complete = {arm: _complete(study) for arm, (study, _) in studies.items() if study is not None}
    if complete:
        page.figure(history_figure(complete, sweep.start_mre), "history.png",
                    "Best val MRE of each arm's trials in Optuna's order, and each arm's running best.",
                    "; ".join(f"{arm}: {len(trials)} complete trials, best val MRE "
                              + (f"{min(t.value for t in trials):.3f} mm" if trials else "none")
                              for arm, trials in complete.items()) + f"; start checkpoint {sweep.start_mre:.3f} mm.")
    for arm, trials in complete.items():
        searched = {k for t in trials for k, d in t.distributions.items() if not d.single()}
        page.heading(f"Arm {arm}: parameter importances and parameters vs val MRE")
        if len(trials) < MIN_IMPORTANCE_TRIALS:
            page.note(f"Importances need at least {MIN_IMPORTANCE_TRIALS} complete trials; the {arm} study has "
                      f"{len(trials)}.")
        elif not searched:
            page.note("No searched parameter varies in the complete trials, so there is no importance to rank.")
        else:
            importances = optuna.importance.get_param_importances(studies[arm][0])
            page.figure(importance_figure(importances, len(trials)), f"importances_{arm}.png",
                        f"optuna.importance.get_param_importances on the {arm} study.",
                        f"Importance of each parameter for the {arm} arm's best val MRE ({len(trials)} complete "
                        f"trials): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".")
            if len(trials) < FEW_IMPORTANCE_TRIALS:
                page.note(f"Estimated from only {len(trials)} complete trials: treat the ranking as rough.")
        if trials and searched:
            page.figure(parallel_figure(trials), f"parallel_{arm}.png",
                        f"Parallel coordinates of the {arm} arm's trials; each axis spans its range in the search "
                        "space (log axes for log-uniform parameters).", parallel_alt(arm, trials))


def search_sections(page: Page, exp: Experiment, sweep: Sweep) -> None:
    """The search's diagnostics, all on the selection split: what ran, the best trial per landmark, the Optuna
    studies, the epochs ASHA spent, and the tables."""
    import pyarrow.compute as pc

    trials_t, landmarks_t = exp.read_table("trials"), exp.read_table("landmarks")
    s, sel = sweep.settings, sweep.roles.get("val", {}).get("spec", "the selection split")
    rows = trials_t.to_pylist()
    best = best_row(rows)
    page.heading(f"The search, on the selection split ({sel})")
    budgets = ", ".join(f"{arm} {s.budget(arm)} x {s.epochs_of(arm)} epochs" for arm in s.arms)
    page.text(f"{exp} — {len(rows)} trials (per arm: {budgets}); start checkpoint "
              f"{sweep.start}: {sel} MRE {sweep.start_mre:.3f} mm.")
    for n in sweep.notes:
        page.note(n)
    if best is None or best["best_val_mre"] >= sweep.start_mre:
        page.note(f"No fine-tuned trial improved on the start model on {sel}: keep the start model.")

    page.heading(f"Per-landmark error on {sel}: start vs the best trial")
    lm = landmarks_t.filter(pc.equal(landmarks_t["trial_id"], best["trial_id"])) if best else None
    if lm is None:
        page.note("No trial reported a result, so no per-landmark comparison.")
    else:
        label = f"best {best['arm']} ({best['trial_id']})"
        page.figure(landmark_figure(lm.to_pylist(), f"{label} vs start (red: difficult; blue: the others)"),
                    "landmarks.png", f"{sel} MRE per landmark at the start and at the best trial's best epoch; the "
                                     "right panel is the change (blue bars right of 0 = drift).",
                    selection_landmarks_alt(lm.to_pylist(), label, sel))

    study_sections(page, exp, sweep)

    page.heading("Epochs spent per trial")
    fig, summary = epochs_figure(rows, int(s.epochs))
    page.figure(fig, "epochs.png", summary, f"{summary}. Per trial: "
                + ", ".join(f"{r['arm']} {r['trial_id']} {r['epochs_done']}" for r in rows) + ".")

    page.heading("Trials")
    page.table(trials_t.drop_columns([c for c in ("path",) if c in trials_t.column_names]))
    if lm is not None:
        page.heading(f"Best trial {best['trial_id']} ({best['arm']}): landmarks on {sel}")
        page.text("annotators_median_mm: the senior-junior distance on the same split, per landmark — what the "
                  "annotators themselves disagree by. A landmark whose error is near it has little left to gain.")
        page.table(with_annotators(lm.select(["symbol", "start_mre_mm", "best_mre_mm", "change_mm", "difficult"]),
                                   sweep, sel).sort_by([("change_mm", "ascending")]))


# ---------------------------------------------------------------- the page

CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:.3em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.headline{font-weight:bold;font-size:1.2em;margin:.4em 0}.context{font-size:.85em;color:#555;margin:.3em 0}
.note{color:#8a5a00;background:#fff6e0;padding:.4em .6em}.verdict{font-weight:bold;font-size:1.1em}
.scroll{overflow-x:auto;max-width:100%}pre{margin:0}
table.t{border-collapse:collapse;font-size:.85em}table.t td,table.t th{border:1px solid #ddd;padding:2px 6px}
table.nums td{white-space:nowrap;text-align:right}table.nums td:first-child{text-align:left}
figure{margin:.6em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}"""


def report(experiment: Experiment | str, out: str | Path, *, storage: str | None = None, n_boot: int = 2000,
           seed: int = 0, device: str = "auto") -> Path:
    """Write `out`/index.html and its PNGs for one experiment; returns the page's path. Every input is read
    and checked before anything is written, and `out` only appears once the page is complete."""
    from .atomic import staged_dir

    if n_boot < 1:
        raise rule_error("bootstrap", n_boot, "> 0")
    if seed < 0:
        raise rule_error("seed", seed, ">= 0")
    exp = experiment if isinstance(experiment, Experiment) else Experiment.find(experiment, storage)
    out = Path(out).resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no earlier report (index.html); "
                              "choose another --out")
    sweep = exp.load_sweep()
    record, why = verdict_of(exp, n_boot, seed, device)

    with staged_dir(out) as stage:
        page = Page(stage)
        page.parts.append(f"<h1>Sweep {html.escape(sweep.settings.name)}</h1>")
        first_screen(page, record, why)
        if record is not None:
            verdict_section(page, record)
        search_sections(page, exp, sweep)
        (stage / "index.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(sweep.settings.name)} report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")
    return out / "index.html"


def cmd_report(args: argparse.Namespace) -> int:
    """Reads the experiment only (the page goes to --out): it takes no driver lease (storage.py) and may run beside a
    driver."""
    path = report(args.experiment, args.out, storage=args.storage, n_boot=args.bootstrap, seed=args.seed,
                  device=args.device)
    log.info(f"wrote {path}")
    return 0


def register_cli(sub: Any) -> None:
    s = sub.add_parser("report", help="HTML report of a sweep: the verdict, plots and tables")
    add_experiment_options(s)
    s.add_argument("--out", required=True, help="folder for index.html and its PNGs")
    add_bootstrap_options(s, when=", when the sweep recorded no verdict.json")
    add_device_options(s)
    s.set_defaults(func=cmd_report)
