"""Stopping a run between batches: a process-wide stop request that every batch loop checks.

A signal handler (the CLI's) only records the request; each stage's batch loop
(dense, sparse, rerank, index, the lease waits) calls :func:`raise_if_stopped`
between batches, so the run unwinds through its normal error paths: leases are
released, a summary is published, and the interpreter exits normally.
"""

from __future__ import annotations

import threading

from embedder.errors import RunCancelledError

_requested = threading.Event()
_reason: list[str] = []


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
    """
    if _requested.is_set():
        raise RunCancelledError(f"run stopped by {stop_reason()}")


def clear() -> None:
    """Forget a stop request (a new run in the same process)."""
    _requested.clear()
    _reason.clear()
