"""Stage 3, the stop check: the surrogate's error on the data as it will be released (the noise added at native size,
encoded as the release encodes, resized as a victim resizes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ops.engine import to_device
from ops.image import (
    LOSSY_FORMATS,
    DecodedImage,
    encoded_roundtrip,
    match_channels,
    release_native,
    release_native_batch,
    resize_uint8,
    to_working,
)
from ops.noise import release_uint8
from pipeline.samples import ordered_map
from surrogates.training import predict

if TYPE_CHECKING:
    from pipeline.stages.load import ShardData

log = logging.getLogger(__name__)


class CheckWork:
    """The worker's side: its shards' released images at the working resolution, and their errors."""

    def released_working(self, shard: str) -> torch.Tensor:
        """What a victim sees of this shard: released uint8 at native size, resized to the working resolution.

        Computed on the worker's device, the images of one native size together (``release_native_batch``): on a
        GPU no per-sample host work even when natives differ from the working size. Same pixels as the export's
        per-image ``release_native`` on the same device (tested)."""
        sd = self.shards[shard]
        sl = slice(sd.start, sd.end)
        noise = self.noise_rows(sl)
        if self.cfg.encode_format in LOSSY_FORMATS:
            return self._released_lossy(sd, noise)
        if sd.native_is_working:
            return release_uint8(self.x[sl], noise)
        r = self.cfg.resolution
        out = torch.empty(sd.end - sd.start, self.channels, r, r, dtype=torch.uint8, device=self.device)
        # A GPU takes a batch's worth at once; a CPU is fastest a few images at a time (a 128-image chunk of 256-px
        # photos ran at half the per-image speed here: the float intermediates overflow the caches).
        chunk = self.cfg.noise_batch_size if self.device.type == "cuda" else 4
        for part in _size_groups(self._natives(sd), chunk):
            colors = to_device(torch.stack([nat.color for _, nat in part]), self.device)
            idx = torch.tensor([i for i, _ in part], device=self.device)
            released = release_native_batch(colors, noise[idx])
            out[idx] = resize_uint8(match_channels(released, self.channels), (r, r))
        return out

    def _released_lossy(self, sd: ShardData, noise: torch.Tensor) -> torch.Tensor:
        """``released_working`` of a JPEG or WebP release: each released image encoded as the export encodes it and
        decoded again, on the host, image by image (``encoded_roundtrip``: the same pixels as the release's bytes)."""
        r, cfg = self.cfg.resolution, self.cfg
        noise = noise.cpu()

        def one(job: tuple[int, DecodedImage]) -> torch.Tensor:
            i, nat = job
            released = encoded_roundtrip(
                release_native(nat.color, noise[i]), nat.alpha, cfg.encode_format, cfg.encode_quality
            )
            return to_working(released, r, self.channels)

        rows = list(ordered_map(one, enumerate(self._natives(sd)), self.threads))
        out = torch.stack(rows) if rows else torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        return to_device(out, self.device)

    def released_error(self) -> dict:
        """The surrogate's errors on the released data of every shard this worker holds (summed by the caller)."""
        t0 = time.perf_counter()
        wrong = total = 0
        for shard in self.owned:
            sd = self.shards[shard]
            if sd.end == sd.start:
                continue
            # In the engine's precision and memory format, as the train stage; uint8 levels to floats a batch at a time.
            pred = predict(
                self.model,
                self.released_working(shard),
                self.cfg.noise_batch_size,
                autocast=self.engine.autocast,
                prepare=lambda batch: self.engine.format(batch.to(torch.float32) / 255.0),
            )
            wrong += int((pred != self.y[sd.start : sd.end]).sum())
            total += sd.end - sd.start
        return {"wrong": wrong, "total": total, "seconds": time.perf_counter() - t0}


class CheckStage:
    """The coordinator's side: the pool's error on released data."""

    def _check_stage(self, r: int) -> float:
        """Round r's error on the data as it will be released, over every worker's shards. Nothing is committed:
        the round's record holds it, written when the round ends."""
        self._attempt("check", r)
        errors = self.pool.get_all([w.released_error.remote() for w in self.workers])
        return round(sum(e["wrong"] for e in errors) / max(sum(e["total"] for e in errors), 1), 6)


def _size_groups(
    natives: Iterator[DecodedImage], chunk: int, pending_limit: int = 64
) -> Iterator[list[tuple[int, DecodedImage]]]:
    """(row, image) pairs of one native size, at most ``chunk`` together, as ``natives`` stream by; at most
    ``pending_limit`` images wait for company (each row's pixels do not depend on its group: tested)."""
    pending: dict[tuple, list[tuple[int, DecodedImage]]] = {}
    waiting = 0
    for i, nat in enumerate(natives):
        group = pending.setdefault(tuple(nat.color.shape), [])
        group.append((i, nat))
        waiting += 1
        if len(group) == chunk:
            yield pending.pop(tuple(nat.color.shape))
            waiting -= chunk
        elif waiting >= pending_limit:
            yield from pending.values()
            pending, waiting = {}, 0
    yield from pending.values()
