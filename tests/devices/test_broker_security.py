"""Broker security against a real Mosquitto run with the project's own config (deploy/mosquitto).

Each device gets its own login at onboarding and may only touch its own topics; offboarding
revokes the login at once. Mosquitto drops an unauthorised QoS 0/1 publish silently, so
"not delivered" is always checked next to a positive control published after it on the same
connection (MQTT keeps a connection's messages in order: once the control has arrived, the
forbidden message would have arrived before it).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devices.credentials import (
    AutoCredentialManager,
    BrokerUnreachable,
    DynsecCredentialManager,
    NullCredentialManager,
    device_topics,
    make_credential_manager,
)
from tests.helpers.mosquitto import (
    MosquittoBroker,
    free_port,
    mosquitto_available,
    run_mosquitto,
)
from vpp.settings import Settings

ROOT = "vpp/v1"
WAIT_S = 5.0

needs_mosquitto = pytest.mark.skipif(
    not mosquitto_available(), reason="mosquitto with the dynamic-security plugin not installed"
)


class Client:
    """A blocking MQTT 5 test client that records what the broker tells it."""

    def __init__(self, broker: MosquittoBroker, username: str | None, password: str | None):
        self._broker = broker
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"t-{username}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self._message_arrived = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_arrived = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: ReasonCode, _p: Any) -> None:
        self.disconnected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._message_arrived:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._message_arrived.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._suback_arrived:
            self._subacks[mid] = rcs
            self._suback_arrived.notify_all()

    def connect(self) -> ReasonCode:
        """CONNECT and return the CONNACK reason code (the client stops retrying on refusal)."""
        self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        assert self.connack is not None
        if self.connack.is_failure:
            self.stop()
        return self.connack

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        """SUBSCRIBE one filter and return its SUBACK reason code."""
        _rc, mid = self.client.subscribe(topic, qos)
        assert mid is not None
        with self._suback_arrived:
            assert self._suback_arrived.wait_for(lambda: mid in self._subacks, WAIT_S)
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(WAIT_S)

    def wait_for(self, topic: str, payload: bytes) -> bool:
        with self._message_arrived:
            return self._message_arrived.wait_for(lambda: (topic, payload) in self.messages, WAIT_S)

    def received(self, topic: str) -> list[bytes]:
        with self._message_arrived:
            return [p for t, p in self.messages if t == topic]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    if not mosquitto_available():
        pytest.skip("mosquitto with the dynamic-security plugin is not installed")
    with run_mosquitto(ROOT) as b:
        yield b


@pytest.fixture
async def manager(broker: MosquittoBroker) -> AsyncIterator[DynsecCredentialManager]:
    # The service's own login (role vpp-service) administers device credentials.
    m = DynsecCredentialManager(
        broker.host,
        broker.port,
        broker.service_username,
        broker.service_password,
        topic_root=ROOT,
        timeout_s=10,
    )
    yield m
    await m.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.stop()


def new_ids(n: int) -> list[str]:
    tag = secrets.token_hex(3)
    return [f"dev-{tag}-{i}" for i in range(n)]


def connected(
    clients: list[Client], broker: MosquittoBroker, user: str | None, pw: str | None
) -> Client:
    c = Client(broker, user, pw)
    clients.append(c)
    rc = c.connect()
    assert not rc.is_failure, f"{user} refused: {rc}"
    return c


# --- device topics and the null manager (no broker) ---------------------------------------
def test_device_topics_follow_the_contract() -> None:
    assert device_topics("vpp/v1", "bat-1") == {
        "telemetry": "vpp/v1/devices/bat-1/telemetry",
        "status": "vpp/v1/devices/bat-1/status",
        "ack": "vpp/v1/devices/bat-1/ack",
        "cmd": "vpp/v1/devices/bat-1/cmd",
    }
    for bad in ("", "a/b", "+", "x#"):
        with pytest.raises(ValueError, match="device_id"):
            device_topics("vpp/v1", bad)


async def test_null_manager_hands_out_strong_distinct_passwords() -> None:
    m = NullCredentialManager()
    pws = await m.provision(["a", "b", "c"])
    assert set(pws) == {"a", "b", "c"}
    assert len(set(pws.values())) == 3
    for pw in pws.values():
        assert len(pw) >= 22  # >= 128 bits in URL-safe base64
        assert all(ch.isalnum() or ch in "-_" for ch in pw)
    await m.revoke(["a"])
    assert await m.ping()


def test_make_credential_manager_picks_by_settings() -> None:
    assert isinstance(
        make_credential_manager(Settings(mqtt_url="memory://")), NullCredentialManager
    )
    assert isinstance(
        make_credential_manager(Settings(mqtt_url="mqtt://h:1883", broker_credentials="auto")),
        NullCredentialManager,
    )
    assert isinstance(
        make_credential_manager(Settings(mqtt_url="mqtt://u:p@h:1883", broker_credentials="none")),
        NullCredentialManager,
    )
    assert isinstance(
        make_credential_manager(
            Settings(mqtt_url="mqtt://u:p@h:1883", broker_credentials="dynsec")
        ),
        DynsecCredentialManager,
    )
    assert isinstance(
        make_credential_manager(Settings(mqtt_url="mqtts://u:p@h", broker_credentials="auto")),
        AutoCredentialManager,
    )
    with pytest.raises(ValueError, match="broker_credentials"):
        make_credential_manager(Settings(mqtt_url="memory://", broker_credentials="dynsec"))
    with pytest.raises(ValueError, match="broker_credentials"):
        make_credential_manager(Settings(mqtt_url="memory://", broker_credentials="ldap"))


# --- against the project's Mosquitto ---------------------------------------------------------
@needs_mosquitto
async def test_device_cannot_publish_on_another_devices_topics(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, b = new_ids(2)
    pws = await manager.provision([a, b])
    # The ingest side reads through an MQTT 5 shared subscription with the service login.
    service = connected(clients, broker, broker.service_username, broker.service_password)
    for kind in ("telemetry", "status", "ack"):
        rc = service.subscribe(f"$share/ingest/{ROOT}/devices/+/{kind}")
        assert not rc.is_failure, rc
    device_a = connected(clients, broker, a, pws[a])
    ta, tb = device_topics(ROOT, a), device_topics(ROOT, b)

    for kind in ("telemetry", "status", "ack"):
        device_a.publish(tb[kind], b'{"forged": true}', qos=1)
        device_a.publish(tb[kind], b'{"forged": true}', qos=0)
        device_a.publish(ta[kind], b'{"own": true}', qos=1)  # positive control, sent after
    for kind in ("telemetry", "status", "ack"):
        assert service.wait_for(ta[kind], b'{"own": true}'), f"own {kind} not delivered"
        assert service.received(tb[kind]) == [], f"forged {kind} was delivered"
    # Nor may a device publish commands, to itself or anyone.
    device_a.publish(tb["cmd"], b"{}", qos=1)
    device_b = connected(clients, broker, b, pws[b])
    assert not device_b.subscribe(tb["cmd"]).is_failure
    service.publish(tb["cmd"], b'{"command_id": "c-1"}')
    assert device_b.wait_for(tb["cmd"], b'{"command_id": "c-1"}')
    assert device_b.received(tb["cmd"]) == [b'{"command_id": "c-1"}']


@needs_mosquitto
async def test_device_subscribes_only_to_its_own_cmd(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, b = new_ids(2)
    pws = await manager.provision([a])
    device_a = connected(clients, broker, a, pws[a])
    for forbidden in (
        f"{ROOT}/devices/+/cmd",
        "#",
        f"{ROOT}/#",
        f"{ROOT}/devices/{b}/cmd",
        f"{ROOT}/devices/+/telemetry",
        f"$share/g/{ROOT}/devices/{a}/cmd",
    ):
        rc = device_a.subscribe(forbidden)
        assert rc.is_failure, f"subscription to {forbidden} was granted ({rc})"
    assert not device_a.subscribe(device_topics(ROOT, a)["cmd"]).is_failure


@needs_mosquitto
async def test_wrong_password_and_anonymous_are_refused(
    broker: MosquittoBroker, manager: DynsecCredentialManager
) -> None:
    (a,) = new_ids(1)
    pws = await manager.provision([a])
    for user, pw in ((a, pws[a] + "x"), (a, ""), ("no-such-device", pws[a]), (None, None)):
        c = Client(broker, user, pw)
        rc = c.connect()
        assert rc.is_failure, f"{user!r} got in"
        assert rc.getName() in ("Not authorized", "Bad user name or password"), rc.getName()


@needs_mosquitto
async def test_revoke_disconnects_at_once_and_locks_out(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, keep = new_ids(2)
    pws = await manager.provision([a, keep])
    device = connected(clients, broker, a, pws[a])
    other = connected(clients, broker, keep, pws[keep])

    await manager.revoke([a])

    assert device.disconnected.wait(WAIT_S), "revoked device still connected"
    again = Client(broker, a, pws[a])
    assert again.connect().is_failure
    assert not other.disconnected.is_set()  # only the revoked device is touched
    await manager.revoke([a])  # idempotent: revoking twice is fine


@needs_mosquitto
async def test_provision_again_replaces_the_password(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    (a,) = new_ids(1)
    first = (await manager.provision([a]))[a]
    second = (await manager.provision([a]))[a]
    assert first != second
    assert Client(broker, a, first).connect().is_failure
    device = connected(clients, broker, a, second)
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure


@needs_mosquitto
async def test_gateway_publishes_for_many_devices(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    ids = new_ids(60)  # several $CONTROL batches
    pws = await manager.provision(ids)
    assert len(pws) == 60 and len(set(pws.values())) == 60
    service = connected(clients, broker, broker.service_username, broker.service_password)
    assert not service.subscribe(f"{ROOT}/devices/+/telemetry").is_failure
    gateway = connected(clients, broker, broker.gateway_username, broker.gateway_password)
    assert not gateway.subscribe(f"{ROOT}/devices/+/cmd").is_failure
    for d in ids:
        gateway.publish(device_topics(ROOT, d)["telemetry"], d.encode(), qos=1)
    for d in ids:
        assert service.wait_for(device_topics(ROOT, d)["telemetry"], d.encode())
    service.publish(device_topics(ROOT, ids[7])["cmd"], b"go")
    assert gateway.wait_for(device_topics(ROOT, ids[7])["cmd"], b"go")
    # The last device of the bulk has a working login of its own.
    connected(clients, broker, ids[-1], pws[ids[-1]])


@needs_mosquitto
async def test_auto_mode_finds_dynsec(broker: MosquittoBroker) -> None:
    settings = Settings(mqtt_url=broker.service_url, broker_credentials="auto", topic_root=ROOT)
    m = make_credential_manager(settings)
    assert isinstance(m, AutoCredentialManager)
    try:
        assert await m.ping()
        assert isinstance(m.chosen, DynsecCredentialManager)
        (a,) = new_ids(1)
        pws = await m.provision([a])
        c = Client(broker, a, pws[a])
        assert not c.connect().is_failure
        c.stop()
    finally:
        await m.close()


async def test_auto_mode_falls_back_without_dynsec() -> None:
    # The shared system broker (anonymous, no plugin) answers MQTT but never $CONTROL.
    dynsec = DynsecCredentialManager("127.0.0.1", 1883, "probe", "x", topic_root=ROOT)
    m = AutoCredentialManager(dynsec, probe_timeout_s=0.5)
    try:
        ok = await m.ping()
    except BrokerUnreachable:
        pytest.skip("no broker on 127.0.0.1:1883")
    assert ok
    assert isinstance(m.chosen, NullCredentialManager)
    await m.close()


async def test_unreachable_broker_is_an_error_not_a_silent_fallback() -> None:
    m = DynsecCredentialManager("127.0.0.1", free_port(), "u", "p", timeout_s=1)
    auto = AutoCredentialManager(m, probe_timeout_s=0.5)
    assert not await auto.ping()
    with pytest.raises(BrokerUnreachable):
        await auto.provision(["a"])
    await auto.close()


@needs_mosquitto
async def test_provision_repairs_a_half_made_device(
    broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    # A crash between createRole and createClient leaves a role without its client.
    (a,) = new_ids(1)
    await manager.provision([a])
    await manager._execute([{"command": "deleteClient", "username": a}])
    pws = await manager.provision([a])
    device = connected(clients, broker, a, pws[a])
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure
    assert device.subscribe(f"{ROOT}/devices/+/cmd").is_failure
