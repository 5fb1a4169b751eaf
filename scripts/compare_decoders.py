"""Which sub-pixel decoder is better? Evaluate one checkpoint with argmax, quarter-offset and DARK on the
same split (the README's decoder figures come from this script).

    python scripts/compare_decoders.py --checkpoint CKPT --dataset_path DIR --split valid
    python scripts/compare_decoders.py --smoke-test
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile

from tune_landmarks.build import from_checkpoint
from tune_landmarks.config import TrainConfig
from tune_landmarks.device import resolve_device
from tune_landmarks.heatmap import DECODERS
from tune_landmarks.infer import config_of, evaluate_split
from tune_landmarks.model import read_checkpoint
from tune_landmarks.read import describe
from tune_landmarks.run import prepare_data, train
from tune_landmarks.synth import make_synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--dataset_path")
    p.add_argument("--split")
    p.add_argument("--smoke-test", action="store_true", help="train a tiny model on a tiny synthetic set first")
    a = p.parse_args()
    if a.smoke_test:
        tmp = tempfile.mkdtemp()
        a.dataset_path = str(make_synthetic(f"{tmp}/data", num_images=8, seed=0, size=128))
        train(TrainConfig(dataset_path=a.dataset_path, model="hrnet_w18_small_v2", image_size=(64, 64), epochs=1,
                          out=f"{tmp}/run", progress=False))
        a.checkpoint = f"{tmp}/run/best.pt"
    if not (a.checkpoint and a.dataset_path):
        p.error("--checkpoint and --dataset_path are required (or --smoke-test)")
    ckpt = read_checkpoint(a.checkpoint)
    cfg = dataclasses.replace(config_of(ckpt), dataset_path=a.dataset_path, progress=False,
                              allow_duplicates=True)  # every decoder on the same images (docs/duplicates.md)
    info = describe(a.dataset_path)
    cfg.val_split = info.val_split(a.split)
    data = prepare_data(cfg, progress=False)
    model = from_checkpoint(ckpt, a.checkpoint, info.symbols)
    device = resolve_device("auto")
    model.to(device)
    print(f"{a.checkpoint} on {a.dataset_path} [{cfg.val_split}], {len(data.val)} images, input {cfg.image_size}")
    base = None
    for dec in DECODERS:
        s, _, _ = evaluate_split(model, data.val, info.symbols, device, dataclasses.replace(cfg, decoder=dec))
        base = base or s.mre
        print(f"  {dec:<8} MRE {s.mre:.4f} mm  SDR@2mm {s.sdr[2.0]:.1f}%  ratio to {DECODERS[0]} {s.mre / base:.3f}")


if __name__ == "__main__":
    main()
