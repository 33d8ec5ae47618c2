"""Data-parallel training that computes what one worker computes: batch norm over the pool's whole batch.

A pool of N workers trains one surrogate on one global batch, each worker holding the rows of that batch that fall in
its own shards. Averaging the gradients is not enough for that to be one worker's step: a batch-norm layer in training
mode normalises by the statistics of the batch it sees, and each worker sees only its part. When the shards are not
shuffled (a corpus sorted by class, folder by folder, is common), one worker's part is digits 0-4 and the other's 5-9:
each normalises by its own classes' statistics, the surrogate trains on features no single model computes, and the
noise, optimised against the model in eval mode (running statistics of the whole corpus), stops fitting the model
that trains on it.

``PoolBatchNorm`` is batch norm whose training-mode statistics are summed over the process group (all-reduce of the
per-channel sums, sums of squares and counts; the backward pass all-reduces its two per-channel sums the same way),
so that every worker normalises by the global batch's mean and variance and its running statistics are the ones one
worker would keep. CPUs are covered (``torch.nn.SyncBatchNorm`` takes GPU tensors only), and a worker whose part of a
batch is empty still joins every collective. Outside training, or without a process group, it is ``BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) with mean and (biased) var over every worker's rows, per channel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):
        dims = [d for d in range(x.dim()) if d != 1]
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        n = xf.numel() // max(c, 1)
        # Each worker's mean and centred sum of squares (two passes: no cancellation), combined over the pool in
        # float64 per channel: sum(x) and sum(x^2) = M2 + n * mean^2.
        local_mean = xf.mean(dims) if n else torch.zeros(c, device=x.device)
        m2 = ((xf - local_mean.view(shape)) ** 2).sum(dims)
        local_mean, m2 = local_mean.double(), m2.double()
        stats = torch.cat(
            [
                n * local_mean,
                m2 + n * local_mean * local_mean,
                torch.tensor([float(n)], dtype=torch.float64, device=x.device),
            ]
        )
        dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp_(min=0.0)
        invstd = torch.rsqrt(var + eps).float()
        mean, var, count = mean.float(), var.float(), count.float()
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, count)
        ctx.dims, ctx.shape = dims, shape
        return xhat.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad, _gmean, _gvar, _gcount):
        xhat, invstd, count = ctx.saved_tensors
        g = grad.float()
        c = xhat.shape[1]
        sums = torch.cat([g.sum(ctx.dims), (g * xhat).sum(ctx.dims)])
        dist.all_reduce(sums)
        mean_g = (sums[:c] / count).view(ctx.shape)
        mean_gx = (sums[c:] / count).view(ctx.shape)
        dx = (g - mean_g - xhat * mean_gx) * invstd.view(ctx.shape)
        return dx.to(grad.dtype), None


class PoolBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` that, in training mode inside a process group, normalises by the whole pool's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xhat, mean, var, count = _GlobalBatchNorm.apply(x, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        if not self.affine:
            return xhat
        shape = [1, -1] + [1] * (x.dim() - 2)
        return xhat * self.weight.view(shape) + self.bias.view(shape)


def pool_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every ``BatchNorm2d`` of ``model`` into a ``PoolBatchNorm`` in place: same parameters (the very
    tensors an optimiser already holds), same buffers and state-dict keys, so checkpoints do not change."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = PoolBatchNorm
    return model
