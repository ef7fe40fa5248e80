"""The client commands of ``vpp``, run as a user would (typer's CliRunner) against a live
service on a free port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.helpers.settings import make_settings

runner = CliRunner()


class LiveServer:
    """The API on a free port, served by uvicorn in a thread with its own event loop."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.ready = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        import uvicorn

        from api.app import create_app
        from dispatch.services import Services
        from store.migrate import upgrade

        await asyncio.to_thread(upgrade, self.settings.database_url)
        self.services = await Services.create(self.settings)
        self.loop = asyncio.get_running_loop()
        config = uvicorn.Config(
            create_app(services=self.services), log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        serving = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not serving.done():
            await asyncio.sleep(0.02)
        self.ready.set()
        await serving
        await self.services.close()

    def start(self) -> LiveServer:
        self.thread.start()
        assert self.ready.wait(30), "server did not start"
        return self

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def key(self, tenant: str, role: str) -> str:
        from store.keys import create_api_key

        return str(
            self.call(create_api_key(self.services.db, tenant, role, self.services.clock.now_ms()))
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(make_settings(f"sqlite+aiosqlite:///{tmp_path}/vpp.db")).start()
    yield server
    server.stop()


def vpp(*args: str, url: str, key: str | None) -> Any:
    full = [*args, "--url", url]
    if key is not None:
        full += ["--key", key]
    return runner.invoke(app, full, env={"VPP_API_KEY": "", "COLUMNS": "200"})


def write_devices_csv(path: Path, n: int, region: str = "ERCOT-NORTH") -> Path:
    lines = ["id,kind,site_id,region,capacity_wh,max_discharge_w,max_charge_w"]
    lines += [f"bat-{i},battery,site-{i},{region},13500,5000,5000" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_help_explains_each_command_with_an_example():
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0
    for group in ("devices", "requests", "events", "fleet"):
        assert group in top.output
    for args in (
        ["devices", "import"],
        ["requests", "quote"],
        ["requests", "commit"],
        ["requests", "cancel"],
        ["requests", "list"],
        ["requests", "show"],
        ["events", "list"],
        ["events", "show"],
        ["events", "abort"],
        ["fleet"],
    ):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, args
        assert "Example: vpp " + " ".join(args) in result.output, args
        assert "--json" in result.output, args


def test_import_csv_then_fleet_shows_the_devices(live: LiveServer, tmp_path: Path):
    fleet_key = live.key("acme", "fleet")
    csv_path = write_devices_csv(tmp_path / "homes.csv", 25)
    result = vpp(
        "devices", "import", str(csv_path), "--batch-size", "10", url=live.url, key=fleet_key
    )
    assert result.exit_code == 0, result.output
    assert "imported 25 of 25 devices" in result.output
    creds = json.loads((tmp_path / "homes.csv.credentials.json").read_text())
    assert len(creds) == 25 and creds[0]["mqtt"]["password"]

    as_json = vpp("fleet", "--json", url=live.url, key=fleet_key)
    assert as_json.exit_code == 0, as_json.output
    api_answer = json.loads(as_json.output)
    rows = [r for r in api_answer["regions"] if r["region"] == "ERCOT-NORTH"]
    assert rows[0]["kind"] == "battery" and rows[0]["registered"] == 25

    table = vpp("fleet", url=live.url, key=fleet_key)
    assert table.exit_code == 0, table.output
    assert "ERCOT-NORTH" in table.output and "battery" in table.output and "25" in table.output


def test_import_json_names_the_bad_row_by_its_place_in_the_file(live: LiveServer, tmp_path):
    fleet_key = live.key("acme", "fleet")
    devices: list[dict[str, Any]] = [
        {
            "id": f"t-{i}",
            "kind": "thermostat",
            "site_id": f"s-{i}",
            "region": "ERCOT-HOUSTON",
            "hvac_rated_w": 5600,
            "comfort_max_c": 26,
            "comfort_min_c": 19,
        }
        for i in range(12)
    ]
    devices[7]["region"] = "NOWHERE"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(devices))
    result = vpp("devices", "import", str(path), "--batch-size", "5", url=live.url, key=fleet_key)
    assert result.exit_code == 1
    assert "row 7" in result.output and "region" in result.output
    assert "5 devices before it were" in result.output  # the first batch was stored


def test_requests_quote_list_show_and_commit(live: LiveServer, tmp_path: Path):
    fleet_key = live.key("acme", "fleet")
    buyer = live.key("hyper", "hyperscaler")
    vpp(
        "devices",
        "import",
        str(write_devices_csv(tmp_path / "d.csv", 20)),
        url=live.url,
        key=fleet_key,
    )

    quoted = vpp(
        "requests",
        "quote",
        "--region",
        "ERCOT-NORTH",
        "--mw",
        "0.05",
        "--start",
        "+3h",
        "--duration",
        "2h",
        "--json",
        url=live.url,
        key=buyer,
    )
    assert quoted.exit_code == 0, quoted.output
    req = json.loads(quoted.output)
    assert req["id"].startswith("cr-") and req["status"] in ("quoted", "rejected")

    listed = vpp("requests", "list", "--json", url=live.url, key=buyer)
    assert listed.exit_code == 0, listed.output
    assert [r["id"] for r in json.loads(listed.output)] == [req["id"]]

    table = vpp("requests", "list", url=live.url, key=buyer)
    assert req["id"] in table.output and "ERCOT-NORTH" in table.output

    shown = vpp("requests", "show", req["id"], url=live.url, key=buyer)
    assert shown.exit_code == 0 and req["id"] in shown.output

    committed = vpp("requests", "commit", req["id"], "--json", url=live.url, key=buyer)
    if req["status"] == "quoted" and req["quoted_mw"] > 0:
        assert committed.exit_code == 0, committed.output
        assert json.loads(committed.output)["status"] == "committed"
        cancelled = vpp("requests", "cancel", req["id"], url=live.url, key=buyer)
        assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    else:
        # Nothing to book: the service says why (409) and the command fails.
        assert committed.exit_code == 1
        assert "409" in committed.output

    # Another tenant's request looks exactly like a missing one.
    other = live.key("other", "hyperscaler")
    missing = vpp("requests", "show", req["id"], url=live.url, key=other)
    assert missing.exit_code == 1 and "404" in missing.output


def test_quote_rejects_bad_times_before_calling(live: LiveServer):
    buyer = live.key("hyper", "hyperscaler")
    result = vpp(
        "requests",
        "quote",
        "--region",
        "ERCOT-NORTH",
        "--mw",
        "1",
        "--start",
        "tomorrow",
        "--duration",
        "2h",
        url=live.url,
        key=buyer,
    )
    assert result.exit_code == 2 and "start" in result.output


def test_events_list_show_and_abort_a_grid_event(live: LiveServer, tmp_path: Path):
    import httpx

    operator = live.key("ops", "operator")
    listed = vpp("events", "list", "--json", url=live.url, key=operator)
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == []
    assert "no active events" in vpp("events", "list", url=live.url, key=operator).output

    fleet_key = live.key("acme", "fleet")
    vpp(
        "devices",
        "import",
        str(write_devices_csv(tmp_path / "d.csv", 10)),
        url=live.url,
        key=fleet_key,
    )
    from cli.client import resolve_time

    now_ms = live.services.clock.now_ms()
    body = {
        "region": "ERCOT-NORTH",
        "mw": 0.01,
        "start": resolve_time("+1h", "start", now_ms),
        "end": resolve_time("+2h", "end", now_ms),
    }
    made = httpx.post(
        live.url + "/v1/grid-events", json=body, headers={"Authorization": f"Bearer {operator}"}
    )
    assert made.status_code == 201, made.text
    event_id = made.json()["id"]

    shown = vpp("events", "show", event_id, url=live.url, key=operator)
    assert shown.exit_code == 0, shown.output
    assert "no minutes measured yet" in shown.output

    aborted = vpp("events", "abort", event_id, "--yes", "--json", url=live.url, key=operator)
    assert aborted.exit_code == 0, aborted.output
    assert json.loads(aborted.output)["status"] == "aborted"
    again = vpp("events", "abort", event_id, "--yes", url=live.url, key=operator)
    assert again.exit_code == 1 and "409" in again.output

    missing = vpp("events", "show", "ge-000000000000", url=live.url, key=operator)
    assert missing.exit_code == 1 and "404" in missing.output
    not_grid = vpp("events", "abort", "cr-000000000000", "--yes", url=live.url, key=operator)
    assert not_grid.exit_code == 2 and "grid event" in not_grid.output


def test_clear_errors_without_a_key_or_a_service(live: LiveServer):
    no_key = vpp("fleet", url=live.url, key=None)
    assert no_key.exit_code == 2 and "VPP_API_KEY" in no_key.output
    bad_key = vpp("fleet", url=live.url, key="vpp_nope_nope")
    assert bad_key.exit_code == 1 and "401" in bad_key.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = vpp("fleet", url=dead, key="vpp_x_y")
    assert down.exit_code == 1 and "cannot reach" in down.output
