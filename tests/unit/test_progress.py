"""Following a run: the heartbeat speaks only when the run's log has been silent for its interval."""

from __future__ import annotations

import logging
import time

from pipeline.progress import Heartbeat, eta


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger(name: str) -> tuple[logging.Logger, _Lines]:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    lines = _Lines()
    logger.addHandler(lines)
    return logger, lines


def test_a_silent_phase_gets_a_line_every_interval_and_a_talkative_one_gets_none():
    logger, lines = _logger("test_progress.silent")
    child = logging.getLogger("test_progress.silent.stage")  # the stages log through child loggers
    with Heartbeat(logger, every=0.2) as beat:
        beat.phase("round 3 train")
        time.sleep(0.75)
        beats = [line for line in lines.lines if "still at work" in line]
        assert 2 <= len(beats) <= 4, lines.lines
        assert beats[0].startswith("round 3 train: still at work")
        lines.lines.clear()
        for _ in range(10):  # a stage that logs its own progress more often than the interval
            child.info("round 3 noise: a shard done")
            time.sleep(0.05)
        assert not [line for line in lines.lines if "still at work" in line], lines.lines
        beat.phase(None)  # paused (between phases, or the run is over)
        lines.lines.clear()
        time.sleep(0.5)
        assert lines.lines == []
    assert not logger.handlers[1:]  # the heartbeat's own watcher is removed on exit


def test_eta_is_the_pace_so_far():
    assert eta(0, 10, 5.0) == "" and eta(10, 10, 5.0) == ""
    assert eta(2, 10, 10.0) == ", about 40 s left"
    assert eta(1, 10, 100.0) == ", about 15 min left"
