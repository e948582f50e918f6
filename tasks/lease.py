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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL, PREFECT_HOME

from embedder.io.atomic import atomic_write_text


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def uses_embedded_server() -> bool:
    """True when no API URL is set, so each process runs its own temporary server."""
    return not PREFECT_API_URL.value()


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


def recover_stale_slots(limit_name: str) -> int:
    """Free slots held by dead holders on the embedded server; return how many were freed.

    Only slots whose every registered holder is dead (by pid, on this host) and
    past its lease expiry are freed, so a live holder is never robbed.
    """
    if not uses_embedded_server():
        return 0  # a real server reclaims expired leases itself
    with _holders_lock(limit_name):
        holders = _read_holders(limit_name)
        host = socket.gethostname()
        now = time.time()
        alive = [h for h in holders if h.get("host") != host or _pid_alive(int(h.get("pid", -1)))
                 or now < float(h.get("expires_at", 0))]
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name)
            stale = max(0, limit.active_slots - len(alive))
            if stale:
                client.update_global_concurrency_limit(
                    limit_name, GlobalConcurrencyLimitUpdate(active_slots=limit.active_slots - stale)
                )
        _write_holders(limit_name, alive)
    return stale


@contextlib.contextmanager
def gpu_lease(limit_name: str, stage: str, *, timeout_s: float, lease_duration_s: float) -> Iterator[dict[str, Any]]:
    """Hold the GPU slot for one stage and yield its lease event (filled in on release)."""
    ensure_gpu_limit(limit_name)
    freed = recover_stale_slots(limit_name)
    if freed:
        get_run_logger().warning("freed %d GPU slot(s) left by dead holders of %r", freed, limit_name)
    event: dict[str, Any] = {"stage": stage, "limit_name": limit_name, "requested_at": _now()}
    t0 = time.monotonic()
    with concurrency(limit_name, occupy=1, strict=True, timeout_seconds=timeout_s,
                     lease_duration=lease_duration_s):
        event["acquired_at"] = _now()
        event["wait_s"] = round(time.monotonic() - t0, 3)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
              "expires_at": time.time() + lease_duration_s}
        with _holders_lock(limit_name):
            _write_holders(limit_name, [*_read_holders(limit_name), me])
        try:
            yield event
        finally:
            with _holders_lock(limit_name):
                holders = _read_holders(limit_name)
                if me in holders:
                    holders.remove(me)
                _write_holders(limit_name, holders)
    event["released_at"] = _now()
