"""Client commands of ``vpp``: talk to a running service over its HTTP API.

``vpp devices import``, ``vpp requests quote|commit|list|show``, ``vpp events list|show|abort`` and
``vpp fleet``. Each takes ``--url`` (default ``VPP_API_URL`` or http://127.0.0.1:8000), ``--key``
(default ``VPP_API_KEY``) and ``--json`` (the API's own JSON, for scripts). Heavy imports (httpx,
rich) happen inside the commands so ``vpp --help`` stays instant.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from vpp.domain import DeviceKind, GridEventStatus, RequestStatus

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

DEFAULT_URL = "http://127.0.0.1:8000"

# Tests point the client at an in-process app by setting this to an httpx transport.
transport: Any = None

UrlOpt = typer.Option(
    None, "--url", envvar="VPP_API_URL", help="service base URL (default http://127.0.0.1:8000)"
)
KeyOpt = typer.Option(None, "--key", envvar="VPP_API_KEY", help="API key (or env VPP_API_KEY)")
JsonOpt = typer.Option(False, "--json", help="print the API's JSON answer, for scripts")


# --- plumbing ------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):
            return "; ".join(
                str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail
            )
        return str(detail)
    return json.dumps(body)[:500]


class ApiClient:
    """A thin synchronous client: one place for the key, the base URL and error messages."""

    def __init__(self, url: str | None, key: str | None, timeout_s: float = 60.0) -> None:
        import httpx

        if not key:
            fail("no API key: pass --key or set VPP_API_KEY (make one: vpp keys create …)", 2)
        self.base_url = (url or DEFAULT_URL).rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "vpp-cli"},
            timeout=timeout_s,
            transport=transport,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        ok: Sequence[int] = (200, 201, 202, 204),
        **kwargs: Any,
    ) -> httpx.Response:
        import httpx

        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            fail(f"cannot reach the service at {self.base_url} (is `vpp serve` running? --url?)")
        except httpx.TimeoutException:
            fail(f"the service at {self.base_url} did not answer in time")
        if resp.status_code in ok:
            return resp
        hint = {
            401: " (check --key / VPP_API_KEY)",
            403: " (this key's role may not do that)",
            429: f" (retry in {resp.headers.get('Retry-After', '?')} s)",
        }.get(resp.status_code, "")
        if resp.status_code == 404 and _detail(resp) == "Not Found":
            fail(f"{method} {path}: not available on this service (404){hint}")
        fail(f"{method} {path}: {resp.status_code} {_detail(resp)}{hint}")

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        resp = self.request("POST", path, **kwargs)
        return resp.json() if resp.content else {}

    def close(self) -> None:
        self.http.close()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _list_of(data: Any, *names: str) -> list[Any]:
    """The list in an answer: the answer itself or the first named (or only) list inside it."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for name in (*names, "items", "data", "results", "rows"):
            if isinstance(data.get(name), list):
                return list(data[name])
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return list(lists[0])
    return []


def _mw(value: Any) -> str:
    if value is None or value == "":
        return "–"
    try:
        return f"{float(value):,.3f}"
    except (TypeError, ValueError):
        return str(value)


def _pct(value: Any) -> str:
    if value is None:
        return "–"
    try:
        return f"{float(value) * 100:.1f} %"
    except (TypeError, ValueError):
        return str(value)


def _short_time(value: Any) -> str:
    """A wire time as a table cell, ``2026-07-15 17:00Z`` (seconds and ms only if not zero)."""
    from vpp.timefmt import TimeFormatError, parse_rfc3339, to_rfc3339

    text = str(value or "–")
    try:
        wire = to_rfc3339(parse_rfc3339(text))
    except TimeFormatError:
        return text
    clock = wire[11:-1].removesuffix(".000").removesuffix(":00")
    return f"{wire[:10]} {clock}Z"


# --- times ---------------------------------------------------------------------------------------
_RELATIVE = re.compile(r"^(?:now)?\s*\+\s*(\d+(?:\.\d+)?)\s*([smhd])$", re.IGNORECASE)
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_span_s(text: str, field: str) -> float:
    """``90m``, ``2h``, ``1d`` or an ISO 8601 duration (``PT2H``) → seconds."""
    match = _SPAN.match(text.strip())
    if match:
        return float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    from api.routers.forecast import parse_duration_s

    try:
        return float(parse_duration_s(text))
    except ValueError:
        fail(f"{field}: {text!r} is not a duration such as 2h, 90m or PT2H", 2)


def resolve_time(text: str, field: str, now_ms: int | None = None) -> str:
    """RFC 3339 (an offset, or UTC if none), or ``+2h`` / ``now+90m`` relative to the service
    clock → the wire's RFC 3339 (vpp.timefmt)."""
    from vpp.timefmt import TimeFormatError, parse_rfc3339, to_rfc3339

    text = text.strip()
    if text.lower() == "now" or _RELATIVE.match(text):
        if now_ms is None:
            from vpp.clock import get_clock

            now_ms = get_clock().now_ms()
        offset_s = 0.0
        match = _RELATIVE.match(text)
        if match:
            offset_s = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return to_rfc3339(now_ms + round(offset_s * 1000))
    try:
        return to_rfc3339(parse_rfc3339(text, field, assume_utc=True))
    except TimeFormatError as exc:
        fail(f"{exc} (or +2h from now)", 2)


# --- devices import ------------------------------------------------------------------------------
def read_devices_file(path: Path, fmt: str | None) -> tuple[str, list[str], list[Any]]:
    """(format, csv header, rows). CSV rows stay raw lines' cells so the server parses them;
    JSON rows are objects (a top-level list, or {"devices": [...]})."""
    import csv

    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt in ("jsonl", "ndjson"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "json", [], rows
    if fmt == "json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            fail(f"{path}: not valid JSON ({exc})", 2)
        rows = _list_of(data, "devices")
        if not rows and not isinstance(data, list | dict):
            fail(f"{path}: expected a JSON array of devices or {{'devices': [...]}}", 2)
        return "json", [], rows
    if fmt == "csv":
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                fail(f"{path}: empty CSV (the first row names the fields)", 2)
            rows = [r for r in reader if any(cell.strip() for cell in r)]
        return "csv", header, rows
    fail(f"--format: {fmt!r} is not csv or json (name the file .csv/.json or pass --format)", 2)


def _batches(rows: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(rows), size):
        yield start, rows[start : start + size]


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _shift_row_indices(detail: Any, offset: int) -> Any:
    """Bulk errors name rows by index within the batch; name them by index within the file."""
    if isinstance(detail, list):
        return [_shift_row_indices(d, offset) for d in detail]
    if isinstance(detail, dict):
        out = dict(detail)
        for key in ("index", "row"):
            if isinstance(out.get(key), int):
                out[key] = out[key] + offset
        return out
    return detail


devices_app = typer.Typer(
    help="Devices of a fleet. Example: vpp devices import homes.csv --key $FLEET_KEY",
    no_args_is_help=True,
)


@devices_app.command("import")
def devices_import(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV or JSON file"),
    fmt: str | None = typer.Option(None, "--format", help="csv | json (default: by extension)"),
    batch_size: int = typer.Option(5000, min=1, max=100_000, help="devices per API call"),
    credentials: Path | None = typer.Option(
        None,
        "--credentials",
        help="where to write the devices' MQTT credentials (shown only once) "
        "(default: FILE's name + .credentials.json)",
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Register devices from a CSV (header row = field names) or JSON file, in batches.

    Each batch is all or nothing; a bad row stops the import, named by its index in the file.

    The MQTT credentials the service hands out once are written to --credentials (mode 600).

    Example: vpp devices import homes.csv --key $FLEET_KEY

    CSV header, e.g.: id,kind,site_id,region,capacity_wh,max_discharge_w,max_charge_w
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    kind, header, rows = read_devices_file(file, fmt)
    if not rows:
        fail(f"{file}: no devices in the file", 2)
    client = ApiClient(url, key)
    creds_path = credentials or file.with_name(file.name + ".credentials.json")
    stored: list[Any] = []
    errors: Any = None
    failed_at: int | None = None
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        disable=as_json,
        transient=False,
    ) as progress:
        task = progress.add_task(f"importing {file.name}", total=len(rows))
        for offset, batch in _batches(rows, batch_size):
            if kind == "csv":
                resp = client.request(
                    "POST",
                    "/v1/devices/bulk",
                    ok=(200, 201, 422, 409),
                    content=_csv_text(header, batch).encode(),
                    headers={"Content-Type": "text/csv"},
                )
            else:
                resp = client.request(
                    "POST", "/v1/devices/bulk", ok=(200, 201, 422, 409), json=batch
                )
            if resp.status_code in (409, 422):
                try:
                    body = resp.json()
                except ValueError:
                    body = {"detail": resp.text}
                errors = _shift_row_indices(body.get("errors", body.get("detail")), offset)
                if isinstance(body.get("detail"), str) and body.get("errors") is not None:
                    errors = {"detail": body["detail"], "errors": errors}
                failed_at = offset
                break
            stored.extend(_list_of(resp.json(), "devices", "created", "credentials"))
            progress.advance(task, len(batch))
    client.close()
    if stored:
        creds_path.write_text(json.dumps(stored, indent=1, default=str))
        creds_path.chmod(0o600)
    if as_json:
        _print_json(
            {
                "imported": len(stored),
                "total": len(rows),
                "credentials_file": str(creds_path) if stored else None,
                "failed_batch_start": failed_at,
                "errors": errors,
            }
        )
        if errors is not None:
            raise typer.Exit(1)
        return
    out = _console()
    if stored:
        out.print(f"imported [bold]{len(stored):,}[/] of {len(rows):,} devices")
        out.print(f"MQTT credentials written to [bold]{creds_path}[/] (keep it safe)")
    if errors is not None:
        err = _console(stderr=True)
        err.print(
            f"[bold red]error:[/] the batch starting at device {failed_at} was refused; "
            f"nothing from it was stored ({len(stored):,} devices before it were)."
        )
        for line in _error_lines(errors)[:50]:
            err.print(f"  {line}", soft_wrap=True)
        raise typer.Exit(1)


def _error_lines(errors: Any) -> list[str]:
    if isinstance(errors, dict) and "errors" in errors:
        errors = errors["errors"]
    if isinstance(errors, list):
        lines = []
        for e in errors:
            if isinstance(e, dict):
                where = e.get("index", e.get("row"))
                field = e.get("field") or ".".join(str(p) for p in e.get("loc", []))
                msg = e.get("message") or e.get("msg") or e.get("detail") or json.dumps(e)
                lines.append(f"row {where}: {field}: {msg}" if where is not None else f"{msg}")
            else:
                lines.append(str(e))
        return lines
    return [str(errors)]


# --- capacity requests ---------------------------------------------------------------------------
requests_app = typer.Typer(
    help="Capacity requests. Example: vpp requests quote --region ERCOT-NORTH --mw 5 "
    "--start +2h --duration 2h",
    no_args_is_help=True,
)


def _request_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("id", "left"),
        ("region", "left"),
        ("status", "left"),
        ("start (UTC)", "left"),
        ("end (UTC)", "left"),
        ("asked MW", "right"),
        ("quoted MW", "right"),
        ("firmness", "right"),
        ("performance", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            str(r.get("id")),
            str(r.get("region", "")),
            _status_text(r.get("status")),
            _short_time(r.get("start")),
            _short_time(r.get("end")),
            _mw(r.get("mw")),
            _mw(r.get("quoted_mw")),
            f"P{round(float(r['firmness']) * 100)}" if r.get("firmness") is not None else "–",
            _pct(r.get("performance")),
        )
    return table


def _status_text(status: Any) -> str:
    colour = {
        RequestStatus.quoted.value: "blue",
        RequestStatus.committed.value: "yellow",
        RequestStatus.active.value: "green",
        RequestStatus.completed.value: "bold",
        RequestStatus.rejected.value: "red",
        RequestStatus.cancelled.value: "red",
        RequestStatus.expired.value: "red",
        GridEventStatus.aborted.value: "red",
        GridEventStatus.scheduled.value: "cyan",
    }.get(str(status), "white")
    return f"[{colour}]{status}[/]"


def _show_request(req: dict[str, Any]) -> None:
    from rich.table import Table

    out = _console()
    out.print(_request_table([req], f"capacity request {req.get('id')}"))
    for field in ("reason", "quote_expires_at", "direction", "max_price_per_mwh"):
        if req.get(field) is not None:
            out.print(f"{field}: {req[field]}")
    intervals = [
        r
        for r in _list_of(req, "intervals", "delivery", "measured")
        if isinstance(r, dict) and ("target_mw" in r or "delivered_mw" in r)
    ]
    if intervals:
        table = Table(title="delivery per interval", title_justify="left")
        for col in ("start (UTC)", "target MW", "delivered MW", "performance"):
            table.add_column(col, justify="left" if col.startswith("start") else "right")
        for r in intervals:
            table.add_row(
                _short_time(r.get("start")),
                _mw(r.get("target_mw")),
                _mw(r.get("delivered_mw")),
                _pct(r.get("performance")),
            )
        out.print(table)
    d = req.get("delivery")
    if isinstance(d, dict) and d.get("delivered_mw") is not None:
        # The service's own summary (the dashboard and the CSV show the same figures).
        out.print(
            f"delivered {_mw(d.get('delivered_mw'))} MW on average against "
            f"{_mw(d.get('committed_mw'))} MW committed, performance {_pct(d.get('performance'))}, "
            f"over {d.get('intervals')} of {d.get('expected_intervals')} settlement intervals"
        )


@requests_app.command("quote")
def requests_quote(
    region: str = typer.Option(..., help="ISO zone, e.g. ERCOT-NORTH"),
    mw: float = typer.Option(..., help="MW asked for"),
    start: str = typer.Option(..., help="RFC 3339 UTC, or +2h from now (service clock)"),
    end: str | None = typer.Option(None, help="RFC 3339 UTC, or +4h; or give --duration"),
    duration: str | None = typer.Option(None, help="window length: 2h, 90m, PT2H"),
    firmness: float | None = typer.Option(None, help="0.5–0.99 (default 0.9: P90)"),
    direction: str | None = typer.Option(None, help="load_reduction (default) | net_export"),
    max_price: float | None = typer.Option(None, "--max-price", help="$/MWh ceiling"),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="retry-safe: the same key and body never quote twice"
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Ask for a quote: how many firm MW the fleet can sell in a region and window.

    Example: vpp requests quote --region ERCOT-NORTH --mw 5 --start +2h --duration 2h
    """
    if (end is None) == (duration is None):
        fail("give exactly one of --end and --duration", 2)
    start_text = resolve_time(start, "start")
    if end is not None:
        end_text = resolve_time(end, "end")
    else:
        from vpp.timefmt import parse_rfc3339, to_rfc3339

        span_ms = round(parse_span_s(duration or "", "duration") * 1000)
        end_text = to_rfc3339(parse_rfc3339(start_text, "start") + span_ms)
    body: dict[str, Any] = {"region": region, "mw": mw, "start": start_text, "end": end_text}
    if firmness is not None:
        body["firmness"] = firmness
    if direction is not None:
        body["direction"] = direction
    if max_price is not None:
        body["max_price_per_mwh"] = max_price
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    client = ApiClient(url, key)
    req = client.post("/v1/capacity-requests", json=body, headers=headers)
    client.close()
    if as_json:
        _print_json(req)
        return
    out = _console()
    if req.get("status") == RequestStatus.rejected:
        out.print(f"[red]rejected[/] {req.get('id')}: {req.get('reason', 'no reason given')}")
        return
    out.print(
        f"quoted [bold]{_mw(req.get('quoted_mw'))} MW[/] of {_mw(mw)} MW in {region} "
        f"({start_text} → {end_text}) as [bold]{req.get('id')}[/]"
        + (f", valid until {req['quote_expires_at']}" if req.get("quote_expires_at") else "")
    )
    if req.get("reason"):
        out.print(f"note: {req['reason']}")
    out.print(f"commit it with: vpp requests commit {req.get('id')}")


@requests_app.command("commit")
def requests_commit(
    request_id: str = typer.Argument(..., help="cr-… from `vpp requests quote`"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Book a quoted request's capacity (fails with 409 if it is no longer there).

    Example: vpp requests commit cr-0123456789ab
    """
    client = ApiClient(url, key)
    req = client.post(f"/v1/capacity-requests/{request_id}/commit")
    client.close()
    if as_json:
        _print_json(req)
        return
    _console().print(
        f"{req.get('id', request_id)} is [bold]{req.get('status')}[/]: "
        f"{_mw(req.get('quoted_mw'))} MW booked; it dispatches by itself when the window opens."
    )


@requests_app.command("cancel")
def requests_cancel(
    request_id: str = typer.Argument(..., help="cr-…"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Cancel a request before its window opens; booked capacity is released.

    Example: vpp requests cancel cr-0123456789ab
    """
    client = ApiClient(url, key)
    req = client.post(f"/v1/capacity-requests/{request_id}/cancel")
    client.close()
    if as_json:
        _print_json(req)
        return
    _console().print(f"{req.get('id', request_id)} is [bold]{req.get('status')}[/]")


@requests_app.command("list")
def requests_list(
    status: str | None = typer.Option(None, help="only this status (quoted, committed, …)"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List capacity requests (your tenant's; all tenants for operator and admin keys).

    Example: vpp requests list --status committed
    """
    client = ApiClient(url, key)
    data = client.get("/v1/capacity-requests", params={"status": status} if status else None)
    client.close()
    rows = _list_of(data, "requests", "capacity_requests")
    if status:
        rows = [r for r in rows if r.get("status") == status]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _console().print("no capacity requests")
        return
    _console().print(_request_table(rows, f"{len(rows)} capacity requests"))


@requests_app.command("show")
def requests_show(
    request_id: str = typer.Argument(..., help="cr-…"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """One request: status, plan and, once it has run, delivery and performance per interval.

    Example: vpp requests show cr-0123456789ab --json
    """
    client = ApiClient(url, key)
    req = client.get(f"/v1/capacity-requests/{request_id}")
    client.close()
    if as_json:
        _print_json(req)
        return
    _show_request(req)


# --- events --------------------------------------------------------------------------------------
events_app = typer.Typer(
    help="Events being dispatched (capacity requests in their window, grid events). "
    "Example: vpp events list",
    no_args_is_help=True,
)


@events_app.command("list")
def events_list(
    status: str = typer.Option("active", help="active | recent"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Active (or recent) events with their target MW.

    Example: vpp events list --status recent
    """
    from rich.table import Table

    client = ApiClient(url, key)
    rows = _list_of(client.get("/v1/events", params={"status": status}), "events")
    client.close()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _console().print(f"no {status} events")
        return
    table = Table(title=f"{len(rows)} {status} events", title_justify="left")
    for col in ("id", "region", "status", "start (UTC)", "end (UTC)", "MW"):
        table.add_column(col, justify="right" if col == "MW" else "left")
    for e in rows:
        target = next(
            (
                e[k]
                for k in ("target_mw", "committed_mw", "mw", "quoted_mw")
                if e.get(k) is not None
            ),
            None,
        )
        table.add_row(
            str(e.get("id")),
            str(e.get("region", "")),
            _status_text(e.get("status")),
            _short_time(e.get("start")),
            _short_time(e.get("end")),
            _mw(target),
        )
    _console().print(table)


@events_app.command("show")
def events_show(
    event_id: str = typer.Argument(..., help="cr-… or ge-…"),
    last: int = typer.Option(15, help="minutes to print (0: all)"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Minute by minute: target and delivered MW, and devices commanded, acked, opted out, replaced.

    Example: vpp events show ge-0123456789ab --last 30
    """
    from rich.table import Table

    client = ApiClient(url, key)
    data = client.get(f"/v1/events/{event_id}/timeline")
    client.close()
    if as_json:
        _print_json(data)
        return
    rows = _list_of(data, "timeline", "minutes", "points", "intervals")
    if not rows:
        _console().print(f"{event_id}: no minutes measured yet")
        return
    shown = rows[-last:] if last > 0 else rows
    table = Table(
        title=f"{event_id}: {len(rows)} minutes" + (f" (last {len(shown)})" if last else ""),
        title_justify="left",
    )
    cols = ("target_mw", "delivered_mw", "commanded", "acknowledged", "opted_out", "replaced")
    table.add_column("minute (UTC)")
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for r in shown:
        when = next((r[k] for k in ("ts", "minute", "start", "time") if r.get(k) is not None), "")
        table.add_row(
            _short_time(when),
            *(_mw(r.get(c)) if c.endswith("_mw") else str(r.get(c, "–")) for c in cols),
        )
    _console().print(table)


@events_app.command("abort")
def events_abort(
    event_id: str = typer.Argument(..., help="ge-… (a grid event)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Abort a grid event: every device it commanded is restored at once.

    Example: vpp events abort ge-0123456789ab --yes
    """
    if not event_id.startswith("ge-"):
        fail(
            f"event_id: {event_id!r} is not a grid event (ge-…); capacity requests are not "
            "aborted from here",
            2,
        )
    if not yes and not as_json and sys.stdin.isatty():
        typer.confirm(f"Abort {event_id} and restore every device?", abort=True)
    client = ApiClient(url, key)
    data = client.post(f"/v1/grid-events/{event_id}/abort")
    client.close()
    if as_json:
        _print_json(data)
        return
    _console().print(f"{event_id}: [bold]{data.get('status', GridEventStatus.aborted.value)}[/]")


# --- audit ---------------------------------------------------------------------------------------
def _since(text: str, field: str) -> str:
    """An RFC 3339 time, or a span (``2h``, ``1d``) meaning that long before now."""
    if _SPAN.match(text.strip()):
        from vpp.clock import get_clock
        from vpp.timefmt import to_rfc3339

        return to_rfc3339(get_clock().now_ms() - round(parse_span_s(text, field) * 1000))
    return resolve_time(text, field)


def audit(
    since: str | None = typer.Option(None, help="RFC 3339, or a span back from now: 2h, 7d"),
    until: str | None = typer.Option(None, help="RFC 3339, or a span back from now"),
    tenant: str | None = typer.Option(None, help="only the callers of this tenant"),
    action: str | None = typer.Option(None, help="only this action, e.g. request.committed"),
    limit: int = typer.Option(50, min=1, max=1000, help="rows, newest first"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Who did what and when: the audit trail (an admin key).

    Example: vpp audit --since 24h --action key.revoked
    """
    from rich.table import Table

    params: dict[str, Any] = {"limit": limit}
    if since is not None:
        params["since"] = _since(since, "since")
    if until is not None:
        params["until"] = _since(until, "until")
    if tenant is not None:
        params["tenant"] = tenant
    if action is not None:
        params["action"] = action
    client = ApiClient(url, key)
    rows = _list_of(client.get("/v1/audit", params=params), "items")
    client.close()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _console().print("no audit entries")
        return
    table = Table(title=f"{len(rows)} audit entries, newest first", title_justify="left")
    for col in ("at (UTC)", "action", "target", "tenant", "key", "detail"):
        table.add_column(col)
    for r in rows:
        detail = json.dumps(r.get("detail") or {}, separators=(",", ":"))
        table.add_row(
            _short_time(r.get("at")),
            str(r.get("action", "")),
            str(r.get("target_id") or "–"),
            str(r.get("tenant") or "–"),
            str(r.get("key_id") or r.get("actor") or "–"),
            detail if len(detail) <= 80 else detail[:79] + "…",
        )
    _console().print(table)


# --- fleet ---------------------------------------------------------------------------------------
def fleet_rows(data: Any) -> list[dict[str, Any]]:
    """Flatten the fleet answer into rows of region, kind, registered, online, available_mw,
    whether it lists rows or nests kinds inside regions."""
    rows: list[dict[str, Any]] = []
    kinds = {k.value for k in DeviceKind}

    def walk(node: Any, region: str | None, key_name: str | None) -> None:
        if isinstance(node, list):
            for n in node:
                walk(n, region, None)
            return
        if not isinstance(node, dict):
            return
        here = node.get("region", region)
        kind = node.get("kind") or (key_name if key_name in kinds else None)
        if kind in kinds and any(k in node for k in ("registered", "online", "available_mw")):
            rows.append(
                {
                    "region": here or "?",
                    "kind": kind,
                    "registered": int(node.get("registered") or 0),
                    "online": int(node.get("online") or 0),
                    "available_mw": float(node.get("available_mw") or 0.0),
                }
            )
            return
        for k, v in node.items():
            if not isinstance(v, dict | list) or k in ("totals", "total"):
                continue
            region_key = (
                here is None
                and isinstance(v, dict)
                and k not in kinds
                and "kind" not in v
                and "region" not in v
                and k not in ("regions", "by_region", "kinds", "by_kind", "rows", "items")
            )
            walk(v, k if region_key else here, k)

    walk(data, None, None)
    return rows


def fleet(
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Devices registered and online, and MW available now, per region and kind.

    Example: vpp fleet --url http://vpp.internal:8000 --key $OPERATOR_KEY
    """
    from rich.table import Table

    client = ApiClient(url, key)
    data = client.get("/v1/fleet")
    client.close()
    if as_json:
        _print_json(data)
        return
    rows = fleet_rows(data)
    if not rows:
        _console().print("no devices registered")
        return
    table = Table(title="fleet", title_justify="left", show_footer=True)
    total_reg = sum(r["registered"] for r in rows)
    total_on = sum(r["online"] for r in rows)
    total_mw = sum(r["available_mw"] for r in rows)
    table.add_column("region", footer="total")
    table.add_column("kind")
    table.add_column("registered", justify="right", footer=f"{total_reg:,}")
    table.add_column("online", justify="right", footer=f"{total_on:,}")
    table.add_column(
        "online share",
        justify="right",
        footer=_pct(total_on / total_reg) if total_reg else "–",
    )
    table.add_column("available MW", justify="right", footer=_mw(total_mw))
    for r in sorted(rows, key=lambda r: (r["region"], r["kind"])):
        table.add_row(
            r["region"],
            r["kind"],
            f"{r['registered']:,}",
            f"{r['online']:,}",
            _pct(r["online"] / r["registered"]) if r["registered"] else "–",
            _mw(r["available_mw"]),
        )
    _console().print(table)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``vpp`` program."""
    app.add_typer(devices_app, name="devices")
    app.add_typer(requests_app, name="requests")
    app.add_typer(events_app, name="events")
    app.command("fleet")(fleet)
    app.command("audit")(audit)


__all__ = ["ApiClient", "fleet_rows", "register", "resolve_time"]
