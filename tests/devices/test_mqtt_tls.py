"""MQTT over TLS: the deploy config's TLS listener (deploy/mosquitto/mosquitto.conf) on a private
Mosquitto, with a CA this test makes. The service connects with ``VPP_MQTT_URL=mqtts://…`` and
``VPP_MQTT_CA_FILE``, provisions a device's login over TLS, and ingests the telemetry the device
publishes over TLS; a client that does not trust the CA, or speaks plain MQTT to the TLS port,
is refused."""

from __future__ import annotations

import secrets
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers.eventkit import wait_for
from tests.helpers.mosquitto import MosquittoBroker, mosquitto_available, run_mosquitto
from tests.helpers.settings import make_settings

pytestmark = pytest.mark.skipif(
    not mosquitto_available(), reason="mosquitto with the dynamic-security plugin not installed"
)
WAIT_S = 5.0


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[MosquittoBroker]:
    with run_mosquitto(tls=True) as broker:
        yield broker


def device_client(
    broker: MosquittoBroker, username: str, password: str, context: ssl.SSLContext | None
) -> tuple[paho.Client, threading.Event, list[Any]]:
    """A device's paho client to the TLS port; ``context`` None speaks plain MQTT to it."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{username}-{secrets.token_hex(2)}", protocol=5
    )
    c.username_pw_set(username, password)
    if context is not None:
        c.tls_set_context(context)
    done = threading.Event()
    outcome: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        outcome.append(rc)
        done.set()

    c.on_connect = on_connect
    return c, done, outcome


def refused(broker: MosquittoBroker, context: ssl.SSLContext | None) -> bool:
    """True if a client cannot complete a session with the TLS listener."""
    c, done, outcome = device_client(broker, "nobody", "x", context)
    assert broker.tls_port is not None
    try:
        c.connect(broker.host, broker.tls_port, keepalive=10)
    except (ssl.SSLError, OSError):
        return True  # the TLS handshake failed: the broker's certificate is not trusted
    c.loop_start()
    try:
        got = done.wait(2.0)
        return not got or bool(outcome and getattr(outcome[0], "is_failure", True))
    finally:
        c.disconnect()
        c.loop_stop()


async def test_service_and_device_over_tls(
    tls_broker: MosquittoBroker, sqlite_url: str, services_factory: Any, api_factory: Any
) -> None:
    from devices.ingest import IngestWorker

    assert tls_broker.ca_file is not None
    settings = make_settings(
        sqlite_url,
        mqtt_url=tls_broker.tls_url(tls_broker.service_username, tls_broker.service_password),
        mqtt_ca_file=str(tls_broker.ca_file),
        broker_credentials="dynsec",
        topic_root=tls_broker.topic_root,
    )
    svc = await services_factory(settings)
    client, make_key = await api_factory(settings, services=svc)
    headers = await make_key("acme", "fleet")
    device_id = f"tls-{secrets.token_hex(4)}"
    r = await client.post(
        "/v1/devices",
        json={
            "id": device_id,
            "kind": "battery",
            "site_id": "site-1",
            "region": "ERCOT-NORTH",
            "capacity_wh": 13500,
            "max_discharge_w": 5000,
            "max_charge_w": 5000,
        },
        headers=headers,
    )
    assert r.status_code == 201, r.text  # the login was made over TLS (dynsec on mqtts://)
    creds = r.json()["mqtt"]

    ingest = IngestWorker(svc)
    await ingest.start()
    device, done, outcome = device_client(
        tls_broker,
        creds["username"],
        creds["password"],
        ssl.create_default_context(cafile=str(tls_broker.ca_file)),
    )
    try:
        assert tls_broker.tls_port is not None
        device.connect(tls_broker.host, tls_broker.tls_port, keepalive=10)
        device.loop_start()
        assert done.wait(WAIT_S) and not outcome[0].is_failure, outcome
        now = svc.clock.now_ms()
        body = orjson.dumps({"ts": now, "seq": 1, "soc_pct": 64.5, "power_w": 1200})
        device.publish(creds["topics"]["telemetry"], body, qos=1).wait_for_publish(WAIT_S)

        async def heard() -> bool:
            got = await client.get(f"/v1/devices/{device_id}", headers=headers)
            return got.status_code == 200 and got.json().get("last_telemetry") is not None

        assert await wait_for(heard, 10.0), "telemetry sent over TLS never reached the service"
        last = (await client.get(f"/v1/devices/{device_id}", headers=headers)).json()
        assert last["last_telemetry"]["soc_pct"] == 64.5
        assert last["last_telemetry"]["power_kw"] == 1.2
    finally:
        device.disconnect()
        device.loop_stop()
        await ingest.stop()


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_broker: MosquittoBroker) -> None:
    # The system's CAs do not include the test CA: the handshake fails on the certificate.
    assert refused(tls_broker, ssl.create_default_context())
    # Plain MQTT to the TLS port gets no CONNACK.
    assert refused(tls_broker, None)
    # Control: the same client trusting the CA completes the handshake (and is then refused only
    # by its login, which the broker answers in a CONNACK).
    assert tls_broker.ca_file is not None
    c, done, outcome = device_client(
        tls_broker, "nobody", "x", ssl.create_default_context(cafile=str(tls_broker.ca_file))
    )
    assert tls_broker.tls_port is not None
    c.connect(tls_broker.host, tls_broker.tls_port, keepalive=10)
    c.loop_start()
    try:
        assert done.wait(WAIT_S), "no CONNACK over TLS"
        assert outcome[0].is_failure  # not authorised: a CONNACK, so TLS itself worked
    finally:
        c.disconnect()
        c.loop_stop()


async def test_the_service_without_the_ca_cannot_connect(tls_broker: MosquittoBroker) -> None:
    from devices.mqtt import make_client

    url = tls_broker.tls_url(tls_broker.service_username, tls_broker.service_password)
    without = make_client(url, f"svc-{secrets.token_hex(3)}")
    with pytest.raises(ConnectionError):
        await without.connect(timeout_s=2.0)
    await without.disconnect()
    assert tls_broker.ca_file is not None
    trusting = make_client(url, f"svc-{secrets.token_hex(3)}", ca_file=str(tls_broker.ca_file))
    await trusting.connect(timeout_s=WAIT_S)
    await trusting.disconnect()


def test_a_missing_ca_file_is_named() -> None:
    from devices.mqtt import make_client

    with pytest.raises(ValueError, match="VPP_MQTT_CA_FILE"):
        make_client("mqtts://u:p@127.0.0.1:8883", "svc-x", ca_file="/nonexistent/ca.pem")
