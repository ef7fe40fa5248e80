"""The state-store interface: each device's latest state (packed records, ``vpp.fleet.records``),
online status, the ingest registry, the ack queue and small shared values.

Everything in it is a cache of the database or of telemetry, so losing it (a Redis restarted
empty, a flush) loses nothing for good. A *generation* token, written when the store was last
built, tells a lost store from an empty one: ``generation()`` is None once it is lost, and
``rebuild()`` (one process at a time) refills what the database holds: the ingest registry.
Latest states and statuses come back with the next telemetry; see ``store.state.rebuild``."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vpp.fleet.records import PACKED_CHUNK, PackedStates, PackedStatus, pack_records


@dataclass(frozen=True)
class RegistryCursor:
    """A point in the registry's change log: ``position`` (opaque to callers; a stream id in
    Redis) and the registry version the registry had there."""

    position: str
    version: int


@dataclass(frozen=True)
class RegistryChanges:
    """The registry's changes after a cursor, in order folded into one mapping: device id →
    kind code, or None for a device removed. Applying them to a registry that already holds
    some of them is harmless (each is the latest value of its device)."""

    changes: dict[str, int | None]
    cursor: RegistryCursor


class StateStore(abc.ABC):
    """Async interface. Writes are batched: callers hand over many devices at once."""

    # --- latest state ---
    @abc.abstractmethod
    async def put_states(self, records: Mapping[str, bytes]) -> None: ...

    @abc.abstractmethod
    async def get_states(self, device_ids: list[str]) -> list[bytes | None]: ...

    @abc.abstractmethod
    async def all_states(self) -> dict[str, bytes]: ...

    async def all_states_packed(self) -> list[PackedStates]:
        """Every latest state, packed for the fleet snapshot (see ``PackedStates``)."""
        states = await self.all_states()
        ids, records = list(states), list(states.values())
        return [
            pack_records(ids[lo : lo + PACKED_CHUNK], records[lo : lo + PACKED_CHUNK])
            for lo in range(0, len(ids), PACKED_CHUNK)
        ]

    # --- online status (status topic / Last Will): device_id -> (online, service ms) ---
    @abc.abstractmethod
    async def put_status(self, statuses: Mapping[str, tuple[bool, int]]) -> None: ...

    @abc.abstractmethod
    async def all_status(self) -> dict[str, tuple[bool, int]]: ...

    async def get_online(self, device_ids: list[str]) -> list[bool | None]:
        """The online flag of each device (None: no status message yet)."""
        status = await self.all_status()
        return [v[0] if (v := status.get(d)) is not None else None for d in device_ids]

    async def all_status_packed(self) -> list[PackedStatus]:
        """Every online flag, packed for the fleet snapshot (see ``PackedStatus``)."""
        status = await self.all_status()
        ids = list(status)
        flags = np.fromiter((v[0] for v in status.values()), dtype=bool, count=len(ids))
        return [
            (ids[lo : lo + PACKED_CHUNK], flags[lo : lo + PACKED_CHUNK])
            for lo in range(0, len(ids), PACKED_CHUNK)
        ]

    # --- registry that ingest checks: device_id -> kind code, for enrolled, onboarded devices ---
    @abc.abstractmethod
    async def registry_put(self, devices: Mapping[str, int]) -> None: ...

    @abc.abstractmethod
    async def registry_remove(self, device_ids: list[str]) -> None: ...

    @abc.abstractmethod
    async def registry_all(self) -> dict[str, int]:
        """The whole registry. Read in chunks (other clients are served in between), so not
        one instant's registry: take ``registry_cursor()`` before it and apply
        ``registry_changes()`` after that cursor to have every write made meanwhile."""

    @abc.abstractmethod
    async def registry_version(self) -> int: ...

    @abc.abstractmethod
    async def registry_cursor(self) -> RegistryCursor:
        """The change log's end now, with the registry version at that point."""

    @abc.abstractmethod
    async def registry_changes(
        self, cursor: RegistryCursor, overlap_ms: int = 0
    ) -> RegistryChanges | None:
        """The registry's changes after ``cursor`` and the cursor after them; None when they
        cannot all be told (the log was trimmed past the cursor, lost, or the registry was
        written without it, as by ``rebuild``): then the caller reloads it whole.

        ``overlap_ms``: also the changes logged up to that long before the cursor, as far as
        the log still holds them (best effort; they do not count against the version check).
        A registry write is logged before its database transaction commits, so a reader that
        took its cursor and then read the database may have missed a change logged just
        before the cursor; the fleet cache re-reads those devices."""

    # --- large shared values (the fleet cache's registry image) ---
    stores_blobs = False  # whether put_blob keeps anything (the in-process store does not)

    async def put_blob(self, name: str, data: bytes) -> None:
        """Store a large value under ``name``, replacing the previous one whole (a reader
        sees the old one or the new one, never a mix). The in-process store keeps nothing:
        whoever could read it is the process that wrote it."""
        return None

    async def get_blob(self, name: str) -> bytes | None:
        """The value last stored under ``name``, or None (never stored, lost, or replaced
        while it was read)."""
        return None

    # --- loss and rebuild ---
    @abc.abstractmethod
    async def generation(self) -> str | None:
        """The token written by the last build; None: the store lost its contents (or was never
        built) and the registry must be rebuilt before anyone trusts it."""

    @abc.abstractmethod
    async def rebuild(self, load_registry: Callable[[], Awaitable[Mapping[str, int]]]) -> bool:
        """Rebuild a lost store, unless another process is doing it: True if this call rebuilt.

        Takes the rebuild lock (False at once when another holder has it, or when the store is
        not lost), loads the registry with ``load_registry`` (device id → kind code, from the
        database), adds it without overwriting entries written since the loss (an onboarding or
        offboarding made after it is newer than the load), moves the registry version to a value
        no process has seen, and writes a new generation, all only if the store was not lost
        again meanwhile. Idempotent: two rebuilds give the same registry."""

    @abc.abstractmethod
    async def delete_devices(self, device_ids: list[str]) -> None:
        """Forget state and status of offboarded devices."""

    # --- ack queue: ingest pushes raw acks, the event runner drains them ---
    @abc.abstractmethod
    async def push_acks(self, acks: list[bytes]) -> None: ...

    @abc.abstractmethod
    async def pop_acks(self, max_items: int = 10_000) -> list[bytes]: ...

    # --- small shared key/values (forecast cache, leader leases) ---
    @abc.abstractmethod
    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    @abc.abstractmethod
    async def get_value(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew a named lease (the replicas' leader); True if ``owner`` holds it."""

    @abc.abstractmethod
    async def lease_holder(self, name: str) -> str | None:
        """The owner holding the named lease now, or None."""

    @abc.abstractmethod
    async def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it (a clean shutdown: no wait for its TTL)."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def memory_bytes(self) -> int:
        """Bytes the store holds for device state (for the per-device memory figure)."""

    async def close(self) -> None:
        return None
