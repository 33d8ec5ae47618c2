"""Fault injection for resume tests: kill the coordinator, or a worker once, at the start of a named unit of work.

``UNLEARNABLE_FAULT=<where>:<unit>:<round>:<shard>`` with ``where`` = ``coordinator`` (SIGKILL the protect process)
or ``worker`` (the worker process exits once; ``UNLEARNABLE_FAULT_ONCE`` names the flag file that makes it once).
``unit`` is ``train``, ``noise``, ``check`` or ``export``; an empty round or shard matches any. Unset: no effect.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def _matches(where: str, unit: str, round_: int | None, shard: str | None) -> bool:
    spec = os.environ.get("UNLEARNABLE_FAULT")
    if not spec:
        return False
    parts = (spec.split(":") + ["", "", "", ""])[:4]
    w, u, r, s = parts
    return (
        w == where and u == unit and (r == "" or round_ is None or int(r) == round_) and (s == "" or s == (shard or ""))
    )


def at_unit(where: str, unit: str, round_: int | None = None, shard: str | None = None) -> None:
    if not _matches(where, unit, round_, shard):
        return
    if where == "coordinator":
        log.warning("fault hook: SIGKILL at %s round %s shard %s", unit, round_, shard)
        os.kill(os.getpid(), signal.SIGKILL)
    flag = os.environ.get("UNLEARNABLE_FAULT_ONCE")
    if flag and os.path.exists(flag):
        return
    if flag:
        open(flag, "w").close()
    log.warning("fault hook: worker exits at %s round %s shard %s", unit, round_, shard)
    os._exit(1)
