"""Broker security against a real Mosquitto run with the project's own config (deploy/mosquitto).

Each device gets its own login at onboarding and may only touch its own topics; offboarding
revokes the login at once. Mosquitto drops an unauthorised QoS 0/1 publish silently, so
"not delivered" is always checked next to a positive control published after it on the same
connection (MQTT keeps a connection's messages in order: once the control has arrived, the
forbidden message would have arrived before it).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from devices.credentials import (
    AutoCredentialManager,
    BrokerUnreachable,
    DynsecCredentialManager,
    NullCredentialManager,
    device_topics,
    make_credential_manager,
)
from tests.helpers.mosquitto import (
    WAIT_S,
    Client,
    MosquittoBroker,
    free_port,
    mosquitto_available,
)
from vpp.settings import Settings

ROOT = "vpp/v1"  # the topic root of the mosquitto_broker fixture

needs_mosquitto = pytest.mark.skipif(
    not mosquitto_available(), reason="mosquitto with the dynamic-security plugin not installed"
)


@pytest.fixture
async def manager(mosquitto_broker: MosquittoBroker) -> AsyncIterator[DynsecCredentialManager]:
    # The service's own login (role vpp-service) administers device credentials.
    m = DynsecCredentialManager(
        mosquitto_broker.host,
        mosquitto_broker.port,
        mosquitto_broker.service_username,
        mosquitto_broker.service_password,
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
    clients: list[Client], mosquitto_broker: MosquittoBroker, user: str | None, pw: str | None
) -> Client:
    c = Client(mosquitto_broker, user, pw)
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
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, b = new_ids(2)
    pws = await manager.provision([a, b])
    # The ingest side reads through an MQTT 5 shared subscription with the service login.
    service = connected(
        clients,
        mosquitto_broker,
        mosquitto_broker.service_username,
        mosquitto_broker.service_password,
    )
    for kind in ("telemetry", "status", "ack"):
        rc = service.subscribe(f"$share/ingest/{ROOT}/devices/+/{kind}")
        assert not rc.is_failure, rc
    device_a = connected(clients, mosquitto_broker, a, pws[a])
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
    device_b = connected(clients, mosquitto_broker, b, pws[b])
    assert not device_b.subscribe(tb["cmd"]).is_failure
    service.publish(tb["cmd"], b'{"command_id": "c-1"}')
    assert device_b.wait_for(tb["cmd"], b'{"command_id": "c-1"}')
    assert device_b.received(tb["cmd"]) == [b'{"command_id": "c-1"}']


@needs_mosquitto
async def test_device_subscribes_only_to_its_own_cmd(
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, b = new_ids(2)
    pws = await manager.provision([a])
    device_a = connected(clients, mosquitto_broker, a, pws[a])
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
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager
) -> None:
    (a,) = new_ids(1)
    pws = await manager.provision([a])
    for user, pw in ((a, pws[a] + "x"), (a, ""), ("no-such-device", pws[a]), (None, None)):
        c = Client(mosquitto_broker, user, pw)
        rc = c.connect()
        assert rc.is_failure, f"{user!r} got in"
        assert rc.getName() in ("Not authorized", "Bad user name or password"), rc.getName()


@needs_mosquitto
async def test_revoke_disconnects_at_once_and_locks_out(
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    a, keep = new_ids(2)
    pws = await manager.provision([a, keep])
    device = connected(clients, mosquitto_broker, a, pws[a])
    other = connected(clients, mosquitto_broker, keep, pws[keep])

    await manager.revoke([a])

    assert device.disconnected.wait(WAIT_S), "revoked device still connected"
    again = Client(mosquitto_broker, a, pws[a])
    assert again.connect().is_failure
    assert not other.disconnected.is_set()  # only the revoked device is touched
    await manager.revoke([a])  # idempotent: revoking twice is fine


@needs_mosquitto
async def test_provision_again_replaces_the_password(
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    (a,) = new_ids(1)
    first = (await manager.provision([a]))[a]
    second = (await manager.provision([a]))[a]
    assert first != second
    assert Client(mosquitto_broker, a, first).connect().is_failure
    device = connected(clients, mosquitto_broker, a, second)
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure


@needs_mosquitto
async def test_gateway_publishes_for_many_devices(
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    ids = new_ids(60)  # several $CONTROL batches
    pws = await manager.provision(ids)
    assert len(pws) == 60 and len(set(pws.values())) == 60
    service = connected(
        clients,
        mosquitto_broker,
        mosquitto_broker.service_username,
        mosquitto_broker.service_password,
    )
    assert not service.subscribe(f"{ROOT}/devices/+/telemetry").is_failure
    gateway = connected(
        clients,
        mosquitto_broker,
        mosquitto_broker.gateway_username,
        mosquitto_broker.gateway_password,
    )
    assert not gateway.subscribe(f"{ROOT}/devices/+/cmd").is_failure
    for d in ids:
        gateway.publish(device_topics(ROOT, d)["telemetry"], d.encode(), qos=1)
    for d in ids:
        assert service.wait_for(device_topics(ROOT, d)["telemetry"], d.encode())
    service.publish(device_topics(ROOT, ids[7])["cmd"], b"go")
    assert gateway.wait_for(device_topics(ROOT, ids[7])["cmd"], b"go")
    # The last device of the bulk has a working login of its own.
    connected(clients, mosquitto_broker, ids[-1], pws[ids[-1]])


@needs_mosquitto
async def test_auto_mode_finds_dynsec(mosquitto_broker: MosquittoBroker) -> None:
    settings = Settings(
        mqtt_url=mosquitto_broker.service_url, broker_credentials="auto", topic_root=ROOT
    )
    m = make_credential_manager(settings)
    assert isinstance(m, AutoCredentialManager)
    try:
        assert await m.ping()
        assert isinstance(m.chosen, DynsecCredentialManager)
        (a,) = new_ids(1)
        pws = await m.provision([a])
        c = Client(mosquitto_broker, a, pws[a])
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
    mosquitto_broker: MosquittoBroker, manager: DynsecCredentialManager, clients: list[Client]
) -> None:
    # A crash between createRole and createClient leaves a role without its client.
    (a,) = new_ids(1)
    await manager.provision([a])
    await manager._execute([{"command": "deleteClient", "username": a}])
    pws = await manager.provision([a])
    device = connected(clients, mosquitto_broker, a, pws[a])
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure
    assert device.subscribe(f"{ROOT}/devices/+/cmd").is_failure
