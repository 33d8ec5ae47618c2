"""``pipeline.rows.RowFile``: a worker's working images and noise levels in an unnamed file, read and written as a
tensor of the rows would be."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.rows import RowFile


def _rows(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128 if dtype == torch.int8 else 0, 128, (n, 3, 4, 5), dtype=dtype, generator=g)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_rows_read_back_as_the_tensor_they_were(dtype):
    held = torch.cat([_rows(7, dtype, 1), _rows(5, dtype, 2)])
    f = RowFile((3, 4, 5), dtype, torch.device("cpu"))
    f.append(held[:7])
    f.append(held[7:])
    assert f.shape == (12, 3, 4, 5) and len(f) == 12 and f.device.type == "cpu"
    assert torch.equal(f[:], held) and torch.equal(f[3:9], held[3:9]) and f[5:5].shape == (0, 3, 4, 5)
    index = torch.tensor([11, 0, 4, 4, -1])  # any order, repeats, from the end: as a tensor's rows
    assert torch.equal(f[index], held[index]) and f[index].dtype == dtype
    with pytest.raises(IndexError):
        f[torch.tensor([12])]
    with pytest.raises(IndexError):
        f[::2]


def test_writes_land_on_their_rows_and_the_file_has_no_name():
    f = RowFile((3, 4, 5), torch.int8, torch.device("cpu"))
    held = _rows(10, torch.int8, 3)
    f.append(held)
    new = _rows(3, torch.int8, 4)
    f[2:5] = new
    f[8:10] = 0
    held[2:5], held[8:10] = new, 0
    assert torch.equal(f[:], held)
    assert os.fstat(f.file.fileno()).st_nlink == 0  # gone with the process however it ends
    with pytest.raises(ValueError, match="rows written to a slice"):
        f[0:2] = new
    with pytest.raises(ValueError, match="not"):
        f.append(torch.zeros(1, 3, 4, 5, dtype=torch.uint8))  # another dtype
    with pytest.raises(IndexError):
        f[torch.tensor([1, 2])] = new[:2]
    f.file.truncate(3 * f.row_bytes + 7)  # a file cut short under the worker: an error, never rows of zeros
    assert torch.equal(f[0:3], held[0:3])
    with pytest.raises(RuntimeError, match="ends at byte"):
        f[0:5]
    f.close()
