"""``vpp demo``: the whole story in one process, on the embedded defaults.

A SQLite file in a temporary folder, the in-process MQTT broker and state store, the API and the
dashboard on a free port (uvicorn in this event loop), ingest, forecaster and event runner, and a
simulated fleet of a few thousand homes in two regions that onboards itself through the API. The
service clock runs 60 times faster than the wall clock, from an evening, so a 2-hour evening
window plays in about two minutes. Then the story: API keys, a quote, a commitment, the window
opening, devices dropping off and customers opting out, and a short report. Ctrl-C stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vpp.domain import CommandStatus, CommandType, RequestStatus
from vpp.timefmt import parse_rfc3339, to_rfc3339

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

    from dispatch.services import Services
    from vpp.clock import Clock
    from vpp.settings import Settings

log = logging.getLogger("cli.demo")

DEMO_REGIONS = ("ERCOT-NORTH", "ERCOT-HOUSTON")
MS_PER_MIN = 60_000
STEP_MS = 15 * MS_PER_MIN  # the market books on a 15-minute grid
GAP_GOAL_PCT = 3.0  # measured against the simulator's truth, % of committed


@dataclass
class DemoOptions:
    devices: int = 3000
    regions: tuple[str, ...] = DEMO_REGIONS
    time_scale: float = 60.0
    window_h: float = 2.0
    evening_start_utc_h: int = 23  # 17:00 in Texas (CST): the evening peak starts
    lead_min: int = 20  # service minutes between the commitment and the window
    drop_fraction: float = 0.06  # devices that fall off during the window
    opt_out_at_2h: float = 0.15  # thermostat customers who override by 2 h
    host: str = "127.0.0.1"
    port: int = 0
    hold: bool = True  # keep serving the dashboard after the report, until Ctrl-C
    workdir: Path | None = None
    seed: int = 7
    log_to_file: bool = True
    settle_wait_s: float = 45.0  # wall seconds to wait for the final settlement


@dataclass
class DemoResult:
    dashboard_url: str = ""
    request_id: str | None = None
    asked_mw: float = 0.0
    quoted_mw: float = 0.0
    committed_mw: float = 0.0
    delivered_mw: float | None = None  # the API's delivery summary (the dashboard's figure)
    performance: float | None = None
    intervals: int = 0  # settlement intervals both figures are over
    expected_intervals: int = 0  # settlement intervals of the window
    settled: bool = False  # False: the figures are provisional (the final settlement not in)
    truth_mw: float | None = None  # the simulator's, same intervals, same devices
    truth_performance: float | None = None
    gap_pct: float | None = None  # |measured − truth| as % of committed
    status: str | None = None
    commanded: int | None = None
    acknowledged: int | None = None
    opted_out: int | None = None
    replaced: int | None = None
    dropped: int = 0
    devices: int = 0
    missing: list[str] = field(default_factory=list)
    wall_s: float = 0.0


# --- time ---------------------------------------------------------------------------------------
def evening_origin_ms(wall_ms: float, time_scale: float, target_ms: int) -> int:
    """The VPP_TIME_ORIGIN at which the scaled clock reads ``target_ms`` at ``wall_ms``.

    Clock: now = origin + (wall − origin) × scale, so
    origin = (wall × scale − target) / (scale − 1).
    A target less than a day ahead puts the origin at most 24 h / (scale − 1) in the past.
    """
    if time_scale <= 1:
        return int(wall_ms)
    return int((wall_ms * time_scale - target_ms) / (time_scale - 1))


def next_evening_ms(wall_ms: float, hour_utc: int, lead_min: int) -> int:
    """Service time to start at: ``lead_min`` + 45 min before the next ``hour_utc`` o'clock."""
    now = datetime.fromtimestamp(wall_ms / 1000, tz=UTC)
    target = now.replace(hour=hour_utc, minute=0, second=0, microsecond=0)
    start = target - timedelta(minutes=lead_min + 45)
    if start <= now:
        start += timedelta(days=1)
    return int(start.timestamp() * 1000)


def hhmm(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).strftime("%H:%M")


def free_socket(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _list_of(data: Any, *names: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for n in (*names, "items"):
            if isinstance(data.get(n), list):
                return list(data[n])
    return []


# --- the demo ------------------------------------------------------------------------------------
class Demo:
    def __init__(self, opts: DemoOptions, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.result = DemoResult()
        self.services: Services | None = None
        self.server: Any = None
        self.server_task: asyncio.Task[Any] | None = None
        self.sim: Any = None
        self.sim_stop = asyncio.Event()
        self.sim_task: asyncio.Task[Any] | None = None
        self.http: httpx.AsyncClient | None = None
        self.base_url = ""
        self.keys: dict[str, str] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir: Path = Path(".")
        self.clock: Clock | None = None
        self._previous_clock: Clock | None = None
        self.settings: Settings | None = None

    # ---- helpers ------------------------------------------------------------------------------
    def stage(self, n: int, title: str) -> None:
        self.console.rule(f"[bold cyan]{n}. {title}", align="left")

    def say(self, text: str) -> None:
        self.console.print("   " + text, highlight=False)

    def service_now_ms(self) -> int:
        assert self.clock is not None
        return self.clock.now_ms()

    async def api(
        self, method: str, path: str, key: str, ok: tuple[int, ...] = (200, 201), **kw: Any
    ) -> Any:
        assert self.http is not None
        headers = {"Authorization": f"Bearer {self.keys[key]}", **kw.pop("headers", {})}
        resp = await self.http.request(method, path, headers=headers, **kw)
        if resp.status_code == 404 and resp.headers.get("content-type", "").startswith(
            "application/json"
        ):
            with contextlib.suppress(ValueError):
                if resp.json().get("detail") == "Not Found":
                    raise EndpointMissing(f"{method} {path}")
        if resp.status_code not in ok:
            raise DemoError(f"{method} {path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else {}

    # ---- stages -------------------------------------------------------------------------------
    async def start_service(self) -> None:
        import httpx
        import uvicorn

        from api.app import create_app
        from dispatch.services import Services
        from store.keys import create_api_key
        from store.migrate import upgrade
        from vpp.clock import Clock, set_clock
        from vpp.settings import Settings

        opts = self.opts
        self.stage(1, "Start the service on the embedded defaults")
        if opts.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vpp-demo-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = opts.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.workdir / "demo.log"
        if opts.log_to_file:
            # The console is for the story; the components' logs go to a file.
            handler = logging.FileHandler(log_file)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            root = logging.getLogger()
            root.handlers = [handler]
            root.setLevel(logging.INFO)

        wall_ms = time.time() * 1000
        start_ms = next_evening_ms(wall_ms, opts.evening_start_utc_h, opts.lead_min)
        origin = evening_origin_ms(wall_ms, opts.time_scale, start_ms)
        self.settings = Settings(
            database_url=f"sqlite+aiosqlite:///{self.workdir}/vpp.db",
            mqtt_url="memory://",
            redis_url="memory://",
            time_scale=opts.time_scale,
            time_origin=origin,
            broker_credentials="none",
            # VPP_REGIONS narrowing the sold regions still lets the demo's own regions in.
            regions=sorted({*narrowed, *opts.regions}) if (narrowed := Settings().regions) else [],
        )
        self.clock = Clock(opts.time_scale, origin)
        import vpp.clock

        self._previous_clock = vpp.clock._clock
        set_clock(self.clock)  # one clock for every part of this process
        await asyncio.to_thread(upgrade, self.settings.database_url)
        self.services = await Services.create(self.settings, clock=self.clock)
        app = create_app(self.settings, services=self.services, run_background=True)
        sock = free_socket(opts.host, opts.port)
        port = sock.getsockname()[1]
        self.base_url = f"http://{opts.host}:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.server_task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.server_task.done():
                self.server_task.result()
                raise DemoError("the API server stopped while starting")
            await asyncio.sleep(0.05)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=120.0)
        self.say(f"data in [bold]{self.workdir}[/] (SQLite), in-process broker and state store")
        self.say(
            f"service clock: [bold]×{opts.time_scale:g}[/], "
            f"now {to_rfc3339(self.service_now_ms())} "
            f"(a {opts.window_h:g} h window lasts {opts.window_h * 3600 / opts.time_scale:.0f} s)"
        )
        self.say(f"API and dashboard on [bold]{self.base_url}[/]  ·  log: {log_file}")

        now = self.service_now_ms()
        for name, tenant, role in (
            ("fleet", "sunrise-homes", "fleet"),
            ("buyer", "hyperscale-dc", "hyperscaler"),
            ("operator", "grid-ops", "operator"),
        ):
            self.keys[name] = await create_api_key(self.services.db, tenant, role, now, "demo")
        self.result.dashboard_url = f"{self.base_url}/#key={self.keys['buyer']}"
        self.say(
            "API keys: fleet owner [bold]sunrise-homes[/], buyer [bold]hyperscale-dc[/] "
            "(hyperscaler), grid operator [bold]grid-ops[/]"
        )
        self.console.print()
        self.console.print(
            f"   [bold green]Dashboard:[/] [link={self.result.dashboard_url}]"
            f"{self.result.dashboard_url}[/link]",
            soft_wrap=True,
        )
        self.console.print(
            f"   [dim](operator view: {self.base_url}/#key={self.keys['operator']})[/]",
            soft_wrap=True,
        )

    async def start_fleet(self) -> None:
        import httpx
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from sim.simulator import FaultPlan, FleetSimulator

        opts = self.opts
        assert self.services is not None
        self.stage(2, f"A simulated fleet of {opts.devices:,} homes onboards itself")
        chunk = max(250, math.ceil(opts.devices / 12))
        progress = Progress(
            "   [progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )

        with progress:
            task = progress.add_task("registering devices", total=opts.devices)

            async def advance(response: httpx.Response) -> None:
                path = response.request.url.path
                if path.endswith("/v1/devices/bulk") and response.status_code < 300:
                    progress.advance(task, chunk)

            onboarding_http = httpx.AsyncClient(
                base_url=self.base_url, timeout=600.0, event_hooks={"response": [advance]}
            )
            self.sim = FleetSimulator(
                self.settings,
                n_devices=opts.devices,
                regions=list(opts.regions),
                api_url=self.base_url,
                api_key=self.keys["fleet"],
                http_client=onboarding_http,
                seed=opts.seed,
                clock=self.clock,
                mqtt_client_factory=self.services.mqtt_client,
                id_prefix="home",
                tick_s=15.0,
                faults=FaultPlan(),
                fleet_options={"opt_out_at_2h": opts.opt_out_at_2h},
            )
            try:
                n = await self.sim.onboard(chunk=chunk)
            finally:
                await onboarding_http.aclose()
            progress.update(task, completed=opts.devices)
        self.result.devices = n
        self.sim_task = asyncio.create_task(self.sim.run(self.sim_stop))

        with Progress(
            "   [progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            transient=False,
        ) as progress:
            task = progress.add_task("devices online", total=n)
            deadline = time.monotonic() + 60
            online = 0
            while time.monotonic() < deadline:
                fleet = await self.api("GET", "/v1/fleet", "operator")
                online = int(fleet.get("totals", {}).get("online", 0))
                progress.update(task, completed=online)
                if online >= 0.9 * n:
                    break
                await asyncio.sleep(1.0)
        fleet = await self.api("GET", "/v1/fleet", "operator")
        from rich.table import Table

        table = Table(box=None, padding=(0, 2), pad_edge=False)
        for col in ("region", "kind", "registered", "online", "available MW"):
            table.add_column(col, justify="left" if col in ("region", "kind") else "right")
        for row in fleet.get("regions", []):
            table.add_row(
                row["region"],
                row["kind"],
                f"{row['registered']:,}",
                f"{row['online']:,}",
                f"{row['available_mw']:.2f}",
            )
        self.console.print(table)

    async def quote_and_commit(self) -> dict[str, Any] | None:
        opts = self.opts
        region = opts.regions[0]
        self.stage(3, f"A buyer asks for firm capacity in {region}")
        now = self.service_now_ms()
        start_ms = ((now + opts.lead_min * MS_PER_MIN) // STEP_MS + 1) * STEP_MS
        end_ms = start_ms + int(opts.window_h * 3_600_000)
        try:
            fc = await self.api(
                "GET",
                "/v1/forecast",
                "buyer",
                params={
                    "region": region,
                    "start": to_rfc3339(start_ms),
                    "end": to_rfc3339(end_ms),
                    "step": "PT15M",
                    "firmness": 0.9,
                },
            )
            p90 = [float(i["p90_mw"]) for i in fc.get("intervals", [])]
            p50 = [float(i["p50_mw"]) for i in fc.get("intervals", [])]
            firm = min(p90) if p90 else 0.0
            self.say(
                f"forecast for {hhmm(start_ms)}–{hhmm(end_ms)} UTC: P50 {min(p50, default=0):.2f} "
                f"MW, P90 {firm:.2f} MW (lowest interval)"
            )
        except EndpointMissing:
            firm = 0.0
            self.say("[yellow]forecast not available[/]")
        # Ask for a round figure a little above what the fleet holds firm: the quote shows the cap.
        asked = max(0.5, math.ceil(firm * 1.1 * 2) / 2) if firm > 0 else 1.0
        self.result.asked_mw = asked
        body = {
            "region": region,
            "mw": asked,
            "start": to_rfc3339(start_ms),
            "end": to_rfc3339(end_ms),
            "firmness": 0.9,
        }
        try:
            quote = await self.api(
                "POST",
                "/v1/capacity-requests",
                "buyer",
                json=body,
                headers={"Idempotency-Key": f"demo-{opts.seed}-{start_ms}"},
            )
        except EndpointMissing:
            self.say("[yellow]capacity requests not available on this service[/]")
            return None
        self.result.request_id = quote["id"]
        self.result.quoted_mw = float(quote.get("quoted_mw") or 0.0)
        self.say(
            f"asked [bold]{asked:g} MW[/] at P90 for {hhmm(start_ms)}–{hhmm(end_ms)} UTC → "
            f"[bold]{quote['status']}[/] {self.result.quoted_mw:.2f} MW as {quote['id']}"
        )
        if quote.get("reason"):
            self.say(f"[dim]{quote['reason']}[/]")
        if quote["status"] != RequestStatus.quoted or self.result.quoted_mw <= 0:
            self.say("[yellow]nothing to commit[/]")
            return quote
        committed = await self.api(
            "POST", f"/v1/capacity-requests/{quote['id']}/commit", "buyer", ok=(200, 201, 409)
        )
        if "id" not in committed:
            self.say(f"[red]commit refused:[/] {committed.get('detail')}")
            return quote
        self.result.committed_mw = float(committed.get("committed_mw") or self.result.quoted_mw)
        self.say(
            f"committed: [bold]{self.result.committed_mw:.2f} MW[/] booked "
            f"(status {committed['status']})"
        )
        plan = committed.get("plan") or {}
        by_kind = plan.get("devices_by_kind") or {}
        if by_kind:
            parts = [
                f"{k}: {int(v.get('assigned', 0)):,} homes (+{int(v.get('reserve', 0)):,} reserve)"
                for k, v in by_kind.items()
            ]
            self.say("plan: " + "; ".join(parts))
        return dict(committed)

    async def run_window(self, req: dict[str, Any]) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        opts = self.opts
        rid = req["id"]
        start_ms = parse_rfc3339(req["start"], "start")
        end_ms = parse_rfc3339(req["end"], "end")
        self.stage(4, f"The window opens at {hhmm(start_ms)} UTC")
        with Progress(
            "   [progress.description]{task.description}",
            BarColumn(),
            TextColumn("{task.fields[clock]}"),
            console=self.console,
            transient=True,
        ) as progress:
            lead = max(1, start_ms - self.service_now_ms())
            task = progress.add_task("waiting for the window", total=lead, clock="")
            while self.service_now_ms() < start_ms:
                left = start_ms - self.service_now_ms()
                progress.update(
                    task, completed=lead - max(left, 0), clock=f"{hhmm(self.service_now_ms())} UTC"
                )
                await asyncio.sleep(0.25)
        self.say(f"{hhmm(start_ms)} UTC: dispatching {rid}")
        self.say(
            "[dim]live: delivered/target MW · devices commanded (cmd), acknowledged (ack), "
            "opted out (out), replaced (repl)[/]"
        )

        total_ms = end_ms - start_ms
        drop_at_ms = start_ms + total_ms // 4
        dropped = False
        last: dict[str, Any] = {}
        timeline_missing = False
        with Progress(
            "   [progress.description]{task.description}",
            BarColumn(bar_width=20),
            TextColumn("{task.fields[line]}"),
            console=self.console,
        ) as progress:
            task = progress.add_task(f"{hhmm(start_ms)}", total=total_ms, line="")
            while True:
                now = self.service_now_ms()
                if not dropped and now >= drop_at_ms and opts.drop_fraction > 0:
                    ids = await self.sim.drop_devices(opts.drop_fraction)
                    self.result.dropped = len(ids)
                    dropped = True
                    progress.console.print(
                        f"   [yellow]{hhmm(now)} UTC: {len(ids):,} homes drop off the network "
                        "(an internet outage); the service replaces them[/]"
                    )
                if not timeline_missing:
                    try:
                        data = await self.api("GET", f"/v1/events/{rid}/timeline", "operator")
                        rows = _list_of(data, "timeline", "minutes", "points", "intervals")
                        if rows:
                            last = rows[-1]
                    except EndpointMissing:
                        timeline_missing = True
                        self.result.missing.append("GET /v1/events/{id}/timeline")
                    except DemoError as exc:
                        log.info("timeline: %s", exc)
                if timeline_missing:
                    last = await self._counts_from_db(rid)
                line = (
                    f"{float(last.get('delivered_mw') or 0):.2f}/"
                    f"{float(last.get('target_mw') or 0):.2f} MW · cmd "
                    f"{int(last.get('commanded') or 0):,} ack "
                    f"{int(last.get('acknowledged') or 0):,} out "
                    f"{int(last.get('opted_out') or 0):,} repl "
                    f"{int(last.get('replaced') or 0):,}"
                )
                progress.update(
                    task,
                    completed=min(now - start_ms, total_ms),
                    description=f"{hhmm(min(now, end_ms))} UTC",
                    line=line,
                )
                if now >= end_ms:
                    break
                await asyncio.sleep(0.5)
        for name in ("commanded", "acknowledged", "opted_out", "replaced"):
            if last.get(name) is not None:
                setattr(self.result, name, int(last[name]))
        self.say(f"{hhmm(end_ms)} UTC: window closed; devices restored in a random stagger")

    async def _counts_from_db(self, event_id: str) -> dict[str, Any]:
        """Without the timeline endpoint: count the stored commands of the event."""
        from sqlalchemy import func, select

        from store.models import Command

        assert self.services is not None
        async with self.services.db.session() as session:
            rows = (
                await session.execute(
                    select(Command.status, func.count(func.distinct(Command.device_id)))
                    .where(Command.event_id == event_id, Command.type != CommandType.restore.value)
                    .group_by(Command.status)
                )
            ).all()
        by = {str(s): int(n) for s, n in rows}
        acked = sum(
            by.get(s, 0)
            for s in (CommandStatus.received, CommandStatus.started, CommandStatus.completed)
        )
        return {
            "commanded": sum(by.values()),
            "acknowledged": acked + by.get(CommandStatus.opted_out, 0),
            "opted_out": by.get(CommandStatus.opted_out, 0),
            "replaced": by.get(CommandStatus.missed, 0),
        }

    async def settle(self, rid: str) -> None:
        from rich.progress import Progress, SpinnerColumn

        self.stage(5, "Measurement and settlement")
        deadline = time.monotonic() + self.opts.settle_wait_s
        req: dict[str, Any] = {}
        with Progress(
            SpinnerColumn(),
            "[progress.description]{task.description}",
            console=self.console,
            transient=True,
        ) as progress:
            progress.add_task("   waiting for the request to complete and settle", total=None)
            while True:
                req = await self.api("GET", f"/v1/capacity-requests/{rid}", "buyer")
                # Settled: every interval's final figures (a completed request's intervals
                # before that are the provisional ones measured so far).
                if req.get("status") == RequestStatus.completed and req.get("settled"):
                    break
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(1.0)
        self.result.status = req.get("status")
        intervals = [i for i in req.get("intervals", []) if isinstance(i, dict)]
        delivery = req.get("delivery") or {}
        # The service's figures as its API gives them (the dashboard shows the same), and the
        # simulator's truth over the same intervals and the event's own devices, put through
        # the same function.
        if delivery.get("delivered_mw") is not None:
            self.result.delivered_mw = float(delivery["delivered_mw"])
        if req.get("performance") is not None:
            self.result.performance = float(req["performance"])
        self.result.intervals = len(intervals)
        self.result.settled = bool(req.get("settled"))
        self.result.expected_intervals = int(delivery.get("expected_intervals") or 0)
        try:
            self._truth(rid, req, intervals)
        except Exception:  # the report goes on without the truth
            log.exception("ground truth of %s", rid)
        self.say(
            f"{rid}: [bold]{self.result.status}[/], {len(intervals)} settlement intervals"
            + (
                f", performance [bold]{self.result.performance * 100:.1f} %[/]"
                if self.result.performance is not None
                else ""
            )
            + (
                ""
                if self.result.settled
                else " [yellow](not settled yet: figures over the intervals measured so far)[/]"
            )
        )

    def _truth(self, rid: str, req: dict[str, Any], intervals: list[dict[str, Any]]) -> None:
        """The simulator's ground truth over the settlement intervals the API counted, summed
        over the event's devices only, summarised by the service's own function."""
        from dispatch.settlement import delivery_summary

        if not intervals or self.sim is None:
            return
        starts = [parse_rfc3339(i["start"], "start") for i in intervals]
        ends = [parse_rfc3339(i["end"], "end") for i in intervals]
        committed = [float(i["target_mw"]) for i in intervals]
        true_mw = self.sim.ground_truth().on_intervals(rid, starts, ends)
        assert self.settings is not None
        window = dict(
            window_start_ms=parse_rfc3339(req["start"], "start"),
            window_end_ms=parse_rfc3339(req["end"], "end"),
            interval_s=int(self.settings.settlement_interval_min * 60),
        )
        truth = delivery_summary(
            starts_ms=starts, ends_ms=ends, committed_mw=committed, delivered_mw=true_mw, **window
        )
        self.result.truth_mw = truth.delivered_mw
        self.result.truth_performance = truth.performance
        committed_avg = float((req.get("delivery") or {}).get("committed_mw") or 0.0)
        measured = self.result.delivered_mw
        if measured is not None and truth.delivered_mw is not None and committed_avg > 0:
            self.result.gap_pct = 100.0 * abs(measured - truth.delivered_mw) / committed_avg

    def report(self) -> None:
        from rich.panel import Panel
        from rich.table import Table

        r = self.result

        def mw(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f} MW"

        def n(v: int | None) -> str:
            return "–" if v is None else f"{v:,}"

        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("Request", str(r.request_id or "–"))
        table.add_row("Asked", mw(r.asked_mw))
        table.add_row("Quoted (P90)", mw(r.quoted_mw))
        table.add_row("Committed", mw(r.committed_mw))

        def pct(v: float | None) -> str:
            return "–" if v is None else f"{v * 100:.1f} %"

        over = f" over {r.intervals} intervals" if r.intervals else ""
        if r.intervals and not r.settled:
            over += f" of {r.expected_intervals}, provisional"
        table.add_row(f"Delivered (measured, average{over})", mw(r.delivered_mw))
        if r.truth_mw is not None:
            table.add_row("Delivered (simulator's ground truth, same)", mw(r.truth_mw))
        table.add_row("Performance (measured)", pct(r.performance))
        if r.truth_performance is not None:
            table.add_row("Performance (ground truth)", pct(r.truth_performance))
        table.add_row("Devices in the fleet", n(r.devices))
        # The outage takes homes across the fleet, not only those in the event.
        table.add_row("Fleet homes dropped off mid-event", n(r.dropped))
        table.add_row("Devices commanded", n(r.commanded))
        table.add_row("Acknowledged", n(r.acknowledged))
        table.add_row("Customers who opted out", n(r.opted_out))
        table.add_row("Devices replaced", n(r.replaced))
        table.add_row("Wall time", f"{r.wall_s:.0f} s")
        self.console.print()
        self.console.print(Panel(table, title="[bold]Demo report", expand=False))
        if r.gap_pct is not None:
            met = r.gap_pct <= GAP_GOAL_PCT
            self.console.print(
                f"   gap between measured and ground truth: [bold]{r.gap_pct:.1f} %[/] of "
                f"committed (goal ≤ {GAP_GOAL_PCT:g} %"
                + ("" if met else ", [red]missed[/]")
                + f"; the same {r.intervals} settlement intervals, the event's own devices)",
                highlight=False,
            )
        if r.missing:
            self.console.print(
                "   [yellow]not available in this build:[/] " + ", ".join(sorted(set(r.missing)))
            )
        self.console.print(
            f"   [bold green]Dashboard:[/] {r.dashboard_url}", soft_wrap=True, highlight=False
        )

    async def close(self) -> None:
        self.sim_stop.set()
        if self.sim_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.sim_task, 10)
        if self.http is not None:
            await self.http.aclose()
        if self.server is not None:
            self.server.should_exit = True
        if self.server_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.server_task, 40)
        if self.services is not None:
            with contextlib.suppress(Exception):
                await self.services.close()
        if self._tmp is not None:
            with contextlib.suppress(Exception):
                self._tmp.cleanup()
        if self.clock is not None:
            import vpp.clock

            vpp.clock._clock = self._previous_clock

    async def story(self) -> DemoResult:
        t0 = time.monotonic()
        await self.start_service()
        await self.start_fleet()
        req = await self.quote_and_commit()
        if req is not None and req.get("status") == RequestStatus.committed:
            await self.run_window(req)
            await self.settle(req["id"])
        self.result.wall_s = time.monotonic() - t0
        self.report()
        return self.result


class DemoError(RuntimeError):
    pass


class EndpointMissing(DemoError):
    pass


async def run_demo(opts: DemoOptions, console: Console) -> DemoResult | None:
    """Run the story; Ctrl-C (or SIGTERM) at any point stops everything cleanly."""
    demo = Demo(opts, console)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    story = asyncio.create_task(demo.story())
    stopper = asyncio.create_task(stop.wait())
    result: DemoResult | None = None
    try:
        await asyncio.wait({story, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if story.done():
            result = story.result()
            if opts.hold and not stop.is_set():
                console.print("   The service keeps running for the dashboard: Ctrl-C to stop.")
                await stopper
        else:
            story.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await story
    finally:
        stopper.cancel()
        if stop.is_set():
            console.print("\n   stopping…")
        await demo.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if stop.is_set():
            console.print("   stopped cleanly.")
    return result


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        devices: int = typer.Option(3000, "--devices", "-n", min=50, help="simulated homes"),
        time_scale: float = typer.Option(
            60.0, "--time-scale", min=1.0, help="service clock speed (60: 2 h in 2 min)"
        ),
        port: int = typer.Option(0, help="dashboard port (0: any free port)"),
        host: str = typer.Option("127.0.0.1", help="bind address"),
        hold: bool = typer.Option(
            True, "--hold/--no-hold", help="keep the dashboard up after the report"
        ),
        workdir: Path | None = typer.Option(
            None, help="keep the SQLite file and log here (default: a temporary folder)"
        ),
    ) -> None:
        """Everything on the embedded defaults, with a scripted scenario (about 3 minutes).

        Starts the service and a simulated fleet in two regions on a clock running 60 times
        faster, prints a dashboard link, then quotes, commits and runs a 2-hour evening window
        with devices dropping off and customers opting out, and reports what was delivered.

        Example: vpp demo --devices 3000
        """
        from rich.console import Console

        console = Console(highlight=False)
        console.print(
            "[bold]VPP demo[/]: residential batteries and thermostats sold as firm capacity\n"
        )
        opts = DemoOptions(
            devices=devices,
            time_scale=time_scale,
            port=port,
            host=host,
            hold=hold,
            workdir=workdir,
        )
        try:
            result = asyncio.run(run_demo(opts, console))
        except DemoError as exc:
            console.print(f"[bold red]demo failed:[/] {exc}")
            raise typer.Exit(1) from None
        if result is None:
            raise typer.Exit(130)


__all__ = ["Demo", "DemoOptions", "DemoResult", "evening_origin_ms", "register", "run_demo"]
