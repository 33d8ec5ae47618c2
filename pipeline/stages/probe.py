"""The protection probe on the release (``pipeline.probe`` trains and judges it): the probe's sample from every worker,
the plain probe in a round whose error is low, and the countermeasure battery once, on the final release (its record
in the work dir is its unit of done)."""

from __future__ import annotations

import json
import logging
import time

import torch

from pipeline.config import PROBE_MARGIN, probe_archs, probe_battery
from pipeline.probe import judge, judge_battery, probe_sample, probe_score
from pipeline.storage import fs
from pipeline.storage.markers import read_record

log = logging.getLogger(__name__)


class ProbeWork:
    """The worker's side: its share of the probe's sample, and a probe training on the whole sample."""

    def probe_data(self, fraction: float = 1.0) -> dict:
        """Released and clean working images, labels and keys of the probe's sample of the samples held (``fraction``
        of them, by a hash of the key: ``pipeline.probe.probe_sample``), and how many rows are each shard's (for
        the protection probe). A shard's released images are computed, sampled and dropped one shard at a time."""
        released, clean, labels, keys, counts = [], [], [], [], []
        for shard in self.owned:
            sd = self.shards[shard]
            chosen = probe_sample(sd.keys, fraction)
            rows = torch.arange(sd.start, sd.end)[chosen]
            released.append(self.released_working(shard).cpu()[chosen])
            clean.append(self.x[rows.to(self.x.device)].cpu())
            labels.append(self.y[rows.to(self.y.device)].cpu())
            keys.extend(k for k, c in zip(sd.keys, chosen.tolist()) if c)
            counts.append((shard, int(chosen.sum())))
        r = self.cfg.resolution
        empty = torch.empty(0, self.channels, r, r, dtype=torch.uint8)
        return {
            "released": torch.cat(released) if released else empty,
            "clean": torch.cat(clean) if clean else empty,
            "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            "keys": keys,
            "shards": counts,
        }

    def probe_score(
        self,
        source: str,
        *parts: dict,
        countermeasure: str = "none",
        order: list[str] | None = None,
        arch: str | None = None,
    ) -> dict:
        """Train the protection probe on ``source`` ("released" or "clean") images of the whole corpus: ``parts``
        are every worker's ``probe_data`` (this one's included), their shards put in ``order`` (the plan's: a pool
        probes the same rows in the same order as one worker; default: as the parts come); ``countermeasure`` as an
        informed adversary trains (``pipeline.probe.probe_score``), with the model ``arch`` (default: the first of
        ``--probe-arch``)."""
        pieces = {}
        for part in parts:
            start = 0
            for shard, count in part["shards"]:
                pieces[shard] = (part, start, start + count)
                start += count
        ordered = [pieces[s] for s in (order or pieces)]
        data = {k: torch.cat([p[k][a:b] for p, a, b in ordered]) for k in ("released", "clean", "labels")}
        data["keys"] = [k for p, a, b in ordered for k in p["keys"][a:b]]
        cfg = self.cfg
        return probe_score(
            data,
            source,
            arch=arch or probe_archs(cfg.probe_arch)[0],
            steps=cfg.probe_steps,
            num_classes=self.num_classes,
            seed=cfg.seed,
            countermeasure=countermeasure,
        )


class ProbeStage:
    """The coordinator's side: the plain probe and the battery, spread over the workers."""

    def _probe(self, clean_ref: float | None) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.heartbeat.phase("probe")
        # The probe trains on its sample of the release (--probe-samples): workers hand their share of it to the one
        # that trains (object refs, not via the coordinator). The clean-trained reference, needed once per run,
        # trains on a second worker at the same time when there is one.
        parts = self._probe_parts()
        released = self.workers[0].probe_score.remote("released", *parts, order=self.plan_order)
        if clean_ref is None:
            clean = self.workers[1 % len(self.workers)].probe_score.remote("clean", *parts, order=self.plan_order)
            clean_ref = round(self.pool.get(clean)["accuracy"], 4)  # as the round records keep it: resumed == not
            fs.write_bytes(
                self.layout.probe_record,
                json.dumps({"config_hash": self.chash, "probe_clean_accuracy": clean_ref}).encode(),
            )
        probe = judge(
            self.pool.get(released),
            clean_ref,
            arch=probe_archs(cfg.probe_arch)[0],
            steps=cfg.probe_steps,
            threshold=cfg.probe_threshold,
            margin=PROBE_MARGIN,
        )
        log.info("probe: %.1f s", time.perf_counter() - t0)
        return probe

    def _probe_parts(self) -> list:
        """Every worker's share of the probe's sample: ``--probe-samples`` of the plan's samples, by key hash."""
        fraction = min(1.0, self.cfg.probe_samples / max(1, self.plan.total_samples))
        return [w.probe_data.remote(fraction) for w in self.workers]

    def probe_battery(self) -> None:
        """The probe's countermeasure battery on the final release: the plain probe early-stopped, and each of
        --probe-countermeasures (final and early-stopped), spread over the workers; with more than one
        ``--probe-arch``, the whole battery again for each of the others (recorded as ``NAME@ARCH``). Judged once,
        after the rounds (the stop rule uses the plain probe, which costs one training); its record in the work dir
        is reused by a resumed run."""
        names = probe_battery(self.cfg.probe_countermeasures)
        if not names:  # --probe-countermeasures none: the plain probe of the first --probe-arch alone
            return
        others = probe_archs(self.cfg.probe_arch)[1:]
        names = ["none"] + [n for n in names if n != "none"]
        final = self.history[-1]
        record = read_record(self.layout.battery_record)
        if record and record.get("config_hash") == self.chash and record.get("round") == final["round"]:
            self.battery = record["battery"]
            return
        t0 = time.perf_counter()
        probe = final["probe"]
        # The plain probe early-stopped is the final round's probe itself (same training, scored every epoch).
        plain = (
            [
                {
                    "countermeasure": "none",
                    "accuracy": probe["probe_accuracy"],
                    "seconds": 0.0,
                    "early_stopped_accuracy": probe["probe_early_stopped_accuracy"],
                    "best_epoch": probe["probe_best_epoch"],
                }
            ]
            if probe.get("probe_best_epoch")
            else []
        )
        runs = [(name, None) for name in names[len(plain) :]] + [(name, a) for a in others for name in names]
        self.heartbeat.phase(f"probe battery ({', '.join(name + (f'@{a}' if a else '') for name, a in runs)})")
        parts = self._probe_parts() if runs else []
        refs = [
            self.workers[i % len(self.workers)].probe_score.remote(
                "released", *parts, countermeasure=name, order=self.plan_order, arch=a
            )
            for i, (name, a) in enumerate(runs)
        ]
        self.battery = judge_battery(probe, plain + self.pool.get_all(refs))
        seconds = time.perf_counter() - t0
        self.timings["probe"] += seconds
        fs.write_bytes(
            self.layout.battery_record,
            json.dumps({"config_hash": self.chash, "round": final["round"], "battery": self.battery}).encode(),
        )
        for name, c in self.battery["countermeasures"].items():
            log.info(
                "probe battery: %s: %.1f%% final, %.1f%% early-stopped (epoch %d) on clean held-out (threshold "
                "%.1f%%): %s",
                name,
                100 * c["accuracy"],
                100 * c["early_stopped_accuracy"],
                c["best_epoch"],
                100 * final["probe"]["threshold"],
                "holds" if c["holds"] else "does NOT hold",
            )
        log.info("probe battery: %.1f s", seconds)
