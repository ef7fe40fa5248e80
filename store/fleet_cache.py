"""The fleet cache: a current :class:`FleetSnapshot` built from the database's registry and the
state store's latest records, kept fresh stale-while-revalidate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import select, text

from store.database import Database, copy_csv
from store.outages import dependency_down
from store.state import StateStore
from store.state.base import RegistryCursor
from vpp.clock import Clock
from vpp.domain import KIND_CODE, DeviceKind
from vpp.fleet.ids import IdIndex
from vpp.fleet.image import decode, encode
from vpp.fleet.records import PackedStates, PackedStatus
from vpp.fleet.registry import (
    FLOAT_COLUMNS,
    REGISTRY_COLUMNS,
    Registry,
    assemble_packed,
    build_registry,
    compact_registry,
    export_positions,
    registry_with_changes,
    seed_positions,
    snapshot_with_changes,
)
from vpp.fleet.snapshot import FleetSnapshot, with_fresh_records
from vpp.settings import Settings

log = logging.getLogger(__name__)

IMAGE_KEY = "fleet:registry"  # the registry image in the state store (``<prefix>:fleet:registry``)
IMAGE_CLAIM = "fleet-registry-image"  # the lease a writer of the image holds while it writes
IMAGE_CLAIM_S = 30.0  # and for at most this long: at most one image written every 30 s
IMAGE_REFRESH_S = 60.0  # after a catch-up, a process writes a new image at most this often
# Re-read devices logged this long before a cursor: a registry write is logged before its
# database transaction commits (offboarding waits for the broker in between, up to
# ``broker_apply_timeout_s``), so a read right after the cursor may have missed it.
CATCH_UP_OVERLAP_S = 120.0
CATCH_UP_MAX = 200_000  # changed devices past which one whole read is cheaper
_BY_ID_CHUNK = 10_000  # ids per query of a catch-up


@dataclass
class _Loaded:
    """A build's registry: ``how`` it came ("database", "image" or "catch-up"), the rows to
    apply to it and ids to remove, and an image's chunk positions."""

    how: str
    registry: Registry
    rows: list[Any]
    gone: list[str]
    positions: dict[str, dict[bytes, npt.NDArray[np.intp]]] = field(default_factory=dict)


REBUILD_SPACING = 4.0  # a background rebuild waits this many times the last build's time


class FleetCache:
    """Keeps a current snapshot for the API, forecaster and dispatcher: stale-while-revalidate.

    ``snapshot()`` answers at once with the snapshot it has; when that is older than
    ``max_age_s`` (wall time) it starts one rebuild in the background, so no request waits for
    a million devices to be re-read. Only the first call waits, and calls after ``invalidate()``
    or with ``force=True`` (the event runner's closed loop, tests), which wait for a build that
    started after them.

    The registry changes only through onboarding, PATCH and offboarding. Changes made here come
    in through ``apply_changes`` and are applied to the registry and the current snapshot at
    once. When the state store's registry version says another process changed it, the cache
    catches up through the registry's change log (``registry_changes``): the ids changed since
    its cursor, their rows read from the database by id. Only when the log cannot say (trimmed
    past the cursor, the store lost or rebuilt) or too much changed does it read the whole
    registry again (COPY + Arrow parse). Worker-thread assembly and decoding keep the event
    loop responsive while a rebuild runs.

    A new process does not read the database at all when it can help it: after a whole read
    the cache writes the registry as one compact image (``vpp.fleet.image``: LZ4 column
    buffers, with the rows each state-store chunk joined to) to the state store
    (``<prefix>:fleet:registry``, in chunks), tagged with the change-log cursor taken before
    the read; after a catch-up it refreshes the image at most every ``IMAGE_REFRESH_S``, one
    writer at a time. A cold start loads the image, re-joins the state store's chunks whose
    ids are unchanged from it (no id hashing), and catches up from its cursor; a missing,
    damaged (checksums) or too old image is a whole read instead. Every catch-up also re-reads
    the devices logged ``CATCH_UP_OVERLAP_S`` before its cursor: a registry write is logged
    before its transaction commits. The in-process store keeps no image (one process).

    Offboarding here costs O(1) in the fleet's size: the device's row becomes a tombstone
    (``FleetSnapshot.removed``; out of the id index, region -1, not enrolled, offline) and the
    next build compacts the arrays in a worker thread. A build reads the registry (image,
    catch-up or database) and the state store at the same time.
    """

    def __init__(
        self,
        db: Database,
        state: StateStore,
        settings: Settings,
        clock: Clock,
        max_age_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.state = state
        self.settings = settings
        self.clock = clock
        self.max_age_s = max_age_s
        # Wall-clock bounded on purpose (like the state store's TTLs): it limits work, not
        # simulated time.
        self._monotonic = monotonic
        self._registry: Registry | None = None
        self._registry_version: int | None = None
        self._cursor: RegistryCursor | None = None  # the change log where the registry is
        self._snapshot: FleetSnapshot | None = None
        self._built_at = 0.0
        self._lock = asyncio.Lock()
        # Tickets: a build serves every request made before it started.
        self._requested = 0
        self._built_ticket = -1
        self._must_ticket = 0
        # Local changes seen while a build runs, applied again to its result (idempotent).
        self._changes: list[tuple[list[Any], list[str]]] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.builds = 0
        self.registry_loads = 0  # whole registry reads from the database
        self.image_loads = 0  # starts from the state store's registry image
        self.registry_catchups = 0  # registry moved elsewhere: caught up through the log
        self.last_build_s: dict[str, float] = {}
        self.write_image = True  # write the registry image for the next process (benches: off)
        self._image_task: asyncio.Task[None] | None = None
        self._image_tried_at = -IMAGE_REFRESH_S
        self.images_written = 0
        self.last_image: dict[str, float] = {}

    def invalidate(self) -> None:
        """The next ``snapshot()`` waits for a build that starts after this call (state and
        registry re-read; the registry from the database only if its version moved)."""
        self._requested += 1
        self._must_ticket = self._requested

    def apply_changes(
        self, rows: Sequence[Sequence[Any] | Mapping[str, Any]], removed_ids: Sequence[str] = ()
    ) -> None:
        """Devices this process just onboarded/changed (``rows``: registry rows as tuples in
        ``REGISTRY_COLUMNS`` order or dicts with those keys) and offboarded (``removed_ids``),
        after the call's one registry write (``registry_put``): the registry and the current
        snapshot take them at once, no reload from the database."""
        tuples = [
            tuple(r[c] for c in REGISTRY_COLUMNS) if isinstance(r, Mapping) else tuple(r)
            for r in rows
        ]
        removed = list(removed_ids)
        if self._changes is not None:
            self._changes.append((tuples, removed))
        if self._registry is None:
            return  # nothing loaded yet: the first build reads the database
        # Offboarding tombstones its row (O(1), no compaction of a million rows); the next
        # build compacts in a worker thread.
        self._registry = registry_with_changes(self._registry, tuples, removed)
        if self._registry_version is not None:
            self._registry_version += 1  # our own registry write, already applied
        if self._snapshot is not None:
            self._snapshot = snapshot_with_changes(self._snapshot, self._registry)

    async def snapshot(self, force: bool = False) -> FleetSnapshot:
        if force:
            self._requested += 1
            return await self._fresh(self._requested)
        snap = self._snapshot
        if snap is None or self._built_ticket < self._must_ticket:
            return await self._fresh(self._must_ticket)
        if self._monotonic() - self._built_at >= self._max_age():
            self._start_refresh()
        return snap

    async def with_fresh_states(
        self, snap: FleetSnapshot, device_ids: Sequence[str] | npt.NDArray[Any]
    ) -> FleetSnapshot:
        """``snap`` with the latest records and online flags of ``device_ids`` read from the
        state store now: what the runner's closed loop measures every minute, at the cost of
        its own devices (tens of thousands of reads) instead of a national fleet's rebuild (a
        million)."""
        rows = snap.rows_of(device_ids)
        known = rows >= 0
        ids = np.asarray(device_ids, dtype=object)[known].tolist()
        if not ids:
            return snap
        records, online = await asyncio.gather(
            self.state.get_states(ids), self.state.get_online(ids)
        )
        s = self.settings
        return await asyncio.to_thread(
            with_fresh_records,
            snap,
            rows[known],
            records,
            online,
            self.clock.now_ms(),
            s.telemetry_interval_s,
            s.offline_after_s,
        )

    def _max_age(self) -> float:
        """How old the snapshot may grow before a background rebuild: ``max_age_s``, or four
        times the last build's time when that is longer, so background rebuilds take at most a
        fifth of the process however big the fleet (a million devices build in seconds; back
        to back they starved the ingest sharing the process)."""
        return max(self.max_age_s, REBUILD_SPACING * self.last_build_s.get("total_s", 0.0))

    async def stop(self) -> None:
        """Cancel a background rebuild and image write (called by ``Edges.close``)."""
        for task in (self._refresh, self._image_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresh = self._image_task = None

    async def wait_refreshed(self) -> None:
        """Wait for a background rebuild in flight, if any (tests, benches)."""
        task = self._refresh
        if task is not None:
            await asyncio.shield(task)

    async def _fresh(self, ticket: int) -> FleetSnapshot:
        async with self._lock:
            if self._snapshot is not None and self._built_ticket >= ticket:
                return self._snapshot
            return await self._build()

    def _start_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_in_background())

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                if self._monotonic() - self._built_at < self._max_age():
                    return  # someone rebuilt while we queued
                await self._build()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Keep serving the previous snapshot; try again after another max_age_s. A server
            # that is down is one line a try, not a traceback every two seconds.
            down = dependency_down(exc)
            if down is not None:
                log.warning("fleet snapshot rebuild: %s down; serving the previous one", down)
            else:
                log.exception("fleet snapshot rebuild failed; serving the previous snapshot")
            self._built_at = self._monotonic()

    async def _build(self) -> FleetSnapshot:
        """One rebuild; the caller holds the lock."""
        ticket = self._requested
        self._changes = []
        timings: dict[str, float] = {}
        store = self.state
        try:
            t0 = time.perf_counter()
            # Taken before anything is read: every registry write after it is caught up later.
            cursor = await store.registry_cursor()
            version = cursor.version
            base = self._registry
            reload = base is None or version != self._registry_version

            async def read() -> tuple[list[PackedStates], list[PackedStatus]]:
                out = await asyncio.gather(store.all_states_packed(), store.all_status_packed())
                timings["read_s"] = time.perf_counter() - t0
                return out[0], out[1]

            # The registry (an image, a catch-up, or the database) and the state store are read
            # at the same time (their servers on other cores; decoding in a worker thread).
            loaded: _Loaded | None = None
            if reload:
                loaded, (states, statuses) = await asyncio.gather(
                    self._load(base, timings, t0), read()
                )
            else:
                states, statuses = await read()
            start = self._registry if loaded is None else loaded.registry
            assert start is not None
            registry: Registry = start
            if registry.removed is not None:
                # Rows offboarded before this build leave for good here, off the event loop
                # (changes made meanwhile are applied again below).
                t3 = time.perf_counter()
                registry, _ = await asyncio.to_thread(compact_registry, registry)
                timings["compact_s"] = time.perf_counter() - t3
            if loaded is not None:
                if loaded.positions:  # an image's joins, for the chunks that did not change
                    t3 = time.perf_counter()
                    seeded = 0
                    answers: dict[str, Sequence[Any]] = {"state": states, "status": statuses}
                    for what, known in loaded.positions.items():
                        chunks = [ids for ids, _ in answers.get(what, ())]
                        seeded += seed_positions(registry, what, chunks, known)
                    timings["seeded_chunks"] = seeded
                    timings["seed_s"] = time.perf_counter() - t3
                if loaded.rows or loaded.gone:
                    # Devices offboarded elsewhere become tombstones, compacted by the next
                    # build: a start does not copy every column for them.
                    t3 = time.perf_counter()
                    registry = registry_with_changes(registry, loaded.rows, loaded.gone)
                    timings["changes_s"] = time.perf_counter() - t3
            s = self.settings
            t2 = time.perf_counter()
            snap = await asyncio.to_thread(
                assemble_packed,
                registry,
                states,
                statuses,
                self.clock.now_ms(),
                s.telemetry_interval_s,
                s.offline_after_s,
            )
            timings["assemble_s"] = time.perf_counter() - t2
            imaged = registry
            # Local changes made meanwhile (idempotent on rows they already reached). No await
            # from here on: registry and snapshot are swapped together.
            for rows, removed in self._changes:
                registry = registry_with_changes(registry, rows, removed)
                snap = snapshot_with_changes(snap, registry)
            self._registry, self._snapshot = registry, snap
            if reload:
                assert loaded is not None
                self._registry_version = version
                self._cursor = cursor
                if loaded.how == "database":
                    self.registry_loads += 1
                elif loaded.how == "image":
                    self.image_loads += 1
                else:
                    self.registry_catchups += 1
                if loaded.how == "database" or loaded.rows or loaded.gone:
                    self._maybe_write_image(imaged, cursor, full=loaded.how == "database")
            elif version == self._registry_version:
                self._cursor = cursor  # nothing written elsewhere: the log's end is ours
            self._built_ticket = ticket
            self._built_at = self._monotonic()
            self.builds += 1
            timings["total_s"] = time.perf_counter() - t0
            self.last_build_s = timings
            return snap
        finally:
            self._changes = None

    async def _load(self, base: Registry | None, timings: dict[str, float], t0: float) -> _Loaded:
        """The registry now: ``base`` (or, in a new process, the image in the state store)
        caught up through the change log, else the whole registry from the database."""
        how = "catch-up"
        cursor = self._cursor if base is not None else None
        positions: dict[str, dict[bytes, npt.NDArray[np.intp]]] = {}
        if base is None and self.state.stores_blobs:
            image = await self._read_image()
            timings["image_s"] = time.perf_counter() - t0
            if image is not None:
                base, cursor, positions = image
                how = "image"
        if base is not None and cursor is not None:
            caught = await self._catch_up(cursor)
            timings["catch_up_s"] = time.perf_counter() - t0
            if caught is not None:
                rows, gone = caught
                timings["caught_up"] = len(rows) + len(gone)
                return _Loaded(how, base, rows, gone, positions)
        registry = await self._load_registry()
        timings["registry_s"] = time.perf_counter() - t0
        return _Loaded("database", registry, [], [], {})

    async def _read_image(
        self,
    ) -> tuple[Registry, RegistryCursor, dict[str, dict[bytes, npt.NDArray[np.intp]]]] | None:
        data = await self.state.get_blob(IMAGE_KEY)
        if data is None:
            return None
        try:
            registry, meta, positions = await asyncio.to_thread(decode, data)
            cursor = RegistryCursor(str(meta["position"]), int(meta["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("fleet registry image unusable (%s): reading the database", exc)
            return None
        return registry, cursor, positions

    async def _catch_up(self, cursor: RegistryCursor) -> tuple[list[Any], list[str]] | None:
        """The registry rows of the devices changed since ``cursor`` (and in the overlap before
        it), and the ids among them no longer registered; None when the log cannot say (the
        caller reads the whole registry) or when so many changed that a whole read is
        cheaper."""
        overlap_ms = int(1000 * max(CATCH_UP_OVERLAP_S, 2 * self.settings.broker_apply_timeout_s))
        changes = await self.state.registry_changes(cursor, overlap_ms)
        if changes is None or len(changes.changes) > CATCH_UP_MAX:
            return None
        ids = list(changes.changes)
        if not ids:
            return [], []
        rows = await self._rows_by_id(ids)
        found = {r[0] for r in rows}
        return rows, [d for d in ids if d not in found]

    async def _rows_by_id(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """The registry rows (``REGISTRY_COLUMNS``) of those of ``ids`` registered now."""
        from store.models import Device

        cols = [getattr(Device, name) for name in REGISTRY_COLUMNS]
        out: list[tuple[Any, ...]] = []
        async with self.db.session() as session:
            for lo in range(0, len(ids), _BY_ID_CHUNK):
                chunk = list(ids[lo : lo + _BY_ID_CHUNK])
                if self.db.is_sqlite:
                    query = select(*cols).where(
                        Device.offboarded_ms.is_(None), Device.id.in_(chunk)
                    )
                    result = await session.execute(query)
                else:
                    # A join against the id array (a long IN list plans as a sequential scan).
                    sql = (
                        f"SELECT {', '.join('d.' + c for c in REGISTRY_COLUMNS)} "
                        "FROM unnest(CAST(:ids AS varchar[])) AS u(id) "
                        "JOIN devices d ON d.id = u.id WHERE d.offboarded_ms IS NULL"
                    )
                    result = await session.execute(text(sql), {"ids": chunk})
                out.extend(tuple(r) for r in result.all())
        return out

    def _maybe_write_image(self, registry: Registry, cursor: RegistryCursor, full: bool) -> None:
        """Write the registry's image for the next process in the background: after a whole
        read from the database, and after a catch-up at most every ``IMAGE_REFRESH_S``. One
        writer at a time across processes (a short claim in the store)."""
        if not self.state.stores_blobs or not self.write_image:
            return
        now = self._monotonic()
        if not full and now - self._image_tried_at < IMAGE_REFRESH_S:
            return
        if self._image_task is not None and not self._image_task.done():
            return
        self._image_tried_at = now
        self._image_task = asyncio.get_running_loop().create_task(
            self._write_image(registry, cursor)
        )

    async def _write_image(self, registry: Registry, cursor: RegistryCursor) -> None:
        try:
            owner = uuid.uuid4().hex
            if not await self.state.acquire_lease(IMAGE_CLAIM, owner, IMAGE_CLAIM_S):
                return  # another process is writing one, or just wrote one
            t0 = time.perf_counter()
            meta = {
                "position": cursor.position,
                "version": cursor.version,
                "written_ms": int(time.time() * 1000),
            }

            def image() -> bytes | None:
                compacted, _ = compact_registry(registry)  # an image holds no tombstones
                return encode(compacted, meta, export_positions(compacted))

            data = await asyncio.to_thread(image)
            if data is None:
                return  # an id holding a newline: no image, every start reads the database
            await self.state.put_blob(IMAGE_KEY, data)
            self.images_written += 1
            self.last_image = {"bytes": len(data), "s": time.perf_counter() - t0}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # only a faster next start is lost
            log.warning("fleet registry image not written: %s", exc)

    async def wait_image(self) -> None:
        """Wait for an image write in flight, if any (tests, benches)."""
        if self._image_task is not None:
            await asyncio.shield(self._image_task)

    async def _load_registry(self) -> Registry:
        from store.models import Device

        db = self.db
        if not db.is_sqlite:
            csv = await _copy_registry_csv(db)
            if csv is not None:
                return await asyncio.to_thread(_registry_from_csv, csv)
        cols = [getattr(Device, name) for name in REGISTRY_COLUMNS]
        query = select(*cols).where(Device.offboarded_ms.is_(None)).order_by(Device.id)
        async with db.session() as session:
            rows = (await session.execute(query)).all()
        # Transposed to columns and converted in a worker thread.
        return await asyncio.to_thread(build_registry, rows)


async def _copy_registry_csv(db: Any) -> bytes | None:
    """The registry columns as CSV through PostgreSQL's COPY (asyncpg): no Python object per
    row or value on the event loop. None if the driver can't.

    No ORDER BY: sorting a million ids was about 40 % of the COPY's time in PostgreSQL, and no
    reader depends on the row order (every one finds devices through ``index``)."""
    sql = f"SELECT {', '.join(REGISTRY_COLUMNS)} FROM devices WHERE offboarded_ms IS NULL"
    return await copy_csv(db, sql)


# Parsed by Arrow's multi-threaded CSV reader: the repeated text columns come out dictionary-
# encoded (codes in order of first appearance, as build_registry gives them), so no Python
# object is made per row for them; only the ids become str objects (the index needs them).
_DICTIONARY_COLUMNS = ("tenant_id", "region", "kind", "vendor", "feeder")


def _registry_from_csv(data: bytes) -> Registry:
    if not data.strip():
        return build_registry([])
    types: dict[str, pa.DataType] = {
        "id": pa.string(),
        "enrolled": pa.bool_(),
        **dict.fromkeys(_DICTIONARY_COLUMNS, pa.dictionary(pa.int32(), pa.string())),
        **dict.fromkeys(FLOAT_COLUMNS, pa.float64()),
    }
    table = pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=list(REGISTRY_COLUMNS)),
        convert_options=pacsv.ConvertOptions(
            column_types=types,
            # NULL is an unquoted empty field: "" for text (a missing vendor/feeder is ""),
            # null (NaN) for floats; enrolled is PostgreSQL's t/f.
            strings_can_be_null=False,
            null_values=[""],
            true_values=["t"],
            false_values=["f"],
        ),
    ).unify_dictionaries()
    n = table.num_rows

    def coded(name: str) -> tuple[npt.NDArray[np.int32], list[str]]:
        chunks = table.column(name).chunks
        if not chunks:
            return np.zeros(0, np.int32), []
        labels = chunks[0].dictionary.to_pylist()  # one dictionary after unify_dictionaries
        codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks])
        return codes.astype(np.int32), labels

    ids = table.column("id").to_numpy(zero_copy_only=False).astype(object, copy=False)
    tenant_codes, tenants = coded("tenant_id")
    kind_codes, kinds = coded("kind")
    # An unknown kind raises, naming it, as the rows path does.
    kind_lut = np.array([KIND_CODE[DeviceKind(k)] for k in kinds], dtype=np.int8)
    columns: dict[str, np.ndarray] = {
        "device_ids": ids,
        "tenant_ids": np.array(tenants, dtype=object)[tenant_codes],
        "kind_codes": kind_lut[kind_codes] if n else np.zeros(0, np.int8),
        "enrolled": table.column("enrolled").to_numpy(zero_copy_only=False).astype(bool),
    }
    tables: dict[str, list[str]] = {}
    for col, name in (
        ("region_codes", "region"),
        ("vendor_codes", "vendor"),
        ("feeder_codes", "feeder"),
    ):
        columns[col], tables[name] = coded(name)
    for name in FLOAT_COLUMNS:
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    index = IdIndex.build(ids)
    return Registry(columns, tables["region"], tables["vendor"], tables["feeder"], index)
