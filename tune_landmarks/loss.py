"""Adaptive Wing loss (Wang, Bo, Fuxin, ICCV 2019) with per-landmark weights, and MSE.

The per-landmark weights implement the modes: `all` (1 each), `weighted` (difficult x w),
`masked` (difficult 1, the others 0). The loss is normalised over the active weights so its scale,
and the lr that suits it, does not change with how many landmarks are masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LOSSES, MODES, rule_error


@dataclass(frozen=True)
class AWingParams:
    omega: float = 14.0
    theta: float = 0.5
    epsilon: float = 1.0
    alpha: float = 2.1
    weight: float = 10.0  # W of the weighted loss map (foreground = dilated target > 0.2)

    def __post_init__(self) -> None:
        for name in ("omega", "theta", "epsilon"):
            if not getattr(self, name) > 0:
                raise rule_error(f"awing_{name}", getattr(self, name), "> 0")
        if not self.alpha > 1:
            raise rule_error("awing_alpha", self.alpha, "> 1")
        if self.weight < 0:
            raise rule_error("awing_weight", self.weight, ">= 0")


def adaptive_wing(pred: torch.Tensor, target: torch.Tensor, p: AWingParams) -> torch.Tensor:
    """Element-wise AWing; continuous and smooth at |y - y_hat| = theta by construction of A and C."""
    delta = (target - pred).abs()
    e = p.alpha - target
    r = p.theta / p.epsilon
    a = p.omega * (1 / (1 + r ** e)) * e * r ** (e - 1) / p.epsilon
    c = p.theta * a - p.omega * torch.log1p(r ** e)
    small = p.omega * torch.log1p((delta / p.epsilon) ** e)
    return torch.where(delta < p.theta, small, a * delta - c)


def loss_map_weight(target: torch.Tensor, w: float) -> torch.Tensor:
    """1 + W on the 3x3-dilated foreground (target > 0.2)."""
    fg = F.max_pool2d((target > 0.2).to(target.dtype), 3, stride=1, padding=1)
    return 1 + w * fg


def per_landmark(pred: torch.Tensor, target: torch.Tensor, kind: str, p: AWingParams) -> torch.Tensor:
    """(B, K, H, W) -> (K,) loss of each landmark, averaged over the batch and the pixels."""
    pred = pred.float()
    if kind == "mse":
        el = (pred - target) ** 2
    elif kind == "adaptive_wing":
        el = adaptive_wing(pred, target, p) * loss_map_weight(target, p.weight)
    else:
        raise rule_error("loss", kind, f"one of {', '.join(LOSSES)}")
    return el.mean(dim=(0, 2, 3))


def landmark_weights(symbols: list[str], difficult: list[str], mode: str, difficult_weight: float) -> torch.Tensor:
    if mode not in MODES:
        raise rule_error("mode", mode, f"one of {', '.join(MODES)}")
    hard = torch.tensor([s in difficult for s in symbols], dtype=torch.float32)
    if mode == "all":
        return torch.ones(len(symbols))
    if not hard.any():
        raise ValueError(f"mode {mode!r} needs at least one difficult landmark")
    if mode == "weighted":
        return 1 + (difficult_weight - 1) * hard
    return hard


def weighted_total(per_lm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Normalised over active landmarks: sum(w * L) / sum(w)."""
    weights = weights.to(per_lm.device)
    return (per_lm * weights).sum() / weights.sum()


def check_finite(value: float, what: str = "loss") -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}: training diverged (lower the lr or check the data)")
