"""Stage 2, the noise update: a shard's PGD steps on the worker, and its unit of done: the shard's noise state
(class-wise: the class noise), committed with its marker as soon as it is computed."""

from __future__ import annotations

import io
import logging
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ops.choices import CONVERGED_LOSS
from ops.noise import apply_classwise_update, decode_noise, encode_noise
from pipeline import faults
from pipeline.progress import eta
from pipeline.schedule import NoiseQueue
from pipeline.storage.markers import DamagedUnit, commit, is_done, load_checked
from pipeline.storage.shards import iter_samples

log = logging.getLogger(__name__)


class NoiseWork:
    """The worker's side: update a shard's noise (its own, or a guest's), and the noise-state format."""

    def noise_stage(self, shard: str, round_: int | None = None) -> dict:
        """Update the noise of one shard's samples (sample-wise), or add its class updates to the sums (class-wise).

        Sample-wise with ``skip_converged``, samples whose surrogate loss on their released image is already below
        ``ops.choices.CONVERGED_LOSS`` keep their noise this round; ``image_steps`` counts the steps actually done.
        ``round_`` only names the unit for logs and fault hooks."""
        faults.at_unit("worker", "noise", round_, shard)
        t0 = time.perf_counter()
        sd = self.shards[shard]
        cfg = self.cfg
        self.model.eval()
        # The robust update's draws depend on (seed, round, shard) only: a resumed stage or a guest worker computes
        # the same noise. (Plain noise draws nothing.)
        self.engine.reseed(zlib.crc32(f"{cfg.seed}:{round_}:{shard}".encode()))
        sl = slice(sd.start, sd.end)
        n = sd.end - sd.start
        if cfg.mode == "samplewise":
            delta, done = self.engine.update_samplewise(
                self.x[sl],
                self.y[sl],
                self.noise_rows(sl),
                batch_size=cfg.noise_batch_size,
                skip_below=CONVERGED_LOSS if cfg.skip_converged else None,
            )
            # The state a rerun resumes from is the quantised one: keep exactly that, so resumed == uninterrupted.
            self.set_noise_rows(sl, delta)
            updated, image_steps = done.updated, done.image_steps
        else:
            for start in range(sd.start, sd.end, cfg.noise_batch_size):
                b = slice(start, min(start + cfg.noise_batch_size, sd.end))
                sums, counts = self.engine.classwise_sums(
                    self.x[b].to(torch.float32) / 255.0, self.y[b], self.class_delta, pad_to=cfg.noise_batch_size
                )
                self._class_sums += sums
                self._class_counts += counts
            updated, image_steps = n, n * cfg.pgd_steps
        return {
            "shard": shard,
            "samples": n,
            "updated": updated,
            "image_steps": image_steps,
            "seconds": time.perf_counter() - t0,
        }

    def noise_stage_guest(self, shard: str, round_: int, url: str, state: bytes | None) -> dict:
        """The noise stage of a shard another worker owns (this one was idle): load it once and keep it as a guest
        (not trained on, checked or exported here), take its noise from ``state`` (round_ - 1's, checked by the
        coordinator; None in round 0), update it."""
        if shard not in self.shards:
            _, x, y = self._decode(shard, url, iter_samples(url), self.x.shape[0])
            self._append_rows([(x, y)])
        if self.cfg.mode == "samplewise":
            sd = self.shards[shard]
            if state is not None:
                self.load_noise_state(shard, state)
            else:
                self.noise_q[sd.start : sd.end] = 0
        return {**self.noise_stage(shard, round_), "guest": True}

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

    def noise_state(self, shard: str | None) -> bytes:
        """int8 noise state in units of eps/127: one shard's rows, or the class noise (``shard=None``)."""
        if shard is None:
            q = encode_noise(self.class_delta, self.cfg.eps).cpu()
            keys = None
        else:
            sd = self.shards[shard]
            q = self.noise_q[sd.start : sd.end].to("cpu", copy=True)  # a copy: a view would save the whole storage
            keys = sd.keys
        buf = io.BytesIO()
        torch.save({"q": q, "keys": keys}, buf)
        return buf.getvalue()

    def load_noise_state(self, shard: str | None, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if shard is None:
            self.class_delta = decode_noise(state["q"], self.cfg.eps).to(self.device)
            return
        sd = self.shards[shard]
        if state["keys"] != sd.keys:
            raise ValueError(f"noise state of shard {shard} does not match its samples (input changed?)")
        self.noise_q[sd.start : sd.end] = state["q"].to(self.device)


class NoiseStage:
    """The coordinator's side: hand shards to idle workers, commit each state, load the done ones."""

    def _noise_stage(self, r: int) -> int:
        """Round r's noise update of every shard; returns the image-steps it took. Units done before (a resumed
        stage) are loaded once they check out against their markers; a damaged one is recomputed."""
        done = self._checked_units(r, self._noise_units())
        self._send_noise(done)
        if self.cfg.mode == "classwise":
            if done:
                return 0
            self._attempt("noise", r, "_classes")
            image_steps = self._run_noise_queue(r, [s.id for s in self.plan.shards], commit=False)
            # Every worker summed its shards' class updates; the class noise moves by the sum over the pool.
            parts = self.pool.get_all([w.class_update_sums.remote() for w in self.workers])
            sums = self.pool.put(sum(p[0] for p in parts))
            counts = self.pool.put(sum(p[1] for p in parts))
            self.pool.get_all([w.apply_class_update.remote(sums, counts) for w in self.workers])
            self._commit_noise(r, "_classes", 0)
            return image_steps
        return self._run_noise_queue(r, [s.id for s in self.plan.shards if s.id not in done], commit=True)

    def _run_noise_queue(self, r: int, shard_ids: list[str], commit: bool) -> int:
        """Hand the shards to idle workers, own shards first, then other workers' unstarted ones (see schedule.py).

        Sample-wise (``commit``), each shard's noise state is committed as soon as it is done, and a shard computed
        by a guest worker goes back to its owner. The commit (storage write, read-back, marker) runs on a coordinator
        thread while the worker already computes its next shard: at 224 px a shard's state is ~150 kB an image, and
        writing it must not idle the GPU."""
        cfg = self.cfg
        url = {s.id: s.url for s in self.plan.shards}
        queue = NoiseQueue({i: [s for s in shard_ids if self.owner[s] == i] for i in range(len(self.workers))})
        idle = list(range(len(self.workers)))
        running: dict = {}
        to_owners = []
        commits: list[Future] = []
        image_steps = samples = done = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(2, len(self.workers)), thread_name_prefix="commit") as writers:
            while len(queue) or running:
                for i in list(idle):
                    job = queue.next_for(i)
                    if job is None:
                        continue
                    idle.remove(i)
                    shard, owner = job
                    if commit:
                        self._attempt("noise", r, shard)
                    if owner == i:
                        ref = self.workers[i].noise_stage.remote(shard, r)
                    else:
                        state = self._guest_state(r, shard, owner) if cfg.mode == "samplewise" else None
                        ref = self.workers[i].noise_stage_guest.remote(shard, r, url[shard], state)
                    running[ref] = (i, shard, owner)
                ready, _ = self.pool.wait(list(running))
                for ref in ready:
                    i, shard, owner = running.pop(ref)
                    result = self.pool.get(ref)
                    if commit:
                        # Asked for before the worker's next shard (an actor runs its calls in order), written while
                        # that shard computes; a guest's result goes to the owner as the same object, not via here.
                        state_ref = self.workers[i].noise_state.remote(shard)
                        commits.append(writers.submit(self._commit_state, r, shard, state_ref))
                        if owner != i:
                            to_owners.append(self.workers[owner].load_noise_state.remote(shard, state_ref))
                    idle.append(i)
                    image_steps += result["image_steps"]
                    samples += result["samples"]
                    done += 1
                    elapsed = time.perf_counter() - t0
                    log.info(
                        "round %d noise: %d/%d shards done (%s on worker %d%s), %.0f images/s%s",
                        r,
                        done,
                        len(shard_ids),
                        shard,
                        i,
                        f", owner {owner}" if owner != i else "",
                        samples / max(elapsed, 1e-9),
                        eta(done, len(shard_ids), elapsed),
                    )
            for f in commits:
                f.result()  # a failed write fails the stage, as it did inline
        self.pool.get_all(to_owners)
        return image_steps

    def _guest_state(self, r: int, shard: str, owner: int):
        """The noise a guest starts a shard's round r from: round r-1's committed state, checked against its marker;
        when it does not check out, the owner's copy in memory (it waits for the owner's current shard)."""
        if r == 0:
            return None
        try:
            layout = self.layout
            return self.pool.put(
                load_checked(layout.noise_state(r - 1, shard), layout.noise_marker(r - 1, shard), self.chash)
            )
        except DamagedUnit as exc:
            log.warning("%s; the guest takes the owner's copy", exc)
            return self.workers[owner].noise_state.remote(shard)

    def _commit_noise(self, r: int, unit: str, worker: int) -> bytes:
        """Noise state first, verified; its marker last. Returns the state."""
        shard = None if unit == "_classes" else unit
        return self._commit_state(r, unit, self.workers[worker].noise_state.remote(shard))

    def _commit_state(self, r: int, unit: str, state_ref) -> bytes:
        state = self.pool.get(state_ref)
        commit(self.layout.noise_state(r, unit), state, self.layout.noise_marker(r, unit), self.chash)
        return state

    def _checked_units(self, r: int, units: list[str]) -> dict[str, bytes]:
        """The state of round r's units that are done and check out; a damaged one's marker is dropped."""
        states = {}
        for unit in units:
            if not is_done(self.layout.noise_marker(r, unit), self.chash):
                continue
            try:
                states[unit] = load_checked(
                    self.layout.noise_state(r, unit), self.layout.noise_marker(r, unit), self.chash
                )
            except DamagedUnit as exc:
                self._dropped(exc, r)
        return states

    def _send_noise(self, states: dict[str, bytes]) -> None:
        """Checked noise state back into the workers: a shard's to its owner, the class noise to all."""
        refs = []
        for unit, data in states.items():
            state = self.pool.put(data)
            if unit == "_classes":
                refs += [w.load_noise_state.remote(None, state) for w in self.workers]
            else:
                refs.append(self.workers[self.owner[unit]].load_noise_state.remote(unit, state))
        self.pool.get_all(refs)
