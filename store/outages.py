"""Which dependency a failure is the loss of: the database or the state store.

The storage libraries fail in their own ways when their server goes away (a refused connect is
a bare ``ConnectionRefusedError`` from asyncpg, a dropped one a ``DBAPIError`` with the
connection invalidated, Redis its own ``ConnectionError``); this module is the one place that
knows them, so the layers above name an outage without importing a driver
(``devices.outages`` adds the broker and makes the domain error).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import asyncpg.exceptions as pg_errors
import redis.exceptions as redis_errors
from sqlalchemy import exc as sa_errors

DATABASE = "database"
STATE_STORE = "state_store"

# Exception classes an outage of the database or the state store can surface as (for handlers
# that are registered by class; ``dependency_down`` then says whether it is one).
OUTAGE_TYPES: tuple[type[Exception], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, TimeoutError
    sa_errors.SQLAlchemyError,
    pg_errors.PostgresError,
    pg_errors.InterfaceError,
    redis_errors.RedisError,
)

_PG_DOWN = (
    pg_errors.PostgresConnectionError,  # connection lost or refused by the server
    pg_errors.OperatorInterventionError,  # shutting down, starting up (cannot connect now)
    pg_errors.TooManyConnectionsError,
)
# Where an OSError was raised says whose connection it was (innermost matching frame wins).
_MODULES = (
    (("asyncpg", "sqlalchemy", "aiosqlite", "sqlite3", "psycopg", "store.database"), DATABASE),
    (("redis", "store.state"), STATE_STORE),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def raised_in(exc: BaseException, modules: tuple[tuple[tuple[str, ...], str], ...]) -> str | None:
    """The name paired with the innermost frame of ``exc``'s traceback whose module starts with
    one of the listed prefixes; None if no frame matches."""
    frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames):
        module = str(frame.f_globals.get("__name__", ""))
        for prefixes, name in modules:
            if module.startswith(prefixes):
                return name
    return None


def dependency_down(exc: BaseException) -> str | None:
    """``"database"`` or ``"state_store"`` when ``exc`` (or what caused it) is a connection to
    that server lost, refused or timed out; None for anything else (a bug stays a bug)."""
    for e in _chain(exc):
        if isinstance(e, redis_errors.ConnectionError | redis_errors.TimeoutError):
            return STATE_STORE  # BusyLoadingError is a ConnectionError too
        if isinstance(e, sa_errors.DBAPIError) and (
            e.connection_invalidated or isinstance(e, sa_errors.OperationalError)
        ):
            return DATABASE
        if isinstance(e, sa_errors.TimeoutError | sa_errors.DisconnectionError):
            return DATABASE  # no pooled connection came free / the pool's ping failed
        if isinstance(e, _PG_DOWN):
            return DATABASE
        if isinstance(e, OSError):
            found = raised_in(e, _MODULES)
            if found is not None:
                return found
    return None
