"""The event runner's QoS-1 publisher (devices.mqtt.PublisherPool) on a real Mosquitto: every
message accepted and delivered, one device's messages in order, the broker's in-flight window,
and the re-send after a lost connection."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.mqtt import PublisherPool, make_publisher, parse_mqtt_url
from tests.helpers.mosquitto import MosquittoBroker
from tests.helpers.settings import MQTT_URL, unique


class Collector:
    """A plain paho subscriber (QoS 1) on ``filter_``: topic → payloads in arrival order."""

    def __init__(self, url: str, filter_: str) -> None:
        cfg = parse_mqtt_url(url)
        self.got: dict[str, list[bytes]] = defaultdict(list)
        self.count = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("collect"),
                        protocol=paho.MQTTv5)  # fmt: skip
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        c.on_connect = lambda cl, *a: cl.subscribe(filter_, 1)
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        c.connect(cfg.host, cfg.port)
        c.loop_start()
        assert self._subscribed.wait(10)
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.got[msg.topic].append(msg.payload)
            self.count += 1

    async def wait_for(self, n: int, timeout_s: float = 30.0) -> bool:
        for _ in range(int(timeout_s * 20)):
            if self.count >= n:
                return True
            await asyncio.sleep(0.05)
        return self.count >= n

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# The private broker (deploy config: 200 000 queued messages a subscriber may fall behind by;
# the shared one drops past 1000), topic root vpp/v1; each test its own device ids.
ROOT = "vpp/v1"


async def test_every_message_is_accepted_and_each_device_keeps_its_order(
    mosquitto_broker: MosquittoBroker,
) -> None:
    root = ROOT
    sub = Collector(mosquitto_broker.gateway_url, f"{root}/devices/+/cmd")
    pool = make_publisher(mosquitto_broker.service_url, unique("pool"), connections=3,
                          max_inflight=20)  # fmt: skip
    assert isinstance(pool, PublisherPool)
    await pool.connect()
    try:
        tag = unique("d")
        devices = [f"{tag}-{i:04d}" for i in range(300)]
        # Three commands per device, spread over several calls and interleaved.
        msgs = [(f"{root}/devices/{d}/cmd", f"{d}:{k}".encode(), 1, False)
                for k in range(3) for d in devices]  # fmt: skip
        sent = await asyncio.gather(pool.publish_many(msgs[:500]), pool.publish_many(msgs[500:]))
        assert sum(sent) == 900
        # publish_many returns once every message has its PUBACK: nothing is left in flight.
        assert all(m.queued == 0 for m in pool.members)
        assert await sub.wait_for(900)
        for d in devices:
            assert sub.got[f"{root}/devices/{d}/cmd"] == [f"{d}:{k}".encode() for k in range(3)]
        # The devices are spread over all the connections.
        assert all(m.connects == 1 for m in pool.members)
    finally:
        await pool.disconnect()
        sub.close()


async def test_lost_connection_resends_what_was_in_flight(
    mosquitto_broker: MosquittoBroker,
) -> None:
    root, tag = ROOT, unique("d")
    sub = Collector(mosquitto_broker.gateway_url, f"{root}/devices/+/cmd")
    pool = make_publisher(mosquitto_broker.service_url, unique("pool"), connections=2,
                          max_inflight=50)  # fmt: skip
    assert isinstance(pool, PublisherPool)
    await pool.connect()
    try:
        msgs = [(f"{root}/devices/{tag}-{i:05d}/cmd", str(i).encode(), 1, False)
                for i in range(3000)]  # fmt: skip
        task = asyncio.create_task(pool.publish_many(msgs))
        await asyncio.sleep(0)  # the call queues all 3000 and sends the first windows
        while sum(m.queued for m in pool.members) > 2000:
            await asyncio.sleep(0)
        # The connection breaks with messages in flight and queued (as a broker restart does).
        victim = pool.members[0]
        assert victim.queued > 0
        assert victim._transport is not None
        victim._transport.abort()
        assert await asyncio.wait_for(task, 30) == 3000
        assert victim.connects == 2  # reconnected by itself
        # At least once: every message arrives (a re-sent one may arrive twice, so the count
        # alone can be reached before the last ones are in).
        want = {str(i).encode() for i in range(3000)}
        for _ in range(600):
            with sub._lock:
                got = {p for ps in sub.got.values() for p in ps}
            if got >= want:
                break
            await asyncio.sleep(0.05)
        assert got == want
    finally:
        await pool.disconnect()
        sub.close()


async def test_window_is_the_brokers_receive_maximum(mosquitto_broker: MosquittoBroker) -> None:
    """The deploy config's max_inflight_messages (100) caps a larger client setting: the
    broker's CONNACK says how many QoS-1 messages may await their PUBACK."""
    pool = make_publisher(mosquitto_broker.service_url, unique("pool"), connections=2,
                          max_inflight=1000)  # fmt: skip
    assert isinstance(pool, PublisherPool)
    await pool.connect()
    try:
        assert [m.window for m in pool.members] == [100, 100]
        n = await pool.publish_many(
            [(f"vpp/v1/devices/d-{i}/cmd", b"{}", 1, False) for i in range(1000)]
        )
        assert n == 1000 and pool.refused == 0
    finally:
        await pool.disconnect()


async def test_a_refused_connect_names_the_reason(mosquitto_broker: MosquittoBroker) -> None:
    pool = make_publisher(mosquitto_broker.url("vpp-service", "wrong"), unique("pool"),
                          connections=2)  # fmt: skip
    with pytest.raises(ConnectionError, match=r"refused: reason code 0x8[67]"):
        await pool.connect(timeout_s=5)
    await pool.disconnect()


async def test_disconnect_fails_waiting_publishers_instead_of_hanging() -> None:
    pool = make_publisher("mqtt://127.0.0.1:1", unique("pool"), connections=1)
    with pytest.raises(ConnectionError):
        await pool.connect(timeout_s=2)
    # Not connected: the message waits in the queue for a connection that never comes.
    task = asyncio.create_task(pool.publish_many([("x/devices/d/cmd", b"{}", 1, False)]))
    await asyncio.sleep(0.05)
    await pool.disconnect()
    with pytest.raises(ConnectionError, match="disconnected"):
        await asyncio.wait_for(task, 5)


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ValueError, match="VPP_MQTT_PUBLISH_CONNECTIONS"):
        make_publisher(MQTT_URL, "x", connections=0)
