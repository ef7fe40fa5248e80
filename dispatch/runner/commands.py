"""Commands of the event runner: status codes of a command row, the columnar batch of new
commands, and the contract's command JSON."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from vpp.domain import (
    COMMAND_KIND,
    COMMAND_STATUS_CODE,
    KIND_CODE,
    AckStatus,
    CommandStatus,
    CommandType,
)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# Command row statuses: codes in arrays (vpp.domain.COMMAND_STATUS_CODE), names in the database.
PENDING = COMMAND_STATUS_CODE[CommandStatus.pending]
SENT = COMMAND_STATUS_CODE[CommandStatus.sent]
RECEIVED = COMMAND_STATUS_CODE[CommandStatus.received]
STARTED = COMMAND_STATUS_CODE[CommandStatus.started]
COMPLETED = COMMAND_STATUS_CODE[CommandStatus.completed]
OPTED_OUT = COMMAND_STATUS_CODE[CommandStatus.opted_out]
REJECTED = COMMAND_STATUS_CODE[CommandStatus.rejected]
EXPIRED = COMMAND_STATUS_CODE[CommandStatus.expired]
MISSED = COMMAND_STATUS_CODE[CommandStatus.missed]
STALE = COMMAND_STATUS_CODE[CommandStatus.stale]
PREEMPTED = COMMAND_STATUS_CODE[CommandStatus.preempted]
RELEASED = COMMAND_STATUS_CODE[CommandStatus.released]
RESTORED = COMMAND_STATUS_CODE[CommandStatus.restored]
STATUS_CODE: dict[str, int] = {s.value: c for s, c in COMMAND_STATUS_CODE.items()}
LIVE = np.array([PENDING, SENT, RECEIVED, STARTED], dtype=np.int8)  # the device should act
# Given up on (no ack, or no telemetry) though the device may still be acting on it.
UNSURE = np.array([MISSED, STALE], dtype=np.int8)
MAY_ACT = np.concatenate([LIVE, UNSURE])
ACKED = np.array([RECEIVED, STARTED, COMPLETED], dtype=np.int8)
FAILED = np.array([OPTED_OUT, REJECTED, EXPIRED, MISSED, STALE, PREEMPTED], dtype=np.int8)
# What an ack's status makes of a command: progress, or a failure to replace.
ACK_CODES: dict[str, int] = {
    a.value: STATUS_CODE[a.value]
    for a in (AckStatus.received, AckStatus.started, AckStatus.completed)
}
FAIL_CODES: dict[str, int] = {
    a.value: STATUS_CODE[a.value]
    for a in (AckStatus.opted_out, AckStatus.rejected, AckStatus.expired)
}
# The kind code of the device each command type acts on.
KIND_OF_COMMAND: dict[str, int] = {t.value: KIND_CODE[k] for t, k in COMMAND_KIND.items()}


def new_command_id() -> str:
    return f"c-{secrets.token_hex(10)}"


@dataclass
class CommandBatch:
    """New commands, columnar (one entry a command)."""

    ids: list[str]
    device_ids: list[str]
    kind: npt.NDArray[np.int8]
    type: list[str]
    setpoint_w: F64
    offset_c: F64
    limit_w: F64
    valid_from_ms: I64
    valid_until_ms: I64
    randomize_s: I64  # 0 = none
    baseline_w: F64
    expected_kw: F64

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, lo: int, hi: int) -> CommandBatch:
        """Commands ``lo`` to ``hi`` (a chunk of a big fan-out)."""
        return CommandBatch(
            **{k: v[lo:hi] for k, v in self.__dict__.items()}  # lists and arrays slice alike
        )


def payloads(event_id: str, b: CommandBatch) -> list[bytes]:
    """The contract's command JSON for each command of a batch."""
    out = []
    sp = b.setpoint_w.tolist()
    oc = b.offset_c.tolist()
    lw = b.limit_w.tolist()
    vf = b.valid_from_ms.tolist()
    vu = b.valid_until_ms.tolist()
    rs = b.randomize_s.tolist()
    dumps = orjson.dumps
    for i, cid in enumerate(b.ids):
        doc: dict[str, Any] = {"command_id": cid, "event_id": event_id, "type": b.type[i]}
        t = b.type[i]
        if t == CommandType.battery_discharge or t == CommandType.battery_charge:
            doc["setpoint_w"] = int(sp[i])
        elif t == CommandType.thermostat_offset:
            doc["offset_c"] = round(oc[i], 2)
        elif t == CommandType.solar_curtail:
            doc["limit_w"] = int(lw[i])
        doc["valid_from"] = vf[i]
        doc["valid_until"] = vu[i]
        if rs[i] > 0:
            doc["randomize_start_s"] = rs[i]
        out.append(dumps(doc))
    return out


def _nan_none(v: float) -> float | None:
    return None if v != v else float(v)
