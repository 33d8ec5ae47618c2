"""Markers: small JSON files written last that say a unit of work is done, bound to the run's config hash.

A unit is done iff its marker exists and carries the run's config hash; files without a marker are garbage
and are overwritten.
"""

from __future__ import annotations

import json

from pipeline.storage import fs


def write_marker(url: str, config_hash: str, **payload) -> None:
    fs.write_bytes(url, json.dumps({"config_hash": config_hash, **payload}, indent=2, sort_keys=True).encode())


def read_marker(url: str) -> dict | None:
    try:
        marker = json.loads(fs.read_bytes(url))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn or foreign marker counts as absent: the unit is redone
    return marker if isinstance(marker, dict) else None


def is_done(url: str, config_hash: str) -> bool:
    marker = read_marker(url)
    return marker is not None and marker.get("config_hash") == config_hash
