"""``vpp serve`` started while PostgreSQL is down: up at once, the service once the database is.

The migrations need the database, and the API, ingest and the runner need the migrated schema,
so nothing of the service can start before it answers. Exiting instead would leave a supervisor
to restart the process in a loop (and compose's ``depends_on`` or a k8s Job order nothing after
the first start). So :class:`StartWhenDatabaseUp` is the ASGI app uvicorn serves meanwhile:

- ``GET /healthz`` answers 200 (the process is up: a liveness probe must not kill it);
- ``GET /readyz`` answers 503 with ``checks.database: unreachable`` and ``Retry-After``, the
  shape the service's own ``/readyz`` gives;
- every other request answers 503 in the service's error shape naming ``database``;
- in the background it retries the migrations (1 s doubling to 10 s, one log line when the
  wait begins and one when the database is back), then builds the service's app and runs its
  startup (services, ingest, runner, …) and hands every later request to it.

A failure that is no outage (a broken migration, a component that fails to start) is logged
with its traceback and ends the process with exit status 1, as a start with the database up
would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api.errors import error_body
from devices.outage_log import OutageLog
from devices.outages import RETRY_AFTER_S
from store.migrate import upgrade
from store.outages import DATABASE
from vpp.errors import Unavailable

log = logging.getLogger("cli.serve")

MAX_RETRY_S = 10.0
NOT_STARTED = Unavailable.of(
    DATABASE, "not reachable; the service starts once it is, try again shortly", RETRY_AFTER_S
)


class StartWhenDatabaseUp:
    """The ASGI app of a ``vpp serve`` whose database was down at start (see the module doc)."""

    def __init__(self, database_url: str, make_app: Callable[[], FastAPI]) -> None:
        self.database_url = database_url
        self.make_app = make_app
        self.app: FastAPI | None = None
        self.failed = False  # a start that failed for something other than an outage
        self.outages = OutageLog(log, "vpp serve start")
        self._app_lifespan: AbstractAsyncContextManager[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._waiting(scope, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later

    async def _waiting(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "")
        headers = [(b"content-type", b"application/json")]
        body: dict[str, Any]
        if path == "/healthz":
            status, body = 200, {"status": "ok"}
        else:
            status = 503
            headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            if path == "/readyz":
                body = {
                    "status": "not ready",
                    "checks": {DATABASE: "unreachable"},
                    "detail": f"{DATABASE}: unreachable",
                }
            else:
                body = error_body(NOT_STARTED)
        payload = orjson.dumps(body)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._task = asyncio.create_task(self._bring_up(), name="serve-start")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shut_down()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _bring_up(self) -> None:
        delay = 1.0
        while True:
            try:
                await asyncio.to_thread(upgrade, self.database_url)
                app = self.make_app()
                lifespan = app.router.lifespan_context(app)
                await lifespan.__aenter__()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Any lost dependency waits (the start needs the database; the components
                # ride out the others by themselves); anything else is a bug.
                if self.outages.failed(exc):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_S)
                    continue
                log.exception("vpp serve: the service failed to start")
                self.failed = True
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; serve exits 1
                return
            self.outages.recovered()
            self._app_lifespan = lifespan
            self.app = app
            log.warning("vpp serve: database reachable, migrations applied, service started")
            return

    async def _shut_down(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lifespan, self._app_lifespan = self._app_lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)
