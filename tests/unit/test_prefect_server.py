"""The warm server's SQLite transactions: a read-then-write transaction never fails because another wrote first.

Both scenarios run Prefect's own SQLite configuration (its engine, pragmas and
``begin_transaction``) on a real database file: first as Prefect ships it, to
pin the failure the fix exists for (if Prefect fixes it upstream, this test
says the fix can go), then with :func:`flows.prefect_server.immediate_sqlite_transactions`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError


async def _read_then_write_while_another_writes(db: Path, wait_for_other: bool) -> list[int]:
    """T1 reads, T2 inserts, then T1 inserts; the rows in the end (T1 raises what the database raised)."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    cfg = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{db}")
    engine = await cfg.engine()
    async with engine.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    t1_read, t2_done = asyncio.Event(), asyncio.Event()

    async def t1() -> None:
        async with await cfg.session(engine) as session, cfg.begin_transaction(session):
            await session.execute(sa.text("SELECT count(*) FROM t"))
            t1_read.set()
            if wait_for_other:
                await t2_done.wait()
            else:
                # T2 cannot commit while T1 holds the write lock, so T1 waits a moment and goes on.
                await asyncio.sleep(0.3)
            await session.execute(sa.text("INSERT INTO t VALUES (1)"))

    async def t2() -> None:
        await t1_read.wait()
        async with await cfg.session(engine) as session, cfg.begin_transaction(session):
            await session.execute(sa.text("INSERT INTO t VALUES (2)"))
        t2_done.set()

    try:
        await asyncio.gather(t1(), t2())
        async with engine.connect() as conn:
            return sorted(r[0] for r in await conn.execute(sa.text("SELECT x FROM t")))
    finally:
        await engine.dispose()


def test_prefects_deferred_transaction_fails_at_once_when_another_wrote_between_its_read_and_write(tmp_path):
    with pytest.raises(OperationalError, match="database is locked"):
        asyncio.run(_read_then_write_while_another_writes(tmp_path / "prefect.db", wait_for_other=True))


def test_with_immediate_transactions_both_writers_commit(tmp_path, monkeypatch):
    from prefect.server.database.configurations import AioSqliteConfiguration

    from flows.prefect_server import immediate_sqlite_transactions

    # Restored after the test: this process may host other tests' servers.
    monkeypatch.setattr(AioSqliteConfiguration, "begin_transaction", AioSqliteConfiguration.begin_transaction)
    immediate_sqlite_transactions()
    immediate_sqlite_transactions()  # idempotent: not wrapped twice
    assert asyncio.run(_read_then_write_while_another_writes(tmp_path / "prefect.db", wait_for_other=False)) == [1, 2]
