"""``PoolBatchNorm`` on a real gloo process group of two processes: a batch split over two workers normalises, back-
propagates and keeps running statistics as ``BatchNorm2d`` on the whole batch in one process, also when one worker's
part is empty (it still joins every collective)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from surrogates.distributed import PoolBatchNorm, pool_batch_norm

# float32 sums in another order: the same values up to a few ulps of the activations (about 1e-6 here).
TOL = 2e-5


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 5, 5, generator=g) * 2 + 1  # a mean far from 0: cancellation would show
    up = torch.randn(12, 3, 5, 5, generator=g)  # the gradient arriving from above
    return x, up


def _reference(split: int) -> dict:
    """One process, the whole batch, plain BatchNorm2d; the weight gradient is what the pool sums to."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x, up = _batch()
    x.requires_grad_(True)
    y = bn(x)
    (y * up).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw": bn.weight.grad,
        "db": bn.bias.grad,
        "mean": bn.running_mean,
        "var": bn.running_var,
        "split": split,
    }


def _rank(rank: int, path: str, split: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        torch.manual_seed(1)
        model = nn.Sequential(nn.BatchNorm2d(3))
        with torch.no_grad():
            model[0].weight.uniform_(0.5, 1.5)
            model[0].bias.uniform_(-0.5, 0.5)
        pool_batch_norm(model)
        bn = model[0]
        assert type(bn) is PoolBatchNorm and list(bn.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
        x, up = _batch()
        part = slice(0, split) if rank == 0 else slice(split, None)
        xr = x[part].clone().requires_grad_(True)
        y = bn(xr)
        (y * up[part]).sum().backward()
        for p in (bn.weight, bn.bias):
            dist.all_reduce(p.grad)
        out[rank] = {
            "y": y.detach(),
            "dx": xr.grad,
            "dw": bn.weight.grad,
            "db": bn.bias.grad,
            "mean": bn.running_mean.clone(),
            "var": bn.running_var.clone(),
        }
    finally:
        dist.destroy_process_group()


def _run_pool(tmp_path, split: int) -> dict:
    path = str(tmp_path / f"store-{split}")
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_rank, args=(path, split, out), nprocs=2, join=True, start_method="spawn")
    return dict(out)


def _check(tmp_path, split: int) -> None:
    ref = _reference(split)
    out = _run_pool(tmp_path, split)
    y = torch.cat([out[0]["y"], out[1]["y"]])
    dx = torch.cat([out[0]["dx"], out[1]["dx"]])
    assert torch.allclose(y, ref["y"], atol=TOL), (y - ref["y"]).abs().max()
    assert torch.allclose(dx, ref["dx"], atol=TOL), (dx - ref["dx"]).abs().max()
    for rank in (0, 1):
        for key in ("dw", "db", "mean", "var"):
            assert torch.allclose(out[rank][key], ref[key], atol=TOL), (key, (out[rank][key] - ref[key]).abs().max())


def test_a_batch_split_over_two_workers_is_normalised_as_one(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _check(tmp_path, split=5)


def test_a_worker_with_no_rows_of_the_batch_still_joins(tmp_path):
    _check(tmp_path, split=12)  # rank 1's part is empty


def test_outside_a_process_group_it_is_batch_norm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    pooled = pool_batch_norm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    pooled.load_state_dict(plain.state_dict())
    x, _ = _batch()
    assert torch.equal(plain(x), pooled(x))
    assert torch.equal(plain.running_var, pooled.running_var)
