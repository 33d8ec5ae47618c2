"""A worker: holds a surrogate, its optimiser and its share of the corpus, and runs the stages of a round on them.

This is plain Python: ``pipeline.pool`` wraps it as a Ray actor, and bench or GPU checks can call it in-process.
Images are decoded once, at load, to uint8 tensors at the working resolution (plus the native pixels, which the
released-data stop check and the export need); the noise state stays on the worker's device across rounds.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

import torch

from ops import metrics
from ops.image import DecodedImage, encode_png, release_native, to_working
from ops.noise import (
    apply_classwise_update,
    classwise_update_sums,
    decode_noise,
    encode_noise,
    pgd_minimize,
    release_uint8,
)
from pipeline import faults
from pipeline.config import ProtectConfig
from pipeline.probe import run_probe
from pipeline.samples import Accepted, Rejected, SampleRules, prepare, released_members
from pipeline.storage import fs, manifest
from pipeline.storage.layout import Layout
from pipeline.storage.markers import write_marker
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, write_tar
from surrogates import build
from surrogates.training import load_checkpoint, make_optimizer, predict, save_checkpoint, train_step

log = logging.getLogger(__name__)


@dataclass
class ShardData:
    id: str
    url: str
    start: int  # this shard's rows in the worker's tensors: [start, end)
    end: int
    keys: list[str]
    natives: list[DecodedImage]
    native_is_working: bool  # every image already has the working size and channels: no resize needed
    rejected: int = 0
    read_error: str | None = None
    timings: dict = field(default_factory=dict)


class RoundWorker:
    def __init__(self, cfg: dict, num_classes: int, channels: int, index: int = 0, threads: int | None = None):
        self.cfg = ProtectConfig(**cfg)
        self.index = index
        self.num_classes = num_classes
        self.channels = channels
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(self.cfg.seed)
        self.model = build(self.cfg.surrogate, num_classes, channels).to(self.device)
        self.optimizer = make_optimizer(self.model)
        self.generator = torch.Generator().manual_seed(self.cfg.seed + 1000 * index)
        self.rules = SampleRules(num_classes, self.cfg.max_pixels, self.cfg.image_key, self.cfg.label_key)
        r = self.cfg.resolution
        self.x = torch.empty(0, channels, r, r, dtype=torch.uint8, device=self.device)
        self.y = torch.empty(0, dtype=torch.long, device=self.device)
        self.delta = torch.empty(0, channels, r, r, device=self.device)  # sample-wise noise, one row per sample
        self.class_delta = torch.zeros(num_classes, channels, r, r, device=self.device)
        self._class_sums = torch.zeros_like(self.class_delta)
        self._class_counts = torch.zeros(num_classes, device=self.device)
        self.shards: dict[str, ShardData] = {}

    # ---- data -------------------------------------------------------------------------------------------------
    def load_shard(self, shard: str, url: str) -> dict:
        """Stream a shard, decode its samples and keep the accepted ones on the device; returns counts."""
        t0 = time.perf_counter()
        seen: set[str] = set()
        keys, natives, working, labels = [], [], [], []
        rejected, read_error = 0, None
        for item in iter_samples(url):
            if isinstance(item, ShardReadError):
                read_error = item.message
                continue
            result = prepare(item, self.rules, seen)
            if isinstance(result, Rejected):
                rejected += 1
                continue
            keys.append(result.key)
            natives.append(result.image)
            working.append(to_working(result.image.color, self.cfg.resolution, self.channels))
            labels.append(result.label)
        r = self.cfg.resolution
        x = torch.stack(working) if working else torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        start = self.x.shape[0]
        self.x = torch.cat([self.x, x.to(self.device)])
        self.y = torch.cat([self.y, torch.tensor(labels, dtype=torch.long, device=self.device)])
        self.delta = torch.cat([self.delta, torch.zeros(x.shape, device=self.device)])
        same = all(tuple(n.color.shape) == (self.channels, r, r) for n in natives)
        self.shards[shard] = ShardData(shard, url, start, self.x.shape[0], keys, natives, same, rejected, read_error)
        return {"shard": shard, "accepted": len(keys), "rejected": rejected, "read_error": read_error,
                "seconds": time.perf_counter() - t0}

    def _noise_rows(self, sl: slice) -> torch.Tensor:
        if self.cfg.mode == "samplewise":
            return self.delta[sl]
        return self.class_delta[self.y[sl]]

    # ---- stage 1: surrogate training ------------------------------------------------------------------------
    def train_stage(self) -> dict:
        """``train_steps`` SGD steps on random batches of clip(x + delta) drawn from the data this worker holds."""
        faults.at_unit("worker", "train")
        t0 = time.perf_counter()
        n = self.x.shape[0]
        losses = []
        for _ in range(self.cfg.train_steps if n else 0):
            idx = torch.randperm(n, generator=self.generator)[: self.cfg.batch_size].to(self.device)
            xb = (self.x[idx].to(torch.float32) / 255.0 + self._noise_rows(idx)).clamp_(0.0, 1.0)
            losses.append(train_step(self.model, self.optimizer, xb, self.y[idx]))
        return {"loss": sum(losses) / max(len(losses), 1), "seconds": time.perf_counter() - t0}

    # ---- stage 2: noise update --------------------------------------------------------------------------------
    def noise_stage(self, shard: str, round_: int | None = None) -> dict:
        """Update the noise of one shard's samples (sample-wise), or add its class updates to the sums (class-wise).

        ``round_`` only names the unit for logs and fault hooks."""
        faults.at_unit("worker", "noise", round_, shard)
        t0 = time.perf_counter()
        sd = self.shards[shard]
        cfg = self.cfg
        self.model.eval()
        for start in range(sd.start, sd.end, cfg.batch_size):
            sl = slice(start, min(start + cfg.batch_size, sd.end))
            x = self.x[sl].to(torch.float32) / 255.0
            y = self.y[sl]
            if cfg.mode == "samplewise":
                self.delta[sl] = pgd_minimize(
                    self.model, x, y, self.delta[sl], eps=cfg.eps, step_size=cfg.step_size, steps=cfg.pgd_steps
                )
            else:
                sums, counts = classwise_update_sums(
                    self.model, x, y, self.class_delta, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.pgd_steps
                )
                self._class_sums += sums
                self._class_counts += counts
        if cfg.mode == "samplewise":
            # The state a rerun resumes from is the quantised one: keep exactly that, so resumed == uninterrupted.
            self.delta[sd.start : sd.end] = decode_noise(encode_noise(self.delta[sd.start : sd.end], cfg.eps), cfg.eps)
        n = sd.end - sd.start
        return {"shard": shard, "samples": n, "image_steps": n * cfg.pgd_steps, "seconds": time.perf_counter() - t0}

    def class_update_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's class-wise sums of the stage (to be added across workers), then reset."""
        # A copy: on a CPU worker .cpu() returns the same tensor, which the reset below would zero before it is sent.
        sums, counts = self._class_sums.to("cpu", copy=True), self._class_counts.to("cpu", copy=True)
        self._class_sums.zero_()
        self._class_counts.zero_()
        return sums, counts

    def apply_class_update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        delta = apply_classwise_update(self.class_delta, sums.to(self.device), counts.to(self.device), self.cfg.eps)
        self.class_delta = decode_noise(encode_noise(delta, self.cfg.eps), self.cfg.eps)

    # ---- noise state and checkpoints (the work dir) ------------------------------------------------------------
    def noise_state(self, shard: str | None) -> bytes:
        """int8 noise state in units of eps/127: one shard's rows, or the class noise (``shard=None``)."""
        if shard is None:
            q = encode_noise(self.class_delta, self.cfg.eps).cpu()
            keys = None
        else:
            sd = self.shards[shard]
            q = encode_noise(self.delta[sd.start : sd.end], self.cfg.eps).cpu()
            keys = sd.keys
        buf = io.BytesIO()
        torch.save({"q": q, "keys": keys}, buf)
        return buf.getvalue()

    def load_noise_state(self, shard: str | None, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        delta = decode_noise(state["q"], self.cfg.eps).to(self.device)
        if shard is None:
            self.class_delta = delta
            return
        sd = self.shards[shard]
        if state["keys"] != sd.keys:
            raise ValueError(f"noise state of shard {shard} does not match its samples (input changed?)")
        self.delta[sd.start : sd.end] = delta

    def checkpoint(self) -> bytes:
        return save_checkpoint(self.model, self.optimizer, self.generator)

    def restore(self, data: bytes) -> None:
        load_checkpoint(data, self.model, self.optimizer, self.generator)

    # ---- stage 3: the stop check on released data ------------------------------------------------------------
    def released_working(self, shard: str) -> torch.Tensor:
        """What a victim sees of this shard: released uint8 at native size, resized to the working resolution."""
        sd = self.shards[shard]
        sl = slice(sd.start, sd.end)
        noise = self._noise_rows(sl)
        if sd.native_is_working:
            return release_uint8(self.x[sl], noise)
        out = [
            to_working(release_native(nat.color, noise[i].cpu()), self.cfg.resolution, self.channels)
            for i, nat in enumerate(sd.natives)
        ]
        return torch.stack(out).to(self.device) if out else self.x[sl].clone()

    def released_error(self) -> dict:
        """The surrogate's errors on the released data of every shard this worker holds (summed by the caller)."""
        t0 = time.perf_counter()
        wrong = total = 0
        for shard, sd in self.shards.items():
            if sd.end == sd.start:
                continue
            released = self.released_working(shard)
            pred = predict(self.model, released.to(torch.float32) / 255.0, self.cfg.batch_size)
            wrong += int((pred != self.y[sd.start : sd.end]).sum())
            total += sd.end - sd.start
        return {"wrong": wrong, "total": total, "seconds": time.perf_counter() - t0}

    def probe_data(self) -> dict:
        """Released and clean working images, labels and keys of every sample held (for the protection probe)."""
        released = [self.released_working(s) for s in self.shards]
        keys = [k for sd in self.shards.values() for k in sd.keys]
        return {
            "released": torch.cat(released).cpu() if released else self.x.cpu(),
            "clean": self.x.cpu(),
            "labels": self.y.cpu(),
            "keys": keys,
        }

    def run_probe(self, clean_accuracy: float | None, threshold: float | None, margin: float) -> dict:
        """The protection probe on the data this worker holds (the whole corpus with one worker)."""
        cfg = self.cfg
        return run_probe(self.probe_data(), arch=cfg.probe_arch, steps=cfg.probe_steps, num_classes=self.num_classes,
                         seed=cfg.seed, clean_accuracy=clean_accuracy, threshold=threshold, margin=margin)

    # ---- export -----------------------------------------------------------------------------------------------
    def export_shard(self, shard: str, output: str, work: str, config_hash: str) -> dict:
        """Write ``<shard>.tar`` and ``<shard>.parquet``, verify them, then the ``<shard>_stats.json`` marker."""
        faults.at_unit("worker", "export", None, shard)
        t0 = time.perf_counter()
        layout = Layout(output, work)
        sd = self.shards[shard]
        seen: set[str] = set()
        out_samples: list[RawSample] = []
        rows: list[dict] = []
        index = 0
        noise = self._noise_rows(slice(sd.start, sd.end)).cpu()
        linf_max = 0
        read_error = None
        for item in iter_samples(sd.url):
            if isinstance(item, ShardReadError):
                read_error = item.message
                continue
            result = prepare(item, self.rules, seen)
            if isinstance(result, Rejected):
                rows.append(manifest.row(result.key, shard, "rejected", error=result.error, label=result.label,
                                         source_sha256=result.source_sha256))
                continue
            assert isinstance(result, Accepted)
            if index >= len(sd.keys) or sd.keys[index] != result.key:
                raise RuntimeError(f"shard {shard} changed since it was loaded (sample {result.key})")
            original = result.image.color
            released = release_native(original, noise[index])
            png = encode_png(released, result.image.alpha)
            out_samples.append(RawSample(result.key, released_members(item, png, result.image_member)))
            linf = metrics.linf(released, original)
            linf_max = max(linf_max, linf)
            rows.append(
                manifest.row(
                    result.key, shard, "protected", label=result.label, width=result.image.width,
                    height=result.image.height, source_sha256=result.source_sha256,
                    output_sha256=_sha256(png), output_member=f"{result.key}.png", linf=linf,
                    l2=metrics.l2(released, original), psnr=metrics.psnr(released, original),
                )
            )
            index += 1
        if index != len(sd.keys):
            raise RuntimeError(f"shard {shard} changed since it was loaded: {index} of {len(sd.keys)} samples found")
        tar_sha = fs.write_verified(layout.shard_tar(shard), write_tar(out_samples))
        manifest_bytes = manifest.to_parquet(rows)
        manifest_sha = fs.write_verified(layout.shard_manifest(shard), manifest_bytes)
        protected = sum(1 for r in rows if r["status"] == "protected")
        stats = {
            "shard": shard,
            "input": len(rows),
            "protected": protected,
            "rejected": len(rows) - protected,
            "linf_max": linf_max,
            # The unreadable rest of a shard has no keys to give rows to; the marker records the shard's fault.
            "read_error": read_error,
            "tar_sha256": tar_sha,
            "tar_bytes": fs.size(layout.shard_tar(shard)),
            "manifest_sha256": manifest_sha,
            "manifest_bytes": len(manifest_bytes),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_marker(layout.shard_marker(shard), config_hash, **stats)
        return stats


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
