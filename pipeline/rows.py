"""A worker's rows at the working resolution (its images and their noise levels) in a file on its local disk.

With ``--cache disk`` or ``none`` (and ``auto`` when a worker's share would not fit its budget), a worker keeps its
working images (uint8) and sample-wise noise levels (int8) here instead of in memory: each stage reads the rows it
needs (a batch, a shard's range) and writes back the noise it updates, so a worker's memory holds a batch, not its
share. The train stage's random batches read their rows one at a time; the operating system's page cache keeps what
fits. The file is an anonymous temporary file under the system's temporary directory (``TMPDIR``), like
``--cache disk``'s native images (``pipeline.native_cache``): it has no name, so it goes with the worker's process
however that ends, and the noise in it never lands anywhere but the work dir's state, which the run commits itself.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from ops.engine import to_device


class RowFile:
    """Rows of one shape and dtype in a file: ``shape``, ``append``, reads by slice or index tensor (a tensor on
    ``device``) and writes by slice (a tensor, or a number for every element), as a tensor of the rows would."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, root: str | None = None):
        self.file = tempfile.TemporaryFile(dir=root)  # noqa: SIM115 - held for the worker's life, closed by close()
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.target = torch.device(device)
        self.row_bytes = math.prod(self.row_shape) * torch.empty(0, dtype=dtype).element_size()
        self.rows = 0

    # What the stages ask of a tensor of rows: its shape and where index tensors for it live (the host).
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: torch.Tensor) -> None:
        """Rows after the last one (moved to the host)."""
        self._check(rows)
        self._write(self._bytes(rows), self.rows * self.row_bytes)
        self.rows += rows.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.rows)
            if step != 1:
                raise IndexError("RowFile reads slices of step 1")
            out = torch.empty(max(0, stop - start), *self.row_shape, dtype=self.dtype)
            self._read_into(out, start)
        else:
            rows = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
            out = torch.empty(len(rows), *self.row_shape, dtype=self.dtype)
            for i, row in enumerate(rows):
                if not -self.rows <= row < self.rows:
                    raise IndexError(f"row {row} of {self.rows}")
                self._read_into(out[i : i + 1], row % self.rows)
        return to_device(out, self.target)

    def __setitem__(self, index: slice, value) -> None:
        if not isinstance(index, slice):
            raise IndexError("RowFile writes slices")
        start, stop, step = index.indices(self.rows)
        if step != 1:
            raise IndexError("RowFile writes slices of step 1")
        n = max(0, stop - start)
        if isinstance(value, torch.Tensor):
            self._check(value)
            if value.shape[0] != n:
                raise ValueError(f"{value.shape[0]} rows written to a slice of {n}")
            data = self._bytes(value)
        else:
            data = self._bytes(torch.full((n, *self.row_shape), value, dtype=self.dtype))
        self._write(data, start * self.row_bytes)

    def close(self) -> None:
        self.file.close()

    def _read_into(self, out: torch.Tensor, start: int) -> None:
        """Rows from ``start`` on, straight into ``out`` (contiguous, on the host)."""
        if not out.numel():
            return
        view, offset = memoryview(out.numpy()).cast("B"), start * self.row_bytes
        while len(view):  # one call reads at most about 2 GB
            got = os.preadv(self.file.fileno(), [view], offset)
            if got == 0:
                raise RuntimeError(f"the rows file ends at byte {offset}, {len(view)} more expected")
            view, offset = view[got:], offset + got

    def _write(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        while len(view):  # one call writes at most about 2 GB
            done = os.pwrite(self.file.fileno(), view, offset)
            view, offset = view[done:], offset + done

    def _check(self, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"rows of {tuple(rows.shape[1:])} {rows.dtype}, not {self.row_shape} {self.dtype}")

    def _bytes(self, rows: torch.Tensor) -> memoryview | bytes:
        if not rows.numel():
            return b""
        return memoryview(rows.detach().to("cpu").contiguous().numpy()).cast("B")
