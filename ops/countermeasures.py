"""Countermeasures: what an informed adversary does to a protected release before or while training on it.

A countermeasure is named ``NAME[:ARG]`` (``jpeg:10``, ``at:4/255``); ``parse_countermeasure`` turns the text into a
``Countermeasure`` and ``parse_battery`` a list of them (``all`` is the whole battery). Two kinds:

- **preprocessing** (``jpeg``, ``grayscale``, ``blur``, ``bdr``): a deterministic map of uint8 images
  (N x C x H x W in, the same shape and dtype out), applied once to every image the victim sees (``preprocess``).
- **training-time** (``cutout``, ``cutmix``, ``mixup``, ``ueraser``, ``at``): batch operations inside the training
  loop on float images in [0, 1] (N x C x H x W), drawing their randomness from a ``torch.Generator`` so a seed
  reproduces a run (``batch_augment`` and ``adversary`` give the callables the loop takes).

Everything here is a pure function of tensors (and, for ``pgd_maximize``, a model); no I/O, no Ray, no storage.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ops.choices import parse_fraction
from ops.image import to_gray
from ops.noise import project

# Adversarial training: Madry et al.'s L-inf PGD with a random start, a few steps of eps/4 (enough to reach any
# corner of the ball from the start), the usual cheap setting for the victim's inner maximisation.
AT_STEPS = 5
AT_STEP_FRACTION = 0.25


@dataclass(frozen=True)
class _Spec:
    kind: str  # "none" | "preprocess" | "train"
    default: str | None  # the ARG when omitted (None: the countermeasure takes no ARG)
    usage: str  # one line for --help and error messages


SPECS: dict[str, _Spec] = {
    "none": _Spec("none", None, "none: plain training (the victim's usual recipe)"),
    "jpeg": _Spec("preprocess", "10", "jpeg:Q: JPEG re-encode at quality Q (1-100, default 10)"),
    "grayscale": _Spec("preprocess", None, "grayscale: ITU-R 601 luminance, replicated to every channel"),
    "blur": _Spec("preprocess", "1.0", "blur:SIGMA: Gaussian blur, SIGMA in pixels (default 1.0)"),
    "bdr": _Spec("preprocess", "2", "bdr:BITS: bit-depth reduction to 2^BITS levels per channel (1-8, default 2)"),
    "cutout": _Spec("train", "0.5", "cutout:SIZE: zero a random square of SIZE x the side per image (default 0.5)"),
    "cutmix": _Spec(
        "train",
        "1.0",
        "cutmix:ALPHA: paste a box from another image, labels by area (lam ~ Beta(ALPHA, ALPHA), default 1.0)",
    ),
    "mixup": _Spec(
        "train", "1.0", "mixup:ALPHA: blend image pairs and their labels (lam ~ Beta(ALPHA, ALPHA), default 1.0)"
    ),
    "ueraser": _Spec("train", None, "ueraser: heavy random augmentation per image (UEraser-Lite style)"),
    "at": _Spec("train", "4/255", f"at:EPS: L-inf PGD adversarial training ({AT_STEPS} steps of EPS/4, default 4/255)"),
}

# ``--countermeasures all``: every countermeasure at its default ARG.
ALL = tuple(name if spec.default is None else f"{name}:{spec.default}" for name, spec in SPECS.items())


@dataclass(frozen=True)
class Countermeasure:
    """A parsed ``NAME[:ARG]``: ``text`` is how it is reported (the ARG as the user wrote it, or the default)."""

    name: str
    value: float | None
    text: str

    @property
    def kind(self) -> str:
        return SPECS[self.name].kind


def _number(name: str, arg: str, low: float, high: float, integer: bool = False) -> float:
    try:
        value = parse_fraction(arg)
    except ValueError:
        value = math.nan
    if not (low <= value <= high) or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"countermeasure {name}: ARG must be {kind} in [{low:g}, {high:g}], got {arg!r} ({SPECS[name].usage})"
        )
    return value


def parse_countermeasure(text: str) -> Countermeasure:
    """``NAME[:ARG]`` into a Countermeasure; raises ValueError (one line) for an unknown name or a bad ARG."""
    name, sep, arg = text.strip().partition(":")
    name, arg = name.strip().lower(), arg.strip()
    if name not in SPECS:
        raise ValueError(f"unknown countermeasure {text!r}; choose from {', '.join(SPECS)} (or all)")
    spec = SPECS[name]
    if spec.default is None:
        if sep:
            raise ValueError(f"countermeasure {name} takes no ARG, got {text!r}")
        return Countermeasure(name, None, name)
    if not arg:
        if sep:
            raise ValueError(f"countermeasure {name}: empty ARG in {text!r} ({spec.usage})")
        arg = spec.default
    value = {
        "jpeg": lambda: _number(name, arg, 1, 100, integer=True),
        "blur": lambda: _number(name, arg, 0.1, 16),
        "bdr": lambda: _number(name, arg, 1, 8, integer=True),
        "cutout": lambda: _number(name, arg, 0.01, 1),
        "cutmix": lambda: _number(name, arg, 0.01, 100),
        "mixup": lambda: _number(name, arg, 0.01, 100),
        "at": lambda: _number(name, arg, 1e-6, 1),
    }[name]()
    return Countermeasure(name, value, f"{name}:{arg}")


def parse_battery(items: Iterable[str]) -> list[Countermeasure]:
    """Countermeasures from texts that are each ``NAME[:ARG]``, a comma-separated list of them, or ``all``; in order,
    the same countermeasure (name and value) kept once."""
    out: list[Countermeasure] = []
    seen: set[tuple[str, float | None]] = set()
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            for text in ALL if part.strip().lower() == "all" else (part,):
                cm = parse_countermeasure(text)
                if (cm.name, cm.value) not in seen:
                    seen.add((cm.name, cm.value))
                    out.append(cm)
    if not out:
        raise ValueError("no countermeasure given")
    return out


# --------------------------------------------------------------------------------------------- preprocessing


def jpeg(x_uint8: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-encode and decode every image (Pillow's encoder, its default 4:2:0 chroma subsampling for RGB);
    uint8 N x C x H x W (C = 1 or 3) in and out. Deterministic."""
    if x_uint8.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs 1 or 3 channels, got {x_uint8.shape[1]}")
    arrays = x_uint8.permute(0, 2, 3, 1).contiguous().numpy()
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        decoded = np.asarray(Image.open(buf).convert("L" if a.shape[-1] == 1 else "RGB"))
        out.append(decoded.reshape(a.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def grayscale(x_uint8: torch.Tensor) -> torch.Tensor:
    """Luminance (ITU-R 601) replicated to every channel, so the channel count (and the victim's model) is kept."""
    if x_uint8.shape[1] == 1:
        return x_uint8.clone()
    return to_gray(x_uint8).expand_as(x_uint8).contiguous()


def gaussian_blur(x_uint8: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius ceil(3 sigma), edges replicated), rounded back to uint8."""
    return blur(x_uint8.to(torch.float32), sigma).round_().clamp_(0, 255).to(torch.uint8)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``gaussian_blur`` on float images of any range, unrounded and differentiable (the robust noise's EOT blurs
    with it): a separable Gaussian kernel of radius ceil(3 sigma), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def bit_depth_reduction(x_uint8: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise each channel to 2^bits evenly spaced levels spanning 0..255 (as ISS's BDR: round(x (2^b - 1)) /
    (2^b - 1)); 8 bits is the identity."""
    return (quantize_levels(x_uint8.to(torch.float32) / 255.0, int(bits)) * 255.0).round_().to(torch.uint8)


def quantize_levels(x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] rounded to 2^bits evenly spaced levels spanning [0, 1] (``bits`` may be a tensor that
    broadcasts, one depth per image); ``bit_depth_reduction``'s rounding, and the robust noise's EOT's."""
    levels = 2**bits - 1
    return (x * levels).round() / levels


def preprocess(cm: Countermeasure, x_uint8: torch.Tensor) -> torch.Tensor:
    """A preprocessing countermeasure applied to uint8 images; other kinds return the images unchanged."""
    if cm.name == "jpeg":
        return jpeg(x_uint8, int(cm.value))
    if cm.name == "grayscale":
        return grayscale(x_uint8)
    if cm.name == "blur":
        return gaussian_blur(x_uint8, float(cm.value))
    if cm.name == "bdr":
        return bit_depth_reduction(x_uint8, int(cm.value))
    return x_uint8


# --------------------------------------------------------------------------------------------- training time


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; draw a seed from ours so a run stays reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard labels to float probabilities (soft targets pass through)."""
    return y if y.is_floating_point() else F.one_hot(y, num_classes).to(torch.float32)


def _boxes(
    n: int, h: int, w: int, bh: torch.Tensor, bw: torch.Tensor, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """N x 1 x H x W bool masks of boxes of size (bh, bw) around uniformly random centres, clipped to the image
    (DeVries & Taylor's cutout and Yun et al.'s cutmix both let a box hang over the edge)."""
    cy = torch.randint(0, h, (n,), generator=generator).to(device)
    cx = torch.randint(0, w, (n,), generator=generator).to(device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    top, left = (cy - bh // 2).view(-1, 1, 1), (cx - bw // 2).view(-1, 1, 1)
    inside = (rows >= top) & (rows < top + bh.view(-1, 1, 1)) & (cols >= left) & (cols < left + bw.view(-1, 1, 1))
    return inside.unsqueeze(1)


def cutout(x: torch.Tensor, generator: torch.Generator, size: float = 0.5) -> torch.Tensor:
    """Zero one square of side ``size`` x the image side per image, at a random centre (DeVries & Taylor 2017)."""
    n, _, h, w = x.shape
    side = torch.full((n,), max(1, round(size * min(h, w))), device=x.device)
    return x.masked_fill(_boxes(n, h, w, side, side, generator, x.device), 0.0)


def mixup(
    x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang et al.'s mixup: lam ~ Beta(alpha, alpha) per batch, every image blended with a random partner and the
    label probabilities by the same weights (each row still sums to 1). ``targets`` are probabilities N x K."""
    lam = _beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(
    x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Yun et al.'s CutMix: lam ~ Beta(alpha, alpha) per batch; a box of area (1 - lam) from a random partner is
    pasted into each image, and the labels are mixed by the area actually pasted (after clipping at the edges)."""
    n, _, h, w = x.shape
    lam = _beta(alpha, generator)
    perm = torch.randperm(n, generator=generator).to(x.device)
    bh = torch.full((n,), round(h * math.sqrt(1 - lam)), device=x.device)
    bw = torch.full((n,), round(w * math.sqrt(1 - lam)), device=x.device)
    mask = _boxes(n, h, w, bh, bw, generator, x.device)
    pasted = mask.flatten(1).float().mean(1, keepdim=True)  # the fraction of each image that is its partner's
    return torch.where(mask, x[perm], x), (1 - pasted) * targets + pasted * targets[perm]


def _plasma(n: int, h: int, w: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A smooth random field in [-1, 1], N x 1 x H x W: coarse noise at 2-6 cells a side, upsampled bicubically
    (a cheap stand-in for kornia's diamond-square plasma that UEraser uses)."""
    cells = int(torch.randint(2, 7, (1,), generator=generator))
    coarse = torch.rand(n, 1, cells, cells, generator=generator).to(device) * 2 - 1
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each image and channel over 256 levels (float [0, 1] in and out); a channel with a
    single level is left as it is."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().clamp(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, math.inf)).min(1, keepdim=True).values
    denom = (h * w - cdf_min).clamp_min(1)
    out = ((cdf.gather(1, levels) - cdf_min) / denom).clamp(0, 1)
    flat = (cdf_min >= h * w).expand_as(out)  # one level only: nothing to equalise
    return torch.where(flat, x.view(n * c, -1), out).view(n, c, h, w)


def ueraser(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Heavy random augmentation in the spirit of UEraser-Lite (Qin et al. 2023): each op applied to each image
    independently with probability ``p``, in this order:

    plasma brightness (add a smooth field of amplitude up to 0.3), plasma contrast (scale the deviation from the
    image mean by a smooth field in [0.4, 1.6]), channel shuffle (RGB only), posterize to 2-4 bits, histogram
    equalisation, solarize above a random threshold in [0.5, 1], and random erasing (a rectangle of 2-33% of the
    area, aspect 0.3-3.3, filled with uniform noise). Crop and flip come from the victim's usual ``pad``/``flip``.
    The ops are chosen to break the low-amplitude, high-frequency, colour- and level-exact patterns that
    error-minimising noise relies on while keeping shapes.
    """
    n, c, h, w = x.shape
    dev = x.device

    def pick() -> torch.Tensor:
        return (_rand(n, generator, dev) < p).view(n, 1, 1, 1)

    amp = _rand(n, generator, dev).view(n, 1, 1, 1) * 0.3
    x = torch.where(pick(), x + amp * _plasma(n, h, w, generator, dev), x).clamp(0, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    scale = 1 + 0.6 * _plasma(n, h, w, generator, dev)
    x = torch.where(pick(), mean + (x - mean) * scale, x).clamp(0, 1)
    if c == 3:
        perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)]).to(dev)
        shuffled = x.gather(1, perms.view(n, 3, 1, 1).expand(n, 3, h, w))
        x = torch.where(pick(), shuffled, x)
    bits = torch.randint(2, 5, (n,), generator=generator).to(dev).view(n, 1, 1, 1)
    step = 2.0 ** (8 - bits)
    x = torch.where(pick(), torch.floor(x * 255 / step) * step / 255, x)
    x = torch.where(pick(), equalize(x), x)
    threshold = 0.5 + 0.5 * _rand(n, generator, dev).view(n, 1, 1, 1)
    x = torch.where(pick() & (x >= threshold), 1 - x, x)
    area = (0.02 + 0.31 * _rand(n, generator, dev)) * h * w
    aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * _rand(n, generator, dev))
    bh = (area * aspect).sqrt().round().clamp(1, h).long()
    bw = (area / aspect).sqrt().round().clamp(1, w).long()
    box = _boxes(n, h, w, bh, bw, generator, dev) & pick()
    fill = torch.rand(x.shape, generator=generator).to(dev)
    return torch.where(box, fill, x)


def pgd_maximize(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float,
    steps: int = AT_STEPS,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Madry et al.'s L-inf PGD attack for adversarial training: a uniform random start in the eps-ball (when a
    generator is given), then ``steps`` signed-gradient ascent steps of ``step_size`` (default eps/4) on the
    cross-entropy (hard or soft targets), each projected onto the eps-ball and [0, 1]. Returns the adversarial
    images x + delta, detached, with |delta| <= eps. The model's mode is the caller's; its parameters get no
    gradient."""
    return (
        x + pgd_perturbation(model, x, targets, eps=eps, steps=steps, step_size=step_size, generator=generator)
    ).detach()


def pgd_perturbation(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float,
    steps: int = AT_STEPS,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The perturbation ``pgd_maximize`` adds, detached: |delta| <= eps and x + delta in [0, 1]. ``model`` is any
    callable from images to logits (the noise engine passes its autocast, compiled forward); the robust noise's
    inner maximisation is this attack."""
    step_size = eps * AT_STEP_FRACTION if step_size is None else step_size
    if generator is not None:
        delta = (torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = project(delta, x, eps)
    with torch.enable_grad():
        for _ in range(steps):
            image = (x + delta).requires_grad_(True)
            loss = F.cross_entropy(model(image), targets)
            (grad,) = torch.autograd.grad(loss, image)
            delta = project(delta + step_size * grad.sign(), x, eps)
    return delta.detach()


Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
Adversary = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def batch_augment(cm: Countermeasure, num_classes: int) -> Augment | None:
    """The training loop's per-batch transform for a training-time countermeasure: (images, labels, generator) to
    (images, targets), targets being the labels or, for mixup/cutmix, probabilities N x num_classes. None for the
    others (at is an ``adversary``)."""
    if cm.name == "cutout":
        return lambda x, y, g: (cutout(x, g, float(cm.value)), y)
    if cm.name == "ueraser":
        return lambda x, y, g: (ueraser(x, g), y)
    if cm.name == "mixup":
        return lambda x, y, g: mixup(x, one_hot(y, num_classes), g, float(cm.value))
    if cm.name == "cutmix":
        return lambda x, y, g: cutmix(x, one_hot(y, num_classes), g, float(cm.value))
    return None


def adversary(cm: Countermeasure) -> Adversary | None:
    """For ``at:EPS``, the attack the training loop runs on each batch before its step; None for the others."""
    if cm.name != "at":
        return None
    eps = float(cm.value)
    return lambda model, x, targets, g: pgd_maximize(model, x, targets, eps=eps, generator=g)
