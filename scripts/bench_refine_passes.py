"""A second (or third) refinement pass, or averaged shifted crops: do they help, and at what cost?

Why: a second pass (crop again around the refined point, `refine_passes`) and averaging `refine_tta` crops shifted
on a ring are inference only, so one trained refinement stage is scored with each: 1, 2 and 3 passes, and 1 pass of
3 and 5 averaged crops (`--passes`, `--tta`). The variant is chosen on the selection split and judged on a split the
choice never saw, paired by image with bootstrap intervals (verdict.paired_bootstrap), with each variant's
inference time on that split.

    python scripts/bench_refine_passes.py --checkpoint study/refine/best.pt --dataset-path ISBI \
        --selection-split train:0.2 --verdict-split test1      # a trained stage on real images
    python scripts/bench_refine_passes.py                      # a synthetic set and a refine run trained here
    python scripts/bench_refine_passes.py --smoke-test         # seconds; records nothing
"""
from __future__ import annotations

import time
from pathlib import Path

import _bench
import numpy as np

from tune_landmarks.cache import build_cache
from tune_landmarks.config import coerce
from tune_landmarks.crops import views
from tune_landmarks.infer import Cascade, load_cascade
from tune_landmarks.metrics import radial_errors_mm
from tune_landmarks.read import describe, load_split
from tune_landmarks.refine import train_refine
from tune_landmarks.verdict import paired_bootstrap


def refined_errors(cascade: Cascade, dataset: Path, split: str, variant: tuple[int, int], cache: str | None,
                   skip: frozenset[str]) -> tuple[np.ndarray, float]:
    """(N images, refined landmarks) radial errors in mm of the cascade run with `variant` = (passes, averaged crops)
    on `split`, and the seconds the refinement took (the start points, the same for every variant, computed first)."""
    sp = load_split(describe(dataset), split, "mean", skip=skip)
    cached = build_cache(sp.records, split, tuple(cascade.start_cfg.image_size), "mean", cache, progress=False,
                         mode=cascade.start_cfg.resize, interpolation=cascade.start_cfg.interpolation)
    phys = cascade.physical(sp.records, split, "mean", cache, progress=False)
    cascade.cfg.refine_passes, cascade.cfg.refine_tta = variant
    start = cascade.start_points(cached)
    t0 = time.perf_counter()
    pred = cascade.refine_coarse(start, views(phys))
    seconds = time.perf_counter() - t0
    return radial_errors_mm(pred, cached.keypoints_orig, cached.spacing_mm)[:, cascade.channels], seconds


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p, epochs=16)
    p.set_defaults(model="hrnet_w18_small_v2", image_size=64, num_images=30, synth_size=240, start_epochs=8, lr=3e-3,
                   batch_size=8)
    p.add_argument("--checkpoint", help="a trained refinement stage (default: train one on a synthetic set here)")
    p.add_argument("--dataset-path", help="with --checkpoint: its dataset")
    p.add_argument("--selection-split", default="valid", help="where the number of passes is chosen")
    p.add_argument("--verdict-split", default="test", help="where the choice is judged (never used to choose)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--passes", nargs="+", type=int, default=[1, 2, 3], help="refine_passes to score (1 crop each)")
    p.add_argument("--tta", nargs="+", type=int, default=[3, 5], help="refine_tta to score (1 pass each)")
    p.add_argument("--skip-images", default="", help="images left out of both splits (ID,... or @FILE)")
    args = _bench.parse(p, _bench.FINETUNE_SMOKE | {"epochs": 2, "synth_size": 160, "bootstrap": 200, "passes": [1, 2],
                                                    "tta": [3]})
    device = _bench.setup(args)
    rec = _bench.Record("bench_refine_passes: one refinement pass vs crop-again passes and averaged crops", args, device)
    rec.repeats = "one trained stage, scored once per split and number of passes (accuracy, not timing)"
    with _bench.workdir(args) as work:
        if args.checkpoint:
            checkpoint, dataset, cache = Path(args.checkpoint), Path(args.dataset_path), None
        else:
            dataset = _bench.synthetic_data(work, args)
            start = _bench.start_checkpoint(args, dataset, work)
            cfg = _bench.config(args, dataset, work, mode="refine", resume=str(start), difficult=["Go", "Ar", "Po", "Or"],
                                epochs=args.epochs, lr=args.lr, refine_model="hrnet_w18_small", refine_crop_mm=9.6,
                                refine_mm_per_px=0.15, sigma=1.5, refine_offset_scale=1.5, out=str(work / "refine"))
            checkpoint, cache = train_refine(cfg).out / "best.pt", str(work / "cache")
        cascade = load_cascade(checkpoint, device)
        skip = frozenset(coerce("skip_images", args.skip_images))
        variants = [(n, 1) for n in sorted(set(args.passes) | {1})] + [(1, t) for t in sorted(set(args.tta) - {1})]
        scored = {(split, v): refined_errors(cascade, dataset, split, v, cache, skip)
                  for split in (args.selection_split, args.verdict_split) for v in variants}
    errors = {k: e for k, (e, _) in scored.items()}
    chosen = min(variants, key=lambda v: errors[(args.selection_split, v)].mean())
    rows = []
    for split in (args.selection_split, args.verdict_split):
        for v in variants[1:]:
            d = paired_bootstrap(errors[(split, (1, 1))], errors[(split, v)], cascade.refined, n_boot=args.bootstrap)[-1]
            rows.append([split, *v, d.ref_mre_mm, d.cand_mre_mm, d.diff_mm, f"[{d.diff_low_mm:+.3f}, {d.diff_high_mm:+.3f}]",
                         scored[(split, v)][1] / scored[(split, (1, 1))][1]])
    rec.value("settings", f"{checkpoint} ({cascade.cfg.refine_model}, crops of "
                          f"{', '.join(f'{s} {g.size} px at {g.mm_per_px:g} mm/px' for s, g in cascade.crops.items())}"
                          f") on {dataset}; refined: {', '.join(cascade.refined)}; "
                          f"selection split {args.selection_split}, verdict split {args.verdict_split}")
    rec.table(["split", "passes", "averaged crops", "1 crop mm", "variant mm", "variant - 1 crop mm", "95% interval",
               "refinement time / 1 crop"], rows)
    rec.value("chosen on the selection split (passes, averaged crops)", chosen)
    one, best = errors[(args.verdict_split, (1, 1))].mean(), errors[(args.verdict_split, chosen)].mean()
    rec.ratio("refined MRE chosen passes/1 pass on the verdict split", best / one,
              f"{chosen} (passes, averaged crops) chosen; < 1: the choice helps on images that did not make it")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
