"""In-process state store: the embedded default. Same semantics as the Redis store."""

from __future__ import annotations

import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from store.state.base import RegistryChanges, RegistryCursor, StateStore

REGISTRY_LOG_MAX = 10_000  # registry writes kept in the change log (as in the Redis store)


class MemoryStateStore(StateStore):
    def __init__(self) -> None:
        self.registry_log_max = REGISTRY_LOG_MAX
        self._clear()
        # Built with the process and never lost while it runs; ``flush_prefix`` forgets it, so
        # tests can lose this store the way a Redis is lost.
        self._generation: str | None = uuid.uuid4().hex
        self._rebuilding = False

    def _clear(self) -> None:
        self._epoch = getattr(self, "_epoch", 0) + 1  # one more loss
        self._states: dict[str, bytes] = {}
        self._status: dict[str, tuple[bool, int]] = {}
        self._registry: dict[str, int] = {}
        self._registry_version = 0
        # The change log: (sequence number, wall ms, the write's changes, None for a removal).
        self._registry_log: deque[tuple[int, int, dict[str, int | None]]] = deque()
        self._registry_log_seq = 0
        self._registry_log_dropped = 0  # the highest sequence number trimmed off the log
        self._acks: deque[bytes] = deque()
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    async def put_states(self, records: Mapping[str, bytes]) -> None:
        self._states.update(records)

    async def get_states(self, device_ids: list[str]) -> list[bytes | None]:
        return [self._states.get(d) for d in device_ids]

    async def all_states(self) -> dict[str, bytes]:
        return dict(self._states)

    async def put_status(self, statuses: Mapping[str, tuple[bool, int]]) -> None:
        self._status.update(statuses)

    async def all_status(self) -> dict[str, tuple[bool, int]]:
        return dict(self._status)

    async def get_online(self, device_ids: list[str]) -> list[bool | None]:
        return [v[0] if (v := self._status.get(d)) is not None else None for d in device_ids]

    async def registry_put(self, devices: Mapping[str, int]) -> None:
        if not devices:
            return
        self._registry.update(devices)
        self._registry_version += 1
        self._log_change(dict(devices))

    async def registry_remove(self, device_ids: list[str]) -> None:
        if not device_ids:
            return
        for d in device_ids:
            self._registry.pop(d, None)
        self._registry_version += 1
        self._log_change(dict.fromkeys(device_ids))

    def _log_change(self, changes: dict[str, int | None]) -> None:
        self._registry_log_seq += 1
        self._registry_log.append((self._registry_log_seq, int(time.time() * 1000), changes))
        while len(self._registry_log) > self.registry_log_max:
            self._registry_log_dropped = self._registry_log.popleft()[0]

    async def registry_cursor(self) -> RegistryCursor:
        return RegistryCursor(str(self._registry_log_seq), self._registry_version)

    async def registry_changes(
        self, cursor: RegistryCursor, overlap_ms: int = 0
    ) -> RegistryChanges | None:
        try:
            after = int(cursor.position)
        except ValueError:
            return None
        if after < self._registry_log_dropped or after > self._registry_log_seq:
            return None  # trimmed past it, or a cursor of a store since lost
        changes: dict[str, int | None] = {}
        writes = 0
        at = next((t for seq, t, _ in self._registry_log if seq == after), None)
        since = at - overlap_ms if overlap_ms and at is not None else None
        for seq, t, change in self._registry_log:
            if seq > after:
                changes.update(change)
                writes += 1
            elif since is not None and t >= since:
                changes.update(change)  # the overlap before the cursor
        if cursor.version + writes != self._registry_version:
            return None  # written without the log (a rebuild)
        return RegistryChanges(
            changes, RegistryCursor(str(self._registry_log_seq), self._registry_version)
        )

    async def registry_all(self) -> dict[str, int]:
        return dict(self._registry)

    async def registry_version(self) -> int:
        return self._registry_version

    async def generation(self) -> str | None:
        return self._generation

    async def rebuild(self, load_registry: Callable[[], Awaitable[Mapping[str, int]]]) -> bool:
        if self._generation is not None or self._rebuilding:
            return False
        self._rebuilding = True
        epoch = self._epoch
        try:
            loaded = await load_registry()
            if self._generation is not None or self._epoch != epoch:
                return False  # rebuilt by someone else, or lost again while we loaded
            for device_id, code in loaded.items():
                self._registry.setdefault(device_id, code)  # written since the loss: newer
            self._registry_version = time.time_ns() // 1000  # a value no process has seen
            self._generation = uuid.uuid4().hex
            return True
        finally:
            self._rebuilding = False

    async def flush_prefix(self) -> None:
        """Forget everything, as a Redis restarted empty would (tests)."""
        self._clear()
        self._generation = None

    async def delete_devices(self, device_ids: list[str]) -> None:
        for d in device_ids:
            self._states.pop(d, None)
            self._status.pop(d, None)

    async def push_acks(self, acks: list[bytes]) -> None:
        self._acks.extend(acks)

    async def pop_acks(self, max_items: int = 10_000) -> list[bytes]:
        out: list[bytes] = []
        while self._acks and len(out) < max_items:
            out.append(self._acks.popleft())
        return out

    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        # Leases and TTLs are wall-clock bounded: they guard processes, not simulated time.
        self._values[key] = (value, time.monotonic() + ttl_s if ttl_s else None)

    async def get_value(self, key: str) -> bytes | None:
        item = self._values.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and time.monotonic() > expires:
            self._values.pop(key, None)
            return None
        return value

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        now = time.monotonic()
        holder = self._leases.get(name)
        if holder is None or holder[0] == owner or holder[1] < now:
            self._leases[name] = (owner, now + ttl_s)
            return True
        return False

    async def lease_holder(self, name: str) -> str | None:
        holder = self._leases.get(name)
        if holder is None or holder[1] < time.monotonic():
            return None
        return holder[0]

    async def release_lease(self, name: str, owner: str) -> bool:
        holder = self._leases.get(name)
        if holder is not None and holder[0] == owner:
            del self._leases[name]
            return True
        return False

    async def ping(self) -> bool:
        return True

    async def memory_bytes(self) -> int:
        return sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in self._states.items())
