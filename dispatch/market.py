"""The capacity market: quotes, commitments and the ledger that keeps them honest.

Pure ledger arithmetic (the 15-minute slots a window books, what a region can still sell, the
quote) is kept apart from the database edge (:class:`Market`). What a region can sell per interval
is the forecast at the asked firmness, never above the P90, less the safety margin (a share of the
P90, ``settings.margin_pct(region)``), less what is already committed. A commit re-checks that in
one transaction holding the region's lock, so two commits racing for the last megawatts cannot
both win:

- PostgreSQL: ``SELECT … FOR UPDATE`` on the region's ``region_locks`` row;
- SQLite: the transaction's first statement is a write (the region-lock upsert), so it takes the
  database's write lock before it reads anything; a second writer waits on the busy timeout.

Life of a request: quoted → committed → active → completed, or rejected / cancelled / expired.
The event runner (``dispatch.runner``, through ``dispatch.events``) moves committed → active →
completed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from devices.edges import Edges
from dispatch.forecast_service import ForecastService
from dispatch.settlement import DeliverySummary, summarise_lines
from dispatch.settlement_service import settlement_lines
from store.models import CapacityRequest, LedgerEntry, Plan, RegionLock, SettlementLine
from vpp.domain import Direction, RequestStatus
from vpp.errors import Conflict, InvalidInput, NotFound
from vpp.metrics import MARKET_REQUESTS
from vpp.regions import describe_regions
from vpp.timefmt import to_rfc3339

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

LEDGER_STEP_MS = 900_000  # the ledger books capacity on the 15-minute grid
MAX_EVENT_H = 5.0  # domain brief: events last 1–5 h
MW_RESOLUTION = 0.001  # quotes are floored to whole kW, so rounding never oversells
EPS_MW = 1e-6
BOOKED = (RequestStatus.committed.value, RequestStatus.active.value, RequestStatus.completed.value)


# --- errors -------------------------------------------------------------------------------------
def invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(field, message)


def conflict(message: str, field: str | None = "status") -> Conflict:
    return Conflict(field, message)


def not_found(request_id: str) -> NotFound:
    return NotFound("id", f"no capacity request {request_id!r}")


# --- pure ledger arithmetic ---------------------------------------------------------------------
@dataclass(frozen=True)
class RequestInput:
    """A capacity request as the market reads it (epoch ms, plain values)."""

    region: str
    mw: float
    start_ms: int
    end_ms: int
    firmness: float = 0.9
    direction: str = Direction.load_reduction.value
    max_price_per_mwh: float | None = None

    def body_hash(self) -> str:
        """Same request, same hash: what an Idempotency-Key replay is compared on."""
        doc = asdict(self)
        doc["mw"] = round(float(self.mw), 9)
        doc["firmness"] = round(float(self.firmness), 9)
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def ledger_slots(start_ms: int, end_ms: int, step_ms: int = LEDGER_STEP_MS) -> I64:
    """Starts of the 15-minute slots [start, end) touches: a window off the grid books every slot
    it overlaps (the conservative side: the devices are held for the whole slot)."""
    first = (int(start_ms) // step_ms) * step_ms
    stop = -(-int(end_ms) // step_ms) * step_ms
    return np.arange(first, stop, step_ms, dtype=np.int64)


def validate_input(
    inp: RequestInput,
    now_ms: int,
    known_regions: set[str],
    *,
    horizon_h: float,
    min_notice_s: float,
    max_mw: float,
) -> None:
    """Raise :class:`InvalidInput` naming the first bad field."""
    if not inp.region or inp.region not in known_regions:
        known = describe_regions(sorted(known_regions))
        raise invalid("region", f"unknown region {inp.region!r} ({known})")
    if not math.isfinite(inp.mw) or inp.mw <= 0:
        raise invalid("mw", "must be greater than 0")
    if inp.mw > max_mw:
        raise invalid("mw", f"{inp.mw:g} MW is more than the {max_mw:g} MW a request may ask")
    if not math.isfinite(inp.firmness) or not 0.5 <= inp.firmness <= 0.99:
        raise invalid("firmness", "must be within 0.5–0.99")
    if inp.direction not in (Direction.load_reduction.value, Direction.net_export.value):
        raise invalid("direction", "must be 'load_reduction' or 'net_export'")
    if inp.max_price_per_mwh is not None and not (
        math.isfinite(inp.max_price_per_mwh) and inp.max_price_per_mwh >= 0
    ):
        raise invalid("max_price_per_mwh", "must be a non-negative number")
    if inp.end_ms <= inp.start_ms:
        raise invalid("end", "must be after start")
    if inp.start_ms < now_ms:
        raise invalid("start", f"the window starts in the past (now is {to_rfc3339(now_ms)})")
    earliest = now_ms + int(min_notice_s * 1000)
    if inp.start_ms < earliest:
        raise invalid(
            "start",
            f"notice of at least {min_notice_s / 60:g} min is needed: start at "
            f"{to_rfc3339(earliest)} or later",
        )
    horizon_end = now_ms + int(horizon_h * 3_600_000)
    slots = ledger_slots(inp.start_ms, inp.end_ms)
    if int(slots[-1]) + LEDGER_STEP_MS > horizon_end:
        raise invalid(
            "end",
            f"beyond the forecast horizon of {horizon_h:g} h (the last bookable interval ends "
            f"{to_rfc3339(horizon_end // LEDGER_STEP_MS * LEDGER_STEP_MS)})",
        )


def window_rule(inp: RequestInput) -> str | None:
    """A business rule the window breaks (the request is quoted 'rejected' with it), or None."""
    hours = (inp.end_ms - inp.start_ms) / 3_600_000
    if hours > MAX_EVENT_H + 1e-9:
        return (
            f"events last at most {MAX_EVENT_H:g} h and this window is {hours:g} h: ask for "
            "consecutive windows of up to 5 h instead"
        )
    return None


def sellable_mw(firm_mw: F64, p90_mw: F64, margin_pct: float) -> F64:
    """What the ledger may hold in total per interval: the forecast at the asked firmness, never
    above the P90 (so the ledger never books more than P90 − margin), less the safety margin of
    ``margin_pct`` % of the P90."""
    firm = np.asarray(firm_mw, dtype=float)
    p90 = np.asarray(p90_mw, dtype=float)
    margin = np.maximum(p90, 0.0) * margin_pct / 100.0
    return np.maximum(np.minimum(firm, p90) - margin, 0.0)


def free_mw(sellable: F64, committed: F64) -> F64:
    return np.maximum(np.asarray(sellable, float) - np.asarray(committed, float), 0.0)


def floor_mw(mw: float) -> float:
    """Floor to the quote resolution (1 kW), never below 0."""
    if not math.isfinite(mw) or mw <= 0:
        return 0.0
    return round(math.floor(mw / MW_RESOLUTION + 1e-9) * MW_RESOLUTION, 6)


@dataclass(frozen=True)
class Quote:
    quoted_mw: float
    status: str  # "quoted" or "rejected"
    reason: str | None
    binding_slot_ms: int | None  # the interval with the least free MW


def make_quote(
    asked_mw: float,
    firmness: float,
    slots_ms: I64,
    firm_mw: F64,
    p90_mw: F64,
    committed_mw: F64,
    margin_pct: float,
) -> Quote:
    """Quoted MW = min over the window's intervals of (forecast at firmness, ≤ P90, − margin −
    committed), floored at 0 and capped at the MW asked; 0 → rejected, naming the interval."""
    if len(slots_ms) == 0:
        return Quote(0.0, RequestStatus.rejected.value, "the window has no interval", None)
    free = free_mw(sellable_mw(firm_mw, p90_mw, margin_pct), committed_mw)
    k = int(np.argmin(free))
    worst = float(free[k])
    quoted = floor_mw(min(float(asked_mw), worst))
    when = to_rfc3339(int(slots_ms[k]))
    detail = (
        f"P{round(firmness * 100):d} {float(min(firm_mw[k], p90_mw[k])):.3f} MW, margin "
        f"{margin_pct:g} % of the P90, committed {float(committed_mw[k]):.3f} MW"
    )
    if quoted <= 0:
        none = f"no capacity: 0 MW free at firmness {firmness:g} in interval {when} ({detail})"
        return Quote(0.0, RequestStatus.rejected.value, none, int(slots_ms[k]))
    reason: str | None = None
    if quoted < float(asked_mw) - EPS_MW:
        reason = f"partial: {quoted:g} of {float(asked_mw):g} MW free in interval {when} ({detail})"
    return Quote(quoted, RequestStatus.quoted.value, reason, int(slots_ms[k]))


@dataclass(frozen=True)
class QuotePreview:
    """A quote worked out but not stored: ``available_mw`` is the most the window could be quoted
    (the least free MW over its intervals; None when a rule rejects the window), ``expires_ms``
    when a quote made now would expire (None unless quoted)."""

    quote: Quote
    available_mw: float | None
    expires_ms: int | None
    intervals: int


def first_short_slot(free: F64, need_mw: float) -> int | None:
    """Index of the first interval with less than ``need_mw`` free, or None."""
    short = np.flatnonzero(np.asarray(free, float) < need_mw - EPS_MW)
    return int(short[0]) if short.size else None


def new_request_id() -> str:
    return f"cr-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class RequestDetail:
    """A request with its latest plan, booked MW per ledger slot and settlement lines;
    ``summary`` is :func:`dispatch.settlement.delivery_summary` of the lines over the window
    (None without lines): delivered and committed MW, ``performance`` (None without any
    commitment: the request's stored performance stands) and ``line_performance``, each line's
    min(delivered, target) ÷ target (1.0 where nothing was committed)."""

    request: CapacityRequest
    plan: Plan | None
    booked_starts_ms: I64
    booked_mw: F64
    lines: list[SettlementLine]
    summary: DeliverySummary | None = None

    @property
    def line_performance(self) -> list[float]:
        return [] if self.summary is None else self.summary.interval_performance.tolist()

    @property
    def performance(self) -> float | None:
        return None if self.summary is None else self.summary.performance


# --- database edge ------------------------------------------------------------------------------
class Market:
    """Quotes, commits, cancels and reads capacity requests. ``tenant_id`` None means the caller
    sees every tenant (operator, admin); otherwise another tenant's request is not found."""

    def __init__(self, services: Edges, forecast: ForecastService) -> None:
        self.services = services
        self.forecast = forecast

    # -- helpers --
    @property
    def settings(self) -> Any:
        return self.services.settings

    def now_ms(self) -> int:
        return int(self.services.clock.now_ms())

    async def known_regions(self) -> set[str]:
        """Regions a request may name: those sold (the registry, narrowed by ``VPP_REGIONS``)
        and any that holds devices."""
        regions = set((await self.services.current_regions()).sold())
        try:
            snap = await self.services.fleet.snapshot()
            regions |= {r for r in snap.regions if r}
        except Exception:  # the fleet view is a bonus here: settings list the sold regions
            log.exception("fleet snapshot for the region list")
        return regions

    async def _forecast(self, inp: RequestInput, slots: I64) -> tuple[F64, F64]:
        """(firm MW at the request's firmness, P90 MW) per ledger slot."""
        # A bad window raises ForecastInputError, an InvalidInput naming the field.
        res = await self.forecast.forecast(
            inp.region,
            int(slots[0]),
            int(slots[-1]) + LEDGER_STEP_MS,
            step_s=LEDGER_STEP_MS // 1000,
            firmness=inp.firmness,
        )
        starts = np.asarray(res.starts_ms, dtype=np.int64)
        if starts.shape != slots.shape or not np.array_equal(starts, slots):
            raise RuntimeError("forecast intervals do not match the ledger slots")
        return np.asarray(res.firm_mw, float), np.asarray(res.p90_mw, float)

    @staticmethod
    async def committed_in(session: AsyncSession, region: str, slots: I64) -> F64:
        """MW booked per slot in ``region`` (all requests)."""
        out = np.zeros(len(slots))
        if len(slots) == 0:
            return out
        rows = (
            await session.execute(
                select(LedgerEntry.interval_start_ms, func.sum(LedgerEntry.mw))
                .where(LedgerEntry.region == region)
                .where(LedgerEntry.interval_start_ms >= int(slots[0]))
                .where(LedgerEntry.interval_start_ms <= int(slots[-1]))
                .group_by(LedgerEntry.interval_start_ms)
            )
        ).all()
        if rows:
            at = np.array([int(r[0]) for r in rows], dtype=np.int64)
            mw = np.array([float(r[1] or 0.0) for r in rows])
            pos = np.searchsorted(slots, at)
            ok = (pos < len(slots)) & (slots[np.minimum(pos, len(slots) - 1)] == at)
            np.add.at(out, pos[ok], mw[ok])
        return out

    async def committed_mw(self, region: str, slots_ms: npt.ArrayLike) -> F64:
        """MW booked per 15-minute slot in a region (slot starts on the grid)."""
        slots = np.asarray(slots_ms, dtype=np.int64)
        async with self.services.db.session() as session:
            return await self.committed_in(session, region, slots)

    async def _lock_region(self, session: AsyncSession, region: str) -> None:
        """Serialise commits and cancels of one region for the rest of the transaction."""
        if self.services.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            # A write as the first statement: SQLite takes its write lock before any read.
            await session.execute(
                sqlite_insert(RegionLock)
                .values(region=region, version=0)
                .on_conflict_do_nothing(index_elements=["region"])
            )
        else:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            await session.execute(
                pg_insert(RegionLock)
                .values(region=region, version=0)
                .on_conflict_do_nothing(index_elements=["region"])
            )
            await session.execute(
                select(RegionLock.version).where(RegionLock.region == region).with_for_update()
            )
        await session.execute(
            update(RegionLock)
            .where(RegionLock.region == region)
            .values(version=RegionLock.version + 1)
        )

    async def _load(
        self, session: AsyncSession, request_id: str, tenant_id: str | None, lock: bool = False
    ) -> CapacityRequest:
        q = select(CapacityRequest).where(CapacityRequest.id == request_id)
        if tenant_id is not None:
            q = q.where(CapacityRequest.tenant_id == tenant_id)
        if lock:
            q = q.with_for_update()
        row = (
            await session.execute(q.execution_options(populate_existing=True))
        ).scalar_one_or_none()
        if row is None:
            raise not_found(request_id)
        return row

    # -- quote --
    async def _evaluate(self, inp: RequestInput, now: int) -> QuotePreview:
        """What a quote of ``inp`` says at ``now``, without storing anything."""
        s = self.settings
        validate_input(
            inp,
            now,
            await self.known_regions(),
            horizon_h=s.forecast_horizon_h,
            min_notice_s=s.min_notice_s,
            max_mw=s.max_request_mw,
        )
        slots = ledger_slots(inp.start_ms, inp.end_ms)
        rule = window_rule(inp)
        available: float | None = None
        if rule is not None:
            q = Quote(0.0, RequestStatus.rejected.value, rule, None)
        else:
            firm, p90 = await self._forecast(inp, slots)
            committed = await self.committed_mw(inp.region, slots)
            margin = s.margin_pct(inp.region)
            q = make_quote(inp.mw, inp.firmness, slots, firm, p90, committed, margin)
            available = floor_mw(float(np.min(free_mw(sellable_mw(firm, p90, margin), committed))))
        expires = None
        if q.status == RequestStatus.quoted.value:
            latest = inp.start_ms - int(s.min_notice_s * 1000)
            expires = min(now + int(s.quote_ttl_s * 1000), latest)
        return QuotePreview(q, available, expires, len(slots))

    async def preview(self, inp: RequestInput) -> QuotePreview:
        """The quote ``inp`` would get now (same checks and figures as :meth:`quote`), neither
        stored nor booked: bad input raises the same :class:`InvalidInput`."""
        return await self._evaluate(inp, self.now_ms())

    async def quote(
        self, tenant_id: str, inp: RequestInput, idempotency_key: str | None = None
    ) -> tuple[CapacityRequest, bool]:
        """Quote a request (stored as quoted or rejected). Returns (request, replayed): with an
        Idempotency-Key already used for the same body, the stored request and True."""
        digest = inp.body_hash()
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > 200:
                raise invalid("Idempotency-Key", "must be 1 to 200 characters")
            prior = await self._by_key(tenant_id, idempotency_key)
            if prior is not None:
                return self._replay(prior, digest, idempotency_key), True
        now = self.now_ms()
        pre = await self._evaluate(inp, now)
        q, expires = pre.quote, pre.expires_ms
        req = CapacityRequest(
            id=new_request_id(),
            tenant_id=tenant_id,
            region=inp.region,
            mw=float(inp.mw),
            start_ms=int(inp.start_ms),
            end_ms=int(inp.end_ms),
            firmness=float(inp.firmness),
            direction=inp.direction,
            max_price_per_mwh=inp.max_price_per_mwh,
            status=q.status,
            quoted_mw=q.quoted_mw,
            quote_expires_ms=expires,
            reason=q.reason[:500] if q.reason else None,
            idempotency_key=idempotency_key,
            body_hash=digest,
            created_ms=now,
            updated_ms=now,
        )
        try:
            async with self.services.db.session() as session, session.begin():
                session.add(req)
        except IntegrityError:
            # Another call with the same Idempotency-Key won the race: answer with its request.
            prior = await self._by_key(tenant_id, idempotency_key) if idempotency_key else None
            if prior is None:
                raise
            return self._replay(prior, digest, idempotency_key or ""), True
        MARKET_REQUESTS.labels(q.status).inc()
        return req, False

    async def _by_key(self, tenant_id: str, key: str) -> CapacityRequest | None:
        async with self.services.db.session() as session:
            row: CapacityRequest | None = (
                await session.execute(
                    select(CapacityRequest).where(
                        CapacityRequest.tenant_id == tenant_id,
                        CapacityRequest.idempotency_key == key,
                    )
                )
            ).scalar_one_or_none()
            return row

    @staticmethod
    def _replay(prior: CapacityRequest, digest: str, key: str) -> CapacityRequest:
        if prior.body_hash != digest:
            raise invalid(
                "Idempotency-Key",
                f"{key!r} was already used for request {prior.id} with a different body; "
                "use a new key for a new request",
            )
        return prior

    # -- commit --
    async def commit(self, request_id: str, tenant_id: str | None) -> tuple[CapacityRequest, bool]:
        """Book a quote's MW in the ledger. Returns (request, changed); committing a committed
        request again changes nothing. Conflict when the quote is expired, cancelled, rejected, the
        window has started, or the capacity is no longer there (the ledger is then unchanged)."""
        now = self.now_ms()
        async with self.services.db.session() as session:
            req = await self._load(session, request_id, tenant_id)
        if req.status in BOOKED:
            if req.status == RequestStatus.committed.value:
                return req, False
            raise conflict(f"request is {req.status}: it was committed already")
        self._check_committable(req, now)
        if req.quote_expires_ms is not None and now >= req.quote_expires_ms:
            await self.expire_quotes(now, request_id=request_id)
            raise conflict(f"quote expired at {to_rfc3339(req.quote_expires_ms)}")
        inp = self._input_of(req)
        slots = ledger_slots(req.start_ms, req.end_ms)
        # The forecast does not read the ledger: compute it before taking the lock.
        firm, p90 = await self._forecast(inp, slots)
        sellable = sellable_mw(firm, p90, self.settings.margin_pct(req.region))
        async with self.services.db.session() as session, session.begin():
            await self._lock_region(session, req.region)
            req = await self._load(session, request_id, tenant_id, lock=True)
            if req.status == RequestStatus.committed.value:
                return req, False  # a concurrent commit of the same request won
            self._check_committable(req, now)
            committed = await self.committed_in(session, req.region, slots)
            free = free_mw(sellable, committed)
            k = first_short_slot(free, req.quoted_mw)
            if k is not None:
                MARKET_REQUESTS.labels("conflict").inc()
                raise conflict(
                    f"capacity no longer available: {floor_mw(float(free[k])):g} MW free in "
                    f"interval {to_rfc3339(int(slots[k]))}, the quote was {req.quoted_mw:g} MW; "
                    "ask for a new quote",
                    field="mw",
                )
            session.add_all(
                [
                    LedgerEntry(
                        request_id=req.id,
                        interval_start_ms=int(t),
                        region=req.region,
                        mw=float(req.quoted_mw),
                    )
                    for t in slots
                ]
            )
            req.status = RequestStatus.committed.value
            req.updated_ms = now
        MARKET_REQUESTS.labels(RequestStatus.committed.value).inc()
        return req, True

    @staticmethod
    def _check_committable(req: CapacityRequest, now: int) -> None:
        status = req.status
        if status == RequestStatus.quoted.value:
            if req.quote_expires_ms is not None and now >= req.quote_expires_ms:
                raise conflict(f"quote expired at {to_rfc3339(req.quote_expires_ms)}")
            if now >= req.start_ms:
                raise conflict(f"the window started at {to_rfc3339(req.start_ms)}", field="start")
            return
        if status == RequestStatus.expired.value:
            when = to_rfc3339(req.quote_expires_ms) if req.quote_expires_ms else "its deadline"
            raise conflict(f"quote expired at {when}")
        if status == RequestStatus.rejected.value:
            raise conflict(
                f"request is rejected ({req.reason or 'no capacity'}): nothing to commit"
            )
        raise conflict(f"request is {status}")

    @staticmethod
    def _input_of(req: CapacityRequest) -> RequestInput:
        return RequestInput(
            region=req.region,
            mw=req.mw,
            start_ms=req.start_ms,
            end_ms=req.end_ms,
            firmness=req.firmness,
            direction=req.direction,
            max_price_per_mwh=req.max_price_per_mwh,
        )

    # -- cancel --
    async def cancel(self, request_id: str, tenant_id: str | None) -> tuple[CapacityRequest, bool]:
        """Cancel before the window: quoted or committed → cancelled, ledger rows released.
        Cancelling a cancelled request again changes nothing; Conflict once the window has started
        or the request is completed, rejected or expired."""
        now = self.now_ms()
        async with self.services.db.session() as session:
            req = await self._load(session, request_id, tenant_id)
        region = req.region
        async with self.services.db.session() as session, session.begin():
            await self._lock_region(session, region)
            req = await self._load(session, request_id, tenant_id, lock=True)
            if req.status == RequestStatus.cancelled.value:
                return req, False
            # "active" before the window only means the runner sent its commands early (they
            # take effect at the start): still cancellable, and the runner restores the devices.
            if req.status == RequestStatus.completed.value or (
                req.status == RequestStatus.active.value and now >= req.start_ms
            ):
                raise conflict(
                    f"request is {req.status}: only a request before its window can be cancelled"
                )
            if req.status in (RequestStatus.rejected.value, RequestStatus.expired.value):
                raise conflict(f"request is {req.status}: there is nothing to cancel")
            if now >= req.start_ms:
                raise conflict(
                    f"the window started at {to_rfc3339(req.start_ms)}: too late to cancel",
                    field="start",
                )
            await session.execute(delete(LedgerEntry).where(LedgerEntry.request_id == req.id))
            req.status = RequestStatus.cancelled.value
            req.updated_ms = now
        MARKET_REQUESTS.labels(RequestStatus.cancelled.value).inc()
        return req, True

    # -- housekeeping --
    async def expire_quotes(self, now_ms: int, request_id: str | None = None) -> int:
        """Quotes past their expiry become expired (they never held ledger rows). Returns how
        many; call it periodically (the event runner does)."""
        q = (
            update(CapacityRequest)
            .where(CapacityRequest.status == RequestStatus.quoted.value)
            .where(CapacityRequest.quote_expires_ms.is_not(None))
            .where(CapacityRequest.quote_expires_ms <= int(now_ms))
            .values(status=RequestStatus.expired.value, updated_ms=int(now_ms))
        )
        if request_id is not None:
            q = q.where(CapacityRequest.id == request_id)
        async with self.services.db.session() as session, session.begin():
            result = await session.execute(q)
        n = int(getattr(result, "rowcount", 0) or 0)
        if n:
            MARKET_REQUESTS.labels(RequestStatus.expired.value).inc(n)
        return n

    async def booked_mw(self, request_id: str) -> tuple[I64, F64]:
        """A request's ledger rows: (15-minute slot starts in epoch ms, MW per slot)."""
        async with self.services.db.session() as session:
            rows = (
                await session.execute(
                    select(LedgerEntry.interval_start_ms, LedgerEntry.mw)
                    .where(LedgerEntry.request_id == request_id)
                    .order_by(LedgerEntry.interval_start_ms)
                )
            ).all()
        return (
            np.array([int(r[0]) for r in rows], dtype=np.int64),
            np.array([float(r[1]) for r in rows], dtype=float),
        )

    # -- reads --
    async def get(self, request_id: str, tenant_id: str | None) -> CapacityRequest:
        """One request (NotFound for another tenant's). A quote past its expiry reads as expired."""
        async with self.services.db.session() as session:
            req = await self._load(session, request_id, tenant_id)
        now = self.now_ms()
        if (
            req.status == RequestStatus.quoted.value
            and req.quote_expires_ms is not None
            and now >= req.quote_expires_ms
        ):
            await self.expire_quotes(now, request_id=req.id)
            async with self.services.db.session() as session:
                req = await self._load(session, request_id, tenant_id)
        return req

    async def list_requests(
        self,
        tenant_id: str | None,
        *,
        status: str | None = None,
        region: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[CapacityRequest], int]:
        await self.expire_quotes(self.now_ms())
        conds = []
        if tenant_id is not None:
            conds.append(CapacityRequest.tenant_id == tenant_id)
        if status is not None:
            conds.append(CapacityRequest.status == status)
        if region is not None:
            conds.append(CapacityRequest.region == region)
        async with self.services.db.session() as session:
            total = int(
                (
                    await session.execute(
                        select(func.count()).select_from(CapacityRequest).where(*conds)
                    )
                ).scalar_one()
            )
            rows = (
                await session.execute(
                    select(CapacityRequest)
                    .where(*conds)
                    .order_by(CapacityRequest.created_ms.desc(), CapacityRequest.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).scalars()
            return list(rows), total

    async def latest_plans(self, event_ids: Sequence[str]) -> dict[str, Plan]:
        if not event_ids:
            return {}
        async with self.services.db.session() as session:
            rows = (
                await session.execute(
                    select(Plan)
                    .where(Plan.event_id.in_(list(event_ids)))
                    .order_by(Plan.event_id, Plan.version, Plan.id)
                )
            ).scalars()
            out: dict[str, Plan] = {}
            for p in rows:
                out[p.event_id] = p  # the last row per event is the latest version
            return out

    async def detail(self, req: CapacityRequest) -> RequestDetail:
        """Everything GET /v1/capacity-requests/{id} shows: the request, its latest plan, its
        ledger rows and, once settled, its delivery per interval."""
        plans = await self.latest_plans([req.id])
        starts, mw = await self.booked_mw(req.id)
        lines = await settlement_lines(self.services, req.id)
        # An interval with nothing committed shows as met (1.0); no commitment at all leaves
        # the stored performance.
        summary = (
            summarise_lines(
                lines,
                window_start_ms=req.start_ms,
                window_end_ms=req.end_ms,
                interval_s=int(self.settings.settlement_interval_min * 60),
                uncommitted=1.0,
            )
            if lines
            else None
        )
        return RequestDetail(req, plans.get(req.id), starts, mw, lines, summary)
