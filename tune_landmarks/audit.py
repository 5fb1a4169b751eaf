"""`tune-landmarks check-dataset PATH --audit MODEL`: films whose annotation does not belong to them, found by a model.

Archives hold films whose labels belong to another image or another orientation: a film stored mirrored while its
annotation puts the face where it was, an annotation made at another resolution, two films' files swapped. Nothing
in the files says so (check.py reads them all and finds nothing wrong), but a model trained on the others misses
every landmark of such a film. The audit predicts every image of every split, lists the images whose errors lie
beyond the model's own error distribution on most landmarks, and names the likely cause where the geometry shows it
(`explain`). It reports; it never drops anything (`--skip-images` does, when the user decides).

This module is also the `check-dataset` command: check.py's checks (low in the data's way: read, cache,
fingerprint), then the audit, which predicts (infer) and so sits above them. Torch comes in with infer, imported
only when `--audit` is given, so `tune-landmarks --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from .atomic import write_parquet
from .cache import CachedSplit, build_cache, to_target
from .check import DEFAULT_MAX_DISAGREEMENT_MM, check_dataset, finish
from .config import TrainConfig, rule_error
from .crops import PhysicalSplit
from .metrics import predictions_table, radial_errors_mm
from .options import add_dataset_options, add_device_options, flag
from .read import Record, describe

if TYPE_CHECKING:
    from .infer import Cascade
    from .model import LandmarkModel

log = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 99.5
# An image is flagged when more than half its landmarks lie beyond their limits: a film whose annotation is not its
# own misses nearly all of them, a hard film or one stray click a few (those are check-dataset --report's business).
MOST = 0.5
FENCE = 3.0  # the reference leaves out images whose median error is beyond Q3 + 3 IQR of all images' medians
# A cause explains a flagged image when, under it, the image would not be flagged and its median error is at most
# this fraction of the stored one's ("far better"; for the true cause 0.09-0.24 on tests/test_audit.py's damaged set,
# 0.03-0.20 on damaged ISBI films, docs/audit.md).
FAR_BETTER = 0.5
# "Scaled" needs a scale clearly other than 1. Heads differ in size by about 10 % (synth.py draws 0.85-1.05), so an
# annotation swapped with another head's also fits a scale within that (×0.94 on the test set with a weaker model);
# an annotation at another resolution or with another machine's pixel size (Aariz: 0.089-0.144 mm/px) lies beyond.
MIN_SCALE_CHANGE = 0.1


# ---------------------------------------------------------------- the arithmetic (numpy only)

@dataclass
class Films:
    """Every audited image in one order across splits: its annotation and the model's points (original px)."""

    names: list[tuple[str, str]]  # (split, image id)
    true: np.ndarray  # (N, K, 2)
    pred: np.ndarray  # (N, K, 2)
    spacing_mm: np.ndarray  # (N,)

    @property
    def errors(self) -> np.ndarray:
        return radial_errors_mm(self.pred, self.true, self.spacing_mm)


def leave_one_out_limits(errors: np.ndarray, percentile: float, reference: np.ndarray) -> np.ndarray:
    """(N, K): for each image and landmark, the `percentile` (numpy's linear interpolation) of that landmark's errors
    over the other images of `reference` (a mask); inf where no other image is left to compare with."""
    out = np.full(errors.shape, np.inf)
    for i in range(len(errors)):
        others = reference.copy()
        others[i] = False
        if others.any():
            out[i] = np.percentile(errors[others], percentile, axis=0)
    return out


def mostly_beyond(beyond: np.ndarray) -> np.ndarray:
    """Per image (rows of a (N, K) mask): more than MOST of its landmarks beyond their limits."""
    return beyond.sum(-1) > MOST * beyond.shape[-1]


def reference(errors: np.ndarray) -> np.ndarray:
    """(N,) mask of the images that stand for the model's own error distribution: all but those whose median error
    lies beyond the far-out fence of the images' medians (Q3 + FENCE · IQR, Tukey's). A film whose annotation is not
    its own misses by far more than any other; left in, a few such films lift each other's limits and hide one another
    (tests/test_audit.py's 4 damaged films among 20: the limits over all other images flag 1 of them)."""
    medians = np.median(errors, axis=1)
    q1, q3 = np.percentile(medians, [25, 75])
    return medians <= q3 + FENCE * (q3 - q1)


def flag_images(errors: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """The limits (N, K), each landmark's `percentile` over the other images of the reference, and the flagged
    images (N,): most of their landmarks beyond their limits."""
    limits = leave_one_out_limits(errors, percentile, reference(errors))
    return limits, mostly_beyond(errors > limits)


def fit_scale(pred: np.ndarray, true: np.ndarray) -> tuple[float, np.ndarray]:
    """Least squares `true ≈ s · pred + t` over the landmarks (K, 2): one isotropic scale, no rotation."""
    pc, tc = pred - pred.mean(0), true - true.mean(0)
    s = float((pc * tc).sum() / (pc * pc).sum())
    return s, true.mean(0) - s * pred.mean(0)


@dataclass
class Finding:
    """A flagged image: how many of its landmarks lie beyond their limits, its median error, and the likely cause
    ("mirrored", "scaled", "swapped", or "" when no geometry explains it) with the evidence."""

    split: str
    image_id: str
    beyond: int
    landmarks: int
    median_mm: float
    cause: str
    evidence: str
    partner: tuple[str, str] | None = None  # swapped: the (split, id) whose prediction the annotation fits

    def describe(self) -> str:
        return (f"{self.split} {self.image_id}: {self.beyond}/{self.landmarks} landmarks beyond the limit, median error "
                f"{self.median_mm:.2f} mm; {self.evidence}")


class Fit(NamedTuple):
    """One cause held against a flagged image: its median error (mm), landmarks beyond their limits, and what it says."""

    median_mm: float
    beyond: int
    cause: str
    says: str
    partner: tuple[str, str] | None = None


def explains(fit: Fit, landmarks: int, median_mm: float) -> bool:
    """Under this cause the image would not be flagged, and its median error is far below the stored one's."""
    return fit.beyond <= MOST * landmarks and fit.median_mm <= FAR_BETTER * median_mm


def explain(films: Films, i: int, limits: np.ndarray, flipped: np.ndarray | None, flagged: np.ndarray) -> Finding:
    """Finding for flagged image `i` (`limits`: its row, (K,)). Each cause gives another annotation-to-prediction
    comparison; one explains the image when under it the image would not be flagged and its median error is at most
    FAR_BETTER of the stored one's. The flip explains first when it does: it is one comparison, with nothing searched
    and nothing fitted, so it is the least likely to fit by chance; of the others, the closest fit is named.

    - mirrored: `flipped` are the model's points (K, 2) on the film flipped left-right, in that flipped film's pixels,
      held against the annotation as it is. The equivalent "annotation flipped (x -> W-1-x) against the prediction on
      the stored film" is not robust: a mirrored film is one the model never saw (the face looks the other way), and
      its prediction there is not the mirror image of a good one, so that comparison can fail on a mirrored film.
      Flipping the film instead puts a mirrored film back where the model is on home ground, so the match is as close
      as the model's usual error, and sends a correctly stored film where it is not, so that one does not match. (A
      lateral film's landmarks keep their names under the flip: there are no left/right pairs to exchange.)
    - scaled: annotation ≈ s · prediction + t (fit_scale, in pixels): a wrong pixel size or an annotation made at
      another resolution; needs |s - 1| >= MIN_SCALE_CHANGE. The fixed point, t / (1 - s), is named.
    - swapped: the annotation held against every other image's prediction (in that image's millimetres). Of those
      that fit, a flagged image is named first (`flagged`, (N,)): a swap damages both films, while a film that merely
      looks alike is annotated right; then the closest.
    """
    true, pred, spacing = films.true[i], films.pred[i], films.spacing_mm[i]
    err = np.linalg.norm(pred - true, axis=-1) * spacing
    k, median = len(err), float(np.median(err))

    def fit(e: np.ndarray, cause: str, says: str, partner: tuple[str, str] | None = None) -> Fit:
        return Fit(float(np.median(e)), int((e > limits).sum()), cause, says, partner)

    fits = []
    if flipped is not None:
        fits.append(fit(np.linalg.norm(flipped - true, axis=-1) * spacing, "mirrored",
                        "mirrored: the film flipped left-right fits its annotation"))
    s, t = fit_scale(pred, true)
    if abs(s - 1) >= MIN_SCALE_CHANGE:
        fixed = t / (1 - s)
        fits.append(fit(np.linalg.norm(s * pred + t - true, axis=-1) * spacing, "scaled",
                        f"scaled by ×{s:.2f} about ({fixed[0]:.0f}, {fixed[1]:.0f}) px: annotation = {s:.2f} · prediction "
                        f"+ ({t[0]:.1f}, {t[1]:.1f}) px fits"))
    others = np.linalg.norm(films.pred - true, axis=-1) * films.spacing_mm[:, None]  # (N, K)
    medians = np.median(others, axis=1)
    medians[i] = np.inf

    def swap(j: int) -> Fit:
        return fit(others[j], "swapped", f"swapped: it fits the prediction of {' '.join(films.names[j])}", films.names[j])

    order = (j for j in np.lexsort((medians, ~flagged)) if j != i)  # the flagged first, each closest first
    fits.append(next((f for f in map(swap, order) if explains(f, k, median)), swap(int(np.argmin(medians)))))
    split, image_id = films.names[i]
    log.debug("%s %s: median %.2f mm; %s", split, image_id, median,
              "; ".join(f"{f.says} (median {f.median_mm:.2f} mm, {f.beyond} beyond)" for f in fits))
    beyond = int((err > limits).sum())
    good = [f for f in fits if explains(f, k, median)]
    if good:
        best = min(good, key=lambda f: (f.cause != "mirrored", f.median_mm))
        return Finding(split, image_id, beyond, k, median, best.cause,
                       f"{best.says} (median {best.median_mm:.2f} mm, {best.beyond} beyond)", best.partner)
    tried = ", ".join(f"{f.cause} {f.median_mm:.2f} mm" for f in fits)
    return Finding(split, image_id, beyond, k, median, "", f"cause not found (closest fits: {tried})")


def findings(films: Films, limits: np.ndarray, flagged: np.ndarray, flipped: dict[int, np.ndarray]) -> list[Finding]:
    """Every flagged image explained (`flipped`: image index -> its points on the flipped film), those with the most
    landmarks beyond their limits first, then by median error."""
    out = [explain(films, int(i), limits[i], flipped.get(int(i)), flagged) for i in np.flatnonzero(flagged)]
    return sorted(out, key=lambda f: (-f.beyond, -f.median_mm))


# ---------------------------------------------------------------- predicting (infer, imported when the audit runs)

@dataclass
class AuditModel:
    """What the audit predicts with, loaded once and checked against the dataset's landmarks: a checkpoint or model
    folder (`net`), or a refinement cascade (its start model reads the cache at `cfg`'s input size)."""

    cfg: TrainConfig  # how the input is cached and decoded: the model's run config, a cascade's start model's
    net: LandmarkModel | None = None
    cascade: Cascade | None = None

    def caches(self, records: list[Record], split: str, annotator: str, cache_dir: str | None,
               progress: bool) -> tuple[CachedSplit, dict[float, PhysicalSplit] | None]:
        """The split cached as `evaluate` caches it (a cascade's crops also at each of their resolutions)."""
        cfg = self.cfg
        cached = build_cache(records, split, tuple(cfg.image_size), annotator, cache_dir, progress, cfg.resize,
                             cfg.interpolation)
        if self.cascade is None:
            return cached, None
        return cached, self.cascade.physical(records, split, annotator, cache_dir, progress)

    def predict(self, cached: CachedSplit, phys: dict[float, PhysicalSplit] | None) -> np.ndarray:
        """Points (N, K, 2) in original px, as `evaluate` predicts them (infer.predict_as_run, Cascade.predict_cached)."""
        from .infer import predict_as_run

        if self.cascade is None:
            return predict_as_run(self.net, self.cfg, cached)
        return self.cascade.predict_cached(cached, phys)

    def predict_mirrored(self, cached: CachedSplit, phys: dict[float, PhysicalSplit] | None,
                         idx: np.ndarray) -> np.ndarray:
        """Points (len(idx), K, 2) on films `idx` flipped left-right, in the flipped films' pixels: the same calls on
        flipped inputs (a cascade crops the flipped films at its resolution)."""
        from .infer import predict_as_run

        films = flip_films(cached, idx)
        if self.cascade is None:
            return predict_as_run(self.net, self.cfg, films)
        flipped = {res: ([np.ascontiguousarray(p.image(i)[:, ::-1]) for i in idx], p.scale[idx]) for res, p in phys.items()}
        return self.cascade.refine_coarse(self.cascade.start_points(films), flipped)


def flip_films(split: CachedSplit, idx: np.ndarray) -> CachedSplit:
    """Images `idx` of a cached split flipped left-right, in the cache's own frame: each image's content (its left
    W·sx columns; a letterbox pads on the right) is reversed, which is the resize of the flipped film, since the
    cache aligns pixel centres (cache.to_target): x -> W-1-x in the film is x_t -> W·sx-1-x_t in the cache. So the
    model's points map back to the flipped film's pixels exactly as they do for the stored one."""
    images = np.array(split.images[idx])
    widths = np.rint(split.orig_size[idx, 0] * split.scale[idx, 0]).astype(int)
    for img, w in zip(images, widths):
        img[:, :w] = img[:, :w][:, ::-1].copy()
    orig = split.keypoints_orig[idx].copy()
    orig[..., 0] = split.orig_size[idx, None, 0] - 1 - orig[..., 0]
    return replace(split, image_ids=[split.image_ids[i] for i in idx], images=images,
                   keypoints=to_target(orig, split.scale[idx, None, :]), keypoints_orig=orig, scale=split.scale[idx],
                   orig_size=split.orig_size[idx], spacing_mm=split.spacing_mm[idx], thumbs=split.thumbs[idx, :, ::-1])


def load_audit_model(path: str | Path, symbols: list[str], device: str = "auto") -> AuditModel:
    """The model `evaluate` would score with (a best.pt, an exported or imported model folder, a refinement stage),
    refused before any image is predicted, naming the file: missing, not a checkpoint, pickled (read only through
    import-model --trust-pickle, as everywhere), landmarks other than `symbols`. A folder of predictions, or a
    refinement stage on one, cannot predict a flipped film: refused too."""
    from .device import resolve_device
    from .infer import is_given, is_predictions, is_refine, load_cascade, load_model
    from .model import CheckpointError, read_checkpoint

    if is_predictions(path):
        raise CheckpointError(f"{path}: a folder of predictions, not a model: the audit predicts films flipped "
                              "left-right too (give a best.pt, an exported model folder or a refinement stage)")
    ckpt = read_checkpoint(path)
    dev = resolve_device(device)
    if not is_refine(ckpt):
        net, cfg, _ = load_model(path, dev, ckpt, symbols)
        return AuditModel(cfg, net=net)
    if is_given(ckpt["refine"]):
        raise CheckpointError(f"{path}: a refinement stage on another detector's predictions, which has no points for a "
                              "flipped film: audit with a model that predicts every landmark")
    cascade = load_cascade(path, dev, symbols, ckpt)
    return AuditModel(cascade.start_cfg, cascade=cascade)


@dataclass
class Audit:
    """The audit's result: the films, each image x landmark's limit, the flagged images and their findings."""

    films: Films
    symbols: list[str]
    percentile: float
    limits: np.ndarray  # (N, K) mm
    flagged: np.ndarray  # (N,) bool
    findings: list[Finding]

    def table(self) -> pa.Table:
        """One row per image x landmark (`--audit-out`): evaluate's columns, the split, the limit, whether the error
        lies beyond it, and the image's flag and cause."""
        f, k = self.films, len(self.symbols)
        ids = [i for _, i in f.names]
        t = predictions_table(ids, self.symbols, f.pred, f.true, f.errors)
        cause = {(x.split, x.image_id): x.cause for x in self.findings}
        t = t.add_column(0, "split", pa.array(np.repeat([s for s, _ in f.names], k).tolist(), pa.string()))
        for name, values in (("limit_mm", self.limits.ravel().astype(float)), ("beyond", (f.errors > self.limits).ravel()),
                             ("flagged", np.repeat(self.flagged, k)),
                             ("cause", pa.array(np.repeat([cause.get(n) for n in f.names], k).tolist(), pa.string()))):
            t = t.append_column(name, pa.array(values))
        return t.replace_schema_metadata({"percentile": str(self.percentile)})


def check_percentile(percentile: float) -> None:
    """Refuse a percentile outside (0, 100] before any work: the command checks it before a single image is decoded."""
    if not 0 < percentile <= 100:
        raise rule_error("audit_percentile", percentile, "> 0 and <= 100")


def audit(model: AuditModel, records: dict[str, list[Record]], symbols: list[str], annotator: str = "mean",
          percentile: float = DEFAULT_PERCENTILE, cache_dir: str | None = None, progress: bool = True) -> Audit:
    """Predict every record of every split (split -> records) with `model`, flag the images whose errors lie beyond
    the others' on most landmarks (flag_images), predict the flagged films flipped left-right and explain each."""
    check_percentile(percentile)
    held, names, true, pred, spacing = [], [], [], [], []
    for split, recs in records.items():
        if not recs:
            continue
        cached, phys = model.caches(recs, split, annotator, cache_dir, progress)
        held.append((len(names), cached, phys))
        names += [(split, i) for i in cached.image_ids]
        true.append(cached.keypoints_orig)
        pred.append(model.predict(cached, phys))
        spacing.append(cached.spacing_mm)
    if len(names) < 3:
        raise ValueError(f"the audit compares each image with the others: it needs 3 usable images or more, found "
                         f"{len(names)}")
    films = Films(names, np.concatenate(true), np.concatenate(pred), np.concatenate(spacing))
    limits, flagged = flag_images(films.errors, percentile)
    flipped: dict[int, np.ndarray] = {}
    for start, cached, phys in held:
        idx = np.flatnonzero(flagged[start:start + len(cached)])
        if idx.size:
            flipped.update(zip((start + idx).tolist(), model.predict_mirrored(cached, phys, idx)))
    return Audit(films, symbols, percentile, limits, flagged, findings(films, limits, flagged, flipped))


# ---------------------------------------------------------------- the command

def report_audit(result: Audit, model_path: str | Path, out: str | None, strict: bool) -> list[str]:
    """Print the audit (and write `out`); the findings as problems with `strict`, else printed as warnings."""
    n, k = result.limits.shape
    print(f"audit by {model_path}: {n} images predicted, median error {np.median(result.films.errors):.2f} mm; a "
          f"landmark fails beyond the {result.percentile:g}th percentile of its errors on the other images "
          f"(median limit {np.median(result.limits[np.isfinite(result.limits)]):.2f} mm); an image is flagged when "
          f"more than {MOST:.0%} of its {k} landmarks fail")
    if out:
        print(f"wrote {write_parquet(result.table(), out)}")
    lines = [f.describe() for f in result.findings]
    if not lines:
        print("audit: no image's annotation lies outside the model's errors on the others")
    elif not strict:
        print(f"{len(lines)} warning(s): annotations that do not fit their film (--strict makes these errors):")
        for line in lines:
            print(f"  - {line}")
    return lines if strict else []


def cmd_check_dataset(args: argparse.Namespace) -> int:
    """check.py's checks, then (--audit) the audit; exit 1 on any problem, flagged images being warnings unless
    --strict. The model is read and checked first, so a bad --audit is refused before any image is decoded."""
    if args.audit_out and not args.audit:
        raise ValueError("--audit-out writes the audit's table: give --audit MODEL too")
    check_percentile(args.audit_percentile)
    model = load_audit_model(args.audit, describe(args.path, args.format).symbols, args.device) if args.audit else None
    checked = check_dataset(args)
    problems = checked.problems
    result = None
    if model is not None:
        result = audit(model, checked.records, checked.info.symbols, args.annotator, args.audit_percentile,
                       args.cache_dir, args.progress)
        problems += report_audit(result, args.audit, args.audit_out, args.strict)
    code = finish(problems)
    if result is not None and result.findings:
        ids = list(dict.fromkeys([*args.skip_images, *(f.image_id for f in result.findings)]))
        print(f"to leave them out of every role: --skip-images {','.join(ids)} (or --skip-images @FILE, one id a line)")
    return code


def register_cli(sub: Any) -> None:
    s = sub.add_parser("check-dataset", help="list a dataset's splits and every problem in it; decodes every image; "
                                             "--audit MODEL: annotations that do not belong to their film")
    s.add_argument("path")
    add_dataset_options(s, required=None, annotator_help="whose points to check (mean: both files, and their disagreement)")
    s.add_argument("--report", action="store_true",
                   help="list per landmark the senior-junior distance in mm: mean, median, 95th percentile, max and where")
    s.add_argument(*flag("report_out"), dest="report_out", metavar="FILE", help="write that per-landmark table as Parquet")
    s.add_argument(*flag("pairs_out"), dest="pairs_out", metavar="FILE",
                   help="write every image x landmark senior-junior distance as Parquet")
    s.add_argument(*flag("max_disagreement_mm"), dest="max_disagreement_mm", type=float,
                   default=DEFAULT_MAX_DISAGREEMENT_MM, metavar="MM",
                   help=f"warn about senior-junior pairs farther apart than MM (default {DEFAULT_MAX_DISAGREEMENT_MM:g}: "
                        "on ISBI 2015 above the largest distance of 16 of the 19 landmarks, 10 of 5,700 pairs beyond it)")
    s.add_argument("--audit", metavar="MODEL",
                   help="predict every image with MODEL (a best.pt, an exported model folder or a refinement stage) and "
                        "list those whose annotation lies far outside its errors on the others, with the likely cause "
                        "(mirrored, scaled, swapped); see docs/audit.md")
    s.add_argument(*flag("audit_percentile"), dest="audit_percentile", type=float, default=DEFAULT_PERCENTILE,
                   metavar="P", help="a landmark fails beyond the P-th percentile of its errors on the other images "
                                     f"(default {DEFAULT_PERCENTILE:g})")
    s.add_argument(*flag("audit_out"), dest="audit_out", metavar="FILE",
                   help="write the audit's image x landmark table (errors, limits, flags, causes) as Parquet")
    add_device_options(s, cache=True)
    s.add_argument("--strict", action="store_true",
                   help="pairs beyond --max-disagreement-mm and images the audit flags are errors (exit 1)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar while decoding")
    for role in ("train", "val", "test"):
        s.add_argument(*flag(f"{role}_split"), dest=f"{role}_split",
                       help=f"{role} split spec for the roles shown (NAME or NAME:FRACTION; default per layout)")
    s.set_defaults(func=cmd_check_dataset)
