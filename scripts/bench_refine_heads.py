"""The refinement stage's design choice: one network for all refined landmarks (one channel each, every crop training
only its own channel) vs one network per landmark, at the same crops per landmark and epochs.

Why: the issue asks to measure, not assume. Both arms are real `refine.train_refine` runs on a synthetic set (whose
difficult landmarks are built to be hard at low resolution) from one start model trained inside this script; the
per-landmark arm is L runs with one landmark each, so each of its networks sees exactly the crops the shared one
sees of that landmark, and together they cost the same training steps' worth of crops.

    python scripts/bench_refine_heads.py                  # record to BENCHMARKS.md
    python scripts/bench_refine_heads.py --smoke-test     # seconds; records nothing
"""
from __future__ import annotations

import time

import _bench
import numpy as np

from tune_landmarks.refine import train_refine


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    _bench.add_finetune_args(p, epochs=16)
    p.set_defaults(model="hrnet_w18_small_v2", image_size=64, num_images=30, synth_size=240, start_epochs=8, lr=3e-3,
                   batch_size=8)
    p.add_argument("--landmarks", default="Go,Ar,Po,Or", help="refined landmarks")
    p.add_argument("--refine-model", default="hrnet_w18_small")
    p.add_argument("--crop-mm", type=float, default=9.6)
    p.add_argument("--mm-per-px", type=float, default=0.15)
    args = _bench.parse(p, _bench.FINETUNE_SMOKE | {"landmarks": "Go,Ar", "refine_model": "resnet18", "epochs": 1,
                                                      "synth_size": 160})
    device = _bench.setup(args)
    hard = [s.strip() for s in args.landmarks.split(",") if s.strip()]
    rec = _bench.Record("bench_refine_heads: one refinement network for all landmarks vs one per landmark", args, device)
    rec.repeats = "one training run per arm (accuracy, not timing): the shared network once, a network per landmark once each"
    with _bench.workdir(args) as work:
        dataset = _bench.synthetic_data(work, args)
        start = _bench.start_checkpoint(args, dataset, work)

        def run(name: str, landmarks: list[str]):
            cfg = _bench.config(args, dataset, work, mode="refine", resume=str(start), difficult=landmarks,
                                epochs=args.epochs, lr=args.lr, refine_model=args.refine_model,
                                refine_crop_mm=args.crop_mm, refine_mm_per_px=args.mm_per_px, sigma=1.5,
                                refine_offset_scale=1.5, out=str(work / name))
            t = time.perf_counter()
            res = train_refine(cfg)
            return res, time.perf_counter() - t

        shared, t_shared = run("shared", hard)
        alone = {s: run(f"alone-{s}", [s]) for s in hard}
    start_pl = shared.start_per_landmark or {}
    rows = [[s, start_pl.get(s, float("nan")), shared.best.per_landmark[s], alone[s][0].best.per_landmark[s]]
            for s in hard]
    mean = [float(np.mean([r[i] for r in rows])) for i in (1, 2, 3)]
    rows.append(["all refined", *mean])
    rec.value("settings", f"synthetic set of {args.num_images} images ({args.synth_size} px), start model {args.model} at "
                          f"{args.image_size} px ({args.start_epochs} epochs); refine: {args.refine_model}, "
                          f"{args.crop_mm:g}-mm crops at {args.mm_per_px:g} mm/px, {args.epochs} epochs, batch "
                          f"{args.batch_size}, lr {args.lr:g}; val MRE at each run's best epoch (selected on the "
                          "same validation split, as a sweep would)")
    rec.table(["landmark", "start MRE mm", "shared network mm", "one network per landmark mm"], rows)
    rec.ratio("difficult MRE shared/per-landmark", mean[1] / mean[2], "< 1: the shared network is more accurate")
    rec.value("training seconds shared / per-landmark (sum)", t_shared / sum(t for _, t in alone.values()),
              "wall time, including each run's set-up")
    rec.value("weights", f"shared: 1 network; per landmark: {len(hard)} networks")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
