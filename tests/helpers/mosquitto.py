"""A private Mosquitto for tests, run with the project's own config and dynamic-security plugin.

``run_mosquitto()`` starts ``mosquitto`` in a temporary directory on a free port with
``deploy/mosquitto/mosquitto.conf`` (its global part: security, limits, persistence), creates
the dynsec file with ``deploy/mosquitto/init-dynsec.sh`` (admin, ``vpp-service`` and
``vpp-gateway`` clients and roles), yields a :class:`MosquittoBroker` with the address and the
credentials, and stops the broker afterwards. The system broker on 127.0.0.1:1883 is never
touched.

``run_mosquitto(tls=True)`` also makes a CA and a server certificate for 127.0.0.1/localhost
with openssl in the temp dir (:func:`make_test_ca`) and opens the deploy config's TLS listener
on a second free port (``broker.tls_port``, ``broker.ca_file``, ``broker.tls_url(...)``).

``run_mosquitto(mechanism="password_file")`` runs the deploy's other mechanism instead: the base
password file and the ACL file made by ``deploy/mosquitto/init-passwd.sh``, no plugin. Device
logins then come from PostgreSQL through the broker agent: :func:`run_broker_agent` runs
``devices.broker_agent.BrokerAgent`` for that broker in a thread of its own (its own event loop),
so sync and async tests alike can use it.

Use it as a context manager, or ask for the ``mosquitto_broker`` fixture (tests/conftest.py;
module scope: one broker per test module, about a second to start)::

    async def test_x(mosquitto_broker):
        settings = Settings(mqtt_url=mosquitto_broker.service_url, broker_credentials="dynsec")

:class:`Client` is a blocking MQTT 5 client (paho) for playing a device, the service or the
gateway against such a broker.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONF = REPO_ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
INIT_SCRIPT = REPO_ROOT / "deploy" / "mosquitto" / "init-dynsec.sh"
INIT_PASSWD_SCRIPT = REPO_ROOT / "deploy" / "mosquitto" / "init-passwd.sh"
MECHANISMS = ("dynsec", "password_file")

_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
# Options the helper sets itself: paths into the temp dir, and the privilege drop.
_OVERRIDDEN = {
    "plugin",
    "plugin_opt_config_file",
    "password_file",
    "acl_file",
    "persistence_location",
    "log_dest",
    "pid_file",
}


@dataclass(frozen=True)
class MosquittoBroker:
    host: str
    port: int
    admin_username: str
    admin_password: str
    service_username: str
    service_password: str
    gateway_username: str
    gateway_password: str
    topic_root: str
    workdir: Path
    pid: int
    # With tls=True: the deploy config's TLS listener on its own port, and the CA that signed
    # the broker's certificate (what a client verifies the broker against).
    tls_port: int | None = None
    ca_file: Path | None = None
    mechanism: str = "dynsec"  # or "password_file" (see run_mosquitto)

    @property
    def password_file(self) -> Path:
        return self.workdir / "passwd"

    @property
    def base_password_file(self) -> Path:
        return self.workdir / "passwd.base"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "mosquitto.pid"

    def tls_url(self, username: str, password: str) -> str:
        """``mqtts://user:pass@127.0.0.1:tls_port`` (VPP_MQTT_URL for the TLS listener)."""
        assert self.tls_port is not None, "started without tls=True"
        user, pw = quote(username, safe=""), quote(password, safe="")
        return f"mqtts://{user}:{pw}@{self.host}:{self.tls_port}"

    def url(self, username: str, password: str) -> str:
        """``mqtt://user:pass@host:port`` (the VPP_MQTT_URL format)."""
        return (
            f"mqtt://{quote(username, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}"
        )

    @property
    def service_url(self) -> str:
        return self.url(self.service_username, self.service_password)

    @property
    def admin_url(self) -> str:
        return self.url(self.admin_username, self.admin_password)

    @property
    def gateway_url(self) -> str:
        return self.url(self.gateway_username, self.gateway_password)

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def dynsec_plugin_path() -> str | None:
    return next((p for p in _PLUGIN_CANDIDATES if os.path.exists(p)), None)


def mosquitto_available() -> bool:
    return (
        shutil.which("mosquitto") is not None
        and shutil.which("mosquitto_ctrl") is not None
        and dynsec_plugin_path() is not None
    )


def password_file_available() -> bool:
    """password_file brokers: mosquitto_passwd too, and the dynsec plugin (the deny list)."""
    return mosquitto_available() and shutil.which("mosquitto_passwd") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # the test CA's certificate (what clients trust)
    cert_file: Path  # the broker's certificate, signed by the CA, for 127.0.0.1 and localhost
    key_file: Path  # the broker's private key


def make_test_ca(directory: Path) -> TlsFiles:
    """A throwaway CA and a broker certificate it signs (SAN 127.0.0.1, localhost), by openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "tls.key", directory / "tls.csr", directory / "tls.crt"
    ext = directory / "san.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=vpp test CA", "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return TlsFiles(ca_crt, crt, key)


def deploy_listeners() -> list[list[str]]:
    """The deploy config's listener blocks, each its option lines (comments dropped)."""
    blocks: list[list[str]] = []
    for line in DEPLOY_CONF.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.split(maxsplit=1)[0] == "listener":
            blocks.append([])
        if blocks:
            blocks[-1].append(stripped)
    return blocks


def _tls_listener(port: int, tls: TlsFiles) -> list[str]:
    """The deploy config's TLS listener (the block with a certfile), on ``port`` of 127.0.0.1
    with the certificate paths moved to the test's files."""
    block = next((b for b in deploy_listeners() if any(o.startswith("certfile") for o in b)), None)
    if block is None:
        raise RuntimeError(f"{DEPLOY_CONF} has no TLS listener (no certfile)")
    paths = {"certfile": tls.cert_file, "keyfile": tls.key_file, "cafile": tls.ca_file}
    out = [f"listener {port} 127.0.0.1"]
    for option in block[1:]:
        key = option.split(maxsplit=1)[0]
        out.append(f"{key} {paths[key]}" if key in paths else option)
    return out


def render_config(
    workdir: Path,
    port: int,
    plugin: str,
    extra_config: str = "",
    tls_port: int | None = None,
    tls: TlsFiles | None = None,
    password_file: bool = False,
) -> str:
    """The deploy config's global part with the paths moved into ``workdir``, one local listener
    and, with ``tls_port`` and ``tls``, the deploy's TLS listener on that port. ``plugin``: the
    dynsec plugin; ``password_file``: also the password and ACL files in ``workdir``
    (init-passwd.sh's), with dynsec as the deny list."""
    kept: list[str] = []
    for line in DEPLOY_CONF.read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
        if key == "listener":
            break  # listeners come last in the deploy config; the test brings its own
        if key in _OVERRIDDEN or key == "user":
            continue
        kept.append(line)
    kept += [
        "",
        "# --- test overrides (tests/helpers/mosquitto.py) ---",
        f"plugin {plugin}",
        f"plugin_opt_config_file {workdir / 'dynamic-security.json'}",
        *(
            [f"password_file {workdir / 'passwd'}", f"acl_file {workdir / 'acl'}"]
            if password_file
            else []
        ),
        f"pid_file {workdir / 'mosquitto.pid'}",
        f"persistence_location {workdir}/",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type information",
    ]
    if os.geteuid() == 0:
        # Running as root, mosquitto would switch to the `mosquitto` user: stay root so that it
        # can write the dynsec file in our temp dir.
        kept.append("user root")
    if extra_config:
        kept.append(extra_config)
    kept.append(f"listener {port} 127.0.0.1")
    if tls_port is not None and tls is not None:
        kept += _tls_listener(tls_port, tls)
    return "\n".join(kept) + "\n"


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextmanager
def run_mosquitto(
    topic_root: str = "vpp/v1",
    *,
    extra_config: str = "",
    startup_timeout_s: float = 10.0,
    tls: bool = False,
    mechanism: str = "dynsec",
) -> Iterator[MosquittoBroker]:
    """Start a private Mosquitto (project config + dynsec, or ``mechanism="password_file"``:
    the password and ACL files); stop it and remove its files after. ``tls``: also the deploy's
    TLS listener on a second free port, with a CA made for the test."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism: {mechanism!r} is not one of {MECHANISMS}")
    plugin = dynsec_plugin_path()
    if plugin is None or not mosquitto_available():
        raise RuntimeError("mosquitto, mosquitto_ctrl and the dynamic-security plugin are needed")
    if mechanism == "password_file" and not password_file_available():
        raise RuntimeError("mosquitto_passwd is needed")
    workdir = Path(tempfile.mkdtemp(prefix="vpp-mosquitto-"))
    creds = {
        "admin": ("admin", secrets.token_urlsafe(16)),
        "service": ("vpp-service", secrets.token_urlsafe(16)),
        "gateway": ("vpp-gateway", secrets.token_urlsafe(16)),
    }
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = {
            **os.environ,
            "DYNSEC_FILE": str(workdir / "dynamic-security.json"),
            "DYNSEC_ADMIN_USER": creds["admin"][0],
            "DYNSEC_ADMIN_PASSWORD": creds["admin"][1],
            "VPP_SERVICE_USER": creds["service"][0],
            "VPP_SERVICE_PASSWORD": creds["service"][1],
            "VPP_GATEWAY_USER": creds["gateway"][0],
            "VPP_GATEWAY_PASSWORD": creds["gateway"][1],
            "VPP_TOPIC_ROOT": topic_root,
            "MOSQUITTO_DYNSEC_PLUGIN": plugin,
            "INIT_PORT": str(free_port()),
        }
        if mechanism == "password_file":
            env["DATA_DIR"] = str(workdir)
            creds["admin"] = creds["service"]  # no dynsec admin here
        script = INIT_SCRIPT if mechanism == "dynsec" else INIT_PASSWD_SCRIPT
        init = subprocess.run(
            ["sh", str(script)], env=env, capture_output=True, timeout=60, check=False
        )
        if init.returncode != 0:
            raise RuntimeError(f"{script.name} failed: {init.stderr.decode(errors='replace')}")
        tls_files = make_test_ca(workdir / "certs") if tls else None
        tls_port: int | None = None

        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(5):
            port = free_port()
            tls_port = free_port() if tls_files is not None else None
            conf = workdir / "mosquitto.conf"
            conf.write_text(
                render_config(
                    workdir,
                    port,
                    plugin,
                    extra_config,
                    tls_port,
                    tls_files,
                    password_file=mechanism == "password_file",
                )
            )
            proc = subprocess.Popen(
                ["mosquitto", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if _wait_listening("127.0.0.1", port, proc, startup_timeout_s) and (
                tls_port is None or _wait_listening("127.0.0.1", tls_port, proc, startup_timeout_s)
            ):
                break
            _stop(proc)
            proc = None
        if proc is None:
            log = (workdir / "mosquitto.log").read_text(errors="replace")
            raise RuntimeError(f"mosquitto did not start:\n{log}")
        yield MosquittoBroker(
            host="127.0.0.1",
            port=port,
            admin_username=creds["admin"][0],
            admin_password=creds["admin"][1],
            service_username=creds["service"][0],
            service_password=creds["service"][1],
            gateway_username=creds["gateway"][0],
            gateway_password=creds["gateway"][1],
            topic_root=topic_root,
            workdir=workdir,
            pid=proc.pid,
            tls_port=tls_port,
            ca_file=tls_files.ca_file if tls_files is not None else None,
            mechanism=mechanism,
        )
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --- the broker agent ------------------------------------------------------------------------
@dataclass
class AgentThread:
    """A BrokerAgent running on its own event loop in a thread (see run_broker_agent)."""

    agent: Any  # devices.broker_agent.BrokerAgent
    loop: Any  # asyncio.AbstractEventLoop
    thread: threading.Thread

    def wait_reloads(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.agent.stats.reloads < count:
            assert time.monotonic() < deadline, f"agent errors: {self.agent.stats.errors[-3:]}"
            time.sleep(0.02)


@contextmanager
def run_broker_agent(
    broker: MosquittoBroker,
    database_url: str,
    tier: str = "default",
    poll_s: float = 0.02,
    reload_timeout_s: float = 30.0,
) -> Iterator[AgentThread]:
    """Run the broker agent for ``broker`` (started with mechanism="password_file") against
    ``database_url`` (migrated) until the block ends; it has made its first reload on entry."""
    import asyncio

    from devices.broker_agent import AgentConfig, BrokerAgent

    assert broker.mechanism == "password_file", "the agent serves a password_file broker"
    config = AgentConfig(
        database_url=database_url,
        password_file=broker.password_file,
        tier=tier,
        base_file=broker.base_password_file,
        broker_pid_file=broker.pid_file,
        broker_host=broker.host,
        broker_port=broker.port,
        poll_s=poll_s,
        reload_timeout_s=reload_timeout_s,
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        agent = BrokerAgent(config)
        holder["agent"] = agent
        started.set()
        try:
            loop.run_until_complete(agent.run())
        finally:
            loop.run_until_complete(agent.close())
            loop.close()

    thread = threading.Thread(target=main, name="broker-agent", daemon=True)
    thread.start()
    assert started.wait(10)
    handle = AgentThread(holder["agent"], loop, thread)
    try:
        handle.wait_reloads(1)
        yield handle
    finally:
        loop.call_soon_threadsafe(handle.agent.stop)
        thread.join(30)


def restart_mosquitto(broker: MosquittoBroker, timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """Start Mosquitto again with the broker's config and port (after it was stopped); the caller
    stops the returned process."""
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(broker.workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not _wait_listening(broker.host, broker.port, proc, timeout_s):
        _stop(proc)
        raise RuntimeError(f"mosquitto did not restart:\n{broker.log()}")
    return proc


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM a broker by pid and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


# --- a test client ---------------------------------------------------------------------------
WAIT_S = 5.0  # how long the client waits for any answer from the broker


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
