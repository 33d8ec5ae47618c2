"""The surrogate model zoo: a registry by name, builders, the optimiser and training step, checkpoints.

Imports only ``ops`` and torch; never ``pipeline`` or Ray.
"""

from surrogates.registry import available, build  # noqa: F401
