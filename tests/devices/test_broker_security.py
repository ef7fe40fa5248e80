"""Broker security against a real Mosquitto run with the project's own config (deploy/mosquitto).

Each device gets its own login at onboarding and may only touch its own topics; offboarding
revokes the login at once. Mosquitto drops an unauthorised QoS 0/1 publish silently, so
"not delivered" is always checked next to a positive control published after it on the same
connection (MQTT keeps a connection's messages in order: once the control has arrived, the
forbidden message would have arrived before it).

The device isolation tests run on both mechanisms (the ``tier`` fixture): ``password_file``
(logins in PostgreSQL, the broker agent, ``%u`` pattern ACLs) and ``dynsec``. They differ in one
promise only: dynsec refuses a device's wildcard subscription in the SUBACK, the password file's
ACLs grant it (Mosquitto 2.0.11 does not check subscriptions against an acl_file) and deliver
nothing through it but the device's own cmd.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devices.credentials import (
    AutoCredentialManager,
    BrokerUnreachable,
    CredentialError,
    CredentialManager,
    DynsecCredentialManager,
    NullCredentialManager,
    PasswordFileCredentialManager,
    device_topics,
    make_credential_manager,
    password_hash,
    validate_password_file_username,
)
from store.database import Database
from tests.helpers.mosquitto import (
    WAIT_S,
    AgentThread,
    Client,
    MosquittoBroker,
    free_port,
    mosquitto_available,
    password_file_available,
    restart_mosquitto,
    run_broker_agent,
    run_mosquitto,
    stop_pid,
)
from tests.helpers.settings import PG_ADMIN_DSN, RUN_ID
from vpp.settings import Settings

ROOT = "vpp/v1"  # the topic root of the brokers here

needs_mosquitto = pytest.mark.skipif(
    not mosquitto_available(), reason="mosquitto with the dynamic-security plugin not installed"
)


@dataclass
class Tier:
    """A private broker with one credential mechanism; for password_file, its database and agent."""

    mechanism: str
    broker: MosquittoBroker
    database_url: str | None = None
    agent: AgentThread | None = None


@pytest.fixture(scope="module")
def module_pg_url(pg_template: str) -> Iterator[str]:
    """A migrated database for one test module."""
    name = f"vpp_t_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["password_file", "dynsec"])
def tier(request: pytest.FixtureRequest) -> Iterator[Tier]:
    if request.param == "dynsec":
        if not mosquitto_available():
            pytest.skip("mosquitto with the dynamic-security plugin is not installed")
        with run_mosquitto(ROOT) as broker:
            yield Tier("dynsec", broker)
        return
    if not password_file_available():
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    url = request.getfixturevalue("module_pg_url")
    with (
        run_mosquitto(ROOT, mechanism="password_file") as broker,
        run_broker_agent(broker, url) as agent,
    ):
        yield Tier("password_file", broker, url, agent)


@pytest.fixture
def broker(tier: Tier) -> MosquittoBroker:
    return tier.broker


@pytest.fixture
async def dynsec_manager(
    mosquitto_broker: MosquittoBroker,
) -> AsyncIterator[DynsecCredentialManager]:
    """For the dynsec-only tests: conftest's broker (dynsec), the service login as admin."""
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
async def manager(tier: Tier) -> AsyncIterator[Any]:
    m: Any
    if tier.mechanism == "dynsec":
        # The service's own login (role vpp-service) administers device credentials.
        m = DynsecCredentialManager(
            tier.broker.host,
            tier.broker.port,
            tier.broker.service_username,
            tier.broker.service_password,
            topic_root=ROOT,
            timeout_s=10,
        )
    else:
        assert tier.database_url is not None
        m = PasswordFileCredentialManager(
            Database(tier.database_url), apply_timeout_s=30, kicker=deny_list(tier.broker)
        )
    yield m
    await m.close()
    if isinstance(m, PasswordFileCredentialManager):
        await m.db.dispose()


def deny_list(broker: MosquittoBroker) -> DynsecCredentialManager:
    """The service's login on the broker's dynsec plugin: password_file's deny list."""
    return DynsecCredentialManager(
        broker.host, broker.port, broker.service_username, broker.service_password, timeout_s=10
    )


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
async def test_device_cannot_publish_on_another_devices_topics(
    broker: MosquittoBroker, manager: CredentialManager, clients: list[Client]
) -> None:
    a, b = new_ids(2)
    pws = await manager.provision([a, b])
    # The ingest side reads through an MQTT 5 shared subscription with the service login.
    service = connected(
        clients,
        broker,
        broker.service_username,
        broker.service_password,
    )
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


async def test_device_subscribes_only_to_its_own_cmd(
    tier: Tier, manager: CredentialManager, clients: list[Client]
) -> None:
    """dynsec refuses a wildcard in the SUBACK; the password file grants it and delivers
    nothing through it but the device's own cmd (and never another device's telemetry)."""
    broker = tier.broker
    a, b = new_ids(2)
    pws = await manager.provision([a, b])
    device_a = connected(clients, broker, a, pws[a])
    wildcards = (
        f"{ROOT}/devices/+/cmd",
        "#",
        f"{ROOT}/#",
        f"{ROOT}/devices/{b}/cmd",
        f"{ROOT}/devices/+/telemetry",
        f"$share/g/{ROOT}/devices/{a}/cmd",
    )
    if tier.mechanism == "dynsec":
        for forbidden in wildcards:
            rc = device_a.subscribe(forbidden)
            assert rc.is_failure, f"subscription to {forbidden} was granted ({rc})"
        assert not device_a.subscribe(device_topics(ROOT, a)["cmd"]).is_failure
        return
    for wildcard in wildcards:
        assert not device_a.subscribe(wildcard).is_failure  # granted: deliveries are checked
    service = connected(clients, broker, broker.service_username, broker.service_password)
    device_b = connected(clients, broker, b, pws[b])
    ta, tb = device_topics(ROOT, a), device_topics(ROOT, b)
    assert not device_b.subscribe(tb["cmd"]).is_failure
    # Another device's command and telemetry (each acknowledged by the broker, so routed,
    # before the next is sent), the service's own traffic under the root, then the positive
    # control: a's own command.
    service.publish(tb["cmd"], b"for-b")
    device_b.publish(tb["telemetry"], b"b-reading")
    device_b.publish(tb["status"], b"b-status", retain=True)
    service.publish(f"{ROOT}/other", b"service-only")
    assert device_b.wait_for(tb["cmd"], b"for-b")  # it was sent, to its owner
    service.publish(ta["cmd"], b"for-a")
    assert device_a.wait_for(ta["cmd"], b"for-a")
    topics = {t for t, _ in device_a.messages}
    assert topics == {ta["cmd"]}, f"device a received {sorted(topics)}"
    # A retained message of another device is not handed out on a fresh wildcard subscription.
    late = connected(clients, broker, a, pws[a])
    assert not late.subscribe("#").is_failure
    late_control = f"{ROOT}/devices/{a}/cmd"
    service.publish(late_control, b"late")
    assert late.wait_for(late_control, b"late")
    assert {t for t, _ in late.messages} == {late_control}
    service.publish(tb["status"], b"", retain=True)  # clear the retained status


async def test_wrong_password_and_anonymous_are_refused(
    broker: MosquittoBroker, manager: CredentialManager
) -> None:
    (a,) = new_ids(1)
    pws = await manager.provision([a])
    for user, pw in ((a, pws[a] + "x"), (a, ""), ("no-such-device", pws[a]), (None, None)):
        c = Client(broker, user, pw)
        rc = c.connect()
        assert rc.is_failure, f"{user!r} got in"
        assert rc.getName() in ("Not authorized", "Bad user name or password"), rc.getName()


async def test_revoke_disconnects_at_once_and_locks_out(
    broker: MosquittoBroker, manager: CredentialManager, clients: list[Client]
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


async def test_provision_again_replaces_the_password(
    broker: MosquittoBroker, manager: CredentialManager, clients: list[Client]
) -> None:
    (a,) = new_ids(1)
    first = (await manager.provision([a]))[a]
    second = (await manager.provision([a]))[a]
    assert first != second
    assert Client(broker, a, first).connect().is_failure
    device = connected(clients, broker, a, second)
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure


async def test_gateway_publishes_for_many_devices(
    broker: MosquittoBroker, manager: CredentialManager, clients: list[Client]
) -> None:
    ids = new_ids(60)  # several $CONTROL batches
    pws = await manager.provision(ids)
    assert len(pws) == 60 and len(set(pws.values())) == 60
    service = connected(
        clients,
        broker,
        broker.service_username,
        broker.service_password,
    )
    assert not service.subscribe(f"{ROOT}/devices/+/telemetry").is_failure
    gateway = connected(
        clients,
        broker,
        broker.gateway_username,
        broker.gateway_password,
    )
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
    mosquitto_broker: MosquittoBroker,
    dynsec_manager: DynsecCredentialManager,
    clients: list[Client],
) -> None:
    manager = dynsec_manager
    # A crash between createRole and createClient leaves a role without its client.
    (a,) = new_ids(1)
    await manager.provision([a])
    await manager._execute([{"command": "deleteClient", "username": a}])
    pws = await manager.provision([a])
    device = connected(clients, mosquitto_broker, a, pws[a])
    assert not device.subscribe(device_topics(ROOT, a)["cmd"]).is_failure
    assert device.subscribe(f"{ROOT}/devices/+/cmd").is_failure


# --- password_file only ------------------------------------------------------------------------
def test_password_hash_is_mosquittos_sha512_format(tmp_path: Path) -> None:
    """Our ``$6$`` hash of a password, with the salt mosquitto_passwd chose, is the line
    mosquitto_passwd wrote itself (the broker then accepts both alike)."""
    import base64
    import shutil
    import subprocess

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "passwd"
    path.write_text("")
    subprocess.run(
        ["mosquitto_passwd", "-H", "sha512", "-b", str(path), "dev-1", "s3cret-pw"], check=True
    )
    user, theirs = path.read_text().strip().split(":", 1)
    assert user == "dev-1" and theirs.startswith("$6$")
    salt = base64.b64decode(theirs.split("$")[2])
    assert len(salt) == 12
    assert password_hash("s3cret-pw", salt) == theirs
    assert password_hash("s3cret-pw") != password_hash("s3cret-pw")  # a new salt each time


def test_password_file_usernames_refuse_the_separator() -> None:
    assert validate_password_file_username("bat-000123") == "bat-000123"
    for bad in ("a:b", " a", "a\n", "a/b"):
        with pytest.raises(ValueError, match="device_id"):
            validate_password_file_username(bad)


def test_password_file_mode_needs_postgresql(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, broker_credentials="password_file")
    with pytest.raises(ValueError, match="broker_credentials: password_file"):
        make_credential_manager(settings, Database(sqlite_url))
    with pytest.raises(ValueError, match="broker_credentials: password_file"):
        make_credential_manager(settings)


async def test_provision_without_an_agent_fails_naming_the_tier(module_pg_url: str) -> None:
    db = Database(module_pg_url)
    m = PasswordFileCredentialManager(db, "tier-without-agent", apply_timeout_s=0.3)
    try:
        assert not await m.ping()
        with pytest.raises(CredentialError, match="tier-without-agent"):
            await m.provision(new_ids(1))
    finally:
        await db.dispose()


async def test_concurrent_onboardings_all_work_when_they_return(
    tier: Tier, manager: CredentialManager, clients: list[Client]
) -> None:
    """Eight writers at once, from two managers (two processes' worth): generations commit in
    order, so the agent skips none, and every login works when its call returns."""
    import asyncio

    if tier.mechanism != "password_file":
        pytest.skip("the broker agent's generations")
    assert tier.database_url is not None
    other = PasswordFileCredentialManager(Database(tier.database_url), apply_timeout_s=30)
    batches = [new_ids(50) for _ in range(8)]
    try:
        results = await asyncio.gather(
            *((manager if i % 2 else other).provision(b) for i, b in enumerate(batches))
        )
    finally:
        await other.db.dispose()
    for batch, pws in zip(batches, results, strict=True):
        assert set(pws) == set(batch)
        connected(clients, tier.broker, batch[-1], pws[batch[-1]])


async def test_auto_mode_finds_the_password_file_tier(tier: Tier) -> None:
    if tier.mechanism != "password_file":
        pytest.skip("auto's password_file detection")
    assert tier.database_url is not None
    db = Database(tier.database_url)
    settings = Settings(
        database_url=tier.database_url,
        mqtt_url=tier.broker.service_url,
        broker_credentials="auto",
        topic_root=ROOT,
    )
    m = make_credential_manager(settings, db)
    try:
        assert isinstance(m, AutoCredentialManager)
        assert await m.ping()
        assert isinstance(m.chosen, PasswordFileCredentialManager)
    finally:
        await m.close()
        await db.dispose()


async def test_broker_restarted_from_an_empty_volume_gets_every_login_back(
    module_pg_url: str, clients: list[Client]
) -> None:
    """The broker's data volume is lost: the init step seeds only the base logins, the broker
    starts with them, and the agent notices the file is not its own and writes every device
    login back from the database."""
    import subprocess

    from tests.helpers.mosquitto import INIT_PASSWD_SCRIPT

    if not password_file_available():
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    db = Database(module_pg_url)
    restarted: subprocess.Popen[bytes] | None = None
    with (
        run_mosquitto(ROOT, mechanism="password_file") as broker,
        run_broker_agent(broker, module_pg_url, tier="restart-tier") as agent,
    ):
        m = PasswordFileCredentialManager(db, "restart-tier", apply_timeout_s=30)
        try:
            ids = new_ids(3)
            pws = await m.provision(ids)
            stop_pid(broker.pid)
            for name in ("passwd", "passwd.base", "acl", "mosquitto.db"):
                (broker.workdir / name).unlink(missing_ok=True)
            env = {
                "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                "DATA_DIR": str(broker.workdir),
                "VPP_SERVICE_USER": broker.service_username,
                "VPP_SERVICE_PASSWORD": broker.service_password,
                "VPP_GATEWAY_USER": broker.gateway_username,
                "VPP_GATEWAY_PASSWORD": broker.gateway_password,
                "VPP_TOPIC_ROOT": ROOT,
            }
            subprocess.run(["sh", str(INIT_PASSWD_SCRIPT)], env=env, check=True, timeout=30)
            reloads = agent.agent.stats.reloads
            restarted = restart_mosquitto(broker)
            agent.wait_reloads(reloads + 1)
            for d in ids:
                connected(clients, broker, d, pws[d])
            # And the agent keeps serving the new broker process.
            (extra,) = new_ids(1)
            more = await m.provision([extra])
            connected(clients, broker, extra, more[extra])
        finally:
            if restarted is not None:
                restarted.terminate()
                restarted.wait(10)
            await db.dispose()


async def test_agent_folds_every_pending_write_into_one_reload(
    module_pg_url: str, clients: list[Client]
) -> None:
    from devices.broker_agent import AgentConfig, BrokerAgent

    if not password_file_available():
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    db = Database(module_pg_url)
    with run_mosquitto(ROOT, mechanism="password_file") as broker:
        agent = BrokerAgent(
            AgentConfig(
                database_url=module_pg_url,
                password_file=broker.password_file,
                tier="fold-tier",
                base_file=broker.base_password_file,
                broker_pid_file=broker.pid_file,
                broker_host=broker.host,
                broker_port=broker.port,
            )
        )
        writer = PasswordFileCredentialManager(db, "fold-tier")
        try:
            assert await agent.step()  # the first load and reload
            assert not await agent.step()  # nothing new: no reload
            a, b, c = new_ids(3)
            # Three writes as three onboardings would make them (not waiting for the agent).
            hashes = {d: ("pw-" + d) for d in (a, b, c)}
            gens = [await writer.write_logins([d], [password_hash(hashes[d])]) for d in (a, b)]
            gens.append(await writer.write_logins([a], [None]))  # and a revocation
            assert gens == sorted(gens) and len(set(gens)) == 3
            reloads = agent.stats.reloads
            assert await agent.step()
            assert agent.stats.reloads == reloads + 1
            assert await writer.applied_generation() == gens[-1]
            connected(clients, broker, b, hashes[b])
            assert Client(broker, a, hashes[a]).connect().is_failure
        finally:
            await agent.close()
            await db.dispose()


async def test_revoked_then_provisioned_again_logs_in_and_the_deny_list_empties(
    tier: Tier, manager: CredentialManager, clients: list[Client]
) -> None:
    """password_file: revoke puts the device on dynsec's deny list (so it is out before the
    reload); once the agent has applied the revocation the entry goes, and an onboarding of the
    same id (an undone one retried) gets a login that works."""
    import asyncio

    if tier.mechanism != "password_file":
        pytest.skip("the password_file deny list")
    assert isinstance(manager, PasswordFileCredentialManager) and manager.kicker is not None
    (a,) = new_ids(1)
    first = await manager.provision([a])
    device = connected(clients, tier.broker, a, first[a])
    await manager.revoke([a])
    assert device.disconnected.wait(WAIT_S), "revoked device still connected"
    assert Client(tier.broker, a, first[a]).connect().is_failure
    await asyncio.wait_for(asyncio.gather(*manager._cleanups), 30)
    listed = await manager.kicker._execute([{"command": "listClients"}])
    assert a not in listed[0]["data"]["clients"]
    assert Client(tier.broker, a, first[a]).connect().is_failure  # the file is without it now
    second = await manager.provision([a])
    connected(clients, tier.broker, a, second[a])


async def test_agent_outlives_a_database_it_cannot_reach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Down at start: the agent logs it once, keeps retrying, and writes nothing."""
    import asyncio
    import logging

    from devices.broker_agent import AgentConfig, BrokerAgent

    agent = BrokerAgent(
        AgentConfig(
            database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none",
            password_file=tmp_path / "passwd",
            broker_port=free_port(),
        )
    )
    caplog.set_level(logging.ERROR, logger="devices.broker_agent")
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(2.5)  # two retries at least
    assert not task.done()
    agent.stop()
    await asyncio.wait_for(task, 5)
    await agent.close()
    assert len(agent.stats.errors) >= 2
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1
    assert not (tmp_path / "passwd").exists()


async def test_a_slow_reload_stays_pending_instead_of_starting_over(module_pg_url: str) -> None:
    """A reload longer than the agent's patience is waited for with the same canary and file:
    writing a new file each time would restart a slow reload forever."""
    from devices.broker_agent import AgentConfig, BrokerAgent, _identity

    if not password_file_available():
        pytest.skip("mosquitto, mosquitto_passwd and the dynsec plugin are needed")
    with run_mosquitto(ROOT, mechanism="password_file") as broker:
        agent = BrokerAgent(
            AgentConfig(
                database_url=module_pg_url,
                password_file=broker.password_file,
                tier="slow-tier",
                base_file=broker.base_password_file,
                broker_pid_file=broker.pid_file,
                broker_host=broker.host,
                broker_port=broker.port,
                reload_timeout_s=0.0,  # gives up at once: as if the reload took too long
            )
        )
        try:
            with pytest.raises(RuntimeError, match="still waiting"):
                await agent.step()
            written = _identity(broker.password_file)
            agent.config.reload_timeout_s = 30.0
            assert await agent.step()
            assert _identity(broker.password_file) == written  # the same file, not a new one
            assert agent.stats.reloads == 1
        finally:
            await agent.close()
