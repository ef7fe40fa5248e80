"""Validation of what devices send over MQTT (the contract's MQTT section), pure and fast.

``validate_telemetry(payload, kind, last, now_ms)`` turns one telemetry payload into the packed
64-byte ``STATE_DTYPE`` record the state store keeps, or a :class:`Rejected` that names the
reason (a ``RejectReason``, the metric label) and the offending field. It does no I/O and reads
no clock: the caller passes the service time and the device's last accepted ``(ts, seq)``.

This is the ingest hot path (tens of thousands of messages a second), so it is written by hand:
orjson to parse, ``type(x) is …`` checks, and one ``struct`` pack per record. pydantic would be
several times slower here.

Ordering: a message is accepted only if it is newer than the last accepted one of its device.
When both carry ``seq``, ``seq`` must grow (and ``ts`` must not go back); otherwise ``ts`` must
grow. An equal ``seq``/``ts`` is a duplicate (a QoS-1 redelivery) and is dropped as
``out_of_order`` too, so interval history never counts a sample twice. Between two ingest
workers the state store has the last word (:func:`reorder_verdicts`: a reading another worker
overtook by at most the reorder window still counts in the history).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import orjson

from vpp.domain import KIND_OFFBOARDED, AckStatus, RejectReason
from vpp.fleet.records import STATE_DTYPE
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT
from vpp.physics import MODE_CODE

# ts_ms, recv_ms, seq, power_w, soc_pct, backup_reserve_pct, indoor_c, setpoint_c, hvac_w,
# outdoor_c, energy_wh, mode, grid_up, clock_skewed, kind: the STATE_DTYPE layout, packed.
_RECORD = struct.Struct("<qqqfffffffdbbbb")
assert _RECORD.size == STATE_DTYPE.itemsize
_NAN = math.nan


# Plausibility bounds. The contract fixes 0–100 % and the signs; the other limits only keep
# nonsense (and float32 overflow) out of the fleet's sums: no home device comes near them.
MAX_POWER_W = 1_000_000.0
MIN_TEMP_C, MAX_TEMP_C = -80.0, 100.0
MAX_TS_MS = 2**53  # exact in a double; far beyond any real clock
MAX_SEQ = 2**62


@dataclass(frozen=True)
class Limits:
    """The contract's limits, in the units the validator works in."""

    max_payload_bytes: int = 4096
    future_tolerance_ms: int = 300_000  # ts more than 5 minutes ahead: rejected as `future`
    max_clock_skew_ms: int = 60_000  # further off than this: accepted, flagged `clock_skewed`

    @classmethod
    def from_settings(cls, settings: object) -> Limits:
        return cls(
            max_payload_bytes=int(getattr(settings, "max_payload_bytes", 4096)),
            future_tolerance_ms=int(getattr(settings, "future_tolerance_s", 300.0) * 1000),
            max_clock_skew_ms=int(getattr(settings, "max_clock_skew_s", 60.0) * 1000),
        )


DEFAULT_LIMITS = Limits()


class Rejected:
    """A dropped message: ``reason`` (the metric label), ``field`` and a readable message."""

    __slots__ = ("field", "message", "reason")

    def __init__(self, reason: RejectReason, field: str, message: str) -> None:
        self.reason = reason
        self.field = field
        self.message = message

    def __repr__(self) -> str:
        return f"Rejected({self.reason.value}, {self.field}: {self.message})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejected) and (self.reason, self.field) == (
            other.reason,
            other.field,
        )

    def __hash__(self) -> int:
        return hash((self.reason, self.field))


# An accepted reading: (packed STATE_DTYPE record, ts_ms, seq or -1).
Reading = tuple[bytes, int, int]


def _number(
    obj: dict[str, object], name: str, lo: float, hi: float, required: bool
) -> float | Rejected:
    v = obj.get(name)
    if v is None:
        if name in obj:  # an explicit null is not a number either
            return Rejected(RejectReason.wrong_type, name, "must be a number, not null")
        if required:
            return Rejected(RejectReason.missing_field, name, "is required")
        return _NAN
    t = type(v)
    if t is not float and t is not int:
        return Rejected(RejectReason.wrong_type, name, f"must be a number, not {t.__name__}")
    if not lo <= v <= hi:  # type: ignore[operator]
        return Rejected(RejectReason.out_of_range, name, f"must be within {lo:g}..{hi:g}")
    return float(v)  # type: ignore[arg-type]


def _parse_object(payload: bytes, max_bytes: int) -> dict[str, object] | Rejected:
    if len(payload) > max_bytes:
        return Rejected(RejectReason.oversize, "payload", f"over {max_bytes} bytes")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return Rejected(RejectReason.invalid_json, "payload", "not valid JSON")
    if type(obj) is not dict:
        return Rejected(RejectReason.not_object, "payload", "must be a JSON object")
    return obj


def validate_telemetry(
    payload: bytes,
    kind: int,
    last: tuple[int, int] | None,
    now_ms: int,
    limits: Limits = DEFAULT_LIMITS,
) -> Reading | Rejected:
    """Validate one telemetry payload of a device of ``kind`` (registry kind code).

    ``last`` is the device's last accepted ``(ts_ms, seq)`` (seq -1 when it sent none), or None
    when nothing was accepted yet. Returns ``(record, ts_ms, seq)`` or a :class:`Rejected`.
    """
    if kind != BATTERY and kind != SOLAR and kind != THERMOSTAT:
        # Who sent it is checked before what was sent: an offboarded device's garbage counts
        # as `offboarded`.
        if kind == KIND_OFFBOARDED:
            return Rejected(RejectReason.offboarded, "device_id", "the device was offboarded")
        return Rejected(RejectReason.unknown_device, "device_id", "not a registered device")
    obj = _parse_object(payload, limits.max_payload_bytes)
    if type(obj) is Rejected:
        return obj
    assert isinstance(obj, dict)

    ts = obj.get("ts")
    if ts is None:
        if "ts" in obj:
            return Rejected(RejectReason.wrong_type, "ts", "must be an integer (epoch ms)")
        return Rejected(RejectReason.missing_field, "ts", "is required")
    if type(ts) is not int:
        return Rejected(RejectReason.wrong_type, "ts", "must be an integer (epoch ms)")
    if not 0 < ts < MAX_TS_MS:
        return Rejected(RejectReason.out_of_range, "ts", "must be a positive epoch-ms time")
    if ts > now_ms + limits.future_tolerance_ms:
        return Rejected(
            RejectReason.future,
            "ts",
            f"{(ts - now_ms) // 1000} s ahead of the service clock",
        )
    seq = obj.get("seq")
    if seq is None:  # optional (an explicit null counts as absent)
        seq = -1
    elif type(seq) is not int:
        return Rejected(RejectReason.wrong_type, "seq", "must be an integer")
    elif not 0 <= seq < MAX_SEQ:
        return Rejected(RejectReason.out_of_range, "seq", "must be a non-negative integer")

    if last is not None:
        last_ts, last_seq = last
        if seq >= 0 and last_seq >= 0:
            if seq <= last_seq:
                return Rejected(
                    RejectReason.out_of_order, "seq", f"not after the last accepted {last_seq}"
                )
            if ts < last_ts:
                return Rejected(
                    RejectReason.out_of_order, "ts", f"before the last accepted {last_ts}"
                )
        elif ts <= last_ts:
            return Rejected(
                RejectReason.out_of_order, "ts", f"not after the last accepted {last_ts}"
            )

    skewed = 1 if abs(ts - now_ms) > limits.max_clock_skew_ms else 0

    if kind == BATTERY:
        soc = _number(obj, "soc_pct", 0.0, 100.0, True)
        if type(soc) is Rejected:
            return soc
        power = _number(obj, "power_w", -MAX_POWER_W, MAX_POWER_W, True)
        if type(power) is Rejected:
            return power
        reserve = _number(obj, "backup_reserve_pct", 0.0, 100.0, False)
        if type(reserve) is Rejected:
            return reserve
        mode = obj.get("mode")
        if mode is not None and type(mode) is not str:
            return Rejected(RejectReason.wrong_type, "mode", "must be a string")
        grid = obj.get("grid")
        if grid is None:
            grid_up = -1
        elif grid == "up":
            grid_up = 1
        elif grid == "down":
            grid_up = 0
        elif type(grid) is str:
            return Rejected(RejectReason.out_of_range, "grid", 'must be "up" or "down"')
        else:
            return Rejected(RejectReason.wrong_type, "grid", 'must be "up" or "down"')
        return (
            _RECORD.pack(
                ts, now_ms, seq, power, soc, reserve,  # type: ignore[arg-type]
                _NAN, _NAN, _NAN, _NAN, _NAN, -1, grid_up, skewed, BATTERY,
            ),
            ts,
            seq,
        )  # fmt: skip

    if kind == SOLAR:
        power = _number(obj, "power_w", 0.0, MAX_POWER_W, True)
        if type(power) is Rejected:
            return power
        energy = _number(obj, "energy_wh", 0.0, 1e15, False)
        if type(energy) is Rejected:
            return energy
        return (
            _RECORD.pack(
                ts, now_ms, seq, power, _NAN, _NAN,  # type: ignore[arg-type]
                _NAN, _NAN, _NAN, _NAN, energy, -1, -1, skewed, SOLAR,
            ),
            ts,
            seq,
        )  # fmt: skip

    if kind == THERMOSTAT:
        indoor = _number(obj, "indoor_c", MIN_TEMP_C, MAX_TEMP_C, True)
        if type(indoor) is Rejected:
            return indoor
        setpoint = _number(obj, "setpoint_c", MIN_TEMP_C, MAX_TEMP_C, True)
        if type(setpoint) is Rejected:
            return setpoint
        hvac = _number(obj, "hvac_w", 0.0, MAX_POWER_W, True)
        if type(hvac) is Rejected:
            return hvac
        outdoor = _number(obj, "outdoor_c", MIN_TEMP_C, MAX_TEMP_C, False)
        if type(outdoor) is Rejected:
            return outdoor
        mode = obj.get("mode")
        if mode is None:
            if "mode" in obj:
                return Rejected(RejectReason.wrong_type, "mode", "must be a string")
            return Rejected(RejectReason.missing_field, "mode", "is required")
        code = MODE_CODE.get(mode) if type(mode) is str else None
        if code is None:
            if type(mode) is not str:
                return Rejected(RejectReason.wrong_type, "mode", "must be a string")
            return Rejected(
                RejectReason.out_of_range, "mode", 'must be "cool", "heat", "off" or "auto"'
            )
        return (
            _RECORD.pack(
                ts, now_ms, seq, _NAN, _NAN, _NAN,  # type: ignore[arg-type]
                indoor, setpoint, hvac, outdoor, _NAN, code, -1, skewed, THERMOSTAT,
            ),
            ts,
            seq,
        )  # fmt: skip
    raise AssertionError("unreachable")  # kinds were checked on entry


def reorder_verdicts(
    ts: np.ndarray, seq: np.ndarray, stored_ts: np.ndarray, stored_seq: np.ndarray, window_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Readings the state store refused against its stored ``(ts, seq)`` (row-aligned arrays,
    seq -1 when absent): ``(late, duplicate)`` masks.

    *late*: older than the stored reading by the ordering rule above, and by at most
    ``window_ms`` of device time: a reading another worker overtook, taken into the interval
    history. Everything else is rejected as ``out_of_order``; *duplicate* marks the exact
    duplicates of the stored reading among those (same ``seq`` and ``ts``, or same ``ts``
    without seq)."""
    both = (seq >= 0) & (stored_seq >= 0)
    duplicate = np.where(both, (seq == stored_seq) & (ts == stored_ts), ts == stored_ts)
    older = np.where(both, (seq < stored_seq) & (ts <= stored_ts), ts < stored_ts)
    late = older & (stored_ts - ts <= window_ms)
    return late, duplicate


def record_ts_seq(record: bytes) -> tuple[int, int]:
    """``(ts_ms, seq)`` of a packed record (seeds the ordering check from the state store)."""
    ts, _recv, seq = struct.unpack_from("<qqq", record)
    return ts, seq


# --- status and acks -----------------------------------------------------------------------------
def validate_status(payload: bytes) -> bool | Rejected:
    """``online`` → True, ``offline`` → False (the Last Will), anything else rejected."""
    p = payload.strip()
    if p == b"online":
        return True
    if p == b"offline":
        return False
    if len(payload) > 64:
        return Rejected(RejectReason.oversize, "payload", "a status is `online` or `offline`")
    return Rejected(RejectReason.out_of_range, "payload", "must be `online` or `offline`")


_ACK_STATUSES = frozenset(s.value for s in AckStatus)


def validate_ack(
    payload: bytes, device_id: str, recv_ms: int, limits: Limits = DEFAULT_LIMITS
) -> bytes | Rejected:
    """A command acknowledgement → the orjson bytes pushed to the state store's ack queue:
    ``{"device_id", "command_id", "status", "ts", "reason"?, "recv_ms"}``."""
    obj = _parse_object(payload, limits.max_payload_bytes)
    if type(obj) is Rejected:
        return obj
    assert isinstance(obj, dict)
    command_id = obj.get("command_id")
    if command_id is None:
        return Rejected(RejectReason.missing_field, "command_id", "is required")
    if type(command_id) is not str:
        return Rejected(RejectReason.wrong_type, "command_id", "must be a string")
    if not 0 < len(command_id) <= 128:
        return Rejected(RejectReason.out_of_range, "command_id", "must be 1..128 characters")
    status = obj.get("status")
    if status is None:
        return Rejected(RejectReason.missing_field, "status", "is required")
    if type(status) is not str:
        return Rejected(RejectReason.wrong_type, "status", "must be a string")
    if status not in _ACK_STATUSES:
        return Rejected(
            RejectReason.out_of_range,
            "status",
            "must be one of " + ", ".join(sorted(_ACK_STATUSES)),
        )
    ts = obj.get("ts")
    if ts is None:
        return Rejected(RejectReason.missing_field, "ts", "is required")
    if type(ts) is not int:
        return Rejected(RejectReason.wrong_type, "ts", "must be an integer (epoch ms)")
    if not 0 < ts < MAX_TS_MS:
        return Rejected(RejectReason.out_of_range, "ts", "must be a positive epoch-ms time")
    if ts > recv_ms + limits.future_tolerance_ms:
        return Rejected(RejectReason.future, "ts", "ahead of the service clock")
    out: dict[str, object] = {
        "device_id": device_id,
        "command_id": command_id,
        "status": status,
        "ts": ts,
        "recv_ms": recv_ms,
    }
    reason = obj.get("reason")
    if reason is not None:
        if type(reason) is not str:
            return Rejected(RejectReason.wrong_type, "reason", "must be a string")
        out["reason"] = reason[:500]
    return orjson.dumps(out)
