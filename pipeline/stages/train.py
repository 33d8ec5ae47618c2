"""Stage 1, surrogate training: the worker's SGD steps (data-parallel over the pool), and its unit of done: round r's
checkpoint, committed with its marker (``TrainStage``)."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from pipeline import faults
from pipeline.storage.markers import DamagedUnit, commit, is_done, load_checked
from surrogates.training import load_checkpoint, save_checkpoint, train_step

log = logging.getLogger(__name__)


class TrainWork:
    """The worker's side (a part of ``RoundWorker``): the train stage and the checkpoint it commits."""

    def train_stage(self, round_: int | None = None) -> dict:
        """``train_steps`` SGD steps on random batches of clip(x + delta) drawn from the whole corpus.

        A pool takes one worker's steps: every worker draws the same global batch (same seed, same permutation of the
        corpus' rows) and computes the rows of it that it owns; batch norm normalises by the global batch's
        statistics (``surrogates.distributed``); each worker's loss is its rows' share of the global mean, and the
        gradients are summed over the pool (all-reduce) before the step. One worker and a pool differ only by the
        order of floating-point sums.
        """
        faults.at_unit("worker", "train", round_)
        t0 = time.perf_counter()
        if round_ is not None:  # the batches of a round depend on (seed, round) only: a resumed round redraws them
            self.generator.manual_seed(self.cfg.seed + 7919 * (round_ + 1))
            self.attack_generator.manual_seed(self.cfg.seed + 1000 * self.rank + 7919 * (round_ + 1))
        rows = self.global_rows
        if rows is None:
            if self.world > 1:
                raise RuntimeError("a pool worker trains only after set_global_rows")
            rows = torch.arange(self.n_owned)
        total = rows.numel()
        batch = min(total, self.cfg.batch_size)
        hook = self._all_reduce_grads if self.world > 1 else None
        loss_sum = 0.0
        steps = self.cfg.train_steps if total else 0
        for _ in range(steps):
            local = rows[torch.randperm(total, generator=self.generator)[:batch]]
            idx = local[local >= 0].to(self.device)
            xb = (self.x[idx].to(torch.float32) / 255.0 + self.noise_rows(idx)).clamp_(0.0, 1.0)
            # In the engine's precision and memory format (channels_last; bf16 autocast on a GPU, fp32 on a CPU).
            loss_sum += train_step(
                self.model,
                self.optimizer,
                self.engine.format(xb),
                self.y[idx],
                all_reduce=hook,
                autocast=self.engine.autocast,
                adversary=self.adversary,
                global_batch=batch if self.world > 1 else None,
            )
        loss = loss_sum / max(steps, 1)
        if self.world > 1:
            self._sync_buffers()
            total_loss = torch.tensor([loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(total_loss)  # each worker's share of the mean: the sum is the pool's mean loss
            loss = float(total_loss)
        return {"loss": loss, "seconds": time.perf_counter() - t0}

    def _all_reduce_grads(self, grads: list[torch.Tensor]) -> None:
        """Sum each gradient over the pool: every worker's loss is its rows' share of the global batch's mean."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _sync_buffers(self) -> None:
        """Rank 0's buffers to every worker. Batch norm's running statistics are already the pool's (computed from the
        all-reduced batch statistics); this makes them bit-identical and carries any other buffer."""
        with torch.no_grad():
            for b in self.model.buffers():
                dist.broadcast(b, src=0)

    def checkpoint(self) -> bytes:
        return save_checkpoint(self.model, self.optimizer, self.generator)

    def restore(self, data: bytes) -> None:
        load_checkpoint(data, self.model, self.optimizer, self.generator)


class TrainStage:
    """The coordinator's side (a part of ``Run``): train, or load round r's checkpoint when done."""

    def _train_stage(self, r: int) -> dict | None:
        """Round r's training, data-parallel over the pool; its checkpoint is the unit's output, so a resumed round
        never retrains: a done, intact checkpoint is sent to the workers instead (returns None then)."""
        layout = self.layout
        if is_done(layout.train_marker(r), self.chash):
            try:
                self._send_checkpoint(load_checked(layout.checkpoint(r), layout.train_marker(r), self.chash))
                return None
            except DamagedUnit as exc:
                self._dropped(exc, r)
        self._attempt("train", r)
        results = self.pool.get_all([w.train_stage.remote(r) for w in self.workers])
        train = {"loss": sum(x["loss"] for x in results) / len(results), "seconds": max(x["seconds"] for x in results)}
        commit(
            layout.checkpoint(r),
            self.pool.get(self.workers[0].checkpoint.remote()),
            layout.train_marker(r),
            self.chash,
            **train,
        )
        return train
