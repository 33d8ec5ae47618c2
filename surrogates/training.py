"""The surrogate's optimiser, its training step and checkpoints (weights, optimiser, RNG)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """The defaults, from the reference implementation's CIFAR-10 scripts."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A batch of images in the channels_last memory format, the one the victims, the probe and the noise engine run
    their convolutions in (1.3-1.5x faster than contiguous on a CPU, ``docs/benchmarks.md``; tensor cores want it)."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


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
    global_batch: int | None = None,
    adversary: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One SGD step on a batch (already perturbed and clipped by the caller); returns the batch loss.

    ``all_reduce``, when given, is called on the list of gradients before clipping (data-parallel training).
    ``global_batch``, when given, makes ``x`` one worker's rows of a pool's batch of that many: the loss is their
    share of the batch's mean (summed over the rows, divided by ``global_batch``; ``x`` may have no rows), so that
    gradients summed over the pool are the whole batch's.
    ``autocast``, when given, makes the context the forward pass and loss run in (mixed precision: the backward
    pass runs outside it, the weights and their gradients stay fp32).
    ``adversary(model, x, y) -> x'``, when given, replaces the batch before the forward (the robust noise's
    adversarial train stage, ``ops.robust.robust_adversary``): it is called with the model in training mode, must
    leave it so and must leave its gradients alone.
    """
    model.train()
    if adversary is not None:
        x = adversary(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else contextlib.nullcontext():
        logits = model(x).float()
        if global_batch is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = F.cross_entropy(logits, y, reduction="sum") / global_batch
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
        batch = channels_last(x[i : i + batch_size] if prepare is None else prepare(x[i : i + batch_size]))
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
    model.to(memory_format=torch.channels_last)
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
            xb = channels_last(random_crop_flip(x_uint8[idx].to(torch.float32) / 255.0, pad, flip, generator))
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


def class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Each class's accuracy (the share of its test images predicted as it); None for a class with no test image."""
    correct = torch.bincount(y[pred == y], minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes)
    return [float(c) / float(t) if t else None for c, t in zip(correct.tolist(), total.tolist())]


def class_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Each class's F1 score (harmonic mean of its accuracy and its precision): high only when the model both finds
    the class's images and does not answer it for others. A model that answers one class for most images has that
    class's accuracy near 100% but not its F1. None for a class with no image and no prediction."""
    tp = torch.bincount(y[pred == y], minlength=num_classes).tolist()
    actual = torch.bincount(y, minlength=num_classes).tolist()
    predicted = torch.bincount(pred, minlength=num_classes).tolist()
    return [2 * t / (a + p) if a + p else None for t, a, p in zip(tp, actual, predicted)]


def final_scores(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """A trained model's scores on uint8 images, from one prediction: ``accuracy``, and each class's
    ``class_accuracy`` and ``class_f1``."""
    pred = predict(model, x_uint8.to(torch.float32) / 255.0)
    return {
        "accuracy": float((pred == y).float().mean()),
        "class_accuracy": class_accuracy(pred, y, num_classes),
        "class_f1": class_f1(pred, y, num_classes),
    }


def best_class(f1: list[float | None]) -> tuple[int, float]:
    """The class of highest F1 (the last on a tie) and its F1; classes of None are left out."""
    score, k = max((f, k) for k, f in enumerate(f1) if f is not None)
    return k, score


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module):
    """Batch norm layers keep normalising with batch statistics in training mode but leave their running statistics
    (and batch counts) as they were."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running <- (1 - momentum) running + momentum batch: unchanged
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def fit_epochs(
    model: nn.Module,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    pad: int = 0,
    flip: bool = False,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
    adversary: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """``fit``'s recipe in whole epochs (victims under a countermeasure): the same optimiser, one-cycle schedule,
    shuffled batches and crop/flip, over ``epochs`` x (n // batch_size) steps. With no ``augment`` and no
    ``adversary`` it draws the same random numbers as ``fit`` and trains the same weights.

    ``augment(images, labels, generator) -> (images, targets)`` transforms each batch after crop/flip (targets may be
    probabilities: mixup, cutmix); ``adversary(model, images, targets, generator) -> images`` replaces the batch by
    adversarial images before the step (adversarial training: the attack sees the model in training mode, batch
    statistics and all, but its forward passes do not move batch norm's running statistics, so that the victim's
    eval-mode statistics come from the batches it trains on, as many as without the attack);
    ``on_epoch(epoch, model)`` is called after each epoch, from 1 (early stopping scores the model there; the
    model is put back in training mode after it)."""
    generator = torch.Generator().manual_seed(seed)
    n = x_uint8.shape[0]
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    steps = max(1, epochs * per_epoch)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, per_epoch * batch_size, batch_size):
            idx = order[start : start + batch_size]
            xb = random_crop_flip(x_uint8[idx].to(torch.float32) / 255.0, pad, flip, generator)
            targets = y[idx]
            if augment is not None:
                xb, targets = augment(xb, targets, generator)
            xb = channels_last(xb)
            if adversary is not None:
                with _running_stats_frozen(model):
                    xb = adversary(model, xb, targets, generator)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), targets).backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return model
