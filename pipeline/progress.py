"""A run one can follow: a log line at least every ``EVERY_S`` seconds in every phase.

The stages log their own progress (shards done of total, images/s, time left), but one unit of work can outlast any
fixed interval: a training stage on a large batch, the probe, one big shard. ``Heartbeat`` watches the run's log and,
whenever nothing was logged for ``EVERY_S`` seconds, logs what the run is doing and for how long, so that
``ray job logs -f`` never falls silent while the run is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Self

EVERY_S = 30.0


def eta(done: float, total: float, elapsed: float) -> str:
    """The time left at the pace so far, as text for a progress line ('' until something is done)."""
    if done <= 0 or total <= done:
        return ""
    left = elapsed / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


class _Seen(logging.Handler):
    """Notes when the watched logger last emitted a record."""

    def __init__(self, beat: Heartbeat) -> None:
        super().__init__(level=logging.INFO)
        self.beat = beat

    def emit(self, record: logging.LogRecord) -> None:
        self.beat.last = time.monotonic()


class Heartbeat:
    """Logs "<phase>: still at work, N s in this phase" when ``logger`` (and its children) were silent ``every``
    seconds. ``phase(text)`` names what the run does now; ``None`` pauses the heartbeat."""

    def __init__(self, logger: logging.Logger, every: float = EVERY_S) -> None:
        self.logger, self.every = logger, every
        self.last = time.monotonic()
        self._phase: str | None = None
        self._since = self.last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handler = _Seen(self)
        self._thread: threading.Thread | None = None

    def phase(self, text: str | None) -> None:
        with self._lock:
            if text != self._phase:
                self._phase, self._since = text, time.monotonic()

    def __enter__(self) -> Self:
        self.logger.addHandler(self._handler)
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.logger.removeHandler(self._handler)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            now = time.monotonic()
            with self._lock:
                phase, since = self._phase, self._since
            if phase is not None and now - self.last >= self.every:
                self.logger.info("%s: still at work, %.0f s in this phase", phase, now - since)
