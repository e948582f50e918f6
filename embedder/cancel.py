"""Stopping a run between batches: a process-wide stop request that every batch loop checks.

A signal handler (the CLI's) only records the request; each stage's batch loop
(dense, sparse, rerank, index, the lease waits) calls :func:`raise_if_stopped`
between batches, so the run unwinds through its normal error paths: leases are
released, a summary is published, and the interpreter exits normally.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator

from embedder.errors import RunCancelledError

_requested = threading.Event()
_reason: list[str] = []
# Checks of the calling context (a lease that must still be held) run wherever a stop is checked.
_guards: contextvars.ContextVar[tuple[Callable[[], None], ...]] = contextvars.ContextVar("embedder_guards",
                                                                                          default=())


def request_stop(reason: str) -> None:
    """Ask every running stage to stop at its next batch boundary.

    Args:
        reason: Why, as the summary will say it (for example ``"SIGTERM"``).
    """
    if not _requested.is_set():
        _reason[:] = [reason]
        _requested.set()


def stop_reason() -> str | None:
    """The reason of the pending stop request, or None when none was made."""
    return _reason[0] if _requested.is_set() and _reason else None


def raise_if_stopped() -> None:
    """Raise when a stop was requested; called between batches.

    Raises:
        RunCancelledError: Naming the reason.
        Exception: Whatever a :func:`guarded` check raises.
    """
    if _requested.is_set():
        raise RunCancelledError(f"run stopped by {stop_reason()}")
    for check in _guards.get():
        check()


@contextlib.contextmanager
def guarded(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check`` at every :func:`raise_if_stopped` of this context (thread) while inside.

    The GPU lease uses it: a lease that could not be renewed must stop the
    stage at its next batch, since the slot may already be another run's.

    Args:
        check: Raises when the work must stop.
    """
    token = _guards.set((*_guards.get(), check))
    try:
        yield
    finally:
        _guards.reset(token)


def clear() -> None:
    """Forget a stop request (a new run in the same process)."""
    _requested.clear()
    _reason.clear()
