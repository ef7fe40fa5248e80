"""The ``vpp`` command line. Heavy modules are imported inside each command so ``vpp --help``
stays instant."""

from __future__ import annotations

import asyncio
import logging
import sys

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
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")


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
    from store.migrate import upgrade

    _logging()
    s = get_settings()
    # The options reach the settings too, not only uvicorn: what the process reports about
    # itself (and anything built from the port) must be what it serves on.
    s = s.model_copy(update={"api_host": host or s.api_host, "api_port": port or s.api_port})
    upgrade(s.database_url)
    uvicorn.run(
        create_app(s, run_background=True),
        host=s.api_host,
        port=s.api_port,
        log_level=s.log_level,
    )


@app.command()
def ingest() -> None:
    """One ingest worker alone; run several to scale out (MQTT 5 shared subscription).

    Example: VPP_MQTT_URL=mqtt://vpp-service:secret@broker:1883 vpp ingest
    """
    from devices.ingest import run_standalone

    _logging()
    asyncio.run(run_standalone(get_settings()))


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="tenant id (created if new)"),
    role: str = typer.Option(..., help="admin | operator | fleet | hyperscaler"),
    label: str = typer.Option("", help="a note to recognise the key by"),
) -> None:
    """Print a new API key, alone on one line, on standard output."""
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
    s = get_settings()
    upgrade(s.database_url)

    async def go() -> str:
        db = Database(s.database_url)
        try:
            return await create_api_key(db, tenant, role, get_clock().now_ms(), label)
        finally:
            await db.dispose()

    try:
        key = asyncio.run(go())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(key + "\n")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
