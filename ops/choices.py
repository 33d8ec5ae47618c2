"""What the settings can say, without torch: the choice lists, defaults and parsers that the config and the CLI
need. Importing this module (and so ``pipeline.config`` and ``pipeline.cli``) must not import torch: ``unlearnable
status`` and ``verify`` start without it (importing torch takes about 2 s a call on a small CPU). The modules that do
the work (``ops.engine``, ``ops.image``, ``ops.noise``, ``ops.robust``) take their vocabulary from here."""

from __future__ import annotations

import math
from fractions import Fraction

# The noise engine's precision (ops.engine.resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16")
# How the surrogate is compiled: auto = torch.compile's default mode on a CUDA GPU, eager elsewhere; off = eager;
# the others are torch.compile modes (reduce-overhead adds CUDA graphs).
COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
# A sample counts as converged when the surrogate gives its released image the right class with probability >= 0.99
# (cross-entropy below -ln 0.99 ~= 0.01): a long way from the decision boundary that the error stop rule counts at
# (p < 0.5 at best), so another round of steps would only push an already near-zero loss lower. The sample is
# checked again every round, so one the retrained surrogate has drifted away from gets its steps back.
CONVERGED_LOSS = -math.log(0.99)

# The largest image (width x height) a sample may decode to.
DEFAULT_MAX_PIXELS = 50_000_000
# The release's encodings: --encode-format -> the member extension the release gives the protected image.
ENCODE_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
LOSSY_FORMATS = ("jpeg", "webp")
DEFAULT_ENCODE_QUALITY = 90

# --robust: off is the paper's min-min noise, on the robust recipe (ops.robust).
ROBUST_CHOICES = ("off", "on")


def parse_fraction(text: str | float) -> float:
    """Parse ``8/255`` or ``0.0313`` into a float; raises ValueError with the offending text."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"not a number or fraction: {text!r}") from exc


def robust_choice(value: str) -> str:
    """``--robust``'s value, normalised (off or on); ValueError (one line) for anything else."""
    choice = str(value).strip().lower()
    if choice not in ROBUST_CHOICES:
        raise ValueError(f"--robust must be one of {', '.join(ROBUST_CHOICES)}, not {value!r}")
    return choice
