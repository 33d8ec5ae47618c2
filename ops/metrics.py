"""Image-quality metrics of a released image against its original, in uint8 levels."""

from __future__ import annotations

import math

import torch


def linf(released: torch.Tensor, original: torch.Tensor) -> int:
    """Largest absolute difference in uint8 levels over every pixel and channel."""
    return int((released.to(torch.int16) - original.to(torch.int16)).abs().max().item())


def l2(released: torch.Tensor, original: torch.Tensor) -> float:
    """Euclidean norm of the difference, in [0, 1] units (levels / 255)."""
    return float(((released.to(torch.float64) - original.to(torch.float64)) / 255.0).norm().item())


def psnr(released: torch.Tensor, original: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); infinite for identical images."""
    mse = float(((released.to(torch.float64) - original.to(torch.float64)) ** 2).mean().item())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
