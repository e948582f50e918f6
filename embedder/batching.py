"""Batched execution with out-of-memory back-off, shared by the dense and rerank stages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from embedder.gpu import free_device_cache, is_oom

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPlan:
    """The starting batch size and the floor below which OOM back-off gives up."""

    size: int
    floor: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.floor < 1 or self.floor > self.size:
            raise ValueError(f"invalid batch plan: size={self.size}, floor={self.floor}")


@dataclass
class BatchRun(Generic[T]):
    """Outputs in input order plus the batch sizes used."""

    outputs: list[T]
    final_batch_size: int
    backoffs: list[int] = field(default_factory=list)


def run_batched(
    n_items: int,
    fn: Callable[[int, int], Sequence[T]],
    plan: BatchPlan,
    *,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> BatchRun[T]:
    """Call ``fn(start, end)`` over ``[0, n_items)`` in slices, halving the slice on OOM.

    Args:
        n_items: How many items to process.
        fn: Processes items ``[start, end)`` and returns one output per item.
        plan: Starting batch size and floor.
        device: For freeing the cache between retries.
        on_progress: Called with ``(done, total)`` after each slice.
        should_stop: Called with ``done`` after each slice; True stops early
            (the latency budget uses it).

    Raises:
        StageError: When even the floor batch size runs out of memory.
    """
    size = plan.size
    backoffs: list[int] = []
    outputs: list[T] = []
    start = 0
    while start < n_items:
        raise_if_stopped()
        end = min(n_items, start + size)
        try:
            out = fn(start, end)
        except Exception as exc:
            if not is_oom(exc):
                raise
            backoffs.append(size)
            free_device_cache(device)
            if size <= plan.floor:
                raise StageError(
                    f"out of memory even at the minimum batch size {plan.floor}; lower the model's max length "
                    "or raise gpu_memory_ceiling_gb"
                ) from exc
            size = max(plan.floor, size // 2)
            log.warning("out of memory at batch %d; retrying with %d", backoffs[-1], size)
            continue
        if len(out) != end - start:
            raise StageError(f"batch returned {len(out)} outputs for {end - start} inputs")
        outputs.extend(out)
        start = end
        if on_progress is not None:
            on_progress(start, n_items)
        if should_stop is not None and start < n_items and should_stop(start):
            break
    return BatchRun(outputs=outputs, final_batch_size=size, backoffs=backoffs)
