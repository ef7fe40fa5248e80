"""Engine and session factory for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets readers run beside the single writer; FK checks are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def sync_url(url: str) -> str:
    """The synchronous driver URL for the same database (Alembic runs synchronously)."""
    return (
        url.replace("+aiosqlite", "")
        .replace("+asyncpg", "+psycopg")
        .replace("postgresql://", "postgresql+psycopg://")
    )


class Database:
    """The service's handle on its database: one engine, one session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessionmaker = make_sessionmaker(self.engine)
        self._bulk_engine: AsyncEngine | None = None
        self._bulk_idle: list[tuple[AsyncConnection, Any]] = []  # with its asyncpg connection
        self._bulk_generation = 0

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            yield session

    @asynccontextmanager
    async def bulk_connection(self) -> AsyncIterator[Any]:
        """PostgreSQL: an asyncpg connection for a hot path that drives the driver itself (the
        history's COPY), kept between uses without a pool's checkout: the main pool's
        ``pool_pre_ping`` costs three round trips with SQLAlchemy's asyncpg dialect (BEGIN, a
        query, ROLLBACK) and its checkout and return about half a millisecond of CPU, as much
        as the Python side of a 1000-row COPY. Liveness without a round trip instead: a
        connection the server closed while it was kept is seen as closed (asyncpg marks it when
        the socket does) and replaced by a new one, and one that failed other than by a
        server-reported SQL error (a lost socket, a cancelled COPY) is closed, not kept.
        Statements run in autocommit unless the caller opens a transaction."""
        if self.is_sqlite:
            raise RuntimeError("bulk_connection is PostgreSQL's (asyncpg)")
        generation = self._bulk_generation
        conn, pg = await self._bulk_take()
        try:
            yield pg
        except BaseException as exc:
            if pg.is_closed() or not _is_sql_error(exc):
                await _discard(conn)
            else:
                await self._bulk_give(conn, pg, generation)
            raise
        await self._bulk_give(conn, pg, generation)

    async def _bulk_take(self) -> tuple[AsyncConnection, Any]:
        while self._bulk_idle:
            conn, pg = self._bulk_idle.pop()
            if not pg.is_closed():
                return conn, pg
            await _discard(conn)  # closed while kept (server restart, idle timeout)
        if self._bulk_engine is None:
            # NullPool: the kept connections above are this engine's only reuse.
            self._bulk_engine = create_async_engine(self.url, poolclass=NullPool)
        conn = await self._bulk_engine.connect()
        pg = (await conn.get_raw_connection()).driver_connection
        assert pg is not None
        return conn, pg

    async def _bulk_give(self, conn: AsyncConnection, pg: Any, generation: int) -> None:
        if generation == self._bulk_generation and len(self._bulk_idle) < BULK_KEPT:
            self._bulk_idle.append((conn, pg))
        else:  # taken before a dispose(), or enough kept
            await conn.close()

    async def dispose(self) -> None:
        await self.engine.dispose()
        self._bulk_generation += 1
        idle, self._bulk_idle = self._bulk_idle, []
        for conn, _ in idle:
            await conn.close()
        if self._bulk_engine is not None:
            await self._bulk_engine.dispose()


BULK_KEPT = 4  # idle bulk connections a Database keeps


async def _discard(conn: AsyncConnection) -> None:
    """Close a connection that may be broken, never raising over the error that broke it."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()


def _is_sql_error(exc: BaseException) -> bool:
    """An error the server reported about a statement (a unique violation, a deadlock): the
    connection is back at ready-for-query and fine to use again."""
    return isinstance(exc, asyncpg.PostgresError)


async def copy_csv(db: Database, sql: str, *args: Any) -> bytes | None:
    """The rows of ``sql`` (``$1``… bound to ``args``) as CSV through PostgreSQL's COPY
    (asyncpg): no Python object per row or value on the event loop. None if the driver cannot
    (SQLite)."""
    chunks: list[bytes] = []

    async def sink(data: bytes) -> None:
        chunks.append(data)

    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = getattr(raw, "driver_connection", None)
        if driver is None or not hasattr(driver, "copy_from_query"):
            return None
        await driver.copy_from_query(sql, *args, output=sink, format="csv")
    return b"".join(chunks)
