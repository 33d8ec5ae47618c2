"""Error-minimizing noise: the min-min PGD updates, projection, the released uint8 image and the noise-state codec.

Conventions: images ``x`` are float tensors in [0, 1] of shape (N, C, H, W); noise ``delta`` has the same shape
(sample-wise) or (K, C, H, W) for K classes (class-wise). Every update is batched on the tensors' device: no
per-sample Python loop and no host round trip (the reference implementation's slowness came from those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Noise state is stored as int8 in units of eps/NOISE_LEVELS, so |q| <= NOISE_LEVELS keeps |delta| <= eps exactly.
NOISE_LEVELS = 127


def project(delta: torch.Tensor, x: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Project onto the L-inf eps-ball and, given images, onto the set where x + delta stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    if x is not None:
        delta = (x + delta).clamp(0.0, 1.0) - x
    return delta


def pgd_minimize(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """Sample-wise min-min update: ``steps`` signed-gradient descent steps on the surrogate's loss.

    delta <- Proj(delta - step_size * sign(grad_delta CE(f(clip(x + delta)), y))). The model's own parameters are not
    touched (their gradients are not even computed). Returns the new delta, detached.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        delta = delta.detach().clone()
        for _ in range(steps):
            # The gradient is taken at the clipped image itself, not through the clip: torch.clamp passes no gradient
            # at its bounds, so every pixel at exactly 0 or 1 (most of a digit's background and strokes) would never
            # move. The projection below keeps x + delta in [0, 1] all the same.
            image = (x + delta).clamp(0.0, 1.0).requires_grad_(True)
            loss = F.cross_entropy(model(image), y)
            (grad,) = torch.autograd.grad(loss, image)
            with torch.no_grad():
                delta = project(delta - step_size * grad.sign(), x, eps)
        return delta.detach()
    finally:
        for p in params:
            p.requires_grad_(True)


def classwise_update_sums(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    class_delta: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-wise min-min for one batch: run the sample-wise update from each sample's class noise and return
    (per-class sum of the updates, per-class sample count).

    Sums rather than means so that batches and workers can be added before the one division
    (``apply_classwise_update``): the class noise moves by the mean of its samples' updates.
    """
    start = class_delta[y]
    moved = pgd_minimize(model, x, y, start, eps=eps, step_size=step_size, steps=steps)
    num_classes = class_delta.shape[0]
    sums = torch.zeros_like(class_delta)
    sums.index_add_(0, y, moved - start)
    counts = torch.bincount(y, minlength=num_classes).to(class_delta.dtype)
    return sums, counts


def apply_classwise_update(
    class_delta: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, eps: float
) -> torch.Tensor:
    """Move each class's noise by the mean of its samples' updates and project onto the eps-ball."""
    shape = (-1,) + (1,) * (class_delta.dim() - 1)
    mean = sums / counts.clamp(min=1).view(shape)
    return project(class_delta + mean, None, eps)


def release_uint8(x_uint8: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The image as it will be released: round(x + delta) in uint8 levels, clipped to [0, 255].

    ``x_uint8`` holds the original levels; ``delta`` is in [0, 1] units. The result differs from the original by at
    most round(255 * max|delta|) levels in every channel.
    """
    levels = x_uint8.to(torch.float32) + delta.to(torch.float32) * 255.0
    return levels.round_().clamp_(0, 255).to(torch.uint8)


def encode_noise(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Noise state codec: float delta -> int8 in units of eps/127 (the form kept in the work dir)."""
    q = torch.round(delta.to(torch.float32) * (NOISE_LEVELS / eps))
    return q.clamp_(-NOISE_LEVELS, NOISE_LEVELS).to(torch.int8)


def decode_noise(q: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of ``encode_noise``: int8 levels -> float delta, |delta| <= eps."""
    return q.to(torch.float32) * (eps / NOISE_LEVELS)
