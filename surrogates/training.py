"""The surrogate's optimiser, its training step and checkpoints (weights, optimiser, RNG)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """DESIGN.md's defaults, from the reference implementation's CIFAR-10 scripts."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0


def make_optimizer(model: nn.Module, cfg: OptimConfig = OptimConfig()) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float = OptimConfig.grad_clip,
    all_reduce=None,
    autocast=None,
) -> float:
    """One SGD step on a batch (already perturbed and clipped by the caller); returns the batch loss.

    ``all_reduce``, when given, is called on the list of gradients before clipping (data-parallel training).
    ``autocast``, when given, makes the context the forward pass and loss run in (mixed precision: the backward
    pass runs outside it, the weights and their gradients stay fp32).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else contextlib.nullcontext():
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if all_reduce is not None:
        all_reduce([p.grad for p in model.parameters() if p.grad is not None])
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, autocast=None, prepare=None) -> torch.Tensor:
    """Arg-max class of every image, in eval mode, in batches. ``prepare`` maps each batch to the model's input
    (e.g. uint8 levels to floats in a memory format); ``autocast`` as in ``train_step``."""
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        batch = x[i : i + batch_size] if prepare is None else prepare(x[i : i + batch_size])
        with autocast() if autocast is not None else contextlib.nullcontext():
            out.append(model(batch).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator | None) -> bytes:
    """Serialise weights, optimiser state and the batch-sampling RNG state (everything a resumed round needs)."""
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state() if generator is not None else None,
            "torch_rng": torch.get_rng_state(),
        },
        buf,
    )
    return buf.getvalue()


def load_checkpoint(
    data: bytes, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator | None
) -> None:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Standard augmentation: a random crop of each image from a zero-padded copy, and optionally a random h-flip."""
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def fit(
    model: nn.Module,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 0.05,
    pad: int = 0,
    flip: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Train a fresh model from scratch (victims and the protection probe): SGD with Nesterov momentum and a
    one-cycle schedule over ``steps`` steps of shuffled epochs, with optional crop/flip augmentation."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    n = x_uint8.shape[0]
    batch_size = min(batch_size, n)
    done = 0
    model.train()
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            xb = random_crop_flip(x_uint8[idx].to(torch.float32) / 255.0, pad, flip, generator)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return model


def accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor) -> float:
    if y.numel() == 0:
        return float("nan")
    return float((predict(model, x_uint8.to(torch.float32) / 255.0) == y).float().mean())
