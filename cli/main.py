"""The ``vpp`` command line. Heavy modules are imported inside each command so ``vpp --help``
stays instant."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from typing import Any

import typer

from cli import client, demo, simulate
from vpp.settings import get_settings

app = typer.Typer(
    help="VPP aggregation service: run it, operate it, and talk to a running one.\n\n"
    "Example: vpp serve --port 8000",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys. Example: vpp keys create --tenant acme --role hyperscaler")
db_app = typer.Typer(help="Database. Example: vpp db upgrade")
openadr_app = typer.Typer(
    help="The OpenADR 3.1 VTN (/openadr3/3.1.0). "
    "Example: vpp openadr clients create --tenant gridco --role bl"
)
openadr_clients_app = typer.Typer(
    help="OpenADR clients (OAuth2 client credentials). "
    "Example: vpp openadr clients create --tenant gridco --role ven --ven-name oem-cloud"
)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(openadr_app, name="openadr")
openadr_app.add_typer(openadr_clients_app, name="clients")


def _logging() -> None:
    level = get_settings().log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: str = typer.Option(None, help="bind address (default VPP_API_HOST)"),
    port: int = typer.Option(None, help="port (default VPP_API_PORT)"),
) -> None:
    """API, ingest, forecaster and event runner in one process. Run it N times on the same
    database, state store and broker (only --port different) for N replicas: all serve the API
    and ingest; one leads the event runner, housekeeping and calibration (GET /readyz: replica).

    Example: VPP_DATABASE_URL=postgresql+asyncpg://vpp@db/vpp vpp serve --host 0.0.0.0
    """
    import uvicorn

    from api.app import create_app
    from cli.startup import StartWhenDatabaseUp
    from store.migrate import upgrade
    from store.outages import DATABASE, dependency_down

    _logging()
    s = get_settings()
    # The options reach the settings too, not only uvicorn: what the process reports about
    # itself (and anything built from the port) must be what it serves on.
    s = s.model_copy(update={"api_host": host or s.api_host, "api_port": port or s.api_port})
    app: Any
    waiting: StartWhenDatabaseUp | None = None
    try:
        upgrade(s.database_url)
        app = create_app(s, run_background=True)
    except Exception as exc:
        if dependency_down(exc) != DATABASE:
            raise
        # Up anyway: /healthz 200, /readyz 503 naming the database; the migrations and the
        # service once it answers (cli/startup.py).
        logging.getLogger("cli.serve").warning(
            "vpp serve: database unreachable at start; serving /healthz and a 503 /readyz, "
            "migrating and starting once it is reachable"
        )
        waiting = StartWhenDatabaseUp(s.database_url, lambda: create_app(s, run_background=True))
        app = waiting
    uvicorn.run(app, host=s.api_host, port=s.api_port, log_level=s.log_level)
    if waiting is not None and waiting.failed:
        raise typer.Exit(1)


@app.command()
def ingest(
    metrics_port: int = typer.Option(
        0, help="serve Prometheus /metrics on this port (0: none), for deploy/'s scrape config"
    ),
) -> None:
    """One ingest worker alone; run several to scale out (MQTT 5 shared subscription).

    Example: VPP_MQTT_URL=mqtt://vpp-service:secret@broker:1883 vpp ingest --metrics-port 9100
    """
    from devices.ingest import run_standalone

    _logging()
    if metrics_port:
        from prometheus_client import start_http_server

        import vpp.metrics  # noqa: F401  (registers the metrics the worker counts)

        start_http_server(metrics_port)
    asyncio.run(run_standalone(get_settings()))


@app.command("broker-agent")
def broker_agent(
    password_file: str = typer.Option(
        "/mosquitto/data/passwd", help="the broker's password_file (written atomically)"
    ),
    base_file: str = typer.Option(
        "/mosquitto/data/passwd.base",
        help="logins copied first into the file: the service's and gateways' (deploy's init)",
    ),
    broker_pid_file: str = typer.Option(
        "/mosquitto/data/mosquitto.pid", help="the broker's pid_file (re-read on every reload)"
    ),
    broker_pid: int = typer.Option(None, help="the broker's pid, instead of --broker-pid-file"),
    broker_host: str = typer.Option("127.0.0.1", help="where the canary login connects"),
    broker_port: int = typer.Option(1883, help="the broker's plain MQTT port"),
    tier: str = typer.Option(None, help="tier name in broker_tier (default VPP_BROKER_TIER)"),
) -> None:
    """Beside one Mosquitto: keep its password file equal to the device logins in PostgreSQL
    (VPP_BROKER_CREDENTIALS=password_file), reloading it with SIGHUP in batches and proving
    each reload with a canary login. Runs until stopped; outages are retried.

    Example: VPP_DATABASE_URL=postgresql+asyncpg://vpp@db/vpp vpp broker-agent --broker-pid 1
    """
    from pathlib import Path

    from devices.broker_agent import AgentConfig, BrokerAgent

    _logging()
    s = get_settings()
    config = AgentConfig(
        database_url=s.database_url,
        password_file=Path(password_file),
        tier=tier or s.broker_tier,
        base_file=Path(base_file),
        broker_pid=broker_pid,
        broker_pid_file=Path(broker_pid_file) if broker_pid is None else None,
        broker_host=broker_host,
        broker_port=broker_port,
    )

    async def go() -> None:
        agent = BrokerAgent(config)
        try:
            await agent.run()
        finally:
            await agent.close()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


def parse_expiry(text: str, now_ms: int) -> int:
    """``--expires-in``: a span from now (``30d``, ``12h``, ``PT90M``) or an RFC 3339 time (UTC
    if it has no offset) → epoch ms on the service clock."""
    from cli.client import parse_span_s
    from vpp.timefmt import TimeFormatError, parse_rfc3339

    text = text.strip()
    if len(text) >= 10 and text[4:5] == "-":  # a date: 2027-01-01 or 2027-01-01T00:00Z
        try:
            when = text if "T" in text.upper() or " " in text else text + "T00:00:00Z"
            return parse_rfc3339(when, "expires-in", assume_utc=True)
        except TimeFormatError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    return now_ms + round(parse_span_s(text, "expires-in") * 1000)


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="tenant id (created if new)"),
    role: str = typer.Option(..., help="admin | operator | fleet | hyperscaler"),
    label: str = typer.Option("", help="a note to recognise the key by"),
    expires_in: str = typer.Option(
        None,
        "--expires-in",
        help="the key stops working after this span (30d, 12h) or at this RFC 3339 time",
    ),
    rate_limit: float = typer.Option(
        None, "--rate-limit", help="requests a second for this key (default VPP_RATE_LIMIT_PER_S)"
    ),
    burst: int = typer.Option(
        None, "--burst", help="requests this key may make at once (default VPP_RATE_LIMIT_BURST)"
    ),
) -> None:
    """Print a new API key, alone on one line, on standard output.

    Example: vpp keys create --tenant acme --role hyperscaler --expires-in 30d
    """
    from store.database import Database
    from store.keys import create_api_key
    from store.migrate import upgrade
    from vpp.clock import get_clock
    from vpp.domain import Role

    try:
        Role(role)
    except ValueError:
        typer.echo(f"error: role: must be one of {', '.join(r.value for r in Role)}", err=True)
        raise typer.Exit(2) from None
    now_ms = get_clock().now_ms()
    expires_ms = parse_expiry(expires_in, now_ms) if expires_in is not None else None
    s = get_settings()
    upgrade(s.database_url)

    async def go() -> str:
        db = Database(s.database_url)
        try:
            return await create_api_key(
                db,
                tenant,
                role,
                now_ms,
                label,
                expires_ms=expires_ms,
                rate_limit_per_s=rate_limit,
                rate_limit_burst=burst,
            )
        finally:
            await db.dispose()

    try:
        key = asyncio.run(go())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(key + "\n")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="the key id (vpp_<id>_…), or the whole key"),
) -> None:
    """Revoke an API key: it answers 401 from now on. With Redis (VPP_REDIS_URL) every running
    API replica refuses it at once; without, within its 10-second key cache.

    Example: vpp keys revoke 3f9a1c2b7d4e
    """
    from store.database import Database
    from store.keys import key_id_of, revoke_api_key
    from store.migrate import upgrade
    from store.ratelimit import RateLimiter
    from store.state import make_state_store
    from vpp.clock import get_clock
    from vpp.errors import DomainError
    from vpp.timefmt import to_rfc3339

    key_id = key_id_of(key_id) or key_id
    s = get_settings()
    upgrade(s.database_url)

    async def go() -> tuple[str, str, int | None, bool, bool]:
        db = Database(s.database_url)
        try:
            row, changed = await revoke_api_key(db, key_id, get_clock().now_ms())
        finally:
            await db.dispose()
        state = make_state_store(s.redis_url, prefix=s.state_prefix, timeout_s=s.redis_timeout_s)
        try:  # a notice every API replica's next check of the key sees (Redis only)
            noticed = await RateLimiter(state).announce_revoked(key_id)
        finally:
            await state.close()
        return row.tenant_id, row.role, row.revoked_ms, changed, noticed

    try:
        tenant, role, revoked_ms, changed, noticed = asyncio.run(go())
    except DomainError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    when = to_rfc3339(revoked_ms)
    if changed:
        typer.echo(f"revoked key {key_id} (tenant {tenant}, role {role}) at {when}")
    else:
        typer.echo(f"key {key_id} (tenant {tenant}, role {role}) was revoked already, at {when}")
    if noticed:
        typer.echo("every API replica on this state store refuses it now")
    else:
        typer.echo("running API processes refuse it within 10 s (their key cache)")


@openadr_clients_app.command("create")
def openadr_clients_create(
    tenant: str = typer.Option(..., help="tenant id (created if new)"),
    role: str = typer.Option(..., help="bl (business logic: a utility, an ISO) | ven"),
    ven_name: str = typer.Option(
        None, "--ven-name", help="ven only: the venName its ven object must have (POST /vens)"
    ),
) -> None:
    """Print a new client's client_id and client_secret, alone on two lines. The client gets a
    bearer token from POST /openadr3/3.1.0/auth/token; a VEN then creates its own ven object.

    Example: vpp openadr clients create --tenant gridco --role ven --ven-name oem-cloud
    """
    from store.database import Database
    from store.migrate import upgrade
    from store.openadr import create_client
    from vpp.clock import get_clock
    from vpp.errors import DomainError

    s = get_settings()
    upgrade(s.database_url)

    async def go() -> tuple[str, str]:
        db = Database(s.database_url)
        try:
            return await create_client(db, tenant, role, get_clock().now_ms(), ven_name=ven_name)
        finally:
            await db.dispose()

    try:
        client_id, secret = asyncio.run(go())
    except DomainError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(f"{client_id}\n{secret}\n")


@openadr_clients_app.command("revoke")
def openadr_clients_revoke(
    client_id: str = typer.Argument(..., help="the client_id"),
) -> None:
    """Revoke an OpenADR client: its tokens stop at once and it gets no new one.

    Example: vpp openadr clients revoke ven-3f9a1c2b7d4e5f60
    """
    from store.database import Database
    from store.migrate import upgrade
    from store.openadr import revoke_client
    from vpp.clock import get_clock
    from vpp.errors import DomainError

    s = get_settings()
    upgrade(s.database_url)

    async def go() -> tuple[str, str, bool]:
        db = Database(s.database_url)
        try:
            record, changed = await revoke_client(db, client_id, get_clock().now_ms())
            return record.tenant_id, record.role, changed
        finally:
            await db.dispose()

    try:
        tenant, role, changed = asyncio.run(go())
    except DomainError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    state = "revoked" if changed else "was revoked already:"
    typer.echo(f"{state} OpenADR client {client_id} (tenant {tenant}, role {role})")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply the database migrations (VPP_DATABASE_URL)."""
    from store.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    typer.echo("database at " + revision)


# The commands of the other cli modules (each keeps its heavy imports inside its commands, so
# `vpp --help` stays instant). A module that fails to import fails `vpp`, loudly.
for _module in (simulate, demo, client):
    _module.register(app)


def _unwrapped(doc: str) -> str:
    """A docstring with each paragraph on one line: the terminal (rich) wraps it to its own
    width, where the source's line breaks would cut sentences in two. A paragraph of list items
    or indented lines keeps its breaks."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line.startswith(("-", "*", " ")) for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Every command's docstring unwrapped (typer reads ``__doc__`` when it builds the click
    commands, at ``app()`` time), through the subcommand groups."""
    for info in typer_app.registered_commands:
        if info.callback is not None and info.callback.__doc__:
            info.callback.__doc__ = _unwrapped(info.callback.__doc__)
        if info.help:
            info.help = _unwrapped(info.help)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_help(group.typer_instance)


_unwrap_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
