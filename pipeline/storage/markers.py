"""Markers: small JSON files written last that say a unit of work is done, bound to the run's config hash.

A unit is done iff its marker exists and carries the run's config hash; files without a marker are garbage
and are overwritten. This module is the one place that spells out the commit (write, verify, marker) and its
inverse, the checked load: a unit's data is trusted only when its sha256 matches the one its marker holds.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pipeline.storage import fs

log = logging.getLogger(__name__)


class DamagedUnit(Exception):
    """A unit's data is missing or does not match its marker: the unit must be recomputed, never loaded."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"{url}: {why}")
        self.url = url


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


def read_record(url: str) -> dict | None:
    """A JSON record of the work dir or the release (the run record, a probe record), or None when it is missing
    or damaged (a torn write or changed bytes: never trusted, and said in the log)."""
    try:
        record = json.loads(fs.read_bytes(url))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is damaged: ignored", url)
        return None
    return record if isinstance(record, dict) else None


def is_done(url: str, config_hash: str) -> bool:
    marker = read_marker(url)
    return marker is not None and marker.get("config_hash") == config_hash


def commit(url: str, data: bytes, marker_url: str, config_hash: str, **payload) -> str:
    """Write ``data`` (verified), then its marker with the data's sha256: the unit is done. Returns the sha256."""
    sha = fs.write_verified(url, data)
    write_marker(marker_url, config_hash, sha256=sha, **payload)
    return sha


def commit_files(files: dict[str, tuple[str, bytes]], marker_url: str, config_hash: str, **payload) -> dict:
    """Several files of one unit (a released shard: its tar and its manifest), ``{name: (url, data)}``, each written
    and verified, then one marker holding each one's sha256 as ``<name>_sha256``. Returns those hashes."""
    hashes = {f"{name}_sha256": fs.write_verified(url, data) for name, (url, data) in files.items()}
    write_marker(marker_url, config_hash, **payload, **hashes)
    return hashes


def load_checked(url: str, marker_url: str, config_hash: str) -> bytes:
    """The data of a done unit, checked against the sha256 its marker holds; ``DamagedUnit`` when it is missing,
    from another run, or does not match (a torn write, a truncated file, bytes changed by anyone)."""
    marker = read_marker(marker_url)
    if marker is None or marker.get("config_hash") != config_hash:
        raise DamagedUnit(url, "no marker of this run")
    if "sha256" not in marker:
        raise DamagedUnit(url, "its marker holds no sha256")
    try:
        data = fs.read_bytes(url)
    except FileNotFoundError:
        raise DamagedUnit(url, "missing") from None
    if hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise DamagedUnit(url, f"sha256 differs from its marker ({len(data)} bytes)")
    return data


def drop(*marker_urls: str) -> None:
    """Remove markers (a damaged unit and the units that depend on it): they will be recomputed."""
    for url in marker_urls:
        fs.remove(url)
