"""Batched execution with out-of-memory back-off.

:func:`back_off` is the one answer to a failed batch, used by :func:`run_batched`
(rows at a time: the CPU paths, rerank) and by the token-budget engine
(:mod:`embedder.models.engine`): anything but an out-of-memory error goes up
unchanged; an OOM frees the device cache and the caller retries with half the
batch, until the floor, where the stage fails naming the settings to change.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from embedder.gpu import free_device_cache, is_oom

log = logging.getLogger(__name__)

T = TypeVar("T")


def back_off(exc: BaseException, *, device: str, size: int, backoffs: list[int], at_floor: bool,
             floor: str) -> None:
    """Decide about a batch that raised ``exc``: re-raise it, or record an OOM back-off from ``size``.

    On return the caller retries with a smaller batch.

    Args:
        exc: What the batch raised.
        device: Whose cache to free.
        size: The batch size (rows or padded tokens) that ran out of memory; appended to ``backoffs``.
        backoffs: The stage's back-off record.
        at_floor: The batch was already the smallest the caller will try.
        floor: That smallest batch, in words, for the error.

    Raises:
        BaseException: ``exc`` itself, when it is not an out-of-memory error.
        StageError: When an out-of-memory error happened at the floor.
    """
    if not is_oom(exc):
        raise exc
    backoffs.append(size)
    # The failed batch's tensors must be gone before the smaller retry (on CUDA, freeing the cache collects).
    if device.startswith("cuda"):
        free_device_cache(device)
    else:
        gc.collect()
    if at_floor:
        raise StageError(f"out of memory even at {floor}; lower the model's max length or raise "
                         "gpu.memory_ceiling_gb") from exc
    log.warning("out of memory at a batch of %d; retrying with half", size)


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
            back_off(exc, device=device, size=size, backoffs=backoffs, at_floor=size <= plan.floor,
                     floor=f"the minimum batch size {plan.floor}")
            size = max(plan.floor, size // 2)
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
