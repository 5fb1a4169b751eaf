"""Gaussian heatmap targets and sub-pixel decoding.

Frames: heatmap pixel u <-> input pixel x by `x = (u + 0.5) * stride - 0.5` (centres aligned).
Targets are made on the fly, batched on the training device, from keypoints in the input frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DECODERS, rule_error


def to_heatmap_frame(points: torch.Tensor, stride: float) -> torch.Tensor:
    return (points + 0.5) / stride - 0.5


def to_input_frame(points: torch.Tensor, stride: float) -> torch.Tensor:
    return (points + 0.5) * stride - 0.5


def encode(points: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """points (B, K, 2) in heatmap pixels -> (B, K, H, W) Gaussians with peak 1.

    A point outside the heatmap gets an all-zero map: the model is not asked to put its mass on
    the border, and the point is still counted in evaluation on the unaugmented image.
    """
    h, w = size
    ys = torch.arange(h, device=points.device, dtype=points.dtype)
    xs = torch.arange(w, device=points.device, dtype=points.dtype)
    dx = xs.view(1, 1, 1, w) - points[..., 0, None, None]
    dy = ys.view(1, 1, h, 1) - points[..., 1, None, None]
    maps = torch.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
    inside = (points[..., 0] >= -0.5) & (points[..., 0] <= w - 0.5) & (points[..., 1] >= -0.5) & (points[..., 1] <= h - 0.5)
    return maps * inside[..., None, None].to(maps.dtype)


def _argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    b, k, h, w = heatmaps.shape
    idx = heatmaps.reshape(b, k, -1).argmax(-1)
    return torch.stack([(idx % w), torch.div(idx, w, rounding_mode="floor")], -1)


def _gather(hm: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, k, h, w = hm.shape
    x = x.clamp(0, w - 1)
    y = y.clamp(0, h - 1)
    return hm.reshape(b, k, -1).gather(-1, (y * w + x).unsqueeze(-1)).squeeze(-1)


def _blur(hm: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, device=hm.device, dtype=hm.dtype)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    b, k, h, w = hm.shape
    x = hm.reshape(b * k, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return x.reshape(b, k, h, w)


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) non-negative maps -> (B, K, 2) unit coordinates u = sum p j / (w - 1) / sum p (likewise v): the
    expectation over the whole map, in the convention of scripts that normalise a point as x / W."""
    b, k, h, w = heatmaps.shape
    p = heatmaps.float()
    mass = p.sum((2, 3)).clamp_min(1e-12)
    u = (p.sum(2) * torch.arange(w, device=p.device, dtype=p.dtype)).sum(-1) / mass / max(1, w - 1)
    v = (p.sum(3) * torch.arange(h, device=p.device, dtype=p.dtype)).sum(-1) / mass / max(1, h - 1)
    return torch.stack([u, v], -1)


def decode(heatmaps: torch.Tensor, method: str = "dark", sigma: float = 2.0) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 2) sub-pixel peak positions in heatmap pixels (x, y)."""
    if method not in DECODERS:
        raise rule_error("decoder", method, f"one of {', '.join(DECODERS)}")
    hm = heatmaps.detach().float()
    peak = _argmax(hm)
    x, y = peak[..., 0], peak[..., 1]
    out = peak.to(hm.dtype)
    if method == "argmax":
        return out
    b, k, h, w = hm.shape
    if method == "quarter":
        dx = _gather(hm, x + 1, y) - _gather(hm, x - 1, y)
        dy = _gather(hm, x, y + 1) - _gather(hm, x, y - 1)
        return out + 0.25 * torch.stack([torch.sign(dx), torch.sign(dy)], -1)
    # DARK (Zhang et al., CVPR 2020): Taylor expansion of the log of the (re-smoothed) heatmap.
    lg = torch.log(_blur(hm, sigma).clamp_min(1e-10))
    c = _gather(lg, x, y)
    xp, xm = _gather(lg, x + 1, y), _gather(lg, x - 1, y)
    yp, ym = _gather(lg, x, y + 1), _gather(lg, x, y - 1)
    dxx = xp - 2 * c + xm
    dyy = yp - 2 * c + ym
    dxy = 0.25 * (_gather(lg, x + 1, y + 1) - _gather(lg, x + 1, y - 1) - _gather(lg, x - 1, y + 1) + _gather(lg, x - 1, y - 1))
    gx, gy = 0.5 * (xp - xm), 0.5 * (yp - ym)
    det = dxx * dyy - dxy * dxy
    ok = (det.abs() > 1e-12) & (dxx < 0) & (dyy < 0) & (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
    safe = torch.where(ok, det, torch.ones_like(det))
    ox = -(dyy * gx - dxy * gy) / safe
    oy = -(-dxy * gx + dxx * gy) / safe
    off = torch.stack([ox, oy], -1).clamp(-1, 1) * ok[..., None]
    return out + off
