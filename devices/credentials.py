"""Per-device MQTT credentials on the broker: made at onboarding, revoked at offboarding.

Two mechanisms against Mosquitto 2.0 (``VPP_BROKER_CREDENTIALS``):

``password_file`` (:class:`PasswordFileCredentialManager`, for fleets past a few thousand
devices): the service writes each device's salted hash into PostgreSQL (``broker_logins``); the
broker agent beside each Mosquitto (devices/broker_agent.py, ``vpp broker-agent``) writes them into
the broker's password file, reloads it with SIGHUP and records the generation it applied
(``broker_tier``) once its canary login with that generation's password is accepted. What each
device may touch is one static ACL file of ``%u`` patterns (deploy/mosquitto/acl). On reload
Mosquitto re-checks every connected client against the new file and disconnects the ones whose
login is gone. Revocation does not wait for that reload: the broker also loads the
dynamic-security plugin, holding only the devices being revoked as disabled clients (kicked and
refused at once; the plugin defers on everyone else), each removed once the agent has applied its
tombstone. A device's wildcard subscription is granted (Mosquitto 2.0.11 does not check
subscriptions against an acl_file) but every delivery is checked against the READ patterns, so
it delivers nothing but the device's own ``cmd``.

Device hashes are ``$6$`` (one salted SHA-512), not ``$7$`` (PBKDF2): device passwords are 192
random bits, which no guessing can reach whatever the hash, so iterations buy nothing; and
every reload re-checks each connected client's password, where PBKDF2's ~100 µs a login would
stall a broker holding 100 000 sessions for 10 s against ~0.1 s for ``$6$``.

``dynsec`` (:class:`DynsecCredentialManager`, small fleets, no agent): against Mosquitto the
service drives the dynamic-security plugin over MQTT: it publishes command
batches on ``$CONTROL/dynamic-security/v1`` and reads the answers on
``$CONTROL/dynamic-security/v1/response``, so broker and service may live on different hosts,
and ``deleteClient`` disconnects a live session at once.

Each device gets a client (username = ``device_id``) holding one role of its own,
``vpp-device:<device_id>``, whose ACLs name its exact topics: Mosquitto 2.0's dynsec has no
``%u`` substitution in ACL topics (2.0.11 matches ACLs with plain ``mosquitto_topic_matches_sub``),
so one shared role cannot say "your own topics". A device may publish its telemetry, status and
ack, and subscribe to exactly its cmd topic (``subscribeLiteral``: ``+``/``#`` filters are refused
in the SUBACK). Everything else falls to the plugin's default access: no publish, no subscribe.

``NullCredentialManager`` serves the in-process broker (``memory://``) and brokers without
dynsec: it hands out random passwords and tells no broker.

Cost to know: Mosquitto 2.0's dynsec rewrites its whole JSON file after every command, so the
time per device grows with the number of devices already on the broker (deploy/README.md has
figures). Commands are batched into few ``$CONTROL`` messages, but a 100 000-device bulk
onboarding is limited by the broker, not by this module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import text

from store.database import Database

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
DEVICE_ROLE_PREFIX = "vpp-device:"
SERVICE_ROLE = "vpp-service"
GATEWAY_ROLE = "vpp-gateway"
# Keep each $CONTROL message well under the broker's max_packet_size (8 KiB in deploy/).
MAX_CONTROL_PAYLOAD_BYTES = 6000
PASSWORD_BYTES = 24  # 192 bits of randomness, 32 URL-safe characters
_FORBIDDEN_IN_ID = ("/", "+", "#", "\x00")


class CredentialError(RuntimeError):
    """The broker refused or did not answer a credential change."""


class BrokerUnreachable(CredentialError):
    """No MQTT session with the broker: network down, or the admin login refused."""


@runtime_checkable
class CredentialManager(Protocol):
    async def provision(self, device_ids: list[str]) -> dict[str, str]:
        """Create (or reset) each device's broker login; returns device_id -> new password.

        Raises ``ValueError`` (naming ``device_id``) for an id that cannot be a username/topic
        level, ``CredentialError`` when the broker refuses or does not answer; devices of batches
        already sent may then exist: ``revoke(ids)`` undoes an all-or-nothing onboarding.
        """
        ...

    async def revoke(self, device_ids: list[str]) -> None:
        """Remove each device's login at once, disconnecting a live session."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def new_password() -> str:
    """A random URL-safe password with 192 bits of entropy."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def validate_device_id(device_id: str) -> str:
    """A device id doubles as MQTT username and topic level: no wildcards, no '/'."""
    if not isinstance(device_id, str) or not device_id:
        raise ValueError("device_id: must be a non-empty string")
    if any(ch in device_id for ch in _FORBIDDEN_IN_ID):
        raise ValueError(f"device_id: {device_id!r} may not contain '/', '+', '#' or NUL")
    if len(device_id.encode()) > 256:
        raise ValueError("device_id: longer than 256 bytes")
    return device_id


def device_topics(topic_root: str, device_id: str) -> dict[str, str]:
    """The four topics of one device (interface.md), as given to it at onboarding."""
    validate_device_id(device_id)
    base = f"{topic_root.rstrip('/')}/devices/{device_id}"
    return {
        "telemetry": f"{base}/telemetry",
        "status": f"{base}/status",
        "ack": f"{base}/ack",
        "cmd": f"{base}/cmd",
    }


def device_role_name(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_acls(topic_root: str, device_id: str) -> list[dict[str, Any]]:
    """Dynsec ACLs of a device's own role: publish its three uplink topics, subscribe its cmd."""
    topics = device_topics(topic_root, device_id)
    acls: list[dict[str, Any]] = [
        {"acltype": "publishClientSend", "topic": topics[kind], "allow": True}
        for kind in ("telemetry", "status", "ack")
    ]
    # subscribeLiteral compares the filter as a string: "…/+/cmd" or "#" never equals it.
    acls.append({"acltype": "subscribeLiteral", "topic": topics["cmd"], "allow": True})
    return acls


def provision_commands(topic_root: str, device_id: str, password: str) -> list[dict[str, Any]]:
    role = device_role_name(device_id)
    return [
        {"command": "createRole", "rolename": role, "acls": device_acls(topic_root, device_id)},
        {
            "command": "createClient",
            "username": device_id,
            "password": password,
            "roles": [{"rolename": role}],
        },
    ]


def revoke_commands(device_id: str) -> list[dict[str, Any]]:
    # deleteClient first: it kicks the live session; the role goes after.
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_role_name(device_id)},
    ]


def _is_already_exists(error: str) -> bool:
    return "already exists" in error.lower()


def _is_not_found(error: str) -> bool:
    return "not found" in error.lower()


# --- Null ------------------------------------------------------------------------------------
class NullCredentialManager:
    """For the in-process broker and brokers without dynsec: passwords, no broker calls."""

    async def provision(self, device_ids: list[str]) -> dict[str, str]:
        return {validate_device_id(d): new_password() for d in device_ids}

    async def revoke(self, device_ids: list[str]) -> None:
        for d in device_ids:
            validate_device_id(d)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# --- Dynsec ----------------------------------------------------------------------------------
@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, Any]]


@dataclass
class _Conn:
    client: mqtt.Client
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str | None = None
    reached: bool = False  # a CONNACK accepted the login at least once


class DynsecCredentialManager:
    """Device logins through Mosquitto's dynamic-security plugin, over MQTT.

    One paho client (its own network thread, reconnecting by itself) carries every request; the
    answers are matched to requests by ``correlationData``, so several service processes may
    share the same admin login. All methods are coroutines and safe to call concurrently.
    """

    def __init__(
        self,
        host: str,
        port: int,
        admin_username: str,
        admin_password: str,
        tls: bool = False,
        topic_root: str = "vpp/v1",
        *,
        client_id: str | None = None,
        timeout_s: float = 60.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_root = topic_root.rstrip("/")
        self.timeout_s = timeout_s
        self._admin_username = admin_username
        self._admin_password = admin_password
        self._tls = tls
        self._tls_context = tls_context
        self._client_id = client_id or f"vpp-dynsec-{secrets.token_hex(4)}"
        self._corr_prefix = secrets.token_hex(6)
        self._seq = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._conn: _Conn | None = None
        self._connect_lock = asyncio.Lock()
        # One $CONTROL message at a time: the broker runs them one after the other anyway, and
        # in-order sending keeps a provision and a later revoke of the same device in order.
        self._send_lock = asyncio.Lock()

    # -- public API --
    async def provision(self, device_ids: list[str]) -> dict[str, str]:
        passwords = {validate_device_id(d): new_password() for d in device_ids}
        if not passwords:
            return {}
        commands = [
            cmd for d, pw in passwords.items() for cmd in provision_commands(self.topic_root, d, pw)
        ]
        responses = await self._execute(commands)
        stale_roles: list[str] = []  # role left by an earlier attempt: top up its ACLs
        known_clients: list[str] = []  # device provisioned before: new password
        errors: list[str] = []
        for cmd, resp in zip(commands, responses, strict=True):
            error = resp.get("error")
            if not error:
                continue
            if cmd["command"] == "createRole" and _is_already_exists(error):
                stale_roles.append(cmd["rolename"][len(DEVICE_ROLE_PREFIX) :])
            elif cmd["command"] == "createClient" and _is_already_exists(error):
                known_clients.append(cmd["username"])
            else:
                name = cmd.get("username") or cmd.get("rolename")
                errors.append(f"{cmd['command']} {name}: {error}")
        if stale_roles or known_clients:
            retry: list[dict[str, Any]] = []
            tolerated: set[int] = set()  # indexes in retry whose "error" is expected
            for d in stale_roles:
                # A role left by an earlier attempt: make sure it grants what it should. Never
                # deleteRole while a client holds it: dynsec 2.0.11 then leaves the client
                # pointing at freed memory (seen here as a role named after an ACL topic).
                for acl in device_acls(self.topic_root, d):
                    tolerated.add(len(retry))  # "ACL with this topic already exists"
                    retry.append({"command": "addRoleACL", "rolename": device_role_name(d), **acl})
            stale = set(stale_roles)
            for d in known_clients:
                retry.append(
                    {"command": "setClientPassword", "username": d, "password": passwords[d]}
                )
                if d in stale:
                    # Usually attached already, which dynsec 2.0 answers with "Internal error".
                    tolerated.add(len(retry))
                retry.append(
                    {"command": "addClientRole", "username": d, "rolename": device_role_name(d)}
                )
            for i, (cmd, resp) in enumerate(zip(retry, await self._execute(retry), strict=True)):
                if resp.get("error") and i not in tolerated:
                    name = cmd.get("username") or cmd.get("rolename")
                    errors.append(f"{cmd['command']} {name}: {resp['error']}")
            # A new password kicks the old session, but dynsec does its kicks on the broker's
            # next loop turn: one more round trip, and they are done when we return.
            await self._execute([{"command": "getDefaultACLAccess"}])
        if errors:
            raise CredentialError("dynsec refused: " + "; ".join(errors[:10]))
        return passwords

    async def revoke(self, device_ids: list[str]) -> None:
        ids = [validate_device_id(d) for d in device_ids]
        if not ids:
            return
        commands = [cmd for d in ids for cmd in revoke_commands(d)]
        errors = [
            f"{cmd['command']}: {resp['error']}"
            for cmd, resp in zip(commands, await self._execute(commands), strict=True)
            if resp.get("error") and not _is_not_found(resp["error"])
        ]
        # deleteClient kicks the live session on the broker's next loop turn: one more round
        # trip, and the device is off the broker when revoke returns.
        await self._execute([{"command": "getDefaultACLAccess"}])
        if errors:
            raise CredentialError("dynsec refused: " + "; ".join(errors[:10]))

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when the broker answers a dynsec request within ``timeout_s``."""
        try:
            (resp,) = await asyncio.wait_for(
                self._execute([{"command": "getDefaultACLAccess"}], timeout_s=timeout_s),
                timeout_s,
            )
        except (TimeoutError, CredentialError, OSError) as exc:
            log.debug("dynsec ping failed: %s", exc)
            return False
        return not resp.get("error")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.client.disconnect()
            conn.client.loop_stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.loop.call_soon_threadsafe(_fail, p.future, CredentialError("manager closed"))

    # -- transport --
    async def _execute(
        self, commands: list[dict[str, Any]], timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        """Send commands in as few $CONTROL messages as fit; answers in the same order."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        conn = await self._connection(timeout)
        loop = asyncio.get_running_loop()
        results: list[dict[str, Any]] = []
        for batch in _batches(commands):
            futures: list[asyncio.Future[dict[str, Any]]] = []
            body: list[dict[str, Any]] = []
            with self._lock:
                for cmd in batch:
                    corr = f"{self._corr_prefix}-{next(self._seq)}"
                    fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                    self._pending[corr] = _Pending(loop, fut)
                    futures.append(fut)
                    body.append({**cmd, "correlationData": corr})
            try:
                async with self._send_lock:
                    info = conn.client.publish(
                        CONTROL_TOPIC, orjson.dumps({"commands": body}), qos=1
                    )
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        raise CredentialError(f"publish to {CONTROL_TOPIC} failed (rc {info.rc})")
                    # The broker answers in order; waiting here keeps one batch in flight.
                    done = await asyncio.wait_for(asyncio.gather(*futures), timeout)
            except TimeoutError as exc:
                raise CredentialError(
                    f"no dynsec answer from {self.host}:{self.port} within {timeout:.0f} s "
                    "(is the dynamic-security plugin loaded and the login its admin?)"
                ) from exc
            finally:
                with self._lock:
                    for cmd in body:
                        self._pending.pop(cmd["correlationData"], None)
            results.extend(done)
        return results

    async def _connection(self, timeout_s: float) -> _Conn:
        async with self._connect_lock:
            if self._conn is not None and self._conn.failed is None:
                conn = self._conn
            else:
                conn = self._start_client()
                self._conn = conn
        ok = conn.ready.is_set() or await asyncio.to_thread(conn.ready.wait, min(timeout_s, 10.0))
        if conn.failed is not None or not ok:
            reason = conn.failed or "timed out"
            if self._conn is conn:
                self._conn = None
            # paho's thread may sit in its reconnect back-off for a second: stop it off-loop.
            threading.Thread(target=conn.client.loop_stop, daemon=True).start()
            error = CredentialError if conn.reached else BrokerUnreachable
            raise error(f"dynsec admin session with {self.host}:{self.port}: {reason}")
        if not conn.client.is_connected():
            raise BrokerUnreachable(f"not connected to {self.host}:{self.port} (reconnecting)")
        return conn

    def _start_client(self) -> _Conn:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self._admin_username, self._admin_password)
        if self._tls:
            client.tls_set_context(self._tls_context or ssl.create_default_context())
        conn = _Conn(client)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            if reason.is_failure:
                conn.failed = str(reason)
                conn.ready.set()
                return
            conn.reached = True
            # Re-subscribe on every (re)connect; ready once the SUBACK is in.
            c.subscribe(RESPONSE_TOPIC, qos=1)

        def on_subscribe(
            _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any
        ) -> None:
            if any(r.is_failure for r in reasons):
                conn.failed = f"subscribe to {RESPONSE_TOPIC} refused: {reasons[0]}"
            conn.ready.set()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self._on_response(bytes(msg.payload))

        def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
            if not conn.ready.is_set():
                conn.failed = "connection failed"
                conn.ready.set()

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        try:
            client.connect_async(self.host, self.port, keepalive=30)
            client.loop_start()
        except OSError as exc:
            conn.failed = str(exc)
            conn.ready.set()
        return conn

    def _on_response(self, payload: bytes) -> None:
        """Runs on paho's thread: hand each answer to the coroutine waiting for it."""
        try:
            doc = orjson.loads(payload)
            responses = doc.get("responses", []) if isinstance(doc, dict) else []
        except orjson.JSONDecodeError:
            log.warning("unreadable dynsec response: %r", payload[:200])
            return
        for resp in responses:
            if not isinstance(resp, dict):
                continue
            corr = resp.get("correlationData")
            with self._lock:
                pending = self._pending.pop(corr, None) if isinstance(corr, str) else None
            if pending is not None:
                pending.loop.call_soon_threadsafe(_resolve, pending.future, resp)


def _resolve(fut: asyncio.Future[dict[str, Any]], value: dict[str, Any]) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[dict[str, Any]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _batches(commands: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split commands into lists whose JSON stays under MAX_CONTROL_PAYLOAD_BYTES."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 16
    for cmd in commands:
        n = len(orjson.dumps(cmd)) + 40  # + correlationData and separators
        if current and size + n > MAX_CONTROL_PAYLOAD_BYTES:
            batches.append(current)
            current, size = [], 16
        current.append(cmd)
        size += n
    if current:
        batches.append(current)
    return batches


# --- Password file ---------------------------------------------------------------------------
# Mosquitto 2.0.11 decodes a $6$ salt only when it is exactly 12 bytes (security_default.c).
SALT_BYTES = 12
# pg_advisory_xact_lock key of broker_logins writers: "vppbrkr" in ASCII.
LOGIN_WRITE_LOCK = 0x767070_62726B72
DEFAULT_TIER = "default"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$6$`` password-file hash: ``$6$<b64 salt>$<b64 sha512(password || salt)>``."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_hashes(passwords: list[str]) -> list[str]:
    """``password_hash`` of each, with one read of the system's random source for every salt."""
    salts = os.urandom(SALT_BYTES * len(passwords))
    b64, sha512 = base64.b64encode, hashlib.sha512
    out: list[str] = []
    for i, pw in enumerate(passwords):
        salt = salts[i * SALT_BYTES : (i + 1) * SALT_BYTES]
        out.append(f"$6${b64(salt).decode()}${b64(sha512(pw.encode() + salt).digest()).decode()}")
    return out


def validate_password_file_username(device_id: str) -> str:
    """A Mosquitto password-file username: a device id, and no ':' (the file's separator, which
    2.0.11 splits on with strtok) nor blanks at its ends (trimmed)."""
    validate_device_id(device_id)
    if ":" in device_id or "\n" in device_id or device_id.strip() != device_id:
        raise ValueError(
            f"device_id: {device_id!r} cannot be a Mosquitto password-file username "
            "(no ':', newline, or leading/trailing blanks)"
        )
    return device_id


class PasswordFileCredentialManager:
    """Device logins in PostgreSQL (``broker_logins``), made live by the broker agent.

    ``provision`` writes all its rows in one statement under one new generation (a short
    transaction of its own, whatever the caller's), then waits until the tier's agent has
    recorded that generation as applied: the credentials work at the broker when it returns.
    Several service processes may write at once: the advisory lock makes generations commit in
    order.

    ``revoke`` writes tombstones the same way. With a ``kicker`` (the service's login on the
    broker's dynamic-security plugin, loaded beside the password file as a small deny list) it
    does not wait for the reload of the whole file: it adds each device to dynsec as a disabled
    client, which disconnects its live session and refuses its logins at once (dynsec is asked
    first and defers on the devices it does not hold), and removes that entry once the agent
    has applied the tombstone. Without one, or when the broker does not answer it, revoke waits
    for the agent.
    """

    def __init__(
        self,
        db: Database,
        tier: str = DEFAULT_TIER,
        *,
        apply_timeout_s: float = 60.0,
        poll_s: float = 0.03,
        kicker: DynsecCredentialManager | None = None,
    ) -> None:
        if db.is_sqlite:
            raise ValueError(
                "broker_credentials: password_file needs a PostgreSQL VPP_DATABASE_URL"
            )
        self.db = db
        self.tier = tier
        self.apply_timeout_s = apply_timeout_s
        self.poll_s = poll_s
        self.kicker = kicker
        self._kicker_down_until = 0.0  # monotonic: after a failure, don't ask for a minute
        self._cleanups: set[asyncio.Task[None]] = set()

    def _kicker_up(self) -> bool:
        return self.kicker is not None and time.monotonic() >= self._kicker_down_until

    async def provision(self, device_ids: list[str]) -> dict[str, str]:
        passwords = {validate_password_file_username(d): new_password() for d in device_ids}
        if not passwords:
            return {}
        ids = list(passwords)
        hashes = password_hashes(list(passwords.values()))
        generation, were_revoked = await self._write(ids, hashes)
        await self.wait_applied(generation)
        if were_revoked and self._kicker_up():
            # A device revoked before (an undone onboarding, say) may still be on the deny list.
            await self._undeny(were_revoked)
        return passwords

    async def revoke(self, device_ids: list[str]) -> None:
        ids = list(dict.fromkeys(validate_device_id(d) for d in device_ids))
        if not ids:
            return
        generation = await self.write_logins(ids, [None] * len(ids))
        if self._kicker_up() and await self._deny(ids):
            task = asyncio.create_task(self._undeny_when_applied(ids, generation))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            return
        await self.wait_applied(generation)

    async def _deny(self, ids: list[str]) -> bool:
        """Disable each device in dynsec (kicks it; its logins fail): True once done."""
        assert self.kicker is not None
        commands: list[dict[str, Any]] = []
        for d in ids:
            commands.append({"command": "createClient", "username": d, "password": new_password()})
            commands.append({"command": "disableClient", "username": d})
        try:
            responses = await self.kicker._execute(commands)
            errors = [
                f"{c['command']} {c['username']}: {r['error']}"
                for c, r in zip(commands, responses, strict=True)
                if r.get("error") and not _is_already_exists(r["error"])
            ]
            if errors:
                raise CredentialError("; ".join(errors[:5]))
            # dynsec kicks on the broker's next loop turn: one more round trip.
            await self.kicker._execute([{"command": "getDefaultACLAccess"}])
        except CredentialError as exc:
            log.warning("broker deny list unavailable (%s); revoke waits for the agent", exc)
            self._kicker_down_until = time.monotonic() + 60.0
            return False
        return True

    async def _undeny(self, ids: list[str]) -> None:
        assert self.kicker is not None
        try:
            await self.kicker._execute([{"command": "deleteClient", "username": d} for d in ids])
        except CredentialError as exc:
            log.warning("could not clear %d devices from the broker deny list: %s", len(ids), exc)

    async def _undeny_when_applied(self, ids: list[str], generation: int) -> None:
        try:
            await self.wait_applied(generation)
        except CredentialError as exc:
            log.warning("deny list kept for %d devices: %s", len(ids), exc)
            return
        await self._undeny(ids)

    async def ping(self) -> bool:
        """True when the database answers and the tier's agent has applied a generation."""
        try:
            return (await self.applied_generation()) is not None
        except Exception as exc:  # any database failure means "not ready"
            log.debug("broker tier ping failed: %s", exc)
            return False

    async def close(self) -> None:
        # The Database is the process's and closed with it; the deny-list cleanups finish first.
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=self.apply_timeout_s)
        if self.kicker is not None:
            await self.kicker.close()

    async def applied_generation(self) -> int | None:
        async with self.db.engine.connect() as conn:
            value = (
                await conn.execute(
                    text("SELECT applied_generation FROM broker_tier WHERE name = :tier"),
                    {"tier": self.tier},
                )
            ).scalar_one_or_none()
        return None if value is None else int(value)

    async def write_logins(self, ids: list[str], hashes: Sequence[str | None]) -> int:
        """Upsert the rows (a None hash revokes) under a new generation; the generation. Does
        not wait for the broker (``wait_applied``). ``ids`` must be distinct."""
        return (await self._write(ids, hashes))[0]

    async def _write(self, ids: list[str], hashes: Sequence[str | None]) -> tuple[int, list[str]]:
        """write_logins, and which of ``ids`` were revoked (a tombstone) before."""
        try:
            async with self.db.engine.begin() as conn:
                # Held to the commit: the next writer's generation is taken after ours commits.
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOGIN_WRITE_LOCK}
                )
                generation = int(
                    (
                        await conn.execute(
                            text("SELECT coalesce(max(generation), 0) + 1 FROM broker_logins")
                        )
                    ).scalar_one()
                )
                were_revoked = [
                    d
                    for (d,) in (
                        await conn.execute(
                            text(
                                "SELECT device_id FROM broker_logins WHERE device_id = "
                                "ANY(CAST(:ids AS varchar[])) AND password_hash IS NULL"
                            ),
                            {"ids": ids},
                        )
                    ).all()
                ]
                await conn.execute(
                    text(
                        "INSERT INTO broker_logins (device_id, password_hash, generation) "
                        "SELECT u.id, u.hash, :generation FROM unnest("
                        "CAST(:ids AS varchar[]), CAST(:hashes AS varchar[])) AS u(id, hash) "
                        "ON CONFLICT (device_id) DO UPDATE SET "
                        "password_hash = EXCLUDED.password_hash, generation = EXCLUDED.generation"
                    ),
                    {"generation": generation, "ids": ids, "hashes": list(hashes)},
                )
        except Exception as exc:
            raise CredentialError(
                f"broker_logins: could not write {len(ids)} logins: {exc}"
            ) from exc
        return generation, were_revoked

    async def wait_applied(self, generation: int) -> None:
        """Return once the tier's agent has applied ``generation``; CredentialError after
        ``apply_timeout_s``."""
        deadline = time.monotonic() + self.apply_timeout_s
        applied: int | None = None
        while True:
            try:
                applied = await self.applied_generation()
            except Exception as exc:
                log.debug("broker_tier read failed: %s", exc)
            if applied is not None and applied >= generation:
                return
            if time.monotonic() >= deadline:
                raise CredentialError(
                    f"broker tier {self.tier!r} has not applied generation {generation} within "
                    f"{self.apply_timeout_s:.0f} s (applied: {applied}); is `vpp broker-agent` "
                    "running beside the broker?"
                )
            await asyncio.sleep(self.poll_s)


# --- Auto ------------------------------------------------------------------------------------
class AutoCredentialManager:
    """``broker_credentials = "auto"``: password_file if a broker agent has ever recorded the
    tier in the database, else dynsec if the broker answers a dynsec request, else none.

    Decided on first use. A broker that cannot be reached at all is an error (credentials made
    then might never work); a broker that is reachable but gives no dynsec answer within
    ``probe_timeout_s`` means "no dynsec", and stays decided.
    """

    def __init__(
        self,
        dynsec: DynsecCredentialManager,
        probe_timeout_s: float = 2.0,
        password_file: PasswordFileCredentialManager | None = None,
    ) -> None:
        self._dynsec = dynsec
        self._password_file = password_file
        self._probe_timeout_s = probe_timeout_s
        self._chosen: CredentialManager | None = None
        self._lock = asyncio.Lock()

    @property
    def chosen(self) -> CredentialManager | None:
        return self._chosen

    async def _choose(self) -> CredentialManager:
        async with self._lock:
            if self._chosen is not None:
                return self._chosen
            if self._password_file is not None and await self._password_file.ping():
                log.info("broker credentials: password_file, tier %r", self._password_file.tier)
                await self._dynsec.close()
                self._chosen = self._password_file
                return self._chosen
            try:
                # A broker we cannot reach or log in to: raise BrokerUnreachable, decide later.
                await self._dynsec._connection(self._probe_timeout_s)
                answered = await self._dynsec.ping(self._probe_timeout_s)
            except BrokerUnreachable:
                raise
            except CredentialError:
                answered = False  # logged in, but $CONTROL is not ours: no dynsec here
            if answered:
                log.info("broker credentials: dynsec on %s", self._dynsec.host)
                self._chosen = self._dynsec
            else:
                log.warning(
                    "broker credentials: %s:%s gave no dynsec answer; device passwords are "
                    "not enforced by this broker",
                    self._dynsec.host,
                    self._dynsec.port,
                )
                await self._dynsec.close()
                self._chosen = NullCredentialManager()
            return self._chosen

    async def provision(self, device_ids: list[str]) -> dict[str, str]:
        return await (await self._choose()).provision(device_ids)

    async def revoke(self, device_ids: list[str]) -> None:
        await (await self._choose()).revoke(device_ids)

    async def ping(self) -> bool:
        try:
            return await (await self._choose()).ping()
        except CredentialError:
            return False

    async def close(self) -> None:
        if self._chosen is not None:
            await self._chosen.close()
        else:
            await self._dynsec.close()


CREDENTIAL_MODES = ("password_file", "dynsec", "none", "auto")


def make_credential_manager(settings: Any, db: Database | None = None) -> CredentialManager:
    """The manager ``settings.broker_credentials`` asks for (one of ``CREDENTIAL_MODES``).

    password_file writes through ``db`` (the process's PostgreSQL). For dynsec the admin login is
    the one in ``settings.mqtt_url`` (``mqtt://user:pass@host:port``, ``mqtts://`` for TLS): the
    service's own MQTT user, which holds the ``vpp-service`` role. auto: see
    :class:`AutoCredentialManager`.
    """
    from devices.mqtt import parse_mqtt_url  # the one URL parser of the project

    mode = str(getattr(settings, "broker_credentials", "auto")).lower()
    if mode not in CREDENTIAL_MODES:
        raise ValueError(
            f"broker_credentials: {mode!r} is not one of {', '.join(CREDENTIAL_MODES)}"
        )
    if mode == "none":
        return NullCredentialManager()
    tier = str(getattr(settings, "broker_tier", DEFAULT_TIER))
    apply_timeout_s = float(getattr(settings, "broker_apply_timeout_s", 60.0))
    if mode == "password_file":
        if db is None or db.is_sqlite:
            raise ValueError(
                "broker_credentials: password_file needs a PostgreSQL VPP_DATABASE_URL"
            )
        return PasswordFileCredentialManager(
            db, tier, apply_timeout_s=apply_timeout_s, kicker=_kicker(settings)
        )
    cfg = parse_mqtt_url(settings.mqtt_url, getattr(settings, "mqtt_ca_file", None))
    if cfg.is_memory or not cfg.username:
        if mode == "dynsec":
            raise ValueError(
                "broker_credentials: dynsec needs VPP_MQTT_URL mqtt(s)://user:pass@host:port"
            )
        return NullCredentialManager()
    dynsec = _dynsec_login(settings, cfg, "dynsec")
    if mode == "dynsec":
        return dynsec
    password_file = (
        PasswordFileCredentialManager(
            db, tier, apply_timeout_s=apply_timeout_s, kicker=_kicker(settings)
        )
        if db is not None and not db.is_sqlite
        else None
    )
    return AutoCredentialManager(dynsec, password_file=password_file)


def _kicker(settings: Any) -> DynsecCredentialManager | None:
    """The service's login on the broker's dynsec plugin (the password_file deny list), from
    ``settings.mqtt_url``; None for the in-process broker or a URL without a login."""
    from devices.mqtt import parse_mqtt_url

    cfg = parse_mqtt_url(settings.mqtt_url, getattr(settings, "mqtt_ca_file", None))
    if cfg.is_memory or not cfg.username:
        return None
    return _dynsec_login(settings, cfg, "deny", timeout_s=5.0)


def _dynsec_login(settings: Any, cfg: Any, purpose: str, **options: Any) -> DynsecCredentialManager:
    """A dynsec client on the service's own MQTT login (``cfg``: the parsed ``mqtt_url``)."""
    from devices.mqtt import tls_context

    return DynsecCredentialManager(
        cfg.host,
        cfg.port,
        cfg.username,
        cfg.password or "",
        tls=cfg.tls,
        tls_context=tls_context(cfg.ca_file) if cfg.tls else None,
        topic_root=getattr(settings, "topic_root", "vpp/v1"),
        client_id=f"{getattr(settings, 'mqtt_client_id_prefix', 'vpp-svc')}-{purpose}-"
        f"{secrets.token_hex(4)}",
        **options,
    )
