"""The data path: images per second when every sample decodes its full-resolution file (decode + resize +
augment) vs when it reads the decoded cache (+ augment); and the share of a training epoch spent waiting
for data in `run.train` (data_wait_seconds / train_seconds, epochs 2+; goal <= 3%).

Why: the cache exists because decoding a 1935x2400 JPEG costs far more than augmenting it; this
measures how much more on the real ISBI 2015 files, and whether what is left (augmenting in the main
process with --num-workers 0) still starves the training step.

    python scripts/bench_data_path.py                  # ../shared/data/isbi2015, record to BENCHMARKS.md
    python scripts/bench_data_path.py --smoke-test     # a tiny synthetic set; records nothing
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import _bench
import numpy as np

from tune_landmarks.augment import AugmentConfig, LandmarkDataset, train_transform
from tune_landmarks.cache import CachedSplit, decode_image, resize
from tune_landmarks.read import load_split
from tune_landmarks.run import Data, prepare_data, steps_per_epoch, train


class DecodingImages:
    """Stands in for a cache's image array: each read decodes and resizes the original file, which is what
    every sample would cost without the cache (LandmarkDataset indexes `split.images[i]`)."""

    def __init__(self, paths: list[str], size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return resize(decode_image(self.paths[i]), self.size)[0]


def head(split: CachedSplit, n: int) -> CachedSplit:
    """The first n images of a cached split."""
    return dataclasses.replace(split, image_ids=split.image_ids[:n], images=split.images[:n],
                               keypoints=split.keypoints[:n], keypoints_orig=split.keypoints_orig[:n],
                               scale=split.scale[:n], orig_size=split.orig_size[:n], spacing_mm=split.spacing_mm[:n])


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(_bench.SHARED_DATA / "isbi2015"),
                   help="dataset root, or 'synthetic' for a synthetic Aariz-format set")
    p.add_argument("--cache-dir", help="decoded-image cache (default: the package's; synthetic: inside --workdir)")
    p.add_argument("--images", type=int, default=20, help="images per timed pass")
    p.add_argument("--image-size", type=int, default=512, help="square network input")
    p.add_argument("--model", default="hrnet_w32", help="for the data-wait share")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=10, help="steps per epoch of the data-wait run")
    p.add_argument("--val-images", type=int, default=8, help="validation images per epoch (evaluation is not timed)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--num-images", type=int, default=12, help="synthetic set size")
    p.add_argument("--synth-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = _bench.parse(p, {"dataset": "synthetic", "images": 4, "image_size": 64, "model": "hrnet_w18_small_v2",
                            "batch_size": 2, "epochs": 3, "max_steps": 2, "val_images": 2})
    repeats = _bench.history_repeats(args, p)
    device = _bench.setup(args)
    with _bench.workdir(args) as work:
        synthetic = args.dataset == "synthetic"
        root = _bench.synthetic_data(work, args) if synthetic else Path(args.dataset)
        cache = str(work / "cache") if synthetic and not args.cache_dir else args.cache_dir
        cfg = _bench.config(args, root, work, cache_dir=cache, epochs=args.epochs, lr=1e-4, mode="all",
                            num_workers=args.num_workers, out=str(work / "datawait"))
        data = prepare_data(cfg, progress=True)
        size = (args.image_size, args.image_size)
        cached = head(data.train, args.images)
        records = {r.image_id: str(r.image_path) for r in load_split(data.info, data.train_split, cfg.annotator).records}
        paths = [records[i] for i in cached.image_ids]
        decoding = dataclasses.replace(cached, images=DecodingImages(paths, size))
        tf = train_transform(AugmentConfig())
        arms = {"decode+resize+augment": LandmarkDataset(decoding, tf), "cache+augment": LandmarkDataset(cached, tf)}

        def one_pass(ds: LandmarkDataset):
            def run() -> None:
                tf.set_random_seed(args.seed)  # both arms apply the same augmentations
                for i in range(len(ds)):
                    ds[i]
            return run

        times = _bench.interleaved({k: one_pass(ds) for k, ds in arms.items()}, args.repeats, device)
        rate = {k: args.images / _bench.median(v) for k, v in times.items()}
        orig = data.train.orig_size[:args.images]

        res = train(cfg, data=Data(data.info, data.train, head(data.val, args.val_images), data.roles))
    share = [h["data_wait_seconds"] / h["train_seconds"] for h in res.history[1:]]
    n_steps = steps_per_epoch(len(data.train), args.batch_size, args.max_steps)
    rec = _bench.Record("bench_data_path: decode vs cache, and data wait in run.train", args, device)
    rec.value("settings", f"{'synthetic set' if synthetic else root} ({data.info.format}, split {data.train_split}), "
                          f"{args.images} images of {int(orig[:, 0].mean())}x{int(orig[:, 1].mean())} px (mean) "
                          f"to {args.image_size}x{args.image_size}, default augmentation; data-wait run: {args.model}, "
                          f"batch {args.batch_size}, {n_steps} steps/epoch, num_workers {args.num_workers}, "
                          f"{args.epochs} epochs")
    rec.table(["path", "s per pass (median)", "images/s", "time / cache (paired)"],
              [[k, _bench.median(v), rate[k], _bench.paired_ratio(times, k, "cache+augment")] for k, v in times.items()])
    rec.table(["epoch", "train s", "data wait s", "share"],
              [[h["epoch"], h["train_seconds"], h["data_wait_seconds"], h["data_wait_seconds"] / h["train_seconds"]]
               for h in res.history])
    rec.ratio("decode/cache time per image", _bench.paired_ratio(times, "decode+resize+augment", "cache+augment"),
              f"median of per-repeat ratios over {args.images}-image passes; the cache's speed-up")
    rec.ratio("data wait share", _bench.median(share),
              f"data_wait_seconds / train_seconds, {repeats}; goal <= 0.03"
              + (" (met)" if _bench.median(share) <= 0.03 else " (NOT met)"), digits=4)
    rec.repeats = f"{args.repeats} interleaved timed passes per path; data wait: {repeats}"
    _bench.emit(rec)


if __name__ == "__main__":
    main()
