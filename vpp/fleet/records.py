"""The packed per-device state record: the format every layer reads the fleet's state in.

A device's latest state is one fixed 64-byte record (numpy structured dtype ``STATE_DTYPE``):
small enough that a Redis hash of many devices stays in its compact listpack encoding, and
decodable for the whole fleet in one ``np.frombuffer`` call, so fleet views stay vectorised.
Fields a device kind does not report are NaN.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
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
        ("mode", "<i1"),  # thermostat mode code (vpp.physics.MODE_*), battery: -1
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
# (device ids, online flags). Ids are a sequence of str or UTF-8 bytes, or one bytes blob of
# UTF-8 ids each followed by b"\n" (device ids never hold one: no Python object per device
# until the ids are looked up). The chunks come back in the same order from one read to the
# next while the devices stay the same, so a reader can cache where each chunk's devices go and
# look up only chunks that changed.
PackedIds: TypeAlias = Sequence[Any] | bytes
PackedStates: TypeAlias = tuple[PackedIds, bytes]
PackedStatus: TypeAlias = tuple[PackedIds, npt.NDArray[np.bool_]]


def packed_ids(ids: PackedIds) -> list[Any]:
    """The ids of a packed chunk as a list (str or bytes items as given; a blob as str)."""
    if isinstance(ids, bytes):
        return ids.decode().split("\n")[:-1] if ids else []
    return list(ids)


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
