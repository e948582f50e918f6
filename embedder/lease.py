"""What a stage's hold on the GPU slot records: the lease itself is the orchestrator's (``tasks.lease``).

Stages receive the GPU lease as a context manager factory (:data:`GpuLease`)
that yields a :class:`LeaseHolding`; they add the time they spent on GPU work,
and the summary turns the holding into a :class:`embedder.summary.LeaseEvent`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

from embedder.summary import LeaseEvent


@dataclass
class LeaseHolding:
    """One hold of a concurrency slot, filled in as it happens (acquired, then released)."""

    stage: str
    limit_name: str
    host: str
    requested_at: str
    recovery: Literal["prefect", "embedder"]
    lease_id: str | None = None
    acquired_at: str | None = None
    released_at: str | None = None
    wait_s: float = 0.0
    held_s: float | None = None
    gpu_work_s: float | None = None

    def event(self) -> LeaseEvent | None:
        """The summary's record of this holding; None until the slot was both taken and given back."""
        if self.acquired_at is None or self.released_at is None:
            return None
        return LeaseEvent(stage=self.stage, limit_name=self.limit_name, requested_at=self.requested_at,
                          acquired_at=self.acquired_at, released_at=self.released_at, wait_s=self.wait_s,
                          lease_id=self.lease_id, host=self.host, held_s=self.held_s, gpu_work_s=self.gpu_work_s,
                          recovery=self.recovery)


GpuLease = Callable[[], AbstractContextManager[LeaseHolding]]
"""Opens the GPU lease for the calling stage (the orchestrator binds the limit and its timeouts)."""


@contextlib.contextmanager
def gpu_work(gpu: GpuLease | None, needed: bool = True) -> Iterator[LeaseHolding | None]:
    """Hold the GPU lease around a stage's GPU work and record how long that work took.

    Yields None (and takes nothing) when there is no lease to take or no work
    that needs it. A stage that knows its device time better (an engine's own
    count) sets ``gpu_work_s`` itself; otherwise it is the time inside.

    Args:
        gpu: The lease factory the orchestrator passed, or None.
        needed: Whether this call does GPU work at all.
    """
    if gpu is None or not needed:
        yield None
        return
    with gpu() as holding:
        t0 = time.perf_counter()
        try:
            yield holding
        finally:
            if holding.gpu_work_s is None:
                holding.gpu_work_s = round(time.perf_counter() - t0, 3)
