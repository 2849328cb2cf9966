"""Holding the serving engine between decode steps, so that a test sees a request still
running however slow or busy the machine is (no test waits on the clock for that)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


@contextmanager
def gated_steps(engine):
    """Inside the block, the engine's worker waits before each decode step until
    `gate.set()` (prefill still runs, so an admitted sequence has its first token); the gate
    opens on exit."""
    gate = threading.Event()
    real = engine._decode

    def gated(batch):
        gate.wait()
        return real(batch)

    engine._decode = gated
    try:
        yield gate
    finally:
        gate.set()
        engine._decode = real


def wait_for(condition, what: str, limit_s: float = 120) -> None:
    """Poll `condition` until it holds; `limit_s` only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
