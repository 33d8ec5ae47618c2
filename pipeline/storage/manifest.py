"""Per-sample manifests (Parquet): one row per input sample, ``protected`` or ``rejected`` with its error.

``source_sha256`` (a hash of each original) is written only when the run asks for it (``--manifest-source-hash``):
a public hash of every original lets anyone confirm a guessed original.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("label", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("source_sha256", pa.string()),
        ("output_sha256", pa.string()),
        ("output_member", pa.string()),
        ("linf", pa.int64()),
        ("l2", pa.float64()),
        ("psnr", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
PUBLIC_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "source_sha256"])


def row(key: str, shard: str, status: str, **fields) -> dict:
    out = {name: None for name in COLUMNS}
    out.update(key=key, shard=shard, status=status, **fields)
    unknown = set(out) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown manifest columns: {sorted(unknown)}")
    return out


def to_parquet(rows: list[dict], source_hash: bool = False) -> bytes:
    schema = SCHEMA if source_hash else PUBLIC_SCHEMA
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def from_parquet(data: bytes) -> pa.Table:
    """A Parquet file's rows. Read with ``ParquetFile``, not ``pq.read_table``: a table read through pyarrow's dataset
    scanner and still alive at interpreter exit aborted the process there a third to a half of the time (pyarrow 26,
    'terminate called without an active exception', exit 134), after the command's work was done."""
    return pq.ParquetFile(io.BytesIO(data)).read()


def merge(parts: Iterable[bytes], out: BinaryIO, source_hash: bool = False) -> int:
    """One manifest of all shards' rows, in the order given (the plan's shard order), written to ``out`` a shard at a
    time (one row group each): memory holds one shard's rows, not the corpus's. Returns the rows written."""
    schema = SCHEMA if source_hash else PUBLIC_SCHEMA
    rows = 0
    with pq.ParquetWriter(out, schema) as writer:
        for part in parts:
            table = from_parquet(part).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows
