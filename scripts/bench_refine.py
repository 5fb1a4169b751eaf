"""The refinement stage's training step vs a masked fine-tuning step of the full model, at the same images per step.

Why: the workflow trains only the difficult landmarks expecting a faster step and less memory; masked fine-tuning of
the shared model gives neither (bench_loss_modes.py). The refinement stage (`--mode refine`) trains a small crop
network instead and never back-propagates through the start model. Both steps are `run.train_step` with what a run
builds (AdamW over its parameter groups, schedule, clip): the masked step on B whole images at the global input size
(the workflow's 12 of 29 landmarks in the loss), the refine step on the same B images' crops, one per refined
landmark (B x L crops of P px, `refine.CropObjective`). Variants interleaved within each repeat; random pixels
(a step's cost does not depend on them). The goal is refine / masked <= 0.5 in time.

With a crop side per landmark (`--crop-mm-each 28.8 38.4 19.2 ...`, one per refined landmark, as a run's
refine_crop_mm resolves them) the crops differ in size, and a step can either batch each size apart (what
refine.CropDataset and infer.refine_points do: one forward/backward per size) or pad every crop to the largest;
both are timed, so the choice is measured, not assumed.

    python scripts/bench_refine.py                       # record to BENCHMARKS.md
    python scripts/bench_refine.py --smoke-test          # seconds; records nothing
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import _bench
import torch

from tune_landmarks.config import crop_pixels
from tune_landmarks.crops import size_groups
from tune_landmarks.landmarks import AARIZ, WORKFLOW_DIFFICULT, symbols
from tune_landmarks.loss import landmark_weights
from tune_landmarks.model import create_model
from tune_landmarks.refine import CropObjective
from tune_landmarks.run import Optimisation, train_step


def crop_batch(images: int, landmarks: int, size: int, device: torch.device,
               channels: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B x L crops and their keypoints as refine.CropDataset makes them: each crop's own landmark near its centre,
    NaN on the other channels (`channels`: only these landmarks' crops, B each)."""
    channels = list(range(landmarks)) if channels is None else list(channels)
    x, kps = _bench.random_batch(images * len(channels), size, landmarks, device)
    own = torch.tensor(channels, device=device).repeat(images)
    keep = torch.nn.functional.one_hot(own, landmarks).bool()[..., None]
    return x, torch.where(keep, kps * 0.2 + 0.4 * size, torch.full_like(kps, float("nan")))


def crop_batches(images: int, sizes: Sequence[int], device: torch.device,
                 padded: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The crops of `images` images, landmark j's at sizes[j] px: one batch per size (batched apart), or one batch
    of every crop padded to the largest (`padded`: the cost of a batch of the largest size)."""
    if padded:
        return [crop_batch(images, len(sizes), max(sizes), device)]
    return [crop_batch(images, len(sizes), size, device, js) for size, js in size_groups(sizes).items()]


def refine_step(name: str, landmarks: int, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """One call = one `run.train_step` of the refinement network per batch of crops (x, kps)."""
    torch.manual_seed(0)
    model = create_model(name, landmarks).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    cfg = _bench.step_config()
    opt, sched = _bench.shared_optimiser(model)
    optim = Optimisation.create(opt, sched, device, None, cfg.grad_clip)
    objective = CropObjective.from_config(cfg, torch.ones(landmarks))
    frames = [torch.ones(x.shape[0], 3, device=device) for x, _ in batches]  # crops: scale 1

    def step() -> None:
        for (x, kps), frame in zip(batches, frames):
            train_step(model, x, kps, frame, objective, optim)
    return step


def resident_mb(device: torch.device) -> float:
    """Memory held before a step (every model, optimiser and batch of this process): what the step's peak is over."""
    if device.type == "cuda":
        _bench.sync(device)
        return torch.cuda.memory_allocated(device) / 2**20
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) / 1024
    return float("nan")


def step_memory(kind: str, name: str, size: int | tuple[int, ...], images: int, landmarks: int, device: str,
                threads: int, padded: bool = False) -> tuple[float, float]:
    """(memory resident before a step: model, optimiser state, batch, libraries; the step's own peak above it), MB,
    measured in a fresh process after one warm-up step: a process's allocator keeps what earlier steps freed, so
    only a fresh process shows one step's own need. `kind` is "masked" (the full model `name` on `images` whole
    images of `size` px) or "refine" (the refinement network `name` on images x landmarks crops of `size` px, or of
    size[j] px for landmark j, batched apart or `padded`)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if kind == "masked":
        syms = symbols(AARIZ)
        model = create_model(name, len(syms)).to(dev)
        x, kps = _bench.random_batch(images, size, len(syms), dev)
        step = _bench.make_step(model, x, kps, landmark_weights(syms, list(WORKFLOW_DIFFICULT), "masked", 2.5))
    else:
        sizes = size if isinstance(size, tuple) else (size,) * landmarks
        step = refine_step(name, landmarks, crop_batches(images, sizes, dev, padded), dev)
    step()
    mem = _bench.PeakMemory(dev)
    before = resident_mb(dev)
    mem.reset()
    step()
    return before, mem.read_mb() - before


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["hrnet_w18_small_v2"], help="start (full) models")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 768], help="square global input sizes")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--refine-models", nargs="+", default=["hrnet_w18_small", "hrnet_w18_small_v2", "resnet18"],
                   help="refinement backbones (refine_model)")
    p.add_argument("--landmarks", type=int, default=5, help="refined landmarks L (crops per image)")
    p.add_argument("--crop-mm", type=float, default=38.4)
    p.add_argument("--mm-per-px", type=float, default=0.3)
    p.add_argument("--crop-mm-each", nargs="+", type=float, default=None, metavar="MM",
                   help="a crop side per refined landmark (overrides --landmarks and --crop-mm): times the step with "
                        "each size batched apart and with every crop padded to the largest")
    p.add_argument("--max-seconds-per-step", type=float, default=60.0,
                   help="skip a global size (and the larger ones) whose probe step takes longer")
    args = _bench.parse(p, {"sizes": [64, 96], "batch_size": 1, "refine_models": ["resnet18"], "landmarks": 2,
                            "crop_mm": 9.6})
    device = _bench.setup(args)
    each = [crop_pixels(mm, args.mm_per_px) for mm in (args.crop_mm_each or [args.crop_mm] * args.landmarks)]
    landmarks = len(each)
    crop: int | tuple[int, ...] = each[0] if len(set(each)) == 1 else tuple(each)
    layouts = {"": False} if isinstance(crop, int) else {" (by size)": False, " (padded)": True}
    syms = symbols(AARIZ)
    masked = landmark_weights(syms, list(WORKFLOW_DIFFICULT), "masked", 2.5)
    kind = "RSS" if device.type == "cpu" else "CUDA allocated"
    rec = _bench.Record("bench_refine: refinement-stage step vs masked fine-tuning step", args, device)
    rec.value("settings", f"{args.batch_size} image(s) per step; masked: the full model on whole images, "
                          f"{len(syms)} landmarks, loss on the workflow's {len(WORKFLOW_DIFFICULT)}; refine: "
                          f"{args.batch_size} x {landmarks} crops of {'/'.join(map(str, each))} px at "
                          f"{args.mm_per_px:g} mm/px, {landmarks} channels; step = targets + forward + adaptive "
                          f"wing + backward + clip + AdamW (run.train_step; one per crop size when batched by size); "
                          f"fp32")
    rows, ratios, skipped = [], [], []
    for name in args.models:
        model, opt = _bench.model_for_steps(name, len(syms), device)
        refines = {f"refine {r}{lay}": refine_step(r, landmarks, crop_batches(args.batch_size, each, device, padded),
                                                   device)
                   for r in args.refine_models for lay, padded in layouts.items()}
        for size in sorted(args.sizes):
            x, kps = _bench.random_batch(args.batch_size, size, len(syms), device)
            steps = {"masked": _bench.make_step(model, x, kps, masked, opt)} | refines
            if _bench.probe_fails(steps["masked"], device, f"{name} at {size}", args.max_seconds_per_step, skipped):
                break
            times = _bench.interleaved(steps, args.repeats, device)
            jobs = {v: ("masked", name, size, False) if v == "masked" else
                    ("refine", v.removeprefix("refine ").split(" (")[0], crop, v.endswith("(padded)")) for v in steps}
            with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
                memory = {v: pool.apply(step_memory, (*job[:3], args.batch_size, landmarks, str(device), args.threads,
                                                      job[3]))
                          for v, job in jobs.items()}
            for v in steps:
                crops = "" if v == "masked" else args.batch_size * landmarks
                rows.append([name, size, v, args.batch_size, crops, _bench.median(times[v]), *memory[v],
                             memory[v][1] / memory["masked"][1], _bench.paired_ratio(times, v, "masked")])
            ratios.append((name, size, times))
            print(f"{name} {size}px: " + ", ".join(f"{v} {_bench.median(times[v]):.3f}s" for v in steps))
        del model, opt
    rec.table(["start model", "global size", "step", "images/step", "crops/step", "s/step (median)",
               f"resident MB before the step ({kind})", "the step's own peak MB above it", "own peak / masked",
               "time / masked (paired median)"], rows)
    for name, size, times in ratios:
        for v in times:
            if v != "masked":
                rec.ratio(f"{v}/masked {name} {size}px", _bench.paired_ratio(times, v, "masked"),
                          "step time at the same images per step, median of per-repeat ratios; goal <= 0.5")
    rec.note("the refine step's cost depends on the crops (count, size, backbone), not on the global input size; "
             "memory is measured per step kind in a fresh process (step_memory): resident = model + optimiser state + "
             "batch (+ ~1 GB of libraries on CPU), own peak = what one step needs above that")
    for s in skipped:
        rec.note(f"skipped {s}")
    _bench.emit(rec)


if __name__ == "__main__":
    main()
