"""The GPU lease: one Prefect global concurrency slot around every GPU stage.

Prefect does not create a global concurrency limit on first use, and with the
default ``strict=False`` a missing limit is silently not enforced. So the limit
is upserted before use and acquired with ``strict=True``.

A slot is held through a Prefect lease, renewed in the background while the
holder lives. What frees the slot of a holder that died hard (SIGKILL, OOM
kill, power loss) depends on the server:

- **A running server** (``PREFECT_API_URL`` set; loopback or remote): Prefect's
  own lease repossession frees it once the lease expires. Nothing here touches
  slots there: a second mechanism could free the same slot twice.
- **The ephemeral server** (no ``PREFECT_API_URL``): Prefect runs no
  repossession, so the slot would stay taken for ever. Leases are kept on disk
  under ``PREFECT_HOME`` (Prefect's filesystem lease storage) so that every
  process sharing the home, and so the database, can see them, and a waiting
  run releases a dead holder's lease by its lease id: exactly that holder's
  slot, once. A holder is dead only when its pid is gone from this host.

Every holder registers itself as a Prefect variable ``embedder-lease-<lease id>``
(lease id, limit, stage, pid, host, expiry refreshed with each renewal), so
``embed-collections gpu-slots`` lists holders from every process and host that
uses the server, whatever their ``PREFECT_HOME``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate, VariableUpdate
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger, get_run_logger
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from embedder.cancel import guarded, raise_if_stopped
from embedder.errors import StageError
from embedder.lease import LeaseHolding
from embedder.procs import owner, owner_dead
from embedder.settings import host_name

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
RECORD_PREFIX = "embedder-lease-"
RECHECK_S = 5.0
# A lease is renewed at 75% of its duration (as Prefect's own holders do), the registry's expiry with it.
RENEWAL_FRACTION = 0.75
# A renewal that fails is retried this many times, 1, 2, 4 s apart, before the lease counts as lost.
RENEWAL_ATTEMPTS = 3
# Prefect's repossession runs every few seconds: a record this long past its expiry names a freed slot.
STALE_RECORD_S = 60.0

# A SQLite-backed server answers 503 when a write meets another write's fresh snapshot (SQLITE_BUSY),
# which clears in milliseconds; Prefect's client waits 2 s or more before its first retry.
BUSY_RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8)

Recovery = Literal["prefect", "embedder"]
T = TypeVar("T")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _busy_tolerant(call: Callable[[SyncPrefectClient], T]) -> T:
    """Run one registry call, retrying a server's 503 (a busy SQLite) after milliseconds, not seconds.

    The quick attempts go without the client's own retries; the last one has
    them, so a server that stays unavailable is waited for as long as before.
    A nightly run with nothing to embed was otherwise 2-3 s slower in three
    runs of four: its lease record's delete met the server persisting events.
    """
    for delay in BUSY_RETRY_DELAYS_S:
        try:
            with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
                return call(client)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != httpx.codes.SERVICE_UNAVAILABLE:
                raise
        time.sleep(delay)
    with get_client(sync_client=True) as client:
        return call(client)


def recovery_mode() -> Recovery:
    """Who frees a dead holder's slot: ``prefect`` (a running server's lease repossession) or ``embedder``.

    ``embedder`` only on the ephemeral server of a process with no
    ``PREFECT_API_URL``, where Prefect has no repossession.
    """
    return "prefect" if PREFECT_API_URL.value() else "embedder"


def use_shared_lease_storage() -> None:
    """On the ephemeral server, keep leases on disk under ``PREFECT_HOME`` instead of in its memory.

    Must run before the process's ephemeral server starts (it inherits the
    environment): the CLI and ``serve.py`` call it first thing. A program that
    calls the flows itself on the ephemeral server calls it too (or sets
    ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``), else a holder killed hard
    keeps its slot until that server stops. An explicit setting is left alone.
    """
    if recovery_mode() == "embedder":
        os.environ.setdefault(LEASE_STORAGE_ENV, FILESYSTEM_LEASES)


def ensure_gpu_limit(limit_name: str, slots: int = 1) -> None:
    """Create the global concurrency limit if it is missing (an existing limit keeps its size)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            # Two runs starting together both find it missing: the second create loses, harmlessly.
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=slots))


# --- the holder registry ---------------------------------------------------------------------


def _record_name(lease_id: UUID | str) -> str:
    return f"{RECORD_PREFIX}{lease_id}"


def list_holders(limit_name: str | None = None) -> list[dict[str, Any]]:
    """Registered holders (of one limit, or all), oldest first.

    Each is a dict with ``lease_id``, ``limit_name``, ``stage``, ``pid``, ``host``,
    ``acquired_at`` and ``expires_at`` (refreshed with every lease renewal).
    """
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/variables/filter",
                                  json={"variables": {"name": {"like_": f"{RECORD_PREFIX}%"}}, "limit": None})
    holders = [v["value"] for v in response.json() if isinstance(v.get("value"), dict)]
    holders = [h for h in holders if limit_name is None or h.get("limit_name") == limit_name]
    return sorted(holders, key=lambda h: str(h.get("acquired_at", "")))


def holder_state(record: dict[str, Any]) -> str:
    """``alive``, ``dead`` (pid gone from this host), ``expired`` (no renewal for a whole lease) or ``remote``."""
    if owner_dead(record):
        return "dead"
    try:
        expired = datetime.fromisoformat(str(record["expires_at"])) < datetime.now(UTC)
    except (KeyError, ValueError):
        expired = False
    if expired:
        return "expired"
    return "alive" if record.get("host") == owner()["host"] else "remote"


def recover_dead_holders(limit_name: str) -> list[str]:
    """On the ephemeral server, release the lease of each registered holder whose pid is gone; return their ids.

    A holder's record is claimed by deleting it (only one process can), then its
    lease is released by id, which frees exactly its slot. A live process's
    slot, on this host or another, is never touched. Against a running server no
    slot is touched (Prefect's lease repossession owns that): only records of
    dead holders whose lease has long expired, and so was repossessed, are removed.
    """
    mode = recovery_mode()
    freed = []
    for record in list_holders(limit_name):
        state = holder_state(record)
        if mode == "embedder" and state == "dead":
            with get_client(sync_client=True) as client:
                try:
                    client.delete_variable_by_name(_record_name(record["lease_id"]))
                except ObjectNotFound:
                    continue  # another waiting run claimed it first
            _release(UUID(str(record["lease_id"])))
            freed.append(str(record["lease_id"]))
        elif mode == "prefect" and state in ("dead", "expired") and _expired_for(record) > STALE_RECORD_S:
            _deregister(record["lease_id"])
    return freed


def _expired_for(record: dict[str, Any]) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(str(record["expires_at"]))).total_seconds()
    except (KeyError, ValueError):
        return 0.0


def _acquire(limit_name: str, lease_duration_s: float, wait_s: float) -> UUID | None:
    """Take one slot of ``limit_name`` under a lease; None when it stayed taken for ``wait_s``.

    While the limit is full the server answers 423 with a ``Retry-After``; the
    wait follows it, cut short by the slice's end and checked for a stop request.
    """
    deadline = time.monotonic() + wait_s
    while True:
        raise_if_stopped()
        try:
            response = _busy_tolerant(lambda client: client.increment_concurrency_slots_with_lease(
                names=[limit_name], slots=1, mode="concurrency", lease_duration=lease_duration_s))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != httpx.codes.LOCKED:
                raise StageError(f"could not take a slot of {limit_name!r}: the Prefect server answered "
                                 f"{exc.response.status_code} {exc.response.text[:200]}") from exc
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            retry_after = float(exc.response.headers.get("Retry-After", 1.0))
            time.sleep(max(0.05, min(retry_after, left, 1.0)))
            continue
        body = response.json()
        if not body.get("limits"):
            # The limit vanished between ensure_gpu_limit and here (deleted in the UI): never run unguarded.
            raise StageError(f"the concurrency limit {limit_name!r} does not exist on the Prefect server")
        return UUID(str(body["lease_id"]))


def _release(lease_id: UUID) -> None:
    _busy_tolerant(lambda client: client.release_concurrency_slots_with_lease(lease_id))


def _renew(client: SyncPrefectClient, lease_id: UUID, lease_duration_s: float, stop: threading.Event) -> str | None:
    """Renew the lease, retrying a transient failure; the last error's text, or None once renewed (or stopped)."""
    error = ""
    for attempt in range(RENEWAL_ATTEMPTS):
        try:
            client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_duration_s)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server counts; the last one is reported
            error = f"{type(exc).__name__}: {exc}"
        if stop.wait(2.0 ** attempt):
            return None
    return error


@contextlib.contextmanager
def _held(record: dict[str, Any], lease_duration_s: float, log: Any) -> Iterator[None]:
    """Keep the lease renewed and the holder's record on the server while the stage runs.

    A lease that cannot be renewed is lost: the server may hand the slot to
    another run. The stage then stops at its next batch boundary with an error
    (:func:`embedder.cancel.guarded`) rather than share the GPU unguarded.
    """
    lease_id = UUID(record["lease_id"])
    name = _record_name(lease_id)
    _busy_tolerant(lambda client: client.create_variable(VariableCreate(name=name, value=record)))
    stop = threading.Event()
    lost: list[str] = []

    def beat() -> None:
        with get_client(sync_client=True) as client:
            while not stop.wait(lease_duration_s * RENEWAL_FRACTION):
                error = _renew(client, lease_id, lease_duration_s, stop)
                if error is not None:
                    lost.append(error)
                    log.error("the lease %s on %r could not be renewed (%s): the stage stops", lease_id,
                              record["limit_name"], error)
                    return
                record["expires_at"] = datetime.fromtimestamp(time.time() + lease_duration_s, UTC).isoformat()
                with contextlib.suppress(Exception):  # display only: the lease itself is what holds the slot
                    client.update_variable(VariableUpdate(name=name, value=record))

    def check() -> None:
        if lost:
            raise StageError(f"the lease on {record['limit_name']!r} was lost ({lost[0]}); the slot may already "
                             "be another run's, so this stage stopped")

    thread = threading.Thread(target=beat, name=f"{name}-beat", daemon=True)
    thread.start()
    try:
        with guarded(check):
            yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _deregister(lease_id: UUID | str) -> None:
    with contextlib.suppress(ObjectNotFound):
        _busy_tolerant(lambda client: client.delete_variable_by_name(_record_name(lease_id)))


@contextlib.contextmanager
def gpu_lease(limit_name: str, stage: str, *, timeout_s: float, lease_duration_s: float,
              busy: str | None = None) -> Iterator[LeaseHolding]:
    """Hold the GPU slot for one stage and yield its holding (its release time filled in on exit).

    The wait is cut into slices of at most ``RECHECK_S`` seconds; on the
    ephemeral server, dead holders' leases are released between slices, so a
    crashed run delays the next one by a few seconds, never for ever.

    Args:
        busy: The error's text when the slot stays taken (default: the GPU slot's).

    Raises:
        StageError: If the slot is not acquired within ``timeout_s``, or its lease is lost.
    """
    ensure_gpu_limit(limit_name)
    try:
        log: Any = get_run_logger()
    except MissingContextError:  # outside a flow run (the CLI's gpu-slots, a script)
        log = get_logger("embedder.lease")
    holding = LeaseHolding(stage=stage, limit_name=limit_name, host=host_name(), requested_at=_now(),
                           recovery=recovery_mode())
    t0 = time.monotonic()
    while True:
        remaining = timeout_s - (time.monotonic() - t0)
        if remaining <= 0:
            raise StageError(busy or (
                f"the GPU slot {limit_name!r} was not free within {timeout_s:.0f} s; another run holds it "
                "(`embed-collections gpu-slots` lists the holders)"))
        for freed in recover_dead_holders(limit_name):
            log.warning("released GPU lease %s of %r: its holder's process is gone", freed, limit_name)
        lease_id = _acquire(limit_name, lease_duration_s, min(remaining, RECHECK_S))
        if lease_id is not None:
            break
    holding.lease_id = str(lease_id)
    holding.acquired_at = _now()
    holding.wait_s = round(time.monotonic() - t0, 3)
    record = {**owner(), "lease_id": str(lease_id), "limit_name": limit_name, "stage": stage,
              "acquired_at": holding.acquired_at, "lease_duration_s": lease_duration_s,
              "expires_at": datetime.fromtimestamp(time.time() + lease_duration_s, UTC).isoformat()}
    held_from = time.monotonic()
    try:
        with _held(record, lease_duration_s, log):
            yield holding
    finally:
        # The holding ends where the release starts: from then on the server may grant the slot to
        # another holder, so [acquired_at, released_at] of two holders never overlap.
        holding.released_at = _now()
        holding.held_s = round(time.monotonic() - held_from, 3)
        # Release before deregistering: a record without a lease is harmless, a lease without
        # a record could not be recovered.
        try:
            _release(lease_id)
        finally:
            _deregister(lease_id)


def collection_limit_name(output_dir: str, collection: str) -> str:
    """The limit that lets one flow run at a time write a collection of an output dir (any host, any worker)."""
    import hashlib
    from pathlib import Path

    where = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    return f"embedder-collection-{where}-{collection}"


@contextlib.contextmanager
def collection_lease(output_dir: str, collection: str, *, timeout_s: float,
                     lease_duration_s: float) -> Iterator[LeaseHolding]:
    """Hold a collection of an output dir for one flow run: a second run of it queues here.

    Two runs of the same collection into the same output dir (a retry beside the
    nightly run, two workers of a fleet) would otherwise build shards and run sets
    side by side. Held through the same Prefect lease as the GPU slot, so a holder
    that dies frees it the same way. Fleets must mount a shared output dir at the
    same path on every host: the path names the limit.

    Runs that share no Prefect server queue on the output dir's own lock
    (:mod:`embedder.io.dirlock`), taken after the lease.

    Raises:
        StageError: If another run still holds the collection after ``timeout_s``.
    """
    from embedder.io.dirlock import hold_collection

    name = collection_limit_name(output_dir, collection)
    busy = (f"collection {collection!r} of {output_dir} is being written by another run (limit {name!r}) "
            f"and stayed so for {timeout_s:.0f} s; `embed-collections gpu-slots` lists the holder")
    t0 = time.monotonic()
    with gpu_lease(name, "collection", timeout_s=timeout_s, lease_duration_s=lease_duration_s, busy=busy) as event:
        # And the lock on the output dir itself: a run on another Prefect server (or none) queues there.
        left = max(1.0, timeout_s - (time.monotonic() - t0))
        with hold_collection(output_dir, collection, timeout_s=left) as waited:
            event.wait_s += waited
            yield event
