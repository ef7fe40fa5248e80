"""State-store interface and the packed per-device record.

A device's latest state is one fixed 64-byte record (numpy structured dtype ``STATE_DTYPE``):
small enough that a Redis hash of many devices stays in its compact listpack encoding, and
decodable for the whole fleet in one ``np.frombuffer`` call, so fleet views stay vectorised.
Fields a device kind does not report are NaN.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

STATE_DTYPE = np.dtype(
    [
        ("ts_ms", "<i8"),  # device clock
        ("recv_ms", "<i8"),  # service clock at receipt: freshness is judged on this
        ("seq", "<i8"),  # -1 when the device sends none
        ("power_w", "<f4"),
        ("soc_pct", "<f4"),
        ("backup_reserve_pct", "<f4"),
        ("indoor_c", "<f4"),
        ("setpoint_c", "<f4"),
        ("hvac_w", "<f4"),
        ("outdoor_c", "<f4"),
        ("energy_wh", "<f8"),
        ("mode", "<i1"),  # thermostat mode code (devices.physics.MODE_*), battery: -1
        ("grid_up", "<i1"),  # 1 up, 0 down, -1 unknown
        ("clock_skewed", "<i1"),  # device clock more than a minute off the service clock
        ("kind", "<i1"),
    ]
)
assert STATE_DTYPE.itemsize == 64


def empty_state() -> np.ndarray:
    rec = np.zeros(1, dtype=STATE_DTYPE)
    for name in (
        "power_w",
        "soc_pct",
        "backup_reserve_pct",
        "indoor_c",
        "setpoint_c",
        "hvac_w",
        "outdoor_c",
        "energy_wh",
    ):
        rec[name] = np.nan
    rec["seq"] = -1
    rec["mode"] = -1
    rec["grid_up"] = -1
    return rec


def pack_state(rec: np.ndarray) -> bytes:
    return rec.tobytes()


def unpack_states(blobs: Iterable[bytes | None], count: int | None = None) -> np.ndarray:
    """Decode records; a missing record (None) decodes as an empty state with recv_ms 0."""
    blobs = list(blobs)
    empty = empty_state().tobytes()
    buf = b"".join(b if b is not None and len(b) == STATE_DTYPE.itemsize else empty for b in blobs)
    return np.frombuffer(buf, dtype=STATE_DTYPE).copy()


# Packed answers for whole-fleet reads: chunks of (device ids, 64-byte records back to back) and
# (device ids, online flags). Ids are str or UTF-8 bytes. The chunks come back in the same order
# from one read to the next while the devices stay the same, so a reader can cache where each
# chunk's devices go and look up only chunks that changed.
PackedStates: TypeAlias = tuple[Sequence[Any], bytes]
PackedStatus: TypeAlias = tuple[Sequence[Any], npt.NDArray[np.bool_]]
PACKED_CHUNK = 4096


def pack_records(ids: Sequence[Any], records: Sequence[bytes | None]) -> PackedStates:
    """(ids, records joined), leaving out any record that is not exactly 64 bytes."""
    blob = b"".join(r for r in records if r is not None)
    if len(blob) == STATE_DTYPE.itemsize * len(ids):
        return list(ids), blob
    good = [(d, r) for d, r in zip(ids, records, strict=True) if r and len(r) == 64]
    return [d for d, _ in good], b"".join(r for _, r in good)


def bucket_of(device_id: str, n_buckets: int) -> int:
    """Stable across processes and machines (unlike ``hash``)."""
    return zlib.crc32(device_id.encode()) % n_buckets


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
    async def registry_all(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def registry_version(self) -> int: ...

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
        """Take or renew a named lease (the event-runner leader); True if ``owner`` holds it."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def memory_bytes(self) -> int:
        """Bytes the store holds for device state (for the per-device memory figure)."""

    async def close(self) -> None:
        return None
