"""``prefect server start`` whose SQLite write transactions wait for the lock instead of failing.

Prefect's server opens its transactions on SQLite as ``BEGIN DEFERRED``. A
handler that reads and then writes (creating a task run reads its flow run's
labels first) cannot upgrade its read snapshot once another connection has
written in between: SQLite answers ``database is locked`` at once, without
waiting on ``busy_timeout``. The server turns that into a 503 and Prefect's
client waits 2 s before it tries again. On a warm server it happened on most
CLI runs, when the collection's subflow was created while the server was still
recording the previous task's events: 2 s of a 5 s unchanged re-run.

``BEGIN IMMEDIATE`` takes the write lock when the transaction starts, so two
writers queue on ``busy_timeout`` for milliseconds and neither fails. Reads
outside transactions are unaffected. ``embed-collections server start`` runs
the server through this module; PostgreSQL servers are untouched.

Usage: ``python -m flows.prefect_server server start --host 127.0.0.1 --port 4200``
(the arguments are Prefect's own CLI).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

_MARK = "_embedder_immediate"


def immediate_sqlite_transactions() -> None:
    """Make every transaction Prefect's server begins on SQLite ``BEGIN IMMEDIATE`` (idempotent).

    Raises:
        RuntimeError: If this Prefect's SQLite configuration no longer has the hook this relies on,
            so an upgrade that moved it fails loudly instead of silently bringing the 503s back.
    """
    from prefect.server.database import configurations

    config = getattr(configurations, "AioSqliteConfiguration", None)
    deferred = getattr(config, "begin_transaction", None)
    if config is None or deferred is None or not hasattr(configurations, "SQLITE_BEGIN_MODE"):
        raise RuntimeError("this Prefect has no AioSqliteConfiguration.begin_transaction/SQLITE_BEGIN_MODE; "
                           "flows/prefect_server.py needs updating for it")
    if getattr(deferred, _MARK, False):
        return

    @asynccontextmanager
    async def begin_transaction(self: Any, session: Any, with_for_update: bool = False) -> AsyncIterator[Any]:
        # Prefect itself uses IMMEDIATE for its `with_for_update` transactions; every transaction here may write.
        async with deferred(self, session, with_for_update=True) as transaction:
            yield transaction

    setattr(begin_transaction, _MARK, True)
    config.begin_transaction = begin_transaction


def main() -> None:
    """Run Prefect's CLI (``sys.argv``) in this process, with immediate SQLite transactions."""
    immediate_sqlite_transactions()
    from prefect.cli import app

    app()


if __name__ == "__main__":
    main()
