"""Ingest: MQTT telemetry, status and acks from devices into the state store and the history.

One :class:`IngestWorker` per process (``vpp ingest``, or inside ``vpp serve``); run several and
the MQTT 5 shared subscription ``$share/{share_group}/…`` splits the messages between them.

Hot path. paho's network thread only appends ``(topic, payload)`` to a deque. Every
``settings.ingest_flush_ms`` (100 ms) an asyncio task takes everything queued and, in one batch:
validates each message (:mod:`devices.telemetry`), keeps the newest record per device, writes
them to the state store in one call (a conditional write on Redis, so a reading never replaces a
newer one, whichever worker wrote that), pushes acks to the ack queue, updates statuses, and
adds the samples to the interval history.

Durable acceptance. Every ``settings.history_writethrough_ms`` (250 ms of wall time), or at the
first flush that finds no new message (a pause: nothing to gain by waiting), the worker takes
every open interval partial (sums and per-field counts per device and interval) and upserts it to
``telemetry_intervals`` (:func:`store.history.write_partials` merges it with what is there), in
the background: the database never holds up the flush loop, and one write is in flight at a
time. A telemetry reading counts as *accepted* (``accepted["telemetry"]``,
``vpp_ingest_messages_total{topic_kind="telemetry"}``) only once the write holding it has
committed, so a crash at any moment loses no accepted reading: what it loses is at most the
last write-through period of readings not yet counted. (Statuses and acks are accepted once in
the state store: they are not history.)

Database down. A failed write gives its partials back to the accumulator, where they merge
exactly with the readings that arrive meanwhile (memory grows with devices x intervals, not with
readings), and is retried with backoff (0.5 s doubling to 5 s). Past
``settings.history_buffer_max_rows`` rows the oldest intervals are dropped, and their readings
counted (``history_dropped``, ``vpp_ingest_history_dropped_total``).

Ordering. Each worker remembers every device's last accepted ``(ts, seq)`` and drops what is
not newer (a redelivery, a replay). The state store's conditional write then orders the workers
against each other: the shared subscription splits one device's messages between them, so worker
2 may store seq 2 a moment before worker 1 stores seq 1. A reading refused by the store is
*reordered* when it is older than the stored one by at most ``settings.ingest_reorder_window_ms``
(wall ms, times ``time_scale``, measured in the devices' ``ts``; default 2 s, ten flush periods):
it goes into the interval history and counts as accepted (``vpp_ingest_reordered_total``), but
not into the latest state, which already holds the newer reading. A reading older than that, or
an exact duplicate of the stored ``(ts, seq)``, is rejected as ``out_of_order``. The worker's
memory keeps its own last reading either way and the store decides what is older than the
newest: taking the other worker's newer reading as its own last would refuse the readings still
queued behind a reordered one, and a restarted worker (empty memory) still drops a replay.
Known limit: within the window, a replay of a reading that the *other* worker accepted (other
than the stored latest one) is not recognised: the store keeps one reading per device, not every
seq; a device's replays at the same worker are.

Faults. Nothing a device sends can stop the worker: every message is checked inside a
try/except and every drop is counted by reason (``vpp_ingest_rejected_total``). When the broker
goes away paho reconnects with backoff (1 s doubling to 30 s) and re-subscribes. When the state
store write fails, the batch stays in memory (newest record per device, so memory is bounded
by the fleet) and is retried with backoff: accepted state is never lost.

Session choice. The worker connects with a clean session. With a persistent session, Mosquitto
keeps routing a shared subscription's share to a member that is gone, where it waits for a
restart that may never come (scale-down); with a clean one, a dead worker's share moves to the
live ones at once. What the broker had queued for a worker that dies is lost: QoS-0 telemetry
is superseded within one interval anyway, and a lost ack is recovered by the event runner,
which re-sends an unacknowledged command with the same id after 30 s (devices answer
idempotently). For the same reason QoS-1 telemetry is not acknowledged late (PUBACK after the
durable write): a message the broker re-sends only on reconnect of the same persistent session
would wait for a member that may never come back, and with a clean session the broker forgets
it anyway; what a worker had not yet written when it died was never counted as accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from devices.edges import Edges
from devices.outage_log import OutageLog
from devices.telemetry import (
    Limits,
    Rejected,
    record_ts_seq,
    reorder_verdicts,
    validate_ack,
    validate_status,
    validate_telemetry,
)
from store.history import IntervalHistory, Partials, is_transient_conflict, write_partials
from store.state.base import RegistryCursor
from store.state.rebuild import rebuild_if_lost
from vpp import metrics
from vpp.domain import RejectReason
from vpp.fleet.records import STATE_DTYPE

if TYPE_CHECKING:
    from devices.mqtt import MqttClient
    from vpp.settings import Settings

log = logging.getLogger(__name__)

REGISTRY_POLL_S = 1.0  # how soon a worker sees devices onboarded through another process
FORCED_REFRESH_MIN_S = 0.25  # at most this often when messages name devices we do not know
REGISTRY_RETRY_MAX_S = 30.0  # a failing registry read is retried after 1 s, 2 s, ... up to this
MAX_HELD_UNKNOWN = 10_000  # messages of unknown devices waiting for that refresh
MAX_PENDING_HISTORY = 2_000_000  # samples kept while the state store is down (then dropped)
HISTORY_BACKOFF_MAX_S = 5.0  # longest wait between two tries of a failed history write


def _is_newer(new_ts: int, new_seq: int, old_ts: int, old_seq: int) -> bool:
    """The state store's ordering rule (same as the Redis script and the validator)."""
    if new_seq >= 0 and old_seq >= 0:
        return new_seq > old_seq and new_ts >= old_ts
    return new_ts > old_ts


async def put_states_if_newer(state: Any, records: dict[str, bytes]) -> dict[str, bytes]:
    """Write records unless the stored one is newer; ``{device_id: stored record}`` refused.

    Redis does it atomically in a script; other stores (the in-process one) compare here,
    which is atomic too because nothing between the read and the write yields to the loop."""
    fn = getattr(state, "put_states_if_newer", None)
    if fn is not None:
        return dict(await fn(records))
    ids = list(records)
    olds = await state.get_states(ids)
    refused: dict[str, bytes] = {}
    write: dict[str, bytes] = {}
    for d, old in zip(ids, olds, strict=True):
        new = records[d]
        if old is not None and len(old) == STATE_DTYPE.itemsize:
            ots, oseq = record_ts_seq(old)
            nts, nseq = record_ts_seq(new)
            if not _is_newer(nts, nseq, ots, oseq):
                refused[d] = old
                continue
        write[d] = new
    await state.put_states(write)
    return refused


class IngestWorker:
    """``IngestWorker(services)``; ``await start()``, ``await stop()``, ``connected``."""

    def __init__(
        self,
        services: Edges,
        *,
        client_id: str | None = None,
        flush_ms: int | None = None,
        write_history: bool = True,
    ) -> None:
        self.services = services
        s = services.settings
        self.settings = s
        self.limits = Limits.from_settings(s)
        self.client_id = client_id or f"{s.mqtt_client_id_prefix}-ingest-{uuid.uuid4().hex[:10]}"
        self.flush_s = (flush_ms if flush_ms is not None else s.ingest_flush_ms) / 1000.0
        self.write_history = write_history
        self._prefix = f"{s.topic_root}/devices/"
        self._filters = [
            f"$share/{s.share_group}/{s.topic_root}/devices/+/{leaf}"
            for leaf in ("telemetry", "status", "ack")
        ]
        # paho's thread appends, the flush task pops: deque operations are thread-safe.
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._last: dict[str, tuple[int, int]] = {}
        self._registry: dict[str, int] = {}
        self._registry_version: int | None = None
        self._registry_generation: str | None = None
        # Where in the store's registry change log ``_registry`` is: a moved version is caught
        # up with the changes after it, not a reload of the whole registry.
        self._registry_cursor: RegistryCursor | None = None
        self.registry_full_loads = 0  # whole-registry reads (start, lost store, log trimmed)
        self.registry_change_reads = 0  # catch-ups through the change log
        self._registry_retry_at = 0.0  # after a failed refresh: not before this
        self._registry_backoff_s = 0.0
        # True while the registry cannot be trusted to be complete: the state store is lost and
        # not yet rebuilt, or does not answer. Unknown devices' messages then wait (``_held``)
        # instead of being rejected, and the registry held in memory stays in use.
        self._registry_pending = False
        self._rebuild_task: asyncio.Task[bool] | None = None
        self.registry_rebuilds = 0  # rebuilds of a lost state store done by this worker
        self._registry_checked = 0.0
        self._forced_refresh_at = 0.0
        self._held: list[tuple[str, str, bytes]] = []  # unknown device, waiting for a refresh
        # Accepted, not yet in the state store (kept across failed writes).
        self._pend_states: dict[str, bytes] = {}
        self._pend_count: Counter[str] = Counter()  # telemetry messages per pending device
        self._pend_hist_ids: list[str] = []
        self._pend_hist_recs: list[bytes] = []
        self._pend_status: dict[str, tuple[bool, int]] = {}
        self._pend_acks: list[bytes] = []
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self.history = IntervalHistory(s.history_interval_s)
        # The reorder window is set in wall time (how far apart two workers' flushes of one
        # device's messages can be) and compared with the devices' timestamps, in service time.
        self.reorder_window_ms = int(s.ingest_reorder_window_ms * s.time_scale)
        self.reordered = 0  # readings older than the stored state, taken into the history only
        self.writethrough_s = s.history_writethrough_ms / 1000.0
        self._history_writing: Partials | None = None  # taken out, its write in flight
        self._history_task: asyncio.Task[bool] | None = None
        self._history_next_at = 0.0  # monotonic time of the next write-through
        self._history_retry_at = 0.0  # after a failed write: not before this
        self._history_backoff_s = 0.0
        self._client: MqttClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # wakes the flush loop early (stop)
        # Counters (also in Prometheus): accepted by topic kind, rejected by reason.
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.received = 0  # messages taken off the MQTT client
        self.batches = 0
        self.store_failures = 0
        self.history_failures = 0  # history writes that failed (and were retried)
        self.history_dropped = 0  # valid readings that never reached the history
        self.last_rejections: deque[tuple[str, str, str, str]] = deque(maxlen=100)
        # A lost state store is one line per outage here, not one per registry poll.
        self.outages = OutageLog(log, "ingest")
        self._m_accepted = {
            k: metrics.INGEST_MESSAGES.labels(topic_kind=k) for k in ("telemetry", "status", "ack")
        }
        self._m_rejected = {r: metrics.INGEST_REJECTED.labels(reason=r.value) for r in RejectReason}

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def pending(self) -> int:
        """Records and acks accepted but not yet in the state store."""
        return (
            len(self._pend_states) + len(self._pend_acks) + len(self._pend_status) + len(self._held)
        )

    @property
    def pending_history(self) -> int:
        """Readings in the state store, not yet committed to the interval history."""
        writing = self._history_writing
        return self.history.readings + (writing.readings if writing is not None else 0)

    async def start(self) -> None:
        self._stopping = False
        self._wake = asyncio.Event()
        await self._refresh_registry(force=True)
        if self._rebuild_task is not None:
            # A lost store: wait (a while) for its registry, rather than hold every message.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._rebuild_task), 30.0)
            await self._refresh_registry(force=True)
        client = self.services.mqtt_client(self.client_id)
        client.on_message = self._on_message
        await client.subscribe(self._filters, qos=1)
        self._client = client
        self._task = asyncio.create_task(self._run(), name="ingest-flush")
        try:
            await client.connect()
            metrics.INGEST_CONNECTED.set(1)
        except (ConnectionError, OSError) as exc:
            # Keep trying in the background: `vpp serve` starts even while the broker is down.
            log.warning("ingest: broker not reachable yet (%s); retrying", exc)
            self._connect_task = asyncio.create_task(self._connect_until_up(client))
        log.info("ingest worker %s started on %s", self.client_id, self._filters)

    async def _connect_until_up(self, client: MqttClient) -> None:
        delay = 1.0
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await client.connect()
                metrics.INGEST_CONNECTED.set(1)
                log.info("ingest: connected to the broker")
                return
            except (ConnectionError, OSError) as exc:
                log.warning("ingest: broker still not reachable (%s)", exc)
                delay = min(delay * 2, 30.0)

    async def wait_connected(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop receiving, store everything accepted so far, write all open history."""
        self._stopping = True
        if self._connect_task is not None:
            self._connect_task.cancel()
        if self._client is not None:
            try:
                await self._client.disconnect()
            except Exception:
                log.exception("ingest: disconnect")
        if self._rebuild_task is not None and not self._rebuild_task.done():
            self._rebuild_task.cancel()  # the store's lock TTL frees the rebuild for another
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, drain_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:
                log.exception("ingest: flush loop")
            self._task = None
        # Final flush: whatever is queued, then retries until stored or out of time.
        deadline = time.monotonic() + drain_timeout_s
        while True:
            try:
                await self.flush(now_ms=self.services.clock.now_ms())
            except Exception:
                log.exception("ingest: final flush")
            if (not self.pending and not self._inbox) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if self.pending:
            log.error("ingest: %d accepted records could not be stored at stop", self.pending)
        if self.write_history:
            if self._history_task is not None:
                with contextlib.suppress(Exception):
                    await self._history_task
            # Everything still open, retried (the database may be coming back) until written
            # or out of time.
            deadline = time.monotonic() + drain_timeout_s
            while len(self.history):
                if await self._write_history(self.history.take_all()):
                    continue
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if len(self.history):
                log.error(
                    "ingest: %d readings could not be written to the history at stop",
                    self.history.readings,
                )
            metrics.HISTORY_PENDING.set(self.pending_history)
        metrics.INGEST_CONNECTED.set(0)

    # --- receive (paho's thread) -----------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        self._inbox.append((topic, payload))

    def offer(self, device_id: str, leaf: str, payload: bytes) -> None:
        """A message of a device that is not reached over MQTT (a VEN's resource: its report's
        telemetry, its acks), taken exactly as if it had come on the device's topic ``leaf``."""
        self._inbox.append((f"{self._prefix}{device_id}/{leaf}", payload))

    # --- flush loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        # Not cancelled on stop (a batch taken off the inbox must not be dropped half-way):
        # stop() sets _stopping and wakes the loop, which then ends between two flushes.
        while not self._stopping:
            t0 = time.monotonic()
            try:
                await self.flush()
            except Exception:  # a bug must not stop ingest; the batch stays pending
                log.exception("ingest: flush failed")
            metrics.INGEST_CONNECTED.set(1 if self.connected else 0)
            delay = max(0.0, self.flush_s - (time.monotonic() - t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def flush(self, now_ms: int | None = None) -> int:
        """Process everything received so far; returns the number of messages taken."""
        inbox = self._inbox
        n = len(inbox)
        now = self.services.clock.now_ms() if now_ms is None else now_ms
        mono = time.monotonic()
        if mono - self._registry_checked >= REGISTRY_POLL_S:
            await self._refresh_registry()
        if n or self._held:
            batch = [inbox.popleft() for _ in range(n)]
            self.received += n
            t0 = time.perf_counter()
            await self._process(batch, now)
            metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - t0)
            self.batches += 1
        if self.pending and mono >= self._retry_at:
            await self._store()
        if self.write_history:
            self._maybe_write_history(idle=n == 0)
        return n

    async def _refresh_registry(self, force: bool = False) -> bool:
        """Bring the registry up to date if its version or the store's generation moved; True
        if it changed. Catches up through the store's change log; reads the registry whole
        only when forced (start), after a lost store (another generation) or when the log no
        longer reaches back to our cursor. A lost store (no generation) is first rebuilt from
        the database, in the background (one process does it, the others wait for its
        generation); until then the registry held in memory stays in use and
        ``_registry_pending`` is set. A failed refresh is retried after a doubling pause, not
        at every poll: a store too busy to answer is not sent the same reads again."""
        mono = time.monotonic()
        self._registry_checked = mono
        if not force and mono < self._registry_retry_at:
            return False
        state = self.services.state
        try:
            generation = await state.generation()
            if generation is None:
                self._registry_pending = True
                self._start_rebuild()
                return False
            version = await state.registry_version()
            cursor = self._registry_cursor
            full = force or cursor is None or generation != self._registry_generation
            if not full and version == self._registry_version:
                self._refreshed()
                return False
            if not full:
                assert cursor is not None
                caught_up = await state.registry_changes(cursor)
                if caught_up is not None:
                    if await state.generation() != generation:
                        self._registry_pending = True
                        return False  # lost meanwhile: the next refresh reloads
                    registry = self._registry
                    for device_id, code in caught_up.changes.items():
                        if code is None:
                            registry.pop(device_id, None)
                        else:
                            registry[device_id] = code
                    self._registry_cursor = caught_up.cursor
                    self._registry_version = caught_up.cursor.version
                    self.registry_change_reads += 1
                    self._refreshed()
                    return True
            # Whole: the cursor first, so what is written during the chunked read is caught
            # up with at the next refresh (applied again where the read saw it already).
            new_cursor = await state.registry_cursor()
            registry = await state.registry_all()
            if await state.generation() != generation:
                self._registry_pending = True
                return False  # lost again while we read it: keep the one we have
            self._registry = registry
            self._registry_cursor = new_cursor
            self._registry_version = new_cursor.version
            self._registry_generation = generation
            self.registry_full_loads += 1
            self._refreshed()
            return True
        except Exception as exc:
            self._registry_pending = True
            self._registry_backoff_s = min(
                max(self._registry_backoff_s * 2, REGISTRY_POLL_S), REGISTRY_RETRY_MAX_S
            )
            self._registry_retry_at = time.monotonic() + self._registry_backoff_s
            if not self.outages.failed(exc):
                log.warning("ingest: registry refresh failed: %s", exc)
        return False

    def _refreshed(self) -> None:
        self._registry_pending = False
        self._registry_backoff_s = 0.0
        self._registry_retry_at = 0.0
        self.outages.recovered()

    def _start_rebuild(self) -> None:
        if self._rebuild_task is not None and not self._rebuild_task.done():
            return
        self._rebuild_task = asyncio.create_task(self._rebuild(), name="ingest-registry-rebuild")

    async def _rebuild(self) -> bool:
        try:
            rebuilt = await rebuild_if_lost(self.services.db, self.services.state)
        except Exception as exc:  # the database or the store is down too: the next check retries
            log.warning("ingest: rebuild of the lost state store failed: %s", exc)
            return False
        if rebuilt:
            self.registry_rebuilds += 1
            log.warning("ingest: the state store was lost; registry rebuilt from the database")
        self._registry_checked = 0.0  # adopt it at the next flush
        self._registry_retry_at = 0.0
        return rebuilt

    def _reject(self, device_id: str, reason: RejectReason, field: str, message: str) -> None:
        self.rejected[reason.value] += 1
        self._m_rejected[reason].inc()
        self.last_rejections.append((device_id, reason.value, field, message))

    async def _process(self, batch: list[tuple[str, bytes]], now_ms: int) -> None:
        prefix = self._prefix
        plen = len(prefix)
        registry = self._registry
        held = self._held
        known: list[tuple[str, str, bytes, int]] = []
        for topic, payload in batch:
            try:
                if not topic.startswith(prefix):
                    self._reject(topic[:100], RejectReason.bad_topic, "topic", "not a device topic")
                    continue
                device_id, sep, leaf = topic[plen:].partition("/")
                if not sep or not device_id or "/" in leaf:
                    self._reject(topic[:100], RejectReason.bad_topic, "topic", "not a device topic")
                    continue
                kind = registry.get(device_id)
                if kind is None:
                    if len(held) < MAX_HELD_UNKNOWN:
                        held.append((device_id, leaf, payload))
                    else:  # a flood of unknown ids: no more waiting for a refresh
                        self._reject(device_id, RejectReason.unknown_device, "device_id", "unknown")
                    continue
                known.append((device_id, leaf, payload, kind))
            except Exception as exc:  # never let one message stop the batch
                self._reject("?", RejectReason.invalid_json, "payload", f"unexpected: {exc!r}")
        if held and time.monotonic() - self._forced_refresh_at >= FORCED_REFRESH_MIN_S:
            # Every message naming an unknown device waits for one registry refresh made after
            # it arrived (at most FORCED_REFRESH_MIN_S): a device onboarded by another process a
            # moment ago is not dropped. Held messages go first: they are the older ones.
            self._forced_refresh_at = time.monotonic()
            await self._refresh_registry()
            registry = self._registry
            resolved: list[tuple[str, str, bytes, int]] = []
            waiting: list[tuple[str, str, bytes]] = []
            for device_id, leaf, payload in held:
                kind = registry.get(device_id)
                if kind is not None:
                    resolved.append((device_id, leaf, payload, kind))
                elif self._registry_pending:  # the registry is being rebuilt: keep waiting
                    waiting.append((device_id, leaf, payload))
                else:
                    self._reject(device_id, RejectReason.unknown_device, "device_id", "unknown")
            held[:] = waiting
            known = resolved + known
        telemetry: list[tuple[str, bytes, int]] = []
        for device_id, leaf, payload, kind in known:
            if leaf == "telemetry":
                telemetry.append((device_id, payload, kind))
            else:
                try:
                    self._other(device_id, leaf, payload, kind, now_ms)
                except Exception as exc:
                    self._reject(device_id, RejectReason.invalid_json, "payload", f"{exc!r}")
        if telemetry:
            self._telemetry(telemetry, now_ms)

    def _telemetry(self, items: list[tuple[str, bytes, int]], now_ms: int) -> None:
        last = self._last
        limits = self.limits
        pend = self._pend_states
        count = self._pend_count
        hist_ids = self._pend_hist_ids
        hist_recs = self._pend_hist_recs
        keep_history = self.write_history and len(hist_ids) < MAX_PENDING_HISTORY
        not_kept = 0
        for device_id, payload, kind in items:
            try:
                r = validate_telemetry(payload, kind, last.get(device_id), now_ms, limits)
            except Exception as exc:
                self._reject(device_id, RejectReason.invalid_json, "payload", f"{exc!r}")
                continue
            if type(r) is Rejected:
                self._reject(device_id, r.reason, r.field, r.message)
                continue
            rec, ts, seq = r  # type: ignore[misc]
            last[device_id] = (ts, seq)
            pend[device_id] = rec
            count[device_id] += 1
            if keep_history:
                hist_ids.append(device_id)
                hist_recs.append(rec)
            elif self.write_history:
                not_kept += 1
        if not_kept:  # the state store has been down for a long time: state yes, history no
            self._history_lost(not_kept, "the state store is down past its buffer")

    def _other(self, device_id: str, leaf: str, payload: bytes, kind: int, now_ms: int) -> None:
        if kind < 0:
            self._reject(device_id, RejectReason.offboarded, "device_id", "offboarded")
            return
        if leaf == "status":
            st = validate_status(payload)
            if type(st) is Rejected:
                self._reject(device_id, st.reason, st.field, st.message)
                return
            self._pend_status[device_id] = (bool(st), now_ms)
            self.accepted["status"] += 1
            self._m_accepted["status"].inc()
        elif leaf == "ack":
            ack = validate_ack(payload, device_id, now_ms, self.limits)
            if type(ack) is Rejected:
                self._reject(device_id, ack.reason, ack.field, ack.message)
                return
            assert isinstance(ack, bytes)
            self._pend_acks.append(ack)
            self.accepted["ack"] += 1
            self._m_accepted["ack"].inc()
        else:
            self._reject(device_id, RejectReason.bad_topic, "topic", f"unknown leaf {leaf[:40]!r}")

    # --- state store -----------------------------------------------------------------------
    async def _store(self) -> None:
        state = self.services.state
        try:
            if self._pend_acks:
                await state.push_acks(self._pend_acks)
                self._pend_acks = []
            if self._pend_status:
                await state.put_status(self._pend_status)
                self._pend_status = {}
            if self._pend_states:
                refused = await put_states_if_newer(state, self._pend_states)
                self._after_store(refused)
        except Exception as exc:
            self.store_failures += 1
            self._backoff_s = min(max(self._backoff_s * 2, 0.2), 5.0)
            self._retry_at = time.monotonic() + self._backoff_s
            log.warning(
                "ingest: state store write failed (%s); %d records kept, retry in %.1f s",
                exc,
                self.pending,
                self._backoff_s,
            )
            return
        self._backoff_s = 0.0
        self._retry_at = 0.0

    def _after_store(self, refused: dict[str, bytes]) -> None:
        ids, recs = self._pend_hist_ids, self._pend_hist_recs
        pend, count = self._pend_states, self._pend_count
        self._pend_states = {}
        self._pend_count = Counter()
        self._pend_hist_ids = []
        self._pend_hist_recs = []
        if not refused:  # the common case: every record stored
            if not self.write_history:
                self._count_accepted(sum(count.values()))  # no history to wait for
            elif ids:
                self.history.add(ids, np.frombuffer(b"".join(recs), dtype=STATE_DTYPE))
                self._trim_history()
            return
        if self.write_history:
            # Every reading of the batch, one row each.
            rows_ids, weights = ids, None
            arr = np.frombuffer(b"".join(recs), dtype=STATE_DTYPE)
        else:
            # No history: the newest record of each device stands for all its readings.
            rows_ids = list(pend)
            weights = np.fromiter((count[d] for d in rows_ids), dtype=np.int64)
            arr = np.frombuffer(b"".join(pend.values()), dtype=STATE_DTYPE)
        n = len(rows_ids)
        hit = np.flatnonzero(np.fromiter((d in refused for d in rows_ids), dtype=bool, count=n))
        stored = {d: record_ts_seq(r) for d, r in refused.items() if len(r) == STATE_DTYPE.itemsize}
        hit_ids = [rows_ids[i] for i in hit.tolist()]
        s_ts = np.fromiter((stored.get(d, (0, -1))[0] for d in hit_ids), np.int64, len(hit_ids))
        s_seq = np.fromiter((stored.get(d, (0, -1))[1] for d in hit_ids), np.int64, len(hit_ids))
        late, dup = reorder_verdicts(
            arr["ts_ms"][hit], arr["seq"][hit], s_ts, s_seq, self.reorder_window_ms
        )
        keep = np.ones(n, dtype=bool)
        keep[hit[~late]] = False
        w = weights[hit] if weights is not None else np.ones(len(hit), dtype=np.int64)
        n_late = int(w[late].sum())
        n_stale = int(w[~late].sum())
        if n_late:
            self.reordered += n_late
            metrics.INGEST_REORDERED.inc(n_late)
        if n_stale:
            self.rejected[RejectReason.out_of_order.value] += n_stale
            self._m_rejected[RejectReason.out_of_order].inc(n_stale)
        # The worker's own memory of these devices stays its last reading: a reordered one was
        # in order in its own stream, and the stale ones are refused by the store again if
        # replayed (the store, not this worker, knows the newest).
        for d, is_late, is_dup in zip(hit_ids, late.tolist(), dup.tolist(), strict=True):
            if not is_late:
                why = (
                    "a duplicate of the stored reading" if is_dup else "older than the stored state"
                )
                self.last_rejections.append((d, "out_of_order", "ts", why))
        if weights is not None:  # no history: accepted once in (or superseded in) the state store
            self._count_accepted(int(weights.sum()) - n_stale)
            return
        if not keep.all():
            arr = arr[keep]
            rows_ids = [d for d, k in zip(rows_ids, keep.tolist(), strict=True) if k]
        if rows_ids:
            self.history.add(rows_ids, arr)
            self._trim_history()

    def _count_accepted(self, n: int) -> None:
        self.accepted["telemetry"] += n
        self._m_accepted["telemetry"].inc(n)

    # --- history ---------------------------------------------------------------------------
    def _maybe_write_history(self, idle: bool = False) -> None:
        """Start the next write-through when it is due, or at once when the stream has paused
        (``idle``: the flush took no message; nothing is gained by waiting), and none is in
        flight."""
        if self._history_task is not None and not self._history_task.done():
            return
        mono = time.monotonic()
        due = mono >= self._history_next_at or idle
        if not len(self.history) or not due or mono < self._history_retry_at:
            metrics.HISTORY_PENDING.set(self.pending_history)
            return
        self._history_next_at = mono + self.writethrough_s
        self._history_task = asyncio.create_task(
            self._write_history(self.history.take_all()), name="ingest-history"
        )
        metrics.HISTORY_PENDING.set(self.pending_history)

    async def _write_history(self, taken: Partials) -> bool:
        """Upsert the partials; on success their readings count as accepted, on failure they
        go back to the accumulator for the next try. True when written."""
        if not len(taken):
            return True
        self._history_writing = taken
        try:
            n = await write_partials(self.services.db, taken)
        except Exception as exc:
            self.history_failures += 1
            metrics.HISTORY_WRITE_FAILURES.inc()
            self.history.restore(taken)
            self._trim_history()
            if is_transient_conflict(exc):
                # Writers kept meeting (write_partials already ran it again): the database is
                # fine, so try again at the next flush rather than seconds later.
                self._history_backoff_s = 0.0
            else:
                self._history_backoff_s = min(
                    max(self._history_backoff_s * 2, 0.5), HISTORY_BACKOFF_MAX_S
                )
            self._history_retry_at = time.monotonic() + self._history_backoff_s
            log.warning(
                "ingest: history write failed (%s); %d readings in %d rows kept, retry in %.1f s",
                exc,
                self.history.readings,
                len(self.history),
                self._history_backoff_s,
            )
            return False
        finally:
            self._history_writing = None
        self._history_backoff_s = 0.0
        metrics.HISTORY_ROWS.inc(n)
        self._count_accepted(taken.readings)
        return True

    def _trim_history(self) -> None:
        rows, readings = self.history.drop_oldest(self.settings.history_buffer_max_rows)
        if rows:
            self._history_lost(readings, f"{rows} interval rows past history_buffer_max_rows")

    def _history_lost(self, readings: int, why: str) -> None:
        self.history_dropped += readings
        metrics.HISTORY_DROPPED.inc(readings)
        log.error("ingest: %d readings dropped from the interval history (%s)", readings, why)


async def run_standalone(settings: Settings) -> None:
    """``vpp ingest``: one worker until SIGTERM or SIGINT, then a clean stop."""
    services = await Edges.create(settings)
    worker = IngestWorker(services)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
        await stop.wait()
        log.info("ingest: stopping")
    finally:
        await worker.stop()
        await services.close()
        log.info(
            "ingest: stopped; accepted %s, rejected %s",
            dict(worker.accepted),
            dict(worker.rejected),
        )
