"""The GPU lease: one Prefect global concurrency slot around every GPU stage.

Prefect does not create a global concurrency limit on first use, and with the
default ``strict=False`` a missing limit is silently not enforced. So the limit
is upserted before use and acquired with ``strict=True``.

The embedded (ephemeral) server never reclaims the slot of a holder that died
hard. Holders therefore register themselves in a small file beside the Prefect
database (pid, host, lease expiry); before waiting, a run on the embedded
server frees slots whose every registered holder is dead and past its lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency._asyncio import AcquireConcurrencySlotTimeoutError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL, PREFECT_HOME

from embedder.errors import StageError
from embedder.io.atomic import atomic_write_text


def _now() -> str:
    return datetime.now(UTC).isoformat()


def uses_embedded_server() -> bool:
    """True for servers whose holders all live on this host: the embedded one, or one on loopback.

    Those (the ephemeral server, a test harness, a `prefect server start` on
    127.0.0.1) may lack the service that reclaims expired leases, and every
    holder is a local process whose pid can be checked. A remote server reclaims
    leases itself, and its holders may be on other hosts, so it is left alone.
    """
    url = PREFECT_API_URL.value()
    if not url:
        return True
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _holders_file(limit_name: str) -> Path:
    return Path(PREFECT_HOME.value()) / "embedder-leases" / f"{limit_name}.json"


def _read_holders(limit_name: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(_holders_file(limit_name).read_text())
        return data if isinstance(data, list) else []
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_holders(limit_name: str, holders: list[dict[str, Any]]) -> None:
    atomic_write_text(_holders_file(limit_name), json.dumps(holders))


@contextlib.contextmanager
def _holders_lock(limit_name: str) -> Iterator[None]:
    import fcntl

    path = _holders_file(limit_name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_gpu_limit(limit_name: str, slots: int = 1) -> None:
    """Create the global concurrency limit if it is missing (an existing limit keeps its size)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            client.upsert_global_concurrency_limit_by_name(limit_name, slots)


def _recover_locked(limit_name: str) -> int:
    if not uses_embedded_server():
        return 0  # a remote server reclaims expired leases itself, and its holders may be elsewhere
    holders = _read_holders(limit_name)
    host = socket.gethostname()
    now = time.time()
    alive = [h for h in holders if h.get("host") != host or _pid_alive(int(h.get("pid", -1)))
             or now < float(h.get("expires_at", 0))]
    stale = 0
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name)
        stale = max(0, limit.active_slots - len(alive))
        if stale:
            client.update_global_concurrency_limit(
                limit_name, GlobalConcurrencyLimitUpdate(active_slots=limit.active_slots - stale)
            )
    if len(alive) != len(holders):
        _write_holders(limit_name, alive)
    return stale


def recover_stale_slots(limit_name: str) -> int:
    """Free slots held by dead holders on a local server; return how many were freed.

    Every local holder is registered (under a file lock, in the same critical
    section as its acquisition), so a slot is freed only when the server counts
    more active slots than there are registered holders that are alive or still
    inside their lease.
    """
    with _holders_lock(limit_name):
        return _recover_locked(limit_name)


RECHECK_S = 5.0


@contextlib.contextmanager
def gpu_lease(limit_name: str, stage: str, *, timeout_s: float, lease_duration_s: float) -> Iterator[dict[str, Any]]:
    """Hold the GPU slot for one stage and yield its lease event (filled in on release).

    The wait is cut into slices of at most ``RECHECK_S`` seconds; between slices,
    slots left by dead holders whose lease has run out are freed, so a crashed
    run delays the next one by its lease duration, never for ever.

    Raises:
        StageError: If the slot is not acquired within ``timeout_s``.
    """
    ensure_gpu_limit(limit_name)
    log = get_run_logger()
    event: dict[str, Any] = {"stage": stage, "limit_name": limit_name, "requested_at": _now()}
    t0 = time.monotonic()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage}
    with contextlib.ExitStack() as stack:
        while True:
            remaining = timeout_s - (time.monotonic() - t0)
            if remaining <= 0:
                raise StageError(
                    f"the GPU slot {limit_name!r} was not free within {timeout_s:.0f} s; another run holds it "
                    "(see the Prefect UI's concurrency page)"
                )
            # Recovery, acquisition and registration form one critical section: no other local
            # process can count the slot before its holder is registered.
            with _holders_lock(limit_name):
                freed = _recover_locked(limit_name)
                if freed:
                    log.warning("freed %d GPU slot(s) of %r left by dead holders", freed, limit_name)
                try:
                    stack.enter_context(concurrency(limit_name, occupy=1, strict=True,
                                                    timeout_seconds=min(remaining, RECHECK_S),
                                                    lease_duration=lease_duration_s))
                except AcquireConcurrencySlotTimeoutError:
                    continue
                me["expires_at"] = time.time() + lease_duration_s
                _write_holders(limit_name, [*_read_holders(limit_name), me])
                break
        event["acquired_at"] = _now()
        event["wait_s"] = round(time.monotonic() - t0, 3)
        yield event
    # Deregister only after the slot is released: until then the entry must count as a holder.
    event["released_at"] = _now()
    with _holders_lock(limit_name):
        holders = _read_holders(limit_name)
        if me in holders:
            holders.remove(me)
            _write_holders(limit_name, holders)
