"""The event runner: turns committed capacity requests and grid events into device commands,
closes the loop every minute, restores devices at the end, and survives a crash.

One runner acts at a time: the one in the replica that leads (``dispatch.leadership``, a lease in
the state store). Followers do nothing, not even drain the shared ack queue. Every few
service-seconds the leader:

1. starts events whose window opened: plans them (optimiser + priority-list assignment, a
   randomised thermostat control group held back for settlement), stores the plan and the
   commands (status ``pending``; a big event's in chunks of ``STORE_CHUNK``: the first with the
   plan in one transaction, each next one while the one before is being published), publishes
   each chunk once it is committed (QoS 1, over ``VPP_MQTT_PUBLISH_CONNECTIONS`` connections) and
   marks it ``sent`` in bulk while the next goes out;
2. drains acknowledgements; a command unacknowledged after ``command_ack_timeout_s`` is published
   again with the same id; after two misses, or on ``opted_out`` / ``rejected`` / ``expired``, or
   when the device goes stale, the device is replaced (reserve first, then free devices);
3. every ``control_period_s`` estimates delivered MW from fresh telemetry against each device's
   pre-event level, and when the error exceeds max(2 %, 0.2 MW) enlists more devices, or releases
   thermostats first when over;
4. at the window's end, on an abort or a cancel, restores every device: thermostats in a
   randomised stagger (no snapback peak), or all at once on an abort.

Crash safety: commands are stored before they are published and are idempotent by id, so a
restarted runner resumes from the database: it re-publishes exactly the stored commands (same id,
same fields) and never a second, different one for the same device and interval. A crash in the
middle of a big fan-out leaves fewer commands stored than planned: the rest were never sent, and
the resumed closed loop enlists devices for the shortfall. Every command
carries ``valid_until`` at the window's end (plus the thermostat's release stagger), so if the
service dies for good nothing stays curtailed past its window.

Takeover: whenever this process becomes leader (at start, or when another replica's lease
lapsed), it first resumes every active event from the database, exactly as after a restart; when
it stops being leader it forgets its events at once and every action that would store or publish
a command checks leadership first (``LeadershipLost``), so two replicas never command at once.

Broker restarts: paho re-sends what was in flight when the connection broke; after every
reconnect the runner re-publishes each command still waiting for its ack (same id and bytes)
with a fresh ack wait, at once and again when devices have had a stale horizon to reconnect
(neither counts as an attempt: the outage is not the device's). The closed loop holds (no stale
replacements, no enlisting) while the broker is away and until devices have reported again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import func, insert, select, update

from devices.edges import Edges
from devices.outage_log import OutageLog
from devices.outages import dependency_down
from dispatch import events as es
from dispatch.leadership import Leadership
from dispatch.openadr.ven_devices import VenCommands
from dispatch.runner.commands import (
    ACK_CODES,
    ACKED,
    FAIL_CODES,
    FAILED,
    KIND_OF_COMMAND,
    LIVE,
    MAY_ACT,
    MISSED,
    OPTED_OUT,
    PENDING,
    PREEMPTED,
    RECEIVED,
    RELEASED,
    RESTORED,
    SENT,
    STALE,
    STARTED,
    STATUS_CODE,
    UNSURE,
    CommandBatch,
    new_command_id,
    payloads,
)
from dispatch.runner.store import CommandStore
from dispatch.runner.table import DeviceTable, Running
from dispatch.settlement import (
    MIN_CONTROL_DEVICES,
    RATIO_CLIP,
    BatteryDrift,
    fit_battery_drift,
)
from dispatch.types import (
    CMD_BATTERY,
    CMD_THERMOSTAT,
    Assignment,
    Demand,
    DeviceUsage,
    DispatchParams,
    Horizon,
)
from store.models import Command, EventTimeline, Plan, TelemetryInterval
from vpp import metrics
from vpp.domain import (
    COMMAND_BY_CODE,
    COMMAND_STATUS_BY_CODE,
    CommandStatus,
    CommandType,
    GridEventStatus,
    RequestStatus,
)
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.flexibility import thermostat_inputs

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

log = logging.getLogger(__name__)

CONTROL_SHARE = 0.075  # 5–10 % of eligible thermostats held back as the control group
MAX_ATTEMPTS = 2  # first send + one retry; no ack after that → missed, replaced
VALID_MARGIN_S = 60.0  # a command outlives its window by this, for clock skew and transit
RELEASE_STAGGER_S = 900.0  # thermostats release over 0–15 min after the window (10–30 min rule)
BATTERY_RESTORE_SPREAD_S = 30
# How long a thermostat's front-loaded shed is averaged over when deciding how many to start
# with (the rest are held back and enlisted as the shed fades).
FRONT_LOAD_H = 0.25
# Over-delivery beyond this share of the target is released even if it is expected to fade.
RELEASE_AT = 0.035
# A report this soon after a command came into force may still average over the switch-over;
# the closed loop waits for a later one (service ms).
ACT_LAG_MS = 30_000
# Floors in wall seconds: a sped-up service clock must not outrun the broker and ingest.
MIN_ACK_WAIT_WALL_S = 2.0
MIN_SETTLE_WALL_S = 3.0
# Messages per publish_many call, two calls queued at once: leadership is checked between
# chunks, and the publisher's connections never run dry between two of them.
PUBLISH_CHUNK = 5000
CONNECT_TIMEOUT_S = 3.0  # one broker connect attempt (a start with the broker down waits this)
PUBLISH_CONCURRENCY = 2
# An event's commands are stored in chunks of this many rows: the first with the plan in one
# transaction, each next one while the one before it is being published (a command is published
# only once its row is committed).
STORE_CHUNK = 20_000


class LeadershipLost(RuntimeError):
    """This process stopped leading in the middle of an action: stand by, store nothing more."""


def _control_group(
    ids: npt.NDArray[np.object_], event_id: str, share: float = CONTROL_SHARE
) -> npt.NDArray[np.bool_]:
    """A random share of ``ids``, reproducible from the event id (a restarted runner and an
    auditor draw the same group)."""
    rng = np.random.default_rng(zlib.crc32(event_id.encode()))
    n = len(ids)
    k = round(n * share)
    if n >= 20:
        k = max(k, 1)
    mask = np.zeros(n, bool)
    if k:
        mask[rng.choice(n, size=k, replace=False)] = True
    return mask


class EventRunner:
    """``EventRunner(services)``: ``await start()`` / ``await stop()``; ``wake()`` to act now."""

    def __init__(
        self,
        services: Edges,
        *,
        owner: str | None = None,
        leadership: Leadership | None = None,
        openadr: VenCommands | None = None,
    ) -> None:
        self.services = services
        # The second sink: devices reached over OpenADR get their commands as VTN events.
        self.openadr = openadr or VenCommands(services)
        self.settings = services.settings
        self.clock = services.clock
        self.store = CommandStore(services)
        # The process's leadership (``vpp serve`` shares one among its singleton jobs); a runner
        # made alone (tests) holds a lease of its own.
        self._own_leadership = leadership is None
        self.leadership = leadership or Leadership(services.state, self.settings, owner=owner)
        self.owner = self.leadership.owner
        self.running: dict[str, Running] = {}
        self.by_cmd: dict[str, tuple[str, int]] = {}  # command id → (event id, row)
        self.by_restore: dict[str, tuple[str, int]] = {}
        self.settle_queue: dict[str, int] = {}  # event id → service ms when to settle
        self._provisional: dict[str, int] = {}  # event id → intervals settled provisionally
        self.client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.outages = OutageLog(log, "event runner")
        self._stopping = False
        self._leader = False  # acting as leader: resumed, events in memory
        self.takeovers = 0  # times this runner resumed as the new leader
        # The runner's MQTT connections seen so far (a change is a reconnect), and the wall time
        # the broker came back (the closed loop holds until devices have reported again).
        self._seen_connects = 0
        self._broker_back_wall = float("-inf")
        self._resend_after_hold = False
        # Restores sent and not acknowledged yet: command id → (event id, row, its message and
        # valid_until; None and 0 for one resumed from the database).
        self.restore_unacked: dict[str, tuple[str, int, bytes | None, int]] = {}
        self.params = DispatchParams(reserve_pct=self.settings.replacement_reserve_pct)
        self.ticks = 0
        self.last_error: str | None = None
        self.fan_out_stats: dict[str, float] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cid = f"{self.settings.mqtt_client_id_prefix}-runner-{secrets.token_hex(4)}"
        self.client = self.services.mqtt_publisher(cid)
        self._stopping = False
        try:
            await self.client.connect(timeout_s=CONNECT_TIMEOUT_S)
        except (ConnectionError, OSError) as exc:
            # `vpp serve` comes up while the broker is down: the runner holds (broker_up is
            # False) and keeps connecting in the background until it is back.
            log.warning("event runner: broker not reachable yet (%s); retrying", exc)
            self._connect_task = asyncio.create_task(self._connect_until_up(), name="runner-mqtt")
        self._seen_connects = self.client.connects
        self.leadership.on_change.append(self._leadership_changed)
        if self._own_leadership:
            await self.leadership.start()
        self._task = asyncio.create_task(self._loop(), name="event-runner")
        self.services.on_event_change.append(self.wake)

    async def _connect_until_up(self) -> None:
        """Connect attempts with a backoff (1 s doubling to 30 s), one log line per attempt at
        most; once connected paho itself reconnects after any later loss."""
        delay = 1.0
        while not self._stopping and self.client is not None:
            await asyncio.sleep(delay)
            try:
                await self.client.connect(timeout_s=CONNECT_TIMEOUT_S)
            except (ConnectionError, OSError) as exc:
                log.info("event runner: broker still not reachable (%s)", exc)
                delay = min(delay * 2, 30.0)
                continue
            log.warning("event runner: connected to the broker")
            self._wake.set()
            return

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        connecting, self._connect_task = self._connect_task, None
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
        if self.wake in self.services.on_event_change:
            self.services.on_event_change.remove(self.wake)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self._leadership_changed in self.leadership.on_change:
            self.leadership.on_change.remove(self._leadership_changed)
        if self._own_leadership:
            await self.leadership.stop()
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:
                log.exception("runner disconnect")
            self.client = None

    def wake(self) -> None:
        self._wake.set()

    def _leadership_changed(self, leader: bool) -> None:
        self._wake.set()  # take over (or stand by) now, not on the next tick

    def _must_lead(self) -> None:
        """Before storing or publishing a command: only the leader may."""
        if not self.leadership.is_leader:
            raise LeadershipLost(self.owner)

    def stand_by(self) -> None:
        """Forget every event: the leader (another replica, or this one again later) resumes
        them from the database."""
        if self._leader:
            log.warning("event runner %s lost the lead; standing by", self.owner)
        self._leader = False
        self.running.clear()
        self.by_cmd.clear()
        self.by_restore.clear()
        self.restore_unacked.clear()
        self.settle_queue.clear()
        self._provisional.clear()

    @property
    def is_leader(self) -> bool:
        return self._leader and self.leadership.is_leader

    @property
    def broker_up(self) -> bool:
        return self.client is not None and bool(self.client.connected)

    def holding(self) -> bool:
        """The closed loop holds while the broker is away and until devices have had a stale
        horizon (wall) to report again after it came back."""
        if not self.broker_up:
            return True
        stale_wall = self.clock.wall_seconds(self.event_stale_ms() / 1000.0)
        return time.monotonic() - self._broker_back_wall < stale_wall

    def lead_ms(self) -> int:
        """How early an event is planned and its commands published (devices hold them until
        ``valid_from``): a minute, or 3 wall seconds on a sped-up clock, so that planning and
        fan-out are done when the window opens."""
        return int(max(60.0, 3.0 * self.clock.time_scale) * 1000)

    @property
    def tick_wall_s(self) -> float:
        return min(1.0, max(0.05, 5.0 / self.clock.time_scale))

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
                self.last_error = None
                if self.is_leader:  # a follower's tick touches nothing: it proves nothing back
                    self.outages.recovered()
            except asyncio.CancelledError:
                raise
            except LeadershipLost:
                self.stand_by()
            except Exception as exc:  # keep running: the next tick retries from stored state
                self.last_error = repr(exc)
                if not self.outages.failed(exc):  # a lost dependency is one line per outage
                    log.exception("event runner tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_wall_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        self.ticks += 1
        if not self.leadership.is_leader:
            if self._leader or self.running:
                self.stand_by()
            return
        if not self._leader:
            # Becoming leader, at start or by taking over: everything from the database.
            self.stand_by()
            await self.resume()
            self._leader = True
            self.takeovers += 1
        now = self.clock.now_ms()
        await self.drain_acks()
        connects = self.client.connects
        if connects != self._seen_connects and self.broker_up:
            self._seen_connects = connects
            self._broker_back_wall = time.monotonic()
            self._resend_after_hold = True
            await self.resend_unacked()
        elif self._resend_after_hold and not self.holding():
            # Once more when devices have had a stale horizon to come back: a device that
            # reconnected after the service did missed the first re-send (no session kept).
            self._resend_after_hold = False
            await self.resend_unacked()
        if not self.broker_up:
            # Nothing can be sent: keep what is stored, count no misses; settle what is due.
            await self.settle_due()
            return
        for ev in await es.due_events(self.services, now + self.lead_ms()):
            if ev.id not in self.running:
                try:
                    await self.start_event(ev)
                except Exception as exc:
                    if dependency_down(exc):
                        raise  # the tick ends: one outage line, the next tick retries
                    log.exception("starting %s", ev.id)
        if self.running:
            current = await es.statuses(self.services, list(self.running))
        for ev_id, run in list(self.running.items()):
            now = self.clock.now_ms()
            st = current.get(ev_id)
            if run.ending is None:
                if st in (GridEventStatus.aborted.value,):
                    await self.end_event(run, GridEventStatus.aborted.value)
                elif st in (RequestStatus.cancelled.value,):
                    await self.end_event(run, RequestStatus.cancelled.value)
                elif now >= run.info.end_ms:
                    await self.end_event(run, GridEventStatus.completed.value)
                else:
                    await self.publish_due(run, now)
                    await self.retries(run)
                    period_wall = self.clock.wall_seconds(self.settings.control_period_s)
                    if time.monotonic() - run.last_control_wall >= max(period_wall, 0.5):
                        if self.holding():
                            run.last_control_wall = time.monotonic()
                        else:
                            await self.control(run)
                    self.provisional_settlement(run, now)
            else:
                await self.release_due(run, now)
                t = run.table
                last = int(t.valid_until_ms.max(initial=run.info.end_ms))
                if now >= last and not (t.release_at_ms > 0).any():
                    self._forget(run)
        await self.settle_due()

    # --- resume after a restart ----------------------------------------------------------------
    async def resume(self) -> None:
        """Rebuild running events from the database: commands, statuses, control group, reserve;
        and finish the events that ended lately (restores still due, final settlement), in
        case the runner before this one died between an event's end and its settlement."""
        for ev in await es.active_events(self.services):
            try:
                await self._resume_event(ev)
            except Exception as exc:
                if dependency_down(exc):
                    raise  # not leader yet: the next tick resumes everything again
                log.exception("resuming %s", ev.id)
        now = self.clock.now_ms()
        for ev in await es.ended_since(self.services, now - self.unfinished_ms()):
            try:
                await self._resume_ended(ev, now)
            except Exception as exc:
                if dependency_down(exc):
                    raise
                log.exception("finishing %s", ev.id)

    def settle_delay_ms(self) -> int:
        """After an event's end, how long until the history around it is written."""
        return int(max(2 * self.settings.history_interval_s, 5 * self.clock.time_scale) * 1000)

    def unfinished_ms(self) -> int:
        """How long after its end an event may still have restores or settlement to do."""
        return int((RELEASE_STAGGER_S + VALID_MARGIN_S) * 1000) + self.settle_delay_ms()

    async def _resume_ended(self, ev: es.EventInfo, now_ms: int) -> None:
        async with self.services.db.session() as s:
            dispatched = (
                await s.execute(
                    select(func.count())
                    .select_from(Command)
                    .where(Command.event_id == ev.id, Command.type != CommandType.restore.value)
                )
            ).scalar_one()
        if not dispatched or ev.id in self.running:
            return
        await self._resume_event(ev)
        run = self.running.get(ev.id)
        if run is None:
            return
        run.ending = ev.status
        t = run.table
        acting = (
            np.isin(t.status, MAY_ACT)
            & np.array([r is None for r in t.restore_id], dtype=bool)
            & (t.valid_until_ms > now_ms)
        )
        rows = np.flatnonzero(acting)
        # The same release times the ending runner chose: thermostats at their command's expiry
        # (the stagger), the rest now.
        th = t.kind[rows] == THERMOSTAT
        t.release_at_ms[rows] = np.where(
            th, np.maximum(t.valid_until_ms[rows] - int(VALID_MARGIN_S * 1000), now_ms), now_ms
        )
        self.settle_queue[run.id] = max(now_ms, run.info.end_ms + self.settle_delay_ms())
        log.info("finishing %s (%s): %d devices to restore", ev.id, ev.status, rows.size)

    async def _resume_event(self, ev: es.EventInfo) -> None:
        async with self.services.db.session() as s:
            plans = (
                (
                    await s.execute(
                        select(Plan)
                        .where(Plan.event_id == ev.id)
                        .order_by(Plan.version.desc(), Plan.id.desc())
                    )
                )
                .scalars()
                .all()
            )
            # The market's planner stores plans too; the runner's carries a "runner" section.
            plan = next((p for p in plans if "runner" in (p.body or {})), None)
            cmds = (
                (await s.execute(select(Command).where(Command.event_id == ev.id))).scalars().all()
            )
        if plan is None or "runner" not in (plan.body or {}):
            # Planned by no runner yet (crash before the plan was stored): start it afresh.
            await self.start_event(ev, already_active=True)
            return
        body = plan.body["runner"]
        horizon = Horizon(**body["horizon"])
        dispatch = [c for c in cmds if c.type != CommandType.restore.value]
        restores = {c.device_id: c for c in cmds if c.type == CommandType.restore.value}
        dispatch.sort(key=lambda c: (c.created_ms, c.id))
        table = self._table_from_rows(ev.id, dispatch)
        run = Running(
            info=ev,
            horizon=horizon,
            target_mw=np.asarray(body["target_mw"], dtype=float),
            table=table,
            control_ids=list(body.get("control_ids", [])),
            control_baseline_w=np.asarray(body.get("control_baseline_w", []), dtype=float),
            control_kind=np.asarray(
                body.get("control_kinds", [THERMOSTAT] * len(body.get("control_ids", []))),
                dtype=np.int8,
            ),
            replaced=int(body.get("replaced", 0)),
        )
        for i, dev in enumerate(table.device_id):
            rc = restores.get(dev)
            if rc is not None:
                table.restore_id[i] = rc.id
                self.by_restore[rc.id] = (ev.id, i)
                if rc.status in (CommandStatus.pending.value, CommandStatus.sent.value):
                    self.restore_unacked[rc.id] = (ev.id, i, None, 0)
        if body.get("reserve"):
            run.reserve = Assignment.from_json(orjson.dumps(body["reserve"]))
            run.reserve_ids = list(body.get("reserve_ids", []))
        self._register(run)
        log.info("resumed %s: %d commands", ev.id, len(table))
        planned = int(body.get("commands_planned", len(table)))
        if len(table) < planned:
            # The crash came while a big fan-out was being stored: what was never stored was
            # never sent; the closed loop enlists for the shortfall.
            log.warning("resumed %s: %d of %d planned commands were stored", ev.id, len(table),
                        planned)  # fmt: skip

    def _table_from_rows(self, event_id: str, rows: list[Command]) -> DeviceTable:
        kind = np.array([KIND_OF_COMMAND[r.type] for r in rows], dtype=np.int8)
        b = CommandBatch(
            ids=[r.id for r in rows],
            device_ids=[r.device_id for r in rows],
            kind=kind,
            type=[r.type for r in rows],
            setpoint_w=np.array([np.nan if r.setpoint_w is None else r.setpoint_w for r in rows]),
            offset_c=np.array([np.nan if r.offset_c is None else r.offset_c for r in rows]),
            limit_w=np.array([np.nan if r.limit_w is None else r.limit_w for r in rows]),
            valid_from_ms=np.array([r.valid_from_ms for r in rows], dtype=np.int64),
            valid_until_ms=np.array([r.valid_until_ms for r in rows], dtype=np.int64),
            randomize_s=np.array([r.randomize_start_s or 0 for r in rows], dtype=np.int64),
            baseline_w=np.array([np.nan if r.baseline_w is None else r.baseline_w for r in rows]),
            expected_kw=np.array([r.expected_kw or 0.0 for r in rows]),
        )
        t = self._table(event_id, b)
        t.status = np.array([STATUS_CODE.get(r.status, PENDING) for r in rows], dtype=np.int8)
        t.attempts = np.array([r.attempts or 0 for r in rows], dtype=np.int32)
        t.sent_ms = np.array([r.sent_ms or 0 for r in rows], dtype=np.int64)
        # Commands sent before the restart get the full ack wait from now on.
        t.sent_wall = np.where(t.sent_ms > 0, time.monotonic(), 0.0)
        return t

    def _table(self, event_id: str, b: CommandBatch) -> DeviceTable:
        n = len(b)
        return DeviceTable(
            cmd_id=np.array(b.ids, dtype=object),
            device_id=np.array(b.device_ids, dtype=object),
            kind=b.kind.astype(np.int8),
            status=np.zeros(n, np.int8),
            attempts=np.zeros(n, np.int32),
            sent_ms=np.zeros(n, np.int64),
            sent_wall=np.zeros(n),
            valid_from_ms=b.valid_from_ms.astype(np.int64),
            valid_until_ms=b.valid_until_ms.astype(np.int64),
            baseline_w=b.baseline_w.astype(float),
            expected_kw=b.expected_kw.astype(float),
            settle_kw=b.expected_kw.astype(float),
            restore_id=np.full(n, None, dtype=object),
            release_at_ms=np.zeros(n, np.int64),
            payload=payloads(event_id, b),
        )

    def _register(self, run: Running, start_row: int = 0) -> None:
        self.running[run.id] = run
        metrics.EVENTS_ACTIVE.set(len(self.running))
        for i in range(start_row, len(run.table)):
            self.by_cmd[run.table.cmd_id[i]] = (run.id, i)

    def _forget(self, run: Running) -> None:
        self.running.pop(run.id, None)
        metrics.EVENTS_ACTIVE.set(len(self.running))
        for gauge in (metrics.EVENT_DELIVERED_MW, metrics.EVENT_TARGET_MW):
            with contextlib.suppress(KeyError):
                gauge.remove(run.id)  # an ended event leaves no flat line behind
        for c in run.table.cmd_id:
            self.by_cmd.pop(c, None)
        for c in run.table.restore_id:
            if c is not None:
                self.by_restore.pop(c, None)
                self.restore_unacked.pop(c, None)

    # --- starting an event ---------------------------------------------------------------------
    def busy_devices(
        self, exclude_event: str | None = None, below_priority: int | None = None
    ) -> set[str]:
        """Devices held by other running events: live commands, control groups, and commands
        the device may still be acting on although the runner gave up on them (no ack: missed;
        no telemetry: stale) until they expire, and, once an event has ended, its thermostats
        still waiting for their staggered release. Another event commanding such a device would
        give it a second, different command for the same interval (and the first event's
        restore would cancel the second's). With ``below_priority``, devices of lower-priority
        running events are left out (they may be taken)."""
        busy: set[str] = set()
        now = self.clock.now_ms()
        for run in self.running.values():
            if run.id == exclude_event:
                continue
            t = run.table
            ended = run.ending is not None
            if not ended and below_priority is not None and run.info.priority < below_priority:
                continue
            unrestored = np.fromiter((r is None for r in t.restore_id), bool, len(t))
            unsure = np.isin(t.status, UNSURE) & (t.valid_until_ms > now) & unrestored
            if ended:
                held = np.isin(t.status, LIVE) & (t.valid_until_ms > now) & unrestored
                held |= unsure | (t.release_at_ms > 0)
            else:
                held = np.isin(t.status, LIVE) | unsure
                busy.update(run.control_ids)
            busy.update(t.device_id[held].tolist())
        return busy

    async def usage_for(
        self, fleet: FleetSnapshot, exclude_event: str, preempted: tuple[str, ...] = ()
    ) -> DeviceUsage:
        """Each device's events, hours and last event end this season (from past commands).
        Commands of ``preempted`` events (running, lower priority, being preempted) do not count:
        their live commands end now, so they must not make the device look busy or unrested."""
        n = len(fleet)
        usage = DeviceUsage.empty(n)
        season_start = self.clock.now_ms() - 183 * 86_400_000
        async with self.services.db.session() as s:
            rows = (
                await s.execute(
                    select(
                        Command.device_id,
                        func.count(func.distinct(Command.event_id)),
                        func.sum(Command.valid_until_ms - Command.valid_from_ms),
                        func.max(Command.valid_until_ms),
                    )
                    .where(
                        Command.type != CommandType.restore.value,
                        Command.created_ms >= season_start,
                        Command.event_id.notin_([exclude_event, *preempted]),
                        Command.status.notin_(
                            [
                                CommandStatus.pending.value,
                                CommandStatus.opted_out.value,
                                CommandStatus.rejected.value,
                                CommandStatus.missed.value,
                            ]
                        ),
                    )
                    .group_by(Command.device_id)
                )
            ).all()
        for dev, events, ms, last in rows:
            i = fleet.index.get(dev)
            if i is None:
                continue
            usage.events_this_season[i] = int(events)
            usage.hours_this_season[i] = float(ms or 0) / 3.6e6
            usage.last_event_end_ms[i] = int(last or 0)
        return usage

    async def pre_event_levels(self, device_ids: list[str], start_ms: int) -> dict[str, float]:
        """Mean output (battery) / HVAC load (thermostat) over the 30 minutes before the event,
        from the interval history; the baseline the closed loop measures against."""
        out: dict[str, float] = {}
        lo = start_ms - 30 * 60_000
        async with self.services.db.session() as s:
            for k in range(0, len(device_ids), 10_000):
                chunk = device_ids[k : k + 10_000]
                rows = (
                    await s.execute(
                        select(
                            TelemetryInterval.device_id,
                            func.avg(TelemetryInterval.power_w),
                            func.avg(TelemetryInterval.hvac_w),
                        )
                        .where(
                            TelemetryInterval.device_id.in_(chunk),
                            TelemetryInterval.interval_start_ms >= lo,
                            TelemetryInterval.interval_start_ms < start_ms,
                        )
                        .group_by(TelemetryInterval.device_id)
                    )
                ).all()
                for dev, p, h in rows:
                    v = p if p is not None else h
                    if v is not None:
                        out[dev] = float(v)
        return out

    @staticmethod
    def live_levels(fleet: FleetSnapshot, idx: I64) -> F64:
        """Each device's latest output (battery power_w) or load (thermostat hvac_w), W."""
        st = fleet.state[idx]
        bat = fleet.kind_codes[idx] == BATTERY
        return np.where(bat, st["power_w"].astype(float), st["hvac_w"].astype(float))

    async def target_profile(self, ev: es.EventInfo, horizon: Horizon) -> F64:
        """Committed MW per horizon interval: the request's ledger where it has one, else its MW."""
        target = np.zeros(horizon.n_intervals)
        a, b = horizon.window(ev.start_ms, ev.end_ms)
        target[a:b] = ev.mw
        if ev.is_grid:
            return target
        from store.models import LedgerEntry

        async with self.services.db.session() as s:
            rows = (
                await s.execute(
                    select(LedgerEntry.interval_start_ms, LedgerEntry.mw)
                    .where(LedgerEntry.request_id == ev.id)
                    .order_by(LedgerEntry.interval_start_ms)
                )
            ).all()
        if rows:
            starts = np.array([r[0] for r in rows], dtype=np.int64)
            mws = np.array([r[1] for r in rows], dtype=float)
            mids = (
                horizon.start_ms
                + (np.arange(horizon.n_intervals) + 0.5) * horizon.interval_s * 1000
            )
            k = np.searchsorted(starts, mids, side="right") - 1
            ok = k >= 0
            from_ledger = np.where(ok, mws[np.clip(k, 0, None)], 0.0)
            target[a:b] = np.where(from_ledger[a:b] > 0, from_ledger[a:b], target[a:b])
        return target

    def batch_from_assignment(
        self,
        asg: Assignment,
        rows: I64,
        fleet: FleetSnapshot,
        end_ms: int,
        baselines: dict[str, float],
        now_ms: int,
    ) -> CommandBatch:
        """Commands for the given assignment rows, valid to the window's end (+ stagger)."""
        idx = asg.device_index[rows]
        h = asg.horizon
        kind = asg.kind_code[rows].astype(np.int8)
        ct = asg.command_type[rows]
        types = [COMMAND_BY_CODE[int(c)].value for c in ct]
        vf = h.start_ms + asg.start_interval[rows].astype(np.int64) * h.interval_s * 1000
        vf = np.maximum(vf, min(now_ms, end_ms))
        block_end = h.start_ms + asg.end_interval[rows].astype(np.int64) * h.interval_s * 1000
        block_end = np.minimum(block_end, end_ms)
        rng = np.random.default_rng()
        th = ct == CMD_THERMOSTAT
        # A thermostat whose block runs to the window's end keeps its offset for a random 0–15 min
        # more: the release is staggered by the command's own expiry, even if no restore arrives.
        stagger = np.where(
            th & (block_end >= end_ms), rng.integers(0, int(RELEASE_STAGGER_S), len(rows)), 0
        )
        vu = block_end + int(VALID_MARGIN_S * 1000) + stagger.astype(np.int64) * 1000
        ids = fleet.device_ids[idx]
        live = self.live_levels(fleet, idx)
        base = np.array([baselines.get(d, np.nan) for d in ids], dtype=float)
        base = np.where(np.isnan(base), live, base)
        return CommandBatch(
            ids=[new_command_id() for _ in range(len(rows))],
            device_ids=ids.tolist(),
            kind=kind,
            type=types,
            setpoint_w=np.where(ct == CMD_BATTERY, np.floor(asg.setpoint_w[rows]), np.nan),
            offset_c=np.where(th, asg.offset_c[rows], np.nan),
            limit_w=asg.limit_w[rows].astype(float),
            valid_from_ms=vf.astype(np.int64),
            valid_until_ms=vu.astype(np.int64),
            randomize_s=np.zeros(len(rows), np.int64),
            baseline_w=base,
            expected_kw=asg.expected_kw[rows].astype(float),
        )

    def hold_back_front_load(
        self, fleet: FleetSnapshot, asg: Assignment, rows: I64, target_mw: float
    ) -> tuple[I64, I64, F64]:
        """Split the plan's ``rows`` into those to start now and those held back; with each
        started row's kW at first.

        A row's planned kW is its average increment over its block, but the increment is
        front-loaded: a thermostat's unit is off until the home drifts to the new setpoint, then
        holds it at a lower duty; a battery charging from the sun before the event gives its
        setpoint plus the charge it stops, a bonus that fades as the twin it is measured against
        (the control group) fills up and stops charging. Starting every planned row at once
        over-delivers early, and the excess, released, is lost for the rest of the window (one
        command per device per event). So start, in plan order, only as many as cover the
        target with their early kW (the first FRONT_LOAD_H), and keep the rest, in order, at the
        head of the reserve: the closed loop enlists them as the early excess fades."""
        early = asg.expected_kw[rows].astype(float).copy()
        if rows.size == 0 or target_mw <= 0:
            return rows, np.zeros(0, np.int64), early
        th = asg.kind_code[rows] == THERMOSTAT
        if th.any():
            inp = thermostat_inputs(
                fleet,
                asg.device_index[rows[th]],
                offset_c=self.params.thermostat_offset_c,
                min_offset_c=self.params.thermostat_min_offset_c,
            )
            shed, _, _ = inp.shed(FRONT_LOAD_H)
            early[th] = np.maximum(shed, early[th])
        bat = asg.kind_code[rows] == BATTERY
        if bat.any():
            level_kw = np.nan_to_num(self.live_levels(fleet, asg.device_index[rows[bat]])) / 1e3
            charging_kw = np.maximum(-level_kw, 0.0)
            early[bat] = early[bat] + charging_kw
        k = min(
            int(np.searchsorted(np.cumsum(early), target_mw * 1000.0 * (1 - 1e-9))) + 1, rows.size
        )
        return rows[:k], rows[k:], early[:k]

    async def start_event(self, ev: es.EventInfo, already_active: bool = False) -> Running | None:
        """Plan an event, store the plan and its commands, then publish them."""
        now = self.clock.now_ms()
        if now >= ev.end_ms:
            # The window passed while no runner was up: nothing to dispatch, close it.
            await es.set_status(
                self.services,
                ev,
                GridEventStatus.completed.value if ev.is_grid else RequestStatus.completed.value,
                only_from=(ev.status,),
            )
            self.settle_queue[ev.id] = now
            return None
        fleet = await self.services.fleet.snapshot(force=True)
        s = self.settings
        step = int(s.settlement_interval_min * 60)
        n_int = max(1, int(-(-(ev.end_ms - ev.start_ms) // (step * 1000))))
        horizon = Horizon(int(ev.start_ms), step, n_int)
        target = await self.target_profile(ev, horizon)

        region = fleet.mask(region=ev.region)
        busy = self.busy_devices(
            exclude_event=ev.id, below_priority=ev.priority if ev.preempt else None
        )
        busy_mask = fleet.mask_of(busy)
        # Randomised control groups, held back from dispatch: thermostats (their baseline) and
        # batteries (the drift of self-consumption output during the window).
        ctrl_parts = []
        for kind in (THERMOSTAT, BATTERY):
            ok = region & (fleet.kind_codes == kind) & fleet.dispatchable() & ~busy_mask
            idx_k = np.flatnonzero(ok)
            ctrl_parts.append(idx_k[_control_group(fleet.device_ids[idx_k], f"{ev.id}:{kind}")])
        ctrl = np.concatenate(ctrl_parts)
        exclude = busy_mask.copy()
        exclude[ctrl] = True

        others = await es.overlapping_commitments(
            self.services, ev.region, ev.start_ms, ev.end_ms, ev.id
        )
        demands = [
            Demand(
                id=ev.id,
                region=ev.region,
                start_ms=int(ev.start_ms),
                end_ms=int(ev.end_ms),
                mw=target,
                priority=int(ev.priority),
                direction=ev.direction,
                is_grid_event=ev.is_grid,
                preempt=ev.preempt,
            )
        ] + [
            Demand(
                id=o.id,
                region=o.region,
                start_ms=int(o.start_ms),
                end_ms=int(o.end_ms),
                mw=float(o.mw),
                priority=int(o.priority),
                direction=o.direction,
            )
            for o in others[:30]
        ]
        preempted_events = tuple(
            r.id
            for r in self.running.values()
            if ev.preempt and r.id != ev.id and r.ending is None and r.info.priority < ev.priority
        )
        usage = await self.usage_for(fleet, ev.id, preempted_events)
        from dispatch.assign import assign
        from dispatch.optimiser import optimise

        async def plan_with(excluded: npt.NDArray[np.bool_]) -> tuple[Any, Assignment]:
            p = await asyncio.to_thread(
                optimise, fleet, usage, demands, horizon, self.params, exclude=excluded
            )
            a = await asyncio.to_thread(
                assign, fleet, usage, p, demands, horizon, self.params, excluded
            )
            return p, a

        preemptable = self.preemptable_devices(ev)
        if preemptable:
            # First without taking anything: a commitment loses devices only if the free ones
            # cannot cover the event.
            plan, asg = await plan_with(exclude | fleet.mask_of(preemptable))
            if (plan.shortfall_mw[0] > 1e-6).any():
                plan, asg = await plan_with(exclude)
        else:
            plan, asg = await plan_with(exclude)
        mine = self.free_first(
            fleet, asg, np.flatnonzero((asg.demand_index == 0) & ~asg.is_reserve), ev
        )
        reserve_rows = np.flatnonzero((asg.demand_index == 0) & asg.is_reserve)
        mine, held, early_kw = self.hold_back_front_load(
            fleet, asg, mine, float(target.max(initial=0.0))
        )
        if held.size:
            # Held back first in the reserve: the closed loop enlists them as the shed fades.
            reserve_rows = np.concatenate([held, reserve_rows])
        ids_mine = fleet.device_ids[asg.device_index[mine]].tolist()
        baselines = await self.pre_event_levels(ids_mine, ev.start_ms)
        batch = self.batch_from_assignment(asg, mine, fleet, ev.end_ms, baselines, now)
        ctrl_ids = fleet.device_ids[ctrl].tolist()
        ctrl_pre = await self.pre_event_levels(ctrl_ids, ev.start_ms)
        ctrl_live = self.live_levels(fleet, ctrl)
        ctrl_base = np.array(
            [ctrl_pre.get(d, float(ctrl_live[k])) for k, d in enumerate(ctrl_ids)], dtype=float
        )
        # The reserve, kept as an assignment of its own with device ids (rows move on restart).
        from dispatch.assign import standby

        reserve = standby(asg, reserve_rows) if reserve_rows.size else None
        reserve_ids = fleet.device_ids[reserve.device_index].tolist() if reserve is not None else []
        from dispatch.planner import plan_body, region_available_mw

        body = plan_body(
            plan,
            ev.id,
            ev.start_ms,
            ev.end_ms,
            region_available_mw(fleet, ev.region, (ev.end_ms - ev.start_ms) / 3.6e6),
            len(fleet),
            "dispatched at the window's start",
        )
        body["assignment"] = asg.summary()
        body["runner"] = {
            "horizon": {
                "start_ms": horizon.start_ms,
                "interval_s": horizon.interval_s,
                "n_intervals": horizon.n_intervals,
            },
            "target_mw": target.tolist(),
            "control_ids": ctrl_ids,
            "control_kinds": fleet.kind_codes[ctrl].tolist(),
            "control_baseline_w": np.nan_to_num(ctrl_base).round(1).tolist(),
            "reserve": orjson.loads(reserve.to_json()) if reserve is not None else None,
            "reserve_ids": reserve_ids,
            "replaced": 0,
            # Stored in chunks: a runner resumed after a crash halfway may find fewer.
            "commands_planned": len(batch),
        }
        # Preempted devices leave their (lower-priority) events first.
        preempted = self._preempt(set(batch.device_ids), ev)
        # A big event: the first chunk is stored with the plan, the rest while it goes out.
        head, rest = batch.take(0, STORE_CHUNK), batch.take(STORE_CHUNK, len(batch))
        records = self.store.records(ev.id, head, now)
        self._must_lead()
        async with self.services.db.engine.begin() as conn:
            version = (
                await conn.execute(
                    select(func.coalesce(func.max(Plan.version), 0)).where(Plan.event_id == ev.id)
                )
            ).scalar_one()
            model: Any = es.GridEvent if ev.is_grid else es.CapacityRequest
            active = (GridEventStatus.active if ev.is_grid else RequestStatus.active).value
            from_status = (
                (GridEventStatus.active.value,)
                if already_active
                else (GridEventStatus.scheduled.value,)
                if ev.is_grid
                else (RequestStatus.committed.value,)
            )
            res = await conn.execute(
                update(model)
                .where(model.id == ev.id, model.status.in_(from_status))
                .values(status=active, updated_ms=now)
            )
            if not res.rowcount:
                return None  # cancelled or started elsewhere meanwhile
            await conn.execute(
                insert(Plan).values(
                    event_id=ev.id,
                    version=int(version) + 1,
                    created_ms=now,
                    interval_s=horizon.interval_s,
                    start_ms=horizon.start_ms,
                    body=body,
                )
            )
            await self.store.insert(conn, records)
        if preempted:
            await self.store.mark(
                preempted, CommandStatus.preempted.value, reason=f"preempted by {ev.id}"
            )
        run = Running(
            info=es.EventInfo(**{**ev.__dict__, "status": active}),
            horizon=horizon,
            target_mw=target,
            table=self._table(ev.id, head),
            control_ids=ctrl_ids,
            control_baseline_w=ctrl_base,
            control_kind=fleet.kind_codes[ctrl].astype(np.int8),
            reserve=reserve,
            reserve_ids=reserve_ids,
            last_control_wall=time.monotonic(),
        )
        if len(early_kw) == len(batch):
            run.table.settle_kw = early_kw[: len(head)].astype(float)
        self._register(run)
        metrics.EVENT_TARGET_MW.labels(ev.id).set(float(target.max(initial=0.0)))
        log.info(
            "event %s started: %d commands, %d reserve, %d control",
            ev.id,
            len(batch),
            len(reserve_ids),
            len(ctrl_ids),
        )
        early = early_kw[len(head) :] if len(early_kw) == len(batch) else None
        await self.fan_out(run, rest, now, early)
        return run

    async def fan_out(
        self, run: Running, rest: CommandBatch, now_ms: int, settle_kw: F64 | None
    ) -> None:
        """Publish the rows stored so far while the next chunk of ``rest`` is stored, and mark
        each chunk sent while the next one goes out: storing, publishing and marking overlap,
        and a command is published only after its row is committed. The table in memory holds
        stored rows only, so a failure halfway leaves nothing unstored for a later tick to send:
        the closed loop makes up what the unstored rest would have delivered."""
        loop = asyncio.get_running_loop()
        # Wall seconds per stage (they overlap) and how long publishing waited for the
        # database: where a big fan-out's time goes (bench/fanout.py prints it).
        stats = self.fan_out_stats = dict.fromkeys(
            ("store_s", "publish_s", "mark_s", "wait_store_s", "wait_mark_s"), 0.0
        )

        async def store(lo: int) -> DeviceTable:
            t0 = time.perf_counter()
            chunk = rest.take(lo, lo + STORE_CHUNK)
            records = self.store.records(run.id, chunk, now_ms)
            self._must_lead()
            async with self.services.db.engine.begin() as conn:
                await self.store.insert(conn, records)
            table = self._table(run.id, chunk)
            if settle_kw is not None:
                table.settle_kw = settle_kw[lo : lo + len(chunk)].astype(float)
            stats["store_s"] += time.perf_counter() - t0
            return table

        async def mark(ids: list[str], sent_ms: int) -> None:
            t0 = time.perf_counter()
            await self.store.mark(ids, CommandStatus.sent.value, sent_ms=sent_ms, attempts_inc=True)
            stats["mark_s"] += time.perf_counter() - t0

        offsets = list(range(0, len(rest), STORE_CHUNK))
        storing: asyncio.Task[DeviceTable] | None = (
            loop.create_task(store(offsets.pop(0))) if offsets else None
        )
        marking: asyncio.Task[None] | None = None
        # Stored chunks join the run's table once at the end (one copy, not one per chunk);
        # acks are applied only after this returns, so nothing looks for their rows before.
        stored: list[DeviceTable] = []
        table = run.table
        try:
            while True:
                due = table.valid_from_ms <= self.clock.now_ms() + self.lead_ms()
                rows = np.flatnonzero(due & (table.status == PENDING))
                t0 = time.perf_counter()
                pend = await self._publish_rows(table, rows)
                t1 = time.perf_counter()
                stats["publish_s"] += t1 - t0
                if marking is not None:
                    await marking
                t2 = time.perf_counter()
                stats["wait_mark_s"] += t2 - t1
                if pend:
                    marking = loop.create_task(mark(pend, self.clock.now_ms()))
                if storing is None:
                    break
                table = await storing
                stored.append(table)
                stats["wait_store_s"] += time.perf_counter() - t2
                storing = loop.create_task(store(offsets.pop(0))) if offsets else None
            t0 = time.perf_counter()
            if marking is not None:
                await marking
            stats["wait_mark_s"] += time.perf_counter() - t0
        finally:
            for task in (storing, marking):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if stored:
                start = len(run.table)
                run.table.extend(stored)
                self._register(run, start)

    async def _publish_rows(self, t: DeviceTable, rows: I64) -> list[str]:
        """Publish pending rows of ``t`` and record them sent in memory; returns their command
        ids (for the caller to mark sent in the database)."""
        if rows.size == 0:
            return []
        await self.send_commands(t.device_id, t.payload, rows)
        t.status[rows] = SENT
        t.attempts[rows] += 1
        t.sent_ms[rows] = self.clock.now_ms()
        t.sent_wall[rows] = time.monotonic()
        metrics.COMMANDS_SENT.labels("dispatch").inc(len(rows))
        ids: list[str] = t.cmd_id[rows].tolist()
        return ids

    def preemptable_devices(self, by: es.EventInfo) -> set[str]:
        """Devices that lower-priority running events hold and ``by`` may take (none unless it
        may preempt)."""
        if not by.preempt:
            return set()
        return self.busy_devices(exclude_event=by.id) - self.busy_devices(
            exclude_event=by.id, below_priority=by.priority
        )

    def free_first(self, fleet: FleetSnapshot, asg: Assignment, rows: I64, by: es.EventInfo) -> I64:
        """``rows`` in plan order, those on free devices before those that would be taken from
        a lower-priority event: only the front-loaded head is commanded at once, and a commitment
        should lose a device only when the free ones cannot cover the target."""
        taken = self.preemptable_devices(by)
        if not taken or rows.size == 0:
            return rows
        from_others = np.isin(fleet.device_ids[asg.device_index[rows]], np.array(sorted(taken)))
        return rows[np.argsort(from_others, kind="stable")]

    def _preempt(self, devices: set[str], by: es.EventInfo) -> list[str]:
        """Take ``devices`` away from lower-priority running events (their rows become
        ``preempted``; their own closed loop makes up what it can elsewhere)."""
        out: list[str] = []
        for run in self.running.values():
            if run.id == by.id or run.info.priority >= by.priority or not by.preempt:
                continue
            t = run.table
            hit = np.isin(t.status, LIVE) & np.fromiter(
                (d in devices for d in t.device_id), bool, len(t)
            )
            if hit.any():
                t.status[hit] = PREEMPTED
                out.extend(t.cmd_id[hit].tolist())
                run.replaced += int(hit.sum())
                metrics.DEVICES_REPLACED.labels(CommandStatus.preempted.value).inc(int(hit.sum()))
        return out

    # --- publishing ----------------------------------------------------------------------------
    async def send_commands(
        self, device_ids: npt.NDArray[np.object_], bodies: list[bytes], rows: I64
    ) -> None:
        """The rows' commands to their devices by transport: those reached over OpenADR (a
        boolean mask over the rows) as VTN events, the rest published on MQTT."""
        over = await self.openadr.mask(device_ids[rows])
        if over.any():
            vens = rows[over]
            rows = rows[~over]
            self._must_lead()
            await self.openadr.send(device_ids[vens].tolist(), [bodies[i] for i in vens.tolist()])
        topic = self.services.topic
        await self.publish(
            [(topic(device_ids[i], "cmd"), bodies[i], 1, False) for i in rows.tolist()]
        )

    async def publish(self, messages: list[tuple[str, bytes, int, bool]]) -> None:
        """QoS-1 fan-out in chunks, a few chunks in flight (see PUBLISH_CONCURRENCY)."""
        if not messages:
            return
        sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(lo: int) -> None:
            async with sem:
                self._must_lead()
                await self.client.publish_many(messages[lo : lo + PUBLISH_CHUNK])

        await asyncio.gather(*(one(lo) for lo in range(0, len(messages), PUBLISH_CHUNK)))

    async def publish_due(self, run: Running, now_ms: int) -> None:
        """Publish stored-but-unsent commands whose validity has begun (or begins this tick)."""
        t = run.table
        lead_ms = self.lead_ms()
        due = np.flatnonzero((t.status == PENDING) & (t.valid_from_ms <= now_ms + lead_ms))
        if due.size == 0:
            return
        await self._send_rows(run, due)

    async def _send_rows(self, run: Running, rows: I64) -> None:
        t = run.table
        await self.send_commands(t.device_id, t.payload, rows)
        sent = self.clock.now_ms()
        ids = t.cmd_id[rows].tolist()
        first = t.status[rows] == PENDING
        t.status[rows[first]] = SENT
        t.attempts[rows] += 1
        t.sent_ms[rows] = sent
        t.sent_wall[rows] = time.monotonic()
        metrics.COMMANDS_SENT.labels("dispatch").inc(len(rows))
        pend = [ids[k] for k in np.flatnonzero(first)]
        again = [ids[k] for k in np.flatnonzero(~first)]
        if pend:
            await self.store.mark(pend, CommandStatus.sent.value, sent_ms=sent, attempts_inc=True)
        if again:
            await self.store.mark(
                again,
                [COMMAND_STATUS_BY_CODE[int(s)].value for s in t.status[rows[~first]]],
                attempts_inc=True,
            )

    async def resend_unacked(self) -> None:
        """After a broker reconnect: publish again every command still waiting for its ack,
        same id and bytes, with a fresh ack wait (the outage counts as no attempt); restores
        whose short validity ran out meanwhile are replaced by new ones."""
        now = self.clock.now_ms()
        n = 0
        for run in list(self.running.values()):
            t = run.table
            rows = np.flatnonzero((t.status == SENT) & (t.valid_until_ms > now))
            rows = rows[~await self.openadr.mask(t.device_id[rows])]  # the broker's only
            if rows.size:
                topic = self.services.topic
                await self.publish(
                    [(topic(t.device_id[i], "cmd"), t.payload[i], 1, False) for i in rows.tolist()]
                )
                t.sent_wall[rows] = time.monotonic()
                n += rows.size
            again: list[tuple[str, bytes, int, bool]] = []
            lapsed: list[int] = []
            over_openadr = set((await self.openadr.device_ids()).tolist())
            for cid, (ev_id, row, body, until) in list(self.restore_unacked.items()):
                if ev_id != run.id or t.restore_id[row] != cid:
                    continue
                if t.device_id[row] in over_openadr:
                    continue  # its restore is an OpenADR event, not the broker's
                if body is not None and until > now:
                    again.append((self.services.topic(t.device_id[row], "cmd"), body, 1, False))
                else:
                    lapsed.append(row)
            if again:
                await self.publish(again)
                n += len(again)
            if lapsed:
                for row in lapsed:
                    cid = t.restore_id[row]
                    self.restore_unacked.pop(cid, None)
                    self.by_restore.pop(cid, None)
                    t.restore_id[row] = None
                await self.send_restores(run, np.asarray(lapsed, dtype=np.int64))
                n += len(lapsed)
        if n:
            log.warning("broker back: %d unacknowledged commands sent again", n)
        metrics.COMMANDS_SENT.labels("resend").inc(n)

    def ack_wait_wall_s(self) -> float:
        return max(
            self.clock.wall_seconds(self.settings.command_ack_timeout_s), MIN_ACK_WAIT_WALL_S
        )

    async def retries(self, run: Running, restores: bool = False) -> None:
        """Unacknowledged commands: send again with the same id; after two misses replace."""
        if restores:
            return  # restores are fire-and-forget after one retry in end_event
        t = run.table
        waited = time.monotonic() - t.sent_wall
        late = (t.status == SENT) & (t.sent_wall > 0) & (waited >= self.ack_wait_wall_s())
        now = self.clock.now_ms()
        late &= t.valid_until_ms > now
        again = np.flatnonzero(late & (t.attempts < MAX_ATTEMPTS))
        missed = np.flatnonzero(late & (t.attempts >= MAX_ATTEMPTS))
        if again.size:
            await self._send_rows(run, again)
        if missed.size:
            t.status[missed] = MISSED
            await self.store.mark(
                t.cmd_id[missed].tolist(), CommandStatus.missed.value, reason="no ack after 2 tries"
            )
            await self.replace(run, missed, CommandStatus.missed.value)

    # --- acknowledgements ----------------------------------------------------------------------
    async def drain_acks(self) -> int:
        n = 0
        while True:
            raw = await self.services.state.pop_acks(20_000)
            if not raw:
                return n
            n += len(raw)
            try:
                await self.process_acks(raw)
            except Exception:
                # Popped is not recorded: put them back for the next tick (a database outage;
                # recording an ack is forward-only, so one processed twice changes nothing).
                with contextlib.suppress(Exception):
                    await self.services.state.push_acks(raw)
                raise
            if len(raw) < 20_000:
                return n

    async def process_acks(self, raw: list[bytes]) -> None:
        updates: dict[str, tuple[str, int]] = {}
        orphans: dict[str, tuple[str, int]] = {}
        failures: dict[str, list[int]] = {}
        for item in raw:
            try:
                a = orjson.loads(item)
                cid = a["command_id"]
                status = a["status"]
                ts = int(a.get("recv_ms") or a.get("ts") or 0)
            except Exception:
                continue  # ingest validated it; anything else is not ours to crash on
            metrics.ACKS_RECEIVED.labels(str(status)).inc()
            hit = self.by_cmd.get(cid)
            if hit is None:
                r = self.by_restore.get(cid)
                if r is not None:
                    updates[cid] = (status, ts)
                    self.restore_unacked.pop(cid, None)
                else:
                    # Not in memory (an event this runner does not hold, or one ended and
                    # forgotten): the ack still counts, by its command id in the database.
                    orphans[cid] = (str(status), ts)
                continue
            ev_id, row = hit
            run = self.running.get(ev_id)
            if run is None:
                continue
            t = run.table
            cur = int(t.status[row])
            if status in ACK_CODES:
                code = ACK_CODES[status]
                if cur in (PENDING, SENT) or (cur in (RECEIVED, STARTED) and code > cur):
                    t.status[row] = code
                    updates[cid] = (status, ts)
            elif status in FAIL_CODES and cur in (PENDING, SENT, RECEIVED, STARTED):
                t.status[row] = FAIL_CODES[status]
                updates[cid] = (status, ts)
                failures.setdefault(ev_id, []).append(row)
        if updates:
            ids = list(updates)
            await self.store.mark(
                ids, [updates[i][0] for i in ids], ack_ms=[updates[i][1] for i in ids]
            )
        if orphans:
            await self.store.record_acks(orphans)
        for ev_id, rows in failures.items():
            run = self.running.get(ev_id)
            if run is not None and run.ending is None:
                await self.replace(run, np.asarray(rows, dtype=np.int64), "ack")

    # --- replacements and the closed loop ------------------------------------------------------
    async def replace(
        self, run: Running, rows: I64, why: str, fleet: FleetSnapshot | None = None
    ) -> int:
        """Cover what ``rows`` were expected to deliver with other devices (chosen on
        ``fleet``, the control step's, or the cache's recent snapshot)."""
        t = run.table
        short_kw = float(np.sum(t.expected_kw[rows]))
        if short_kw <= 0 or run.ending is not None:
            return 0
        metrics.DEVICES_REPLACED.labels(why).inc(len(rows))
        run.replaced += len(rows)
        return await self.enlist(run, short_kw, fleet)

    async def recent_fleet(self) -> FleetSnapshot:
        """The cache's snapshot, rebuilt first when it is older than one telemetry interval of
        the clock: a scaled clock outruns the cache's wall-clock age, and on such a snapshot
        every candidate would look stale."""
        cache = self.services.fleet
        fleet = await cache.snapshot()
        if self.clock.now_ms() - fleet.now_ms > self.settings.telemetry_interval_s * 1000:
            fleet = await cache.snapshot(force=True)
        return fleet

    async def enlist(
        self, run: Running, short_kw: float, fleet: FleetSnapshot | None = None
    ) -> int:
        from dispatch.assign import replacements

        now = self.clock.now_ms()
        if now >= run.info.end_ms or short_kw <= 0:
            return 0
        if fleet is None:
            fleet = await self.recent_fleet()
        n = len(fleet)
        exclude = np.zeros(n, bool)
        # Every device already in the event stays out (one dispatch command per device and
        # event: replaced devices failed, released ones are recovering).
        # A preempting event may take what lower-priority events hold, as at its start.
        preemptable = self.preemptable_devices(run.info)
        taken = (
            set(run.table.device_id.tolist())
            | set(run.control_ids)
            | (self.busy_devices(exclude_event=run.id) - preemptable)
        )
        exclude |= fleet.mask_of(taken)
        asg = self._reserve_for(run, fleet)
        lower = tuple(
            r.id
            for r in self.running.values()
            if preemptable and r.id != run.id and r.ending is None
            and r.info.priority < run.info.priority
        )  # fmt: skip
        usage = await self.usage_for(fleet, run.id, lower)
        h = run.horizon
        t0 = int(np.clip((now - h.start_ms) // (h.interval_s * 1000), 0, h.n_intervals - 1))
        nd = len(asg.demands)
        short = np.zeros(nd)
        short[0] = short_kw

        async def choose(excluded: npt.NDArray[np.bool_]) -> tuple[Assignment, I64]:
            got = await asyncio.to_thread(
                replacements, fleet, usage, asg, short, excluded, from_interval=t0,
                params=self.params,
            )  # fmt: skip
            return got, np.flatnonzero(got.demand_index == 0)

        # Free devices first: a lower-priority event loses one only when they cannot cover it.
        new, rows = await choose(exclude | fleet.mask_of(preemptable) if preemptable else exclude)
        if preemptable and float(new.expected_kw[rows].sum()) < short_kw * (1 - 1e-9):
            new, rows = await choose(exclude)
            rows = self.free_first(fleet, new, rows, run.info)
        if rows.size == 0:
            return 0
        # Replacements are front-loaded like the devices an event starts with: a thermostat
        # sheds its whole load until the home drifts to the new setpoint. Command only as many
        # as cover the shortfall with that early kW, and count them at it while they settle,
        # or a drop-out's replacements over-deliver for an interval or two.
        rows, _, early_kw = self.hold_back_front_load(fleet, new, rows, short_kw / 1000.0)
        ids = fleet.device_ids[new.device_index[rows]].tolist()
        # The same baseline settlement uses: the device's level over the 30 minutes before the
        # event (then scaled by the control group). Its level now already carries the drift
        # since, which the control group would add a second time. Live level as a fallback.
        baselines = await self.pre_event_levels(ids, run.info.start_ms)
        batch = self.batch_from_assignment(new, rows, fleet, run.info.end_ms, baselines, now)
        # The plan values a battery at its setpoint over its pre-event output floored at 0; one
        # that was charging from its PV gives more than that until the sun fades, and counting
        # only the plan while it settles would enlist or keep too much (the overshoot after a
        # drop-out). Expect what the loop will measure: setpoint − baseline − drift now.
        bat = batch.kind == BATTERY
        if bat.any():
            _, drift = self.control_adjustment(run, fleet, now)
            base = np.nan_to_num(batch.baseline_w, nan=0.0)
            credit_kw = (batch.setpoint_w - base - drift.for_devices(base)[:, 0]) / 1000.0
            batch.expected_kw = np.where(
                bat & np.isfinite(credit_kw), np.maximum(credit_kw, 0.0), batch.expected_kw
            )
        th = batch.kind == THERMOSTAT
        preempted = self._preempt(set(batch.device_ids) & preemptable, run.info)
        if preempted:
            # Their lower-priority events let go first (their closed loops make up elsewhere).
            await self.store.mark(
                preempted, CommandStatus.preempted.value, reason=f"preempted by {run.id}"
            )
        await self.add_commands(run, batch, settle_kw=np.where(th, early_kw, batch.expected_kw))
        return len(batch)

    def _reserve_for(self, run: Running, fleet: FleetSnapshot) -> Assignment:
        """The run's reserve assignment re-indexed on the current snapshot."""
        if run.reserve is None or not run.reserve_ids:
            demand = Demand(
                id=run.id,
                region=run.info.region,
                start_ms=int(run.info.start_ms),
                end_ms=int(run.info.end_ms),
                mw=run.target_mw,
                priority=int(run.info.priority),
                is_grid_event=run.info.is_grid,
                preempt=run.info.preempt,
            )
            return Assignment.empty(run.horizon, [demand], self.params.reserve_pct)
        from dispatch.assign import standby

        idx = fleet.rows_of(run.reserve_ids).astype(np.int64)
        keep = np.flatnonzero(idx >= 0)
        # standby: plans stored before held-back rows were marked reserve stand by too.
        sub = standby(run.reserve, keep)
        sub.device_index = idx[keep]
        return sub

    async def add_commands(
        self, run: Running, batch: CommandBatch, settle_kw: F64 | None = None
    ) -> None:
        """Store, then publish, extra commands for a running event (``settle_kw``: what each
        is counted at until its telemetry shows it acting; the plan's kW if not given)."""
        now = self.clock.now_ms()
        records = self.store.records(run.id, batch, now)
        self._must_lead()
        async with self.services.db.engine.begin() as conn:
            await self.store.insert(conn, records)
        start = len(run.table)
        table = self._table(run.id, batch)
        if settle_kw is not None:
            table.settle_kw = np.asarray(settle_kw, dtype=float)
        run.table.append(table)
        self._register(run, start)
        await self.publish_due(run, now)

    def estimate(self, run: Running, fleet: FleetSnapshot, now_ms: int) -> dict[str, Any]:
        """Delivered MW now, from fresh telemetry against each device's pre-event level."""
        t = run.table
        n = len(t)
        idx = fleet.rows_of(t.device_id).astype(np.int64)
        known = idx >= 0
        live = np.isin(t.status, LIVE) & (t.valid_from_ms <= now_ms) & (t.valid_until_ms > now_ms)
        st = fleet.state[np.where(known, idx, 0)] if n else fleet.state[:0]
        recv = np.where(known, st["recv_ms"], 0) if n else np.zeros(0, np.int64)
        stale_after_ms = self.event_stale_ms()
        # Only a report from after the command came into force shows what the device does: an
        # older one (devices report every 5 minutes outside events) still shows its pre-event
        # level, and counting it would read as a shortfall and enlist far too many devices.
        # (The first report after the start may average over the switch: skip ACT_LAG_MS.)
        acting = known & (recv >= t.valid_from_ms + ACT_LAG_MS)
        # A device whose status says offline (its Last Will, or a gateway's retained status)
        # delivers nothing from that moment: it is stale at once, not after the stale horizon,
        # so the next control step replaces it.
        online = np.where(known, fleet.online[np.where(known, idx, 0)], False) if n else known
        fresh = acting & online & (recv >= now_ms - stale_after_ms)
        # Devices commanded moments ago cannot show it yet: count what the plan expects, until
        # they have had the stale horizon to report (after that, silence means stale).
        settle_wall = max(
            self.clock.wall_seconds(self.settings.control_period_s), MIN_SETTLE_WALL_S
        )
        settling = (
            (time.monotonic() - t.sent_wall < settle_wall)
            | (t.status == PENDING)
            | (~acting & (now_ms - t.valid_from_ms < stale_after_ms))
        )
        bat = t.kind == BATTERY
        level = np.where(bat, st["power_w"], st["hvac_w"]).astype(float) if n else np.zeros(0)
        ratio, drift = self.control_adjustment(run, fleet, now_ms)
        base = np.nan_to_num(t.baseline_w, nan=0.0)
        drift_w = drift.for_devices(base)[:, 0] if n else np.zeros(0)
        kw = np.where(bat, level - (base + drift_w), base * ratio - level) / 1000.0
        kw = np.where(fresh & ~np.isnan(kw), kw, 0.0)
        settle_kw = t.settle_kw if len(t.settle_kw) == n else t.expected_kw
        kw = np.where(settling, settle_kw, kw)
        # Settlement counts every dispatched command over its whole validity, failed ones too
        # (an opted-out thermostat's snapback is negative delivery until its command expires; a
        # dropped device proves nothing: 0). Count them the same way, or loop and settlement
        # disagree by the overrides' snapback.
        failed = (
            np.isin(t.status, FAILED)
            & (t.sent_ms > 0)
            & (t.valid_from_ms <= now_ms)
            & (t.valid_until_ms > now_ms)
            & np.array([r is None for r in t.restore_id], dtype=bool)
        )
        failed_kw = np.where(failed & ~bat & known & (recv >= now_ms - stale_after_ms), kw, 0.0)
        failed_kw = np.where(settling, 0.0, failed_kw)
        kw = np.where(live, kw, failed_kw)
        return {
            "delivered_mw": float(kw.sum() / 1000.0),
            "kw": kw,
            "live": live,
            "fresh": fresh,
            "settling": settling,
            "stale": live & ~fresh & ~settling,
        }

    def event_stale_ms(self) -> int:
        """During an event devices report every 10–60 s: silent for 3 minutes is stale (never
        less than 3 wall seconds, for a sped-up clock)."""
        return int(max(180.0, MIN_SETTLE_WALL_S * self.clock.time_scale) * 1000)

    def control_adjustment(
        self, run: Running, fleet: FleetSnapshot, now_ms: int
    ) -> tuple[float, BatteryDrift]:
        """From the control groups: how thermostat load moved since before the event (a ratio:
        weather, time of day) and how batteries' own output drifted (W: self-consumption
        follows the home's load and the sun)."""
        ratio = 1.0
        drift = BatteryDrift.none(1)
        if not run.control_ids or len(run.control_baseline_w) != len(run.control_ids):
            return ratio, drift
        idx = fleet.rows_of(run.control_ids).astype(np.int64)
        kinds = (
            run.control_kind
            if len(run.control_kind) == len(idx)
            else np.full(len(idx), THERMOSTAT, np.int8)
        )
        ok = idx >= 0
        st = fleet.state[np.where(ok, idx, 0)]
        ok &= st["recv_ms"] >= now_ms - self.event_stale_ms()
        th = ok & (kinds == THERMOSTAT)
        # The same formulas as settlement (dispatch.settlement.settle): the mean load of the
        # reporting control thermostats over the mean pre-event level of all of them, clipped
        # alike; the batteries' drift line on their pre-event level (fit_battery_drift).
        if th.sum() >= MIN_CONTROL_DEVICES:
            now_mean = float(np.nanmean(st["hvac_w"][th]))
            all_th = kinds == THERMOSTAT
            pre_mean = float(np.nanmean(run.control_baseline_w[all_th]))
            if pre_mean > 1e-6 and np.isfinite(now_mean):
                ratio = float(np.clip(now_mean / pre_mean, *RATIO_CLIP))
        bt = ok & (kinds == BATTERY)
        if bt.sum() >= MIN_CONTROL_DEVICES:
            drift = fit_battery_drift(
                st["power_w"][bt].astype(float)[:, None], run.control_baseline_w[bt], 1
            )
        return ratio, drift

    async def control(self, run: Running) -> None:
        """One closed-loop step: measure, replace stale devices, enlist or release."""
        now = self.clock.now_ms()
        if now < run.info.start_ms:
            return
        run.last_control_ms = now
        run.last_control_wall = time.monotonic()
        # The event's own devices and its control group read fresh, the rest (candidates to
        # enlist) as the cache has them, seconds old: a forced rebuild each minute cost a
        # national fleet 1.5–2.5 s of CPU per running event.
        fleet = await self.recent_fleet()
        if fleet.now_ms < now:
            ids = np.concatenate([run.table.device_id, np.asarray(run.control_ids, dtype=object)])
            fleet = await self.services.fleet.with_fresh_states(fleet, ids)
        est = self.estimate(run, fleet, now)
        t = run.table
        action = None
        stale_rows = np.flatnonzero(est["stale"])
        if stale_rows.size:
            t.status[stale_rows] = STALE
            await self.store.mark(
                t.cmd_id[stale_rows].tolist(), CommandStatus.stale.value, reason="no telemetry"
            )
            await self.replace(run, stale_rows, CommandStatus.stale.value, fleet)
            action = f"replaced {stale_rows.size} stale"
            est = self.estimate(run, fleet, now)
        target = run.target_at(now)
        delivered = est["delivered_mw"]
        err = target - delivered
        # The brief's band is max(2 %, 0.2 MW); under 8 MW it is narrowed to 2.5 % of the target,
        # or a small event could sit 0.2 MW (more than 5 %) off its target for good.
        tol = max(0.02 * target, min(0.2, 0.025 * target))
        if target > 0 and err > tol:
            k = await self.enlist(run, err * 1000.0, fleet)
            action = (action + "; " if action else "") + f"enlisted {k} for {err:.3f} MW short"
        elif err < -tol:
            # Increments are front-loaded (see hold_back_front_load) and fall towards the plan:
            # what live devices give above their plan will fade by itself, and a released
            # device is lost for the rest of the window. Release only what will not
            # fade, unless the excess would put the interval near the ±5 % band.
            over = -err
            kw = est["kw"]
            measured = est["live"] & est["fresh"] & ~est["settling"]
            fading = float(np.maximum(kw[measured] - t.expected_kw[measured], 0.0).sum()) / 1000.0
            to_release = max(over - fading, over - RELEASE_AT * target)
            if to_release > tol:
                k = await self.release(run, est, to_release * 1000.0)
                action = (action + "; " if action else "") + (
                    f"released {k} for {to_release:.3f} of {over:.3f} MW over"
                )
        run.last_estimate_mw = delivered
        metrics.EVENT_DELIVERED_MW.labels(run.id).set(delivered)
        metrics.EVENT_TARGET_MW.labels(run.id).set(target)
        await self.record_timeline(run, now, target, delivered, int(est["stale"].sum()), action)

    async def release(self, run: Running, est: dict[str, Any], over_kw: float) -> int:
        """Over-delivering: restore thermostats first (latest enlisted first), then batteries."""
        t = run.table
        kw = est["kw"]
        live = est["live"] & ~est["settling"]
        chosen: list[int] = []
        left = over_kw
        for kind in (THERMOSTAT, BATTERY):
            rows = np.flatnonzero(live & (t.kind == kind) & (kw > 0))[::-1]
            if rows.size == 0 or left <= 0:
                continue
            cum = np.cumsum(kw[rows])
            k = int(np.searchsorted(cum, left, side="left"))
            # Stop short rather than overshoot: release only while it stays within the excess.
            take = rows[: max(0, min(k, rows.size))]
            chosen.extend(take.tolist())
            left -= float(kw[take].sum())
        if not chosen:
            return 0
        rows_a = np.asarray(chosen, dtype=np.int64)
        t.status[rows_a] = RELEASED
        await self.store.mark(
            t.cmd_id[rows_a].tolist(), CommandStatus.released.value, reason="over target"
        )
        await self.send_restores(run, rows_a)
        return len(rows_a)

    async def record_timeline(
        self,
        run: Running,
        now: int,
        target: float,
        delivered: float,
        stale: int,
        action: str | None,
    ) -> None:
        t = run.table
        async with self.services.db.session() as s, s.begin():
            s.add(
                EventTimeline(
                    event_id=run.id,
                    ts_ms=now,
                    target_mw=round(target, 6),
                    delivered_mw=round(delivered, 6),
                    commanded=int(np.isin(t.status, LIVE).sum()),
                    acknowledged=int(np.isin(t.status, ACKED).sum()),
                    opted_out=int((t.status == OPTED_OUT).sum()),
                    replaced=run.replaced,
                    stale=stale,
                    action=action[:200] if action else None,
                )
            )

    # --- the end ---------------------------------------------------------------------------
    async def send_restores(self, run: Running, rows: I64) -> None:
        """Store, then publish, ``restore`` for the given rows (once per row)."""
        t = run.table
        if len(rows):
            rows = rows[np.array([t.restore_id[i] is None for i in rows], dtype=bool)]
        if rows.size == 0:
            return
        now = self.clock.now_ms()
        rnd = np.zeros(len(rows), np.int64)
        n = len(rows)
        b = CommandBatch(
            ids=[new_command_id() for _ in range(n)],
            device_ids=t.device_id[rows].tolist(),
            kind=t.kind[rows],
            type=[CommandType.restore.value] * n,
            setpoint_w=np.full(n, np.nan),
            offset_c=np.full(n, np.nan),
            limit_w=np.full(n, np.nan),
            valid_from_ms=np.full(n, now, np.int64),
            valid_until_ms=now + (rnd + int(VALID_MARGIN_S)) * 1000,
            randomize_s=rnd,
            baseline_w=np.full(n, np.nan),
            expected_kw=np.zeros(n),
        )
        records = self.store.records(run.id, b, now)
        self._must_lead()
        async with self.services.db.engine.begin() as conn:
            await self.store.insert(conn, records)
        for k, i in enumerate(rows.tolist()):
            t.restore_id[i] = b.ids[k]
            self.by_restore[b.ids[k]] = (run.id, i)
        bodies = payloads(run.id, b)
        until = b.valid_until_ms.tolist()
        for k, i in enumerate(rows.tolist()):
            self.restore_unacked[b.ids[k]] = (run.id, i, bodies[k], int(until[k]))
        await self.send_commands(
            np.array(b.device_ids, dtype=object), bodies, np.arange(n, dtype=np.int64)
        )
        await self.store.mark(
            b.ids, CommandStatus.sent.value, sent_ms=self.clock.now_ms(), attempts_inc=True
        )
        metrics.COMMANDS_SENT.labels(CommandType.restore.value).inc(n)

    async def end_event(self, run: Running, reason: str) -> None:
        """Restore every device that may be acting and close the event. Batteries at once;
        thermostats each at its own random time in the release stagger (their command's
        expiry), so the homes do not all restart together; on an abort everyone at once."""
        t = run.table
        acting = np.flatnonzero(np.isin(t.status, MAY_ACT))
        # Never-sent commands are void: mark them so a restart does not send them.
        never = acting[t.status[acting] == PENDING]
        if never.size:
            t.status[never] = RESTORED
            await self.store.mark(
                t.cmd_id[never].tolist(), CommandStatus.restored.value, reason=reason
            )
        acting = acting[t.status[acting] != RESTORED]
        now = self.clock.now_ms()
        if reason == GridEventStatus.aborted:
            t.release_at_ms[acting] = now
        else:
            th = t.kind[acting] == THERMOSTAT
            t.release_at_ms[acting] = np.where(
                th, np.maximum(t.valid_until_ms[acting] - int(VALID_MARGIN_S * 1000), now), now
            )
        if reason == GridEventStatus.completed:
            grid = run.info.is_grid
            await es.set_status(
                self.services,
                run.info,
                (GridEventStatus.completed if grid else RequestStatus.completed).value,
                only_from=((GridEventStatus.active if grid else RequestStatus.active).value,),
            )
        run.ending = reason
        await self.release_due(run, now)
        # Settle once the history intervals around the window's end have been written.
        self.settle_queue[run.id] = max(now, run.info.end_ms) + self.settle_delay_ms()
        log.info("event %s ended (%s): %d devices to restore", run.id, reason, len(acting))

    async def release_due(self, run: Running, now_ms: int) -> None:
        t = run.table
        due = np.flatnonzero((t.release_at_ms > 0) & (t.release_at_ms <= now_ms))
        if due.size:
            t.release_at_ms[due] = 0
            await self.send_restores(run, due)

    def settle_grace_ms(self) -> int:
        """How long after an interval's end its history is surely written."""
        return int(max(self.settings.history_interval_s * 0.2, 2 * self.clock.time_scale) * 1000)

    def provisional_settlement(self, run: Running, now_ms: int) -> None:
        """While an event runs, settle its closed intervals once per settlement interval, so
        GET shows delivery interval by interval (settled in full at the end)."""
        step = run.horizon.interval_s * 1000
        closed = (now_ms - self.settle_grace_ms() - run.info.start_ms) // step
        if closed >= 1 and self._provisional.get(run.id, 0) < closed:
            self._provisional[run.id] = int(closed)
            self.settle_queue.setdefault(run.id, now_ms)

    async def settle_due(self) -> None:
        now = self.clock.now_ms()
        for ev_id, at in list(self.settle_queue.items()):
            if now < at:
                continue
            self.settle_queue.pop(ev_id, None)
            try:
                from dispatch.settlement_service import settle_event

                await settle_event(
                    self.services, ev_id, until_ms=self.clock.now_ms() - self.settle_grace_ms()
                )
            except Exception as exc:
                if dependency_down(exc):
                    # Settled once the dependency is back, not dropped from the queue.
                    self.settle_queue[ev_id] = at
                    raise
                log.exception("settling %s", ev_id)

    # --- introspection (tests, dashboard) --------------------------------------------------------
    def snapshot_of(self, event_id: str) -> dict[str, Any] | None:
        run = self.running.get(event_id)
        if run is None:
            return None
        t = run.table
        counts = {
            COMMAND_STATUS_BY_CODE[int(c)].value: int((t.status == c).sum())
            for c in np.unique(t.status)
        }
        return {
            "event_id": event_id,
            "commands": len(t),
            "by_status": counts,
            "control": len(run.control_ids),
            "replaced": run.replaced,
            "estimate_mw": run.last_estimate_mw,
            "ending": run.ending,
        }
