"""The noise engine: the min-min PGD update of ``ops.noise``, run as fast as the device allows.

Same algorithm, same result: ``NoiseEngine.minimize`` in fp32 eager mode is ``pgd_minimize`` step for step (gradient at
the clipped image leaf, signed step, projection onto the eps-ball and [0, 1]). What the engine adds is how it runs:

- precision: ``bf16`` autocast for the surrogate's forward and backward (``auto``: bf16 on a CUDA device that supports
  it, fp32 elsewhere); the noise, the images and the update stay fp32, so eps and [0, 1] hold exactly;
- ``channels_last`` memory format for the surrogate and the batches (tensor cores want NHWC; on a CPU, oneDNN's
  convolutions run 1.3-1.5x faster in it, ``docs/benchmarks.md``);
- ``torch.compile`` of the surrogate (optionally ``mode="reduce-overhead"``: CUDA graphs), with a fallback to eager
  when compiling is unavailable or fails (logged once, with the reason); a compiled engine pads a short batch to the
  full batch size (padding rows carry no loss) so that one graph serves every batch;
- a whole shard per call: images, labels and noise stay on the device, batches are cut from them there, and no
  per-sample Python or host work happens between steps;
- the skip of converged samples (``skip_below``): a sample whose surrogate loss on its released image (x + delta
  rounded to uint8) is already below the threshold is left as it is for this round;
- the robust update (``robust``, ``--robust on``): ``ops.robust.robust_minimize``'s min-min-max with an expectation
  over transformations in place of the plain steps, with the same padding, precision and memory format; its random
  transforms and starts come from the engine's own generator (``seed``, ``reseed``).

``reference_noise_pass`` is the other end of the scale: the same update computed the way the paper's code does it
(fp32 eager, noise held on the host and moved per sample every batch, parameter gradients computed too). It exists
for ``unlearnable bench``, as the baseline the engine is measured against.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ops.choices import COMPILE_CHOICES, PRECISIONS
from ops.noise import project
from ops.robust import RobustSpec, robust_minimize

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device with bf16 support, else ``fp32``; explicit choices are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def compile_args(choice: str) -> dict:
    """``--compile`` as ``NoiseEngine`` keywords: {"compile": bool | None, "compile_mode": str | None}."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {choice!r}")
    if choice == "auto":
        return {"compile": None, "compile_mode": None}
    if choice == "off":
        return {"compile": False, "compile_mode": None}
    return {"compile": True, "compile_mode": None if choice == "default" else choice}


def pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked copy of a host tensor when a CUDA device is there to use it (faster, asynchronous uploads)."""
    if t.device.type == "cpu" and torch.cuda.is_available():
        return t.pin_memory()
    return t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device through pinned memory, without blocking the host (a no-op on the CPU)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return pin(t).to(device, non_blocking=True)
    return t.to(device)


@dataclass
class ShardUpdate:
    """What one call of ``NoiseEngine.update_samplewise`` did."""

    samples: int
    updated: int  # samples that got PGD steps this round (the rest were converged)
    image_steps: int  # updated * steps: the PGD work actually done


class NoiseEngine:
    """Runs the min-min PGD update against one surrogate. Build it once per worker; it follows the model's weights.

    ``channels_last`` converts the model's parameters in place (training benefits too, and a checkpoint restore
    copies into them, keeping the format). Defaults (``None``): channels_last on every device; compile on CUDA only:
    on a CPU it costs more than it gives for the small surrogates that run there (``docs/benchmarks.md``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        step_size: float,
        steps: int,
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool | None = None,
        compile_mode: str | None = None,
        robust: RobustSpec | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.eps, self.step_size, self.steps = eps, step_size, steps
        self.robust = robust
        # The robust update's randomness (transforms, the inner maximisation's random start); unused when plain.
        self.generator = torch.Generator().manual_seed(seed)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.precision = resolve_precision(precision, self.device)
        on_cuda = self.device.type == "cuda"
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.compile_requested = on_cuda if compile is None else bool(compile)
        self.compile_mode = compile_mode
        self.fallback_reason: str | None = None
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._forward: nn.Module = model
        self._compiled = False
        if self.compile_requested:
            self._try_compile()

    # ---- how the surrogate runs --------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """True while the engine runs a compiled surrogate (False after a fallback to eager)."""
        return self._compiled

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self._compiled,
            "compile_mode": self.compile_mode,
            "fallback": self.fallback_reason,
            "robust": None if self.robust is None else self.robust.describe(),
        }

    def reseed(self, seed: int) -> None:
        """Restart the robust update's generator. A caller that wants a unit of work (a shard in a round) to get the
        same noise however it was reached (a resumed run, a shard taken over by another worker) reseeds before it
        from the unit's identity; without that, the draws follow from the engine's seed and every call before."""
        self.generator.manual_seed(seed)

    def _try_compile(self) -> None:
        if not hasattr(torch, "compile"):
            self._fall_back("torch.compile is not available in this torch")
            return
        try:
            # dynamic=False: batches are padded to one size, so one static graph (and one CUDA graph) serves them.
            self._forward = torch.compile(self.model, mode=self.compile_mode, dynamic=False)
            self._compiled = True
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: run eager, and say why once
            self._fall_back(f"{type(exc).__name__}: {exc}")

    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            log.warning("noise engine: torch.compile unavailable (%s); running the surrogate eagerly", reason)
        self.fallback_reason = reason
        self._forward = self.model
        self._compiled = False

    def autocast(self):
        """The engine's precision as a context: bf16 autocast, or nothing (fp32). The train stage runs in it too."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def format(self, t: torch.Tensor) -> torch.Tensor:
        """A batch in the engine's memory format (channels_last when on)."""
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        if self._compiled:
            try:
                with self.autocast():
                    return self._forward(image)
            except Exception as exc:  # noqa: BLE001 - compilation happens at the first call; fall back, then retry
                self._fall_back(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        with self.autocast():
            return self._forward(image)

    # ---- the update ------------------------------------------------------------------------------------------
    def minimize(
        self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, pad_to: int | None = None
    ) -> torch.Tensor:
        """``steps`` min-min PGD steps on one batch (x in [0, 1]); returns the new delta, detached, |delta| <= eps.

        The surrogate must be in the mode the caller wants (eval for the noise stage). ``pad_to`` pads a short batch
        to that many rows for a compiled surrogate (the padding rows are zero-weighted in the loss). With ``robust``
        the steps are ``ops.robust.robust_minimize``'s (each one costs 1 + robust.inner_steps surrogate passes).
        """
        n = x.shape[0]
        if n == 0 or self.steps == 0:
            return delta.detach().clone()
        pad = (pad_to or n) - n if self._compiled else 0
        weight = None
        if pad > 0:
            x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
            y = torch.cat([y, y[:1].expand(pad)])
            delta = torch.cat([delta, delta[:1].expand(pad, *delta.shape[1:])])
            weight = torch.zeros(n + pad, device=x.device)
            weight[:n] = 1.0 / n
        x, delta = self.format(x), self.format(delta.detach().clone())
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            if self.robust is not None:
                delta = robust_minimize(
                    lambda image: self._logits(self.format(image)).float(),
                    x,
                    y,
                    delta,
                    eps=self.eps,
                    step_size=self.step_size,
                    steps=self.steps,
                    spec=self.robust,
                    generator=self.generator,
                    weight=weight,
                )
            else:
                for _ in range(self.steps):
                    # As in ops.noise.pgd_minimize: the gradient at the clipped image itself, not through the clip
                    # (which passes no gradient at 0 and 1); the projection keeps x + delta in [0, 1].
                    image = self.format((x + delta).clamp(0.0, 1.0)).requires_grad_(True)
                    logits = self._logits(image).float()
                    if weight is None:
                        loss = F.cross_entropy(logits, y)
                    else:
                        loss = (F.cross_entropy(logits, y, reduction="none") * weight).sum()
                    (grad,) = torch.autograd.grad(loss, image)
                    with torch.no_grad():
                        delta = project(delta - self.step_size * grad.sign(), x, self.eps)
        finally:
            for p in params:
                p.requires_grad_(True)
        return delta[:n].contiguous().detach()

    @torch.no_grad()
    def sample_losses(
        self, x_uint8: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, batch_size: int
    ) -> torch.Tensor:
        """Each sample's surrogate loss on its image as it will be released: round(x + delta) in uint8 levels."""
        out = []
        for start in range(0, x_uint8.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            levels = (x_uint8[sl].to(torch.float32) + delta[sl] * 255.0).round_().clamp_(0, 255)
            # Eager even when compiled: one forward a round is not worth a second graph (and its recompiles).
            with self.autocast():
                logits = self.model(self.format(levels / 255.0)).float()
            out.append(F.cross_entropy(logits, y[sl], reduction="none"))
        return torch.cat(out) if out else torch.empty(0, device=x_uint8.device)

    def update_samplewise(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        delta: torch.Tensor,
        *,
        batch_size: int,
        skip_below: float | None = None,
    ) -> tuple[torch.Tensor, ShardUpdate]:
        """One shard's noise stage: every sample's delta moved by ``steps`` PGD steps, in batches, on the device.

        With ``skip_below``, samples whose loss on their released image is already below it keep their delta, and
        the others are packed into full batches. Returns (new delta for all rows, what was done).
        """
        n = x_uint8.shape[0]
        new = delta.detach().clone()
        if skip_below is None:
            rows = None
            count = n
        else:
            losses = self.sample_losses(x_uint8, y, delta, batch_size)
            rows = (losses >= skip_below).nonzero().squeeze(1)
            count = int(rows.numel())
        for start in range(0, count, batch_size):
            if rows is None:
                idx = slice(start, min(start + batch_size, n))
            else:
                idx = rows[start : start + batch_size]
            x = x_uint8[idx].to(torch.float32) / 255.0
            new[idx] = self.minimize(x, y[idx], new[idx], pad_to=batch_size)
        return new, ShardUpdate(samples=n, updated=count, image_steps=count * self.steps)

    def classwise_sums(
        self, x: torch.Tensor, y: torch.Tensor, class_delta: torch.Tensor, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ops.noise.classwise_update_sums`` on the engine: (per-class sum of the updates, per-class counts)."""
        start = class_delta[y]
        moved = self.minimize(x, y, start, pad_to=pad_to)
        sums = torch.zeros_like(class_delta)
        sums.index_add_(0, y, moved - start)
        counts = torch.bincount(y, minlength=class_delta.shape[0]).to(class_delta.dtype)
        return sums, counts


def reference_noise_pass(
    model: nn.Module,
    x_host: torch.Tensor,
    y_host: torch.Tensor,
    noise_host: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The sample-wise update as the paper's code computes it, for benchmarks only: fp32, eager, the noise kept on
    the host and gathered into each batch sample by sample, images uploaded per batch, ``loss.backward()`` (which
    computes the surrogate's parameter gradients too), and each sample's new noise copied back to the host one by one.

    ``x_host`` is float in [0, 1] on the host; returns the updated host noise (``pgd_minimize``'s values up to float
    rounding: the reference projects through the perturbed image, clip(x + clip(delta, eps)), not delta itself).
    """
    model.eval()
    for start in range(0, x_host.shape[0], batch_size):
        stop = min(start + batch_size, x_host.shape[0])
        images = x_host[start:stop].to(device)
        labels = y_host[start:stop].to(device)
        batch_noise = torch.stack([noise_host[i] for i in range(start, stop)]).to(device)
        perturb = (images + batch_noise).clamp(0, 1).detach().requires_grad_(True)
        for _ in range(steps):
            model.zero_grad()
            loss = F.cross_entropy(model(perturb), labels)
            loss.backward()
            eta = -step_size * perturb.grad.data.sign()
            eta = (perturb.data + eta - images).clamp(-eps, eps)
            perturb = (images + eta).clamp(0, 1).detach().requires_grad_(True)
        eta = (perturb.data - images).detach()
        for i, row in enumerate(range(start, stop)):
            noise_host[row] = eta[i].cpu()
    model.zero_grad(set_to_none=True)
    return noise_host
