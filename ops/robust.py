"""Robust error-minimizing noise (``--robust on``): REM's min-min-max with an expectation over transformations.

Plain min-min noise (``ops.noise``) minimises the surrogate's loss on clip(x + delta) itself, and an informed victim
breaks it: adversarial training at 4/255 or mixup put a victim back near its clean accuracy. The robust recipe (Fu et
al., "Robust Unlearnable Examples", ICLR 2022, plus an expectation over the countermeasure battery's transformations)
changes what each noise step minimises:

    min_delta  E_T  max_{|delta_a| <= rho}  L(f(T(clip(x + delta)) + delta_a), y)

- ``T`` is a random, differentiable transform of the batch in the spirit of the battery (``ops.countermeasures``):
  a random shift-crop and flip, then one of identity, a mixup-style blend (own label kept, own image dominant),
  grayscale, Gaussian blur, cutout, a differentiable JPEG approximation or a bit-depth reduction. Noise that still
  lowers the loss after T survives the victim applying T; one T is drawn per noise step, so the steps of a round
  average over many.
- ``delta_a`` is an adversary's L-inf perturbation of radius ``rho`` (PGD ascent with a random start,
  ``ops.countermeasures.pgd_perturbation``): noise that keeps the loss low even at the worst point of the rho-ball
  is not undone by adversarial training at radius rho (REM's argument; plain noise is, since the adversary's
  perturbation can cancel it). It is treated as a constant when differentiating (Danskin), as REM does.
- the surrogate is trained the same way (REM's train stage): on T(clip(x + delta)) + delta_a (``robust_adversary``,
  the ``adversary`` of ``surrogates.training.train_step``).

Everything here is a pure function of tensors and a model or forward callable; randomness comes from a
``torch.Generator`` (a seed reproduces a run). Images are float N x C x H x W in [0, 1], and every transform maps
such images to such images of the same shape and passes gradients to its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ops.choices import robust_choice
from ops.countermeasures import blur, cutout, pgd_perturbation, quantize_levels
from ops.image import to_gray
from ops.noise import project

# REM's CIFAR-10 setting defends against adversarial training at 4/255 with eps = 8/255; 4/255 is also the battery's
# default adversary (``at:4/255``). The inner radius must stay below eps (an adversary with the noise's own budget
# can cancel it outright), so a smaller eps gets rho = eps / 2, REM's ratio.
DEFAULT_RHO = 4 / 255
# The inner maximisation: a random start in the rho-ball and 3 signed steps of rho/2 (1.5 rho in all: from the start,
# most of the ball is in reach). REM uses 10 steps; each inner step costs one forward and backward of the surrogate,
# like an outer step, so the inner steps set the price of the robust noise (about 1 + inner_steps times the plain).
DEFAULT_INNER_STEPS = 3
DEFAULT_INNER_STEP_FRACTION = 0.5
# What T draws from after its shift-crop and flip, one per noise step, uniformly. "none" keeps the victim's plain
# recipe (crop and flip only) in the mix.
TRANSFORMS = ("none", "mixup", "grayscale", "blur", "cutout", "jpeg", "bdr")


@dataclass(frozen=True)
class RobustSpec:
    """The robust recipe's settings (``robust_spec`` gives the defaults for ``--robust on``)."""

    rho: float = DEFAULT_RHO  # the inner adversary's L-inf radius (0: EOT only, no inner maximisation)
    inner_steps: int = DEFAULT_INNER_STEPS
    inner_step_fraction: float = DEFAULT_INNER_STEP_FRACTION  # inner step = rho * this
    transforms: tuple[str, ...] = TRANSFORMS  # T's choices after the shift-crop/flip ("none": crop/flip alone)
    shift: float = 1 / 16  # crop from a zero-padded copy, padding = round(shift x the shorter side) (28 px: 2)
    flip: bool = True  # random horizontal flip
    mixup_min: float = 0.5  # blend weight of the own image, uniform in [mixup_min, 1]
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian blur sigma in pixels, uniform in this range
    cutout_size: float = 0.5  # cutout square side, x the image side (the battery's default)
    jpeg_quality: tuple[int, int] = (10, 50)  # JPEG quality, an integer uniform in this range (battery: jpeg:10)
    bdr_bits: tuple[int, int] = (2, 4)  # bit depth per image, an integer uniform in this range (battery: bdr:2)

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown or not self.transforms:
            raise ValueError(
                f"robust transforms must be a non-empty subset of {', '.join(TRANSFORMS)}, got {list(self.transforms)}"
            )
        if self.rho < 0 or self.inner_steps < 0:
            raise ValueError(f"robust rho and inner_steps must be >= 0, got {self.rho}, {self.inner_steps}")

    @property
    def inner_step_size(self) -> float:
        return self.rho * self.inner_step_fraction

    def describe(self) -> dict:
        """The settings as plain values (the engine's ``describe``, logs, the run record)."""
        return {**asdict(self), "transforms": list(self.transforms)}


def robust_spec(cfg_value: str, eps: float, rho: float | None = None) -> RobustSpec | None:
    """``--robust``'s value to the recipe: None for ``off`` (the paper's min-min noise), the defaults for ``on`` with
    rho = ``rho`` (``--robust-rho``), by default min(4/255, eps / 2). Raises ValueError (one line) for anything
    else."""
    if robust_choice(cfg_value) == "off":
        return None
    return RobustSpec(rho=min(DEFAULT_RHO, eps / 2) if rho is None else rho)


# --------------------------------------------------------------------------------------------- transforms


def _straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the identity's gradient backward (for rounding and clipping, whose own gradient is zero
    almost everywhere: rounding's everywhere, a clip's at every pixel it holds at 0 or 1, and most of a digit is)."""
    return x + (value - x).detach()


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def _integer(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(int(low), int(high) + 1, (1,), generator=generator))


def shift_flip(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """The victim's usual augmentation, batched: each image cropped from a zero-padded copy at a random offset in
    [0, 2 pad], then flipped left-right with probability 1/2 when ``flip`` (gathers, so gradients pass)."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
        rows = offsets[0].view(n, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
        x = padded.gather(2, rows.expand(n, c, h, w + 2 * pad))
        cols = offsets[1].view(n, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
        x = x.gather(3, cols.expand(n, c, h, w))
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def blend(x: torch.Tensor, generator: torch.Generator, lam_min: float = 0.5) -> torch.Tensor:
    """Mixup's image side with the own label kept: each image blended with a random partner of the batch, its own
    weight uniform in [lam_min, 1] (>= 0.5, so its own label stays the right one). The partner is detached: it only
    lends its appearance here, and a gradient into its noise would push it towards this image's class."""
    n = x.shape[0]
    lam = _uniform(n, lam_min, 1.0, generator, x.device).view(n, 1, 1, 1)
    perm = torch.randperm(n, generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm].detach()


def gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luminance replicated to every channel (the battery's grayscale, unrounded); one channel: itself."""
    return x if x.shape[1] == 1 else to_gray(x).expand_as(x)


def bit_depth(x: torch.Tensor, generator: torch.Generator, bits: tuple[int, int]) -> torch.Tensor:
    """The battery's bit-depth reduction at a random depth per image, rounding with a straight-through gradient."""
    n = x.shape[0]
    depth = torch.randint(int(bits[0]), int(bits[1]) + 1, (n,), generator=generator).to(x.device)
    return _straight_through(x, quantize_levels(x, depth.view(n, 1, 1, 1).to(x.dtype)))


# JPEG's example quantisation tables (ITU-T T.81, Annex K, tables K.1 and K.2), in row order; libjpeg scales them
# by the quality as ``jpeg_tables`` does, and Pillow's encoder uses them.
_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
_CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32  # fmt: skip


def jpeg_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(luminance, chrominance) 8 x 8 quantisation tables at a quality in [1, 100], scaled as libjpeg does for a
    baseline JPEG: factor 5000 / q below 50, 200 - 2 q from 50, entries (t factor + 50) // 100 within [1, 255]."""
    q = min(max(int(quality), 1), 100)
    factor = 5000 // q if q < 50 else 200 - 2 * q

    def scaled(table: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor([min(max((t * factor + 50) // 100, 1), 255) for t in table], dtype=torch.float32)

    return scaled(_LUMA_TABLE).view(8, 8), scaled(_CHROMA_TABLE).view(8, 8)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II basis, rows = frequencies: JPEG's 2-D DCT of a block B is D B D^T."""
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k.view(1, 8) + 1) * k.view(8, 1) * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.to(device=device, dtype=torch.float32)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom and right by replicating the edge to a multiple of ``multiple`` (as libjpeg fills partial MCUs)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _quantize_blocks(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """One JPEG component through the codec: level shift, 8 x 8 DCT, quantisation by ``table`` (rounding
    straight-through), dequantisation, inverse DCT. ``plane`` is N x C x H x W in 0..255 with H, W multiples of 8."""
    n, c, h, w = plane.shape
    blocks = (plane - 128.0).reshape(n, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    coef = dct @ blocks @ dct.T
    scaled = coef / table
    coef = _straight_through(scaled, scaled.round()) * table
    out = dct.T @ coef @ dct
    return out.transpose(3, 4).reshape(n, c, h, w) + 128.0


def jpeg_approx(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A differentiable JPEG re-encode and decode at ``quality``, after the baseline codec Pillow runs (``jpeg`` in
    the battery): one channel as a grayscale JPEG; three as JFIF YCbCr with 4:2:0 chroma (2 x 2 means, restored
    with the triangle filter of libjpeg's default upsampling, i.e. bilinear), each component through the 8 x 8 DCT
    and the scaled standard tables; edges padded by replication to whole blocks; the decoded image rounded to
    uint8 levels. Every rounding and the final clip pass gradients straight through. Differences from libjpeg:
    float DCT and colour conversion where libjpeg uses integer ones (see the unit test for the measured gap)."""
    _, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg needs 1 or 3 channels, got {c}")
    luma, chroma = (t.to(x.device) for t in jpeg_tables(quality))
    dct = _dct_matrix(x.device)
    v = x * 255.0
    if c == 1:
        out = _quantize_blocks(_pad_to(v, 8), luma, dct)[..., :h, :w]
    else:
        r, g, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
        ycc = torch.cat(
            [
                0.299 * r + 0.587 * g + 0.114 * b,
                -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
                0.5 * r - 0.418688 * g - 0.081312 * b + 128.0,
            ],
            dim=1,
        )
        ycc = _pad_to(ycc, 16)  # a 4:2:0 MCU is 16 x 16 luminance pixels
        y = _quantize_blocks(ycc[:, :1], luma, dct)
        cbcr = _quantize_blocks(F.avg_pool2d(ycc[:, 1:], 2), chroma, dct)
        cbcr = F.interpolate(cbcr, scale_factor=2, mode="bilinear", align_corners=False)
        y, cb, cr = y[..., :h, :w], cbcr[:, :1, :h, :w] - 128.0, cbcr[:, 1:, :h, :w] - 128.0
        out = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    out = _straight_through(out, out.round().clamp(0, 255))
    return out / 255.0


def _pad_of(spec: RobustSpec, x: torch.Tensor) -> int:
    return round(spec.shift * min(x.shape[-2:]))


def apply_transform(name: str, x: torch.Tensor, spec: RobustSpec, generator: torch.Generator) -> torch.Tensor:
    """One of ``TRANSFORMS`` by name, its parameters drawn from ``generator`` within ``spec``'s ranges. The result
    is clipped to [0, 1] straight-through (a blur's or a JPEG's float error must not leave the range)."""
    if name == "none":
        out = x
    elif name == "mixup":
        out = blend(x, generator, spec.mixup_min)
    elif name == "grayscale":
        out = gray(x)
    elif name == "blur":
        out = blur(x, float(_uniform(1, *spec.blur_sigma, generator, torch.device("cpu"))))
    elif name == "cutout":
        out = cutout(x, generator, spec.cutout_size)
    elif name == "jpeg":
        out = jpeg_approx(x, _integer(*spec.jpeg_quality, generator))
    elif name == "bdr":
        out = bit_depth(x, generator, spec.bdr_bits)
    else:
        raise ValueError(f"unknown robust transform {name!r}; choose from {', '.join(TRANSFORMS)}")
    return _straight_through(out, out.clamp(0.0, 1.0))


def eot_transform(x: torch.Tensor, spec: RobustSpec, generator: torch.Generator) -> torch.Tensor:
    """A random T for one step: the shift-crop and flip, then one of ``spec.transforms`` drawn uniformly (the same
    kind for the whole batch, its parameters drawn per image where the transform allows)."""
    x = shift_flip(x, generator, _pad_of(spec, x), spec.flip)
    name = spec.transforms[int(torch.randint(0, len(spec.transforms), (1,), generator=generator))]
    return apply_transform(name, x, spec, generator)


# --------------------------------------------------------------------------------------------- min-min-max


Forward = Callable[[torch.Tensor], torch.Tensor]


def inner_maximize(
    forward: Forward, images: torch.Tensor, y: torch.Tensor, *, spec: RobustSpec, generator: torch.Generator
) -> torch.Tensor:
    """The adversary's delta_a at ``images`` (already noisy, in [0, 1]): PGD ascent on the cross-entropy from a
    uniform random start, ``spec.inner_steps`` signed steps of ``spec.inner_step_size``, projected onto
    |delta_a| <= rho and images + delta_a in [0, 1]. Detached; the model's parameters get no gradient."""
    if spec.rho == 0 or spec.inner_steps == 0:
        return torch.zeros_like(images)
    return pgd_perturbation(
        forward,
        images.detach(),
        y,
        eps=spec.rho,
        steps=spec.inner_steps,
        step_size=spec.inner_step_size,
        generator=generator,
    )


def robust_minimize(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    spec: RobustSpec,
    generator: torch.Generator,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``steps`` robust noise steps on one batch; returns the new delta, detached, |delta| <= eps, x + delta in
    [0, 1].

    Each step draws T, finds delta_a = ``inner_maximize`` at T(clip(x + delta)), and takes the signed descent step
    delta <- project(delta - step_size sign(grad), x, eps) with grad the gradient of L(f(T(clip(x + delta)) +
    delta_a), y) at the clipped image (as in ``ops.noise.pgd_minimize``: not through the clip, which passes nothing
    at 0 and 1). ``forward`` maps images to logits in the model's current mode (eval for the noise stage); the
    caller freezes its parameters. ``weight``: per-row loss weights (the engine's zero-weighted padding rows).
    """
    delta = delta.detach().clone()
    for _ in range(steps):
        image = (x + delta).clamp(0.0, 1.0).requires_grad_(True)
        view = eot_transform(image, spec, generator)
        delta_a = inner_maximize(forward, view, y, spec=spec, generator=generator)
        logits = forward(view + delta_a).float()
        if weight is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = (F.cross_entropy(logits, y, reduction="none") * weight).sum()
        (grad,) = torch.autograd.grad(loss, image)
        with torch.no_grad():
            delta = project(delta - step_size * grad.sign(), x, eps)
    return delta.detach()


# ``surrogates.training.train_step``'s adversary: (model, batch, labels) -> the batch it trains on.
TrainAdversary = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def robust_adversary(spec: RobustSpec, generator: torch.Generator, autocast: Callable | None = None) -> TrainAdversary:
    """REM's train stage as ``surrogates.training.train_step``'s ``adversary``: each batch (clip(x + delta), in
    [0, 1]) becomes T(batch) + delta_a, a random T and the inner maximisation at radius rho, so the surrogate learns
    on what the noise stage optimises against. ``autocast`` (the engine's) is the attack's precision context.

    The attack runs the surrogate in eval mode, as REM's reference implementation does: it is then the same function
    the noise stage optimises against (the noise stage runs in eval mode), and its forward passes leave batch norm's
    running statistics alone, so those come from the batches trained on only. The model's mode is restored after."""

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a pool worker's share of a batch may be empty
            return x

        def forward(images: torch.Tensor) -> torch.Tensor:
            if autocast is None:
                return model(images).float()
            with autocast():
                return model(images).float()

        was_training = model.training
        params = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                view = eot_transform(x, spec, generator)
            return (view + inner_maximize(forward, view, y, spec=spec, generator=generator)).detach()
        finally:
            for p in params:
                p.requires_grad_(True)
            model.train(was_training)

    return attack
