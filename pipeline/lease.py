"""The lease in the work dir that stops a second coordinator on the same run.

The holder refreshes its heartbeat from a background thread; a lease whose heartbeat is older than ``LEASE_TTL``
(or, on the same host, whose process is gone) is stale and is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.storage import fs

log = logging.getLogger(__name__)
LEASE_TTL = 90.0
HEARTBEAT = 15.0


class LeaseHeld(RuntimeError):
    """Another live coordinator holds this run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, url: str) -> None:
        self.url = url
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {"owner": self.owner, "host": self.host, "pid": os.getpid(), "heartbeat": time.time()}
        ).encode()

    def acquire(self) -> None:
        try:
            held = json.loads(fs.read_bytes(self.url))
        except (FileNotFoundError, ValueError):
            held = None
        if held and held.get("owner") != self.owner:
            age = time.time() - float(held.get("heartbeat", 0))
            dead = held.get("host") == self.host and not _alive(int(held.get("pid", -1)))
            if age < LEASE_TTL and not dead:
                raise LeaseHeld(
                    f"another coordinator (pid {held.get('pid')} on {held.get('host')}) is running this "
                    f"job (heartbeat {age:.0f}s ago); wait for it to finish, or stop it and rerun"
                )
            log.warning(
                "taking over a stale lease from pid %s on %s (heartbeat %.0fs ago)",
                held.get("pid"),
                held.get("host"),
                age,
            )
        fs.write_bytes(self.url, self._record())
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                fs.write_bytes(self.url, self._record())
            except OSError as exc:  # a missed heartbeat is not fatal; the next one retries
                log.warning("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = json.loads(fs.read_bytes(self.url))
            if held.get("owner") == self.owner:
                fs.remove(self.url)
        except (FileNotFoundError, ValueError):
            pass
