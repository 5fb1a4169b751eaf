"""Training augmentation (albumentations) and the torch Dataset over a cached split.

Keypoints that an affine pushes out of the frame stay in the target (their heatmap is then empty,
see heatmap.py); `remove_invisible=False` makes albumentations keep them instead of dropping them.
"""
from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CachedSplit


@dataclass(frozen=True)
class AugmentConfig:
    scale: float = 0.1  # Affine scale range 1 +- scale
    rotate: float = 10.0  # degrees
    translate: float = 0.05  # fraction of the size
    brightness_contrast: float = 0.2
    clahe_p: float = 0.3
    p: float = 0.9  # probability of the affine


def train_transform(cfg: AugmentConfig) -> A.Compose:
    return A.Compose(
        [
            A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), rotate=(-cfg.rotate, cfg.rotate),
                     translate_percent=(-cfg.translate, cfg.translate), p=cfg.p),
            A.RandomBrightnessContrast(brightness_limit=cfg.brightness_contrast,
                                       contrast_limit=cfg.brightness_contrast, p=0.5 if cfg.brightness_contrast else 0),
            A.CLAHE(p=cfg.clahe_p),
        ],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )


def frame_item(scale: np.ndarray, spacing_mm: float) -> torch.Tensor:
    """(sx, sy, spacing mm/px): what a model needs to read a sample's keypoints in its own convention
    (model.LandmarkModel.targets)."""
    return torch.tensor([float(scale[0]), float(scale[1]), float(spacing_mm)], dtype=torch.float32)


class LandmarkDataset(Dataset):
    """Items: image (1, H, W) float in [0, 1], keypoints (K, 2) in the resized frame, the image's frame_item. With
    `labels` (A, N, K, 2) in the resized frame, an item's keypoints are one annotator's, drawn by the transform's
    generator (`--annotator both`); else the split's own."""

    def __init__(self, split: CachedSplit, transform: A.Compose | None = None, labels: np.ndarray | None = None):
        self.split = split
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img = np.array(self.split.images[i])  # a private copy of the read-only memmap row
        kps = self.split.keypoints[i].astype(np.float32)
        if self.labels is not None and self.transform is not None:
            kps = self.labels[int(self.transform.random_generator.integers(len(self.labels))), i].astype(np.float32)
        if self.transform is not None:
            out = self.transform(image=img, keypoints=kps)
            img = out["image"]
            kps = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2)
            if len(kps) != len(self.split.keypoints[i]):
                raise RuntimeError("augmentation dropped keypoints; remove_invisible must stay False")
        image = torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0).float().div_(255.0)
        return image, torch.from_numpy(kps), frame_item(self.split.scale[i], self.split.spacing_mm[i])
