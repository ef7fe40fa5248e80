"""Battery emulators that follow only the v1 contract (``/work/shared/interface.md``), for fault
tests that run the service as real processes.

One paho client speaks for every battery, as an OEM gateway does (the ``vpp-gateway`` login of
the private Mosquitto): telemetry ``{ts, seq, soc_pct, power_w}`` every ``report_s`` service
seconds, a retained ``online`` status, and for each command an ack: ``received`` at once, then
``started`` when it comes into force (``expired`` if it arrives after its ``valid_until``);
``restore`` is acknowledged ``completed``. Physics is plain: a battery under a valid
``battery_discharge`` command gives exactly its ``setpoint_w`` (while its charge lasts), otherwise
0 W; a command is void after ``valid_until``, a ``restore`` ends it. A command id seen twice is
acted on once (and acknowledged again). Every command as received is kept in ``received``.

Nothing here imports the service: the emulator knows the topics, the JSON and the clock
(``VPP_TIME_SCALE`` / ``VPP_TIME_ORIGIN``) and nothing else.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

CAPACITY_WH = 13_500.0
MAX_W = 5_000.0


@dataclass
class Battery:
    device_id: str
    soc_pct: float = 80.0
    command: dict[str, Any] | None = None  # the dispatch command it follows, if any
    started: set[str] = field(default_factory=set)
    seq: int = 0

    def power_w(self, now_ms: int) -> float:
        c = self.command
        if c is None or not (c["valid_from"] <= now_ms < c["valid_until"]):
            return 0.0
        if c["type"] != "battery_discharge" or self.soc_pct <= 20.0:
            return 0.0
        return float(min(c.get("setpoint_w") or 0.0, MAX_W))


class BatteryEmulator:
    """``BatteryEmulator(host, port, username, password, topic_root, scale, origin_ms, ids)``;
    ``start()`` / ``stop()``. Thread-based (paho's network thread and a reporting thread)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        topic_root: str,
        time_scale: float,
        time_origin_ms: int,
        device_ids: list[str],
        report_s: float = 20.0,
    ) -> None:
        self.host, self.port = host, port
        self.root = topic_root
        self.scale = time_scale
        self.origin = time_origin_ms
        self.report_s = report_s
        self.batteries = {d: Battery(d) for d in device_ids}
        self.received: dict[str, list[dict[str, Any]]] = defaultdict(list)  # device → commands
        self.acks_sent: list[tuple[str, str]] = []  # (command id, status)
        # While set, acks are not sent (as if lost on the way: the devices still act).
        self.drop_acks = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connects = 0
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"emu-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        c.username_pw_set(username, password)
        c.reconnect_delay_set(min_delay=1, max_delay=2)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c

    # --- the service clock, as every process computes it -------------------------------------
    def now_ms(self) -> int:
        wall = time.time() * 1000.0
        return int(self.origin + (wall - self.origin) * self.scale)

    # --- MQTT ---------------------------------------------------------------------------------
    def _on_connect(self, client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        self.connects += 1
        client.subscribe(f"{self.root}/devices/+/cmd", qos=1)
        for d in self.batteries:
            client.publish(f"{self.root}/devices/{d}/status", b"online", qos=1, retain=True)

    def _ack(self, device_id: str, command_id: str, status: str) -> None:
        if self.drop_acks:
            return
        body = {"command_id": command_id, "status": status, "ts": self.now_ms()}
        self.client.publish(
            f"{self.root}/devices/{device_id}/ack", json.dumps(body).encode(), qos=1
        )
        with self._lock:
            self.acks_sent.append((command_id, status))

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        device_id = msg.topic.split("/")[-2]
        b = self.batteries.get(device_id)
        try:
            cmd = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.received[device_id].append(cmd)
        if b is None:
            return
        cid = cmd["command_id"]
        now = self.now_ms()
        if cmd.get("valid_until", now + 1) <= now:
            self._ack(device_id, cid, "expired")
            return
        if cmd["type"] == "restore":
            with self._lock:
                b.command = None
            self._ack(device_id, cid, "completed")
            return
        with self._lock:
            current = b.command
            if current is None or current["command_id"] != cid:
                b.command = cmd  # a new command replaces the one before; a repeat changes nothing
            repeat = cid in b.started
        self._ack(device_id, cid, "received")
        if repeat:
            self._ack(device_id, cid, "started")  # seen before: say again where it stands
        elif cmd["valid_from"] <= now:
            self._start(b, cid)

    def _start(self, b: Battery, cid: str) -> None:
        with self._lock:
            first = cid not in b.started
            b.started.add(cid)
        if first:
            self._ack(b.device_id, cid, "started")

    # --- reporting ------------------------------------------------------------------------------
    def _report_loop(self) -> None:
        period_wall = self.report_s / self.scale
        while not self._stop.wait(period_wall):
            now = self.now_ms()
            for b in list(self.batteries.values()):
                with self._lock:
                    p = b.power_w(now)
                    cmd = b.command
                    # Physics over the report period: energy out of the pack.
                    b.soc_pct = max(0.0, b.soc_pct - p * self.report_s / 3600.0 / CAPACITY_WH * 100)
                    b.seq += 1
                    seq = b.seq
                    soc = b.soc_pct
                if cmd is not None and cmd["valid_from"] <= now < cmd["valid_until"]:
                    self._start(b, cmd["command_id"])
                body = {"ts": now, "seq": seq, "soc_pct": round(soc, 2), "power_w": round(p, 1)}
                self.client.publish(
                    f"{self.root}/devices/{b.device_id}/telemetry", json.dumps(body).encode(), qos=0
                )

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while self.connects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.connects == 0:
            raise RuntimeError("emulator: no connection to the broker")
        self._thread = threading.Thread(target=self._report_loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    # --- what the devices saw --------------------------------------------------------------------
    def dispatch_commands(self, event_id: str) -> dict[str, set[str]]:
        """Per device, the distinct dispatch (non-restore) command ids received for an event."""
        out: dict[str, set[str]] = defaultdict(set)
        with self._lock:
            for dev, cmds in self.received.items():
                for c in cmds:
                    if c.get("event_id") == event_id and c["type"] != "restore":
                        out[dev].add(c["command_id"])
        return out

    def restored(self, event_id: str) -> set[str]:
        with self._lock:
            return {
                dev
                for dev, cmds in self.received.items()
                if any(c.get("event_id") == event_id and c["type"] == "restore" for c in cmds)
            }

    def started_ids(self) -> set[str]:
        """Command ids some battery has put into force."""
        with self._lock:
            return set().union(*(b.started for b in self.batteries.values()))

    def copies(self, command_id: str) -> int:
        """How many times a command id arrived (re-sends included)."""
        with self._lock:
            return sum(
                1 for cmds in self.received.values() for c in cmds if c["command_id"] == command_id
            )

    def delivering_w(self) -> float:
        now = self.now_ms()
        with self._lock:
            return sum(b.power_w(now) for b in self.batteries.values())
