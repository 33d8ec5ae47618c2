"""``--cache disk``: a worker's decoded native images in one file on the worker's local disk.

The stop check needs every accepted image of a shard at native size once per round (the noise is added at native
size, then the image is resized as a victim resizes it). ``memory`` keeps them decoded in RAM, ``none`` decodes the
shard from the input again; ``disk`` writes them once, raw, at load and reads them back in order: no decode per
round, and the worker's memory holds the shard being loaded, then a few images at a time. The file is an anonymous
temporary file under the system's temporary directory (``TMPDIR``): it has no name, so it goes with the worker's
process however that ends (a SIGKILL included) and nothing is left behind. It holds the input's own pixels, never
noise.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ops.image import DecodedImage


class DiskCache:
    """A worker's cache file; ``put`` appends one shard's images and returns its ``DiskShard``."""

    def __init__(self, root: str | None = None):
        self.file = tempfile.TemporaryFile(dir=root)  # noqa: SIM115 - held for the worker's life, closed by close()
        self.bytes = 0

    def put(self, natives: Iterable[DecodedImage]) -> DiskShard:
        start, shapes = self.bytes, []
        self.file.seek(start)
        for image in natives:
            self.file.write(image.color.contiguous().numpy().tobytes())
            if image.alpha is not None:
                self.file.write(image.alpha.contiguous().numpy().tobytes())
            shapes.append((tuple(image.color.shape), image.alpha is not None))
        self.file.flush()
        self.bytes = self.file.tell()
        return DiskShard(self, start, tuple(shapes))

    def read(self, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        data = os.pread(self.file.fileno(), n, offset)
        if len(data) != n:
            raise RuntimeError(f"--cache disk: the cache file ends at byte {offset + len(data)}, {n} expected")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(shape)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class DiskShard:
    """One shard's natives in the cache file: iterating yields them in order (colour, then alpha when there is one)."""

    cache: DiskCache
    offset: int
    shapes: tuple[tuple[tuple[int, ...], bool], ...]  # per image: colour shape (C, H, W), has alpha

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[DecodedImage]:
        offset = self.offset
        for (c, h, w), has_alpha in self.shapes:
            color = self.cache.read(offset, (c, h, w))
            offset += c * h * w
            alpha = None
            if has_alpha:
                alpha = self.cache.read(offset, (h, w))
                offset += h * w
            yield DecodedImage(color, alpha)
