"""One running event in memory: its command rows as columns, its targets, control group and
reserve."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dispatch import events as es
from dispatch.types import (
    Assignment,
    Horizon,
)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class DeviceTable:
    """Dispatch commands of one event, one row a command (a replaced device keeps its row)."""

    cmd_id: npt.NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, object))
    device_id: npt.NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, object))
    kind: npt.NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    status: npt.NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    attempts: npt.NDArray[np.int32] = field(default_factory=lambda: np.zeros(0, np.int32))
    sent_ms: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    sent_wall: F64 = field(default_factory=lambda: np.zeros(0))
    valid_from_ms: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    valid_until_ms: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    baseline_w: F64 = field(default_factory=lambda: np.zeros(0))
    expected_kw: F64 = field(default_factory=lambda: np.zeros(0))
    # kW counted for a row while it settles (before telemetry shows it): its expected kW, or
    # what it gives at first when that is more (front-loaded shed, a charging battery's bonus).
    settle_kw: F64 = field(default_factory=lambda: np.zeros(0))
    restore_id: npt.NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, object))
    # Service ms at which the end-of-event restore goes out (thermostats: staggered); 0 = none.
    release_at_ms: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    payload: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cmd_id)

    def append(self, other: DeviceTable) -> None:
        self.extend([other])

    def extend(self, others: list[DeviceTable]) -> None:
        """Append the rows of several tables (one copy of each column for all of them)."""
        for name, value in self.__dict__.items():
            if isinstance(value, np.ndarray):
                setattr(self, name, np.concatenate([value, *(getattr(o, name) for o in others)]))
        for o in others:
            self.payload.extend(o.payload)


@dataclass
class Running:
    info: es.EventInfo
    horizon: Horizon
    target_mw: F64  # per horizon interval
    table: DeviceTable
    control_ids: list[str]
    control_baseline_w: F64
    control_kind: npt.NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    reserve: Assignment | None = None  # the plan's reserve devices (for replacements)
    reserve_ids: list[str] = field(default_factory=list)  # device id per assignment row
    last_control_ms: int = 0
    last_control_wall: float = 0.0
    replaced: int = 0
    ending: str | None = None  # completed | aborted | cancelled, once restores are out
    last_estimate_mw: float = 0.0

    @property
    def id(self) -> str:
        return self.info.id

    def target_at(self, now_ms: int) -> float:
        h = self.horizon
        t = (now_ms - h.start_ms) // (h.interval_s * 1000)
        if t < 0 or t >= h.n_intervals:
            return 0.0
        return float(self.target_mw[int(t)])
