"""Optional per-stage timers of a run: which stage bounds it (reading, the host-to-device copy,
compute or the writer).

The driver overlaps its stages on three threads (``run.execute``): reading and the copy to the
device on one, dispatch on another, and the copy back and the writes on the writer's. Within
``with stages.record() as times:`` each stage's busy time is summed (seconds, over every
minibatch of every run inside the block):

* ``read``: reading a minibatch from the input and its non-zero scan (reading thread);
* ``copy``: the host-to-device copy of its arrays, waited for (reading thread);
* ``compute``: the writer waiting for a minibatch's scores, i.e. the device's work not hidden
  behind the other stages;
* ``fetch``: the device-to-host copy of the scores; ``write``: writing them into the sink.

A stage whose time is close to the run's wall clock bounds it. Outside ``record`` nothing is
timed or waited for; inside, the copies are waited for on the reading thread, so a recorded run
can be slightly slower.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
STAGES = ("read", "copy", "compute", "fetch", "write")


class StageTimes:
    """Seconds and counts per stage (thread-safe sums)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.counts = dict.fromkeys(STAGES, 0)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.counts[stage] = self.counts.get(stage, 0) + 1

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {f"{k}_s": v for k, v in self.seconds.items()}


_active: StageTimes | None = None


@contextlib.contextmanager
def record() -> Iterator[StageTimes]:
    """Time the stages of every run inside the block (one recording at a time)."""
    global _active
    if _active is not None:
        raise RuntimeError("stages.record() is already recording.")
    times = _active = StageTimes()
    try:
        yield times
    finally:
        _active = None


def iterate(stage: str, items: Iterable[T]) -> Iterator[T]:
    """``items``, each ``next`` timed as ``stage`` while recording."""
    it = iter(items)
    while True:
        times = _active
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        if times is not None:
            times.add(stage, time.perf_counter() - t0)
        yield item


def call(stage: str, fn: Callable[..., T], *args: Any, wait: bool = False) -> T:
    """``fn(*args)``, timed as ``stage`` while recording (``wait``: until its arrays are ready)."""
    times = _active
    if times is None:
        return fn(*args)
    t0 = time.perf_counter()
    out = fn(*args)
    if wait:
        import jax

        jax.block_until_ready(out)
    times.add(stage, time.perf_counter() - t0)
    return out


def wait(stage: str, tree: Any) -> None:
    """While recording, wait until ``tree``'s arrays are computed, timed as ``stage``."""
    times = _active
    if times is not None:
        import jax

        t0 = time.perf_counter()
        jax.block_until_ready(tree)
        times.add(stage, time.perf_counter() - t0)
