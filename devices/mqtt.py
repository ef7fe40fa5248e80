"""MQTT transport: one small client interface over two implementations.

- :class:`PahoClient`: paho-mqtt 2.x speaking MQTT 5 to Mosquitto (or any MQTT 5 broker). paho
  runs its network loop in its own thread and reconnects with exponential backoff; subscriptions
  are re-made on every reconnect. We use paho rather than aiomqtt on the hot paths because its
  receive rate is about twice aiomqtt's here (see bench/ingest.py), and we hand messages to
  asyncio in batches, not one by one.
- :class:`PublisherPool` of :class:`PublishConnection`: the event runner's fan-out, QoS-1
  publishing only, on the asyncio loop, a few connections with the broker's in-flight window
  each; about ten times cheaper per message than paho (see the class).
- :class:`MemoryClient` on an :class:`InProcessBroker`: the embedded default (``memory://``) for a
  service that runs with nothing installed. It implements the parts of MQTT the service relies on:
  ``+``/``#`` filters, ``$share/<group>/`` shared subscriptions (round robin), retained messages
  and Last Will on disconnect.

Callbacks (``on_message(topic, payload)``) run on the client's network thread for paho and inline
for the memory broker: keep them short (append to a buffer) and do the work elsewhere.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], None]
OutMessage = tuple[str, bytes, int, bool]  # topic, payload, qos, retain


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    # PEM file of the CA(s) that sign the broker's certificate (mqtts://); None: the system's.
    ca_file: str | None = None

    @property
    def is_memory(self) -> bool:
        return self.host == "" and self.port == 0


def parse_mqtt_url(url: str, ca_file: str | None = None) -> MqttConfig:
    """``mqtt://user:pass@host:1883``, ``mqtts://…`` (TLS, default port 8883), or ``memory://``.
    ``ca_file`` (``VPP_MQTT_CA_FILE``) is the CA that a TLS connection verifies the broker
    against."""
    if url.startswith("memory://"):
        return MqttConfig("", 0, None, None, False)
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(
            f"VPP_MQTT_URL: unsupported scheme {parsed.scheme!r} (mqtt, mqtts, memory)"
        )
    tls = parsed.scheme in ("mqtts", "ssl")
    return MqttConfig(
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or (8883 if tls else 1883),
        username=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        tls=tls,
        ca_file=ca_file or None,
    )


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker's certificate and host name against
    ``ca_file`` (or the system's CAs). A missing or unreadable file fails here, naming it."""
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"VPP_MQTT_CA_FILE: cannot load {ca_file!r} ({exc})") from exc
    return ssl.create_default_context()


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` and ``#`` ($-topics never match a leading wildcard)."""
    if topic.startswith("$") and filter_[:1] in ("+", "#"):
        return False
    f_parts = filter_.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


class MqttClient(abc.ABC):
    """What the service needs from an MQTT client."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.on_message: OnMessage | None = None
        # Successful connections so far: a change tells a user of the client that it reconnected
        # (the event runner then re-sends what is still unacknowledged).
        self.connects = 0

    @abc.abstractmethod
    async def connect(self, timeout_s: float = 10.0) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, filters: list[str], qos: int = 1) -> None:
        """Subscribe (and re-subscribe after every reconnect)."""

    @abc.abstractmethod
    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        """Queue a publish; returns at once."""

    @abc.abstractmethod
    async def publish_many(self, messages: Iterable[OutMessage]) -> int:
        """Publish; wait until the broker accepted every QoS ≥ 1 message. Returns the count."""

    @abc.abstractmethod
    async def disconnect(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...


# --- In-process broker -------------------------------------------------------------------------
class InProcessBroker:
    """A minimal MQTT broker living inside the process (embedded default)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._subs: dict[str, list[tuple[str, MemoryClient]]] = {}  # filter -> [(group, client)]
        self._shared_rr: dict[tuple[str, str], itertools.count[int]] = {}
        self._retained: dict[str, bytes] = {}
        self.clients: dict[str, MemoryClient] = {}
        # Per-device credentials when onboarding provisions them (NullCredentialManager leaves
        # this empty and the in-process broker then trusts every client, as it is in-process).
        self.passwords: dict[str, str] = {}

    def attach(self, client: MemoryClient) -> None:
        with self._lock:
            old = self.clients.get(client.client_id)
            if old is not None and old is not client:
                self.detach(old, clean=False)
            self.clients[client.client_id] = client

    def detach(self, client: MemoryClient, clean: bool) -> None:
        with self._lock:
            if self.clients.get(client.client_id) is client:
                del self.clients[client.client_id]
            for subs in self._subs.values():
                subs[:] = [(g, c) for g, c in subs if c is not client]
        if not clean and client.will is not None:
            self.publish(*client.will)

    def subscribe(self, client: MemoryClient, filter_: str) -> None:
        group = ""
        if filter_.startswith("$share/"):
            _, group, filter_ = filter_.split("/", 2)
        with self._lock:
            self._subs.setdefault(filter_, []).append((group, client))
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(filter_, t)]
        if not group:
            for topic, payload in retained:
                client.deliver(topic, payload)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if retain:
            with self._lock:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
        targets: list[MemoryClient] = []
        with self._lock:
            for filter_, subs in self._subs.items():
                if not subs or not topic_matches(filter_, topic):
                    continue
                groups: dict[str, list[MemoryClient]] = {}
                for group, client in subs:
                    if group:
                        groups.setdefault(group, []).append(client)
                    else:
                        targets.append(client)
                for group, members in groups.items():
                    rr = self._shared_rr.setdefault((filter_, group), itertools.count())
                    targets.append(members[next(rr) % len(members)])
        for client in dict.fromkeys(targets):  # one copy per client even with overlapping filters
            client.deliver(topic, payload)


_default_broker: InProcessBroker | None = None


def default_broker() -> InProcessBroker:
    global _default_broker
    if _default_broker is None:
        _default_broker = InProcessBroker()
    return _default_broker


class MemoryClient(MqttClient):
    def __init__(
        self,
        client_id: str,
        broker: InProcessBroker | None = None,
        will: OutMessage | None = None,
    ) -> None:
        super().__init__(client_id)
        self.broker = broker or default_broker()
        self.will = will
        self._connected = False
        self._filters: list[str] = []

    async def connect(self, timeout_s: float = 10.0) -> None:
        self.broker.attach(self)
        self._connected = True
        self.connects += 1
        for f in self._filters:
            self.broker.subscribe(self, f)

    async def subscribe(self, filters: list[str], qos: int = 1) -> None:
        self._filters.extend(filters)
        if self._connected:
            for f in filters:
                self.broker.subscribe(self, f)

    def deliver(self, topic: str, payload: bytes) -> None:
        cb = self.on_message
        if cb is not None:
            try:
                cb(topic, payload)
            except Exception:  # a subscriber's bug must not break the publisher
                log.exception("on_message failed for %s", topic)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        if not self._connected:
            raise ConnectionError("not connected")
        self.broker.publish(topic, payload, qos, retain)

    async def publish_many(self, messages: Iterable[OutMessage]) -> int:
        n = 0
        for topic, payload, qos, retain in messages:
            self.publish_nowait(topic, payload, qos, retain)
            n += 1
            if n % 5000 == 0:
                await asyncio.sleep(0)  # let consumers run during a big fan-out
        return n

    async def disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self.broker.detach(self, clean=True)

    def drop(self) -> None:
        """Simulate a lost connection: the broker publishes the Last Will."""
        if self._connected:
            self._connected = False
            self.broker.detach(self, clean=False)

    @property
    def connected(self) -> bool:
        return self._connected


# --- paho-mqtt (real brokers) --------------------------------------------------------------------
_buffered_paho_class: type | None = None


def buffered_paho_class() -> type:
    """paho's ``Client`` with buffered socket reads.

    Stock paho reads each incoming packet with at least three ``recv`` calls (one byte of
    header, the length byte by byte, then the body) and one ``select`` per packet: at tens of
    thousands of small QoS-0 messages a second that is most of its cost. This subclass reads up
    to 256 KiB per ``recv`` and serves paho's small reads from that buffer, and keeps parsing
    while whole packets are buffered (``select`` cannot see them). Same protocol code otherwise.
    """
    global _buffered_paho_class
    if _buffered_paho_class is not None:
        return _buffered_paho_class
    import paho.mqtt.client as paho

    class BufferedPahoClient(paho.Client):  # type: ignore[misc]
        _rbuf: bytes = b""
        _rpos: int = 0

        def _sock_recv(self, bufsize: int) -> bytes:
            if self._rpos >= len(self._rbuf):
                data = super()._sock_recv(262_144)  # raises BlockingIOError when none is there
                if not data:
                    return b""  # connection closed
                self._rbuf = data
                self._rpos = 0
            pos = self._rpos
            out = self._rbuf[pos : pos + bufsize]
            self._rpos = pos + len(out)
            return out

        def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
            rc = super().loop_read(max_packets)
            while (
                rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS
                and self._rpos < len(self._rbuf)
                and self._sock is not None
            ):
                rc = super().loop_read(max_packets)
            return rc

        def reconnect(self) -> paho.MQTTErrorCode:
            self._rbuf = b""  # bytes of the old connection must not reach the new one
            self._rpos = 0
            return super().reconnect()

    _buffered_paho_class = BufferedPahoClient
    return BufferedPahoClient


class PahoClient(MqttClient):
    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        will: OutMessage | None = None,
        max_inflight: int = 1000,
        clean_start: bool = True,
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        super().__init__(client_id)
        self.config = config
        self._filters: list[tuple[str, int]] = []
        self._connected_evt = threading.Event()
        self._connect_rc: object = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._acked_early: set[int] = set()  # PUBACKs that beat the registration of their future
        self._pending_lock = threading.RLock()
        c = buffered_paho_class()(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        if config.username:
            c.username_pw_set(config.username, config.password)
        if config.tls:
            c.tls_set_context(tls_context(config.ca_file))
        if will is not None:
            topic, payload, qos, retain = will
            c.will_set(topic, payload, qos, retain)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # unbounded client-side queue: never drop silently
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._subscribed_evt = threading.Event()  # SUBACK of the latest (re)subscription
        self._clean_start = clean_start
        self.client = c

    # callbacks run on paho's thread
    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        self._connect_rc = reason_code
        if not reason_code.is_failure:
            self.connects += 1
            if self._filters:
                self._subscribed_evt.clear()
                client.subscribe([(f, q) for f, q in self._filters])
            else:
                self._subscribed_evt.set()
            self._connected_evt.set()
        else:
            log.warning("MQTT connect refused for %s: %s", self.client_id, reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        self._connected_evt.clear()
        if reason_code is not None and getattr(reason_code, "value", 0) != 0:
            log.warning("MQTT %s disconnected: %s (reconnecting)", self.client_id, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        bad = [rc for rc in reason_codes if rc.is_failure]
        if bad:
            log.warning("MQTT %s: subscription refused: %s", self.client_id, bad)
        self._subscribed_evt.set()

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        cb = self.on_message
        if cb is not None:
            try:
                cb(msg.topic, msg.payload)
            except Exception:
                log.exception("on_message failed for %s", msg.topic)

    def _on_publish(self, client, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        with self._pending_lock:
            fut = self._pending.pop(mid, None)
            if fut is None:
                self._acked_early.add(mid)
        if fut is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, fut)

    async def connect(self, timeout_s: float = 10.0) -> None:
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

        self._loop = asyncio.get_running_loop()
        self.client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=30,
            clean_start=True if self._clean_start else MQTT_CLEAN_START_FIRST_ONLY,
        )
        self.client.loop_start()
        ok = await asyncio.to_thread(self._connected_evt.wait, timeout_s)
        if ok and self._filters:
            # Return once the broker has confirmed the subscriptions: messages published after
            # connect() returns then reach this client.
            await asyncio.to_thread(self._subscribed_evt.wait, timeout_s)
        if not ok:
            self.client.loop_stop()
            rc = self._connect_rc
            raise ConnectionError(
                f"MQTT connect to {self.config.host}:{self.config.port} failed: {rc}"
            )

    async def subscribe(self, filters: list[str], qos: int = 1) -> None:
        new = [(f, qos) for f in filters]
        self._filters.extend(new)
        if self._connected_evt.is_set():
            self._subscribed_evt.clear()
            self.client.subscribe(new)
            await asyncio.to_thread(self._subscribed_evt.wait, 10.0)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        self.client.publish(topic, payload, qos, retain)

    async def publish_many(self, messages: Iterable[OutMessage]) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        futures: list[asyncio.Future[None]] = []
        n = 0
        for topic, payload, qos, retain in messages:
            if qos > 0:
                fut: asyncio.Future[None] = loop.create_future()
                info = self.client.publish(topic, payload, qos, retain)
                with self._pending_lock:
                    if info.mid in self._acked_early:
                        self._acked_early.discard(info.mid)
                        fut.set_result(None)
                    else:
                        self._pending[info.mid] = fut
                futures.append(fut)
            else:
                self.client.publish(topic, payload, qos, retain)
            n += 1
        if futures:
            await asyncio.gather(*futures)
        return n

    async def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._connected_evt.clear()

    @property
    def connected(self) -> bool:
        return self._connected_evt.is_set()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def make_client(
    url: str,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    will: OutMessage | None = None,
    broker: InProcessBroker | None = None,
    clean_start: bool = True,
    ca_file: str | None = None,
) -> MqttClient:
    """A client for ``VPP_MQTT_URL``; ``username``/``password`` override the URL's (devices);
    ``ca_file`` verifies a TLS broker (``VPP_MQTT_CA_FILE``)."""
    cfg = parse_mqtt_url(url, ca_file)
    if cfg.is_memory:
        return MemoryClient(client_id, broker=broker, will=will)
    if username is not None:
        cfg = MqttConfig(cfg.host, cfg.port, username, password, cfg.tls, cfg.ca_file)
    return PahoClient(cfg, client_id, will=will, clean_start=clean_start)


# --- QoS-1 publisher (the event runner's fan-out) ----------------------------------------------
# MQTT 5 packet types and the CONNACK property sizes the publisher must skip over.
_CONNACK, _PUBACK, _PINGRESP, _DISCONNECT = 2, 4, 13, 14
_PROP_FIXED = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x17: 1, 0x19: 1, 0x21: 2, 0x22: 2,
               0x23: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}  # fmt: skip
_PROP_STRING = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}  # u16 length + bytes
_PROP_PAIR = 0x26  # user property: two strings
_PROP_RECEIVE_MAXIMUM = 0x21
_PROP_SERVER_KEEPALIVE = 0x13


def _varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the buffer ends inside it."""
    value = shift = 0
    while pos < len(buf):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("malformed remaining length")
    return None


def _str16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _connack_properties(body: bytes) -> dict[int, int]:
    """The integer properties of a CONNACK's property block (strings are skipped)."""
    got = _read_varint(body, 2)
    if got is None:
        return {}
    length, pos = got
    end = pos + length
    out: dict[int, int] = {}
    while pos < end:
        pid = body[pos]
        pos += 1
        if pid in _PROP_FIXED:
            size = _PROP_FIXED[pid]
            out[pid] = int.from_bytes(body[pos : pos + size], "big")
            pos += size
        elif pid in _PROP_STRING:
            pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        elif pid == _PROP_PAIR:
            for _ in range(2):
                pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        else:
            break  # unknown property: what we need came first or is absent
    return out


class _Job:
    """One publish_many call's share on one connection: resolved when its last PUBACK came."""

    __slots__ = ("fut", "remaining")

    def __init__(self, fut: asyncio.Future[None], remaining: int) -> None:
        self.fut = fut
        self.remaining = remaining

    def one_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0 and not self.fut.done():
            self.fut.set_result(None)


class PublishConnection(asyncio.Protocol):
    """One MQTT 5 connection that only publishes, on the asyncio loop.

    Why not paho here: paho spends 60-180 µs of CPU per QoS-1 message on this kind of machine
    (one ``send`` per packet, a Properties and two ReasonCodes objects per PUBACK, a scan of the
    in-flight list per PUBACK; ``bench/fanout.py`` measures it as the peer), so one Python core
    cannot send a million commands a minute through it. This connection encodes a window of
    PUBLISH packets with one ``bytes.join`` and one ``write``, and parses every PUBACK in a
    read in one pass. Flow control is the broker's Receive Maximum from the CONNACK (Mosquitto's
    ``max_inflight_messages``), capped by ``max_inflight``.

    Delivery: every QoS-1 message stays in flight (its encoded packet kept) until its PUBACK;
    after a lost connection the publisher reconnects (1 s doubling to 30 s) and sends every
    in-flight packet again with the DUP flag, then the queue, in the original order, so a
    ``publish_many`` call returns only when the broker accepted all of its messages.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        max_inflight: int = 100,
        keepalive_s: int = 30,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.max_inflight = max_inflight
        self.keepalive_s = keepalive_s
        self.window = max_inflight
        self.connects = 0
        self.refused = 0  # PUBACKs with a failure reason code (e.g. 0x87 not authorized)
        self._queue: collections.deque[tuple[bytes, bytes, int, bool, _Job | None]] = (
            collections.deque()
        )
        self._inflight: dict[int, tuple[bytes, _Job]] = {}  # packet id → (packet, job)
        self._next_mid = 1
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._connected = False
        self._closing = False
        self._connack: asyncio.Future[int] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._last_write = self._last_read = 0.0

    # --- connection ------------------------------------------------------------------------
    def _connect_packet(self) -> bytes:
        cfg = self.config
        flags = 0x02  # clean start: the publisher keeps its own in-flight state
        payload = _str16(self.client_id.encode())
        if cfg.username:
            flags |= 0x80
            payload += _str16(cfg.username.encode())
            if cfg.password is not None:
                flags |= 0x40
                payload += _str16(cfg.password.encode())
        body = b"\x00\x04MQTT\x05" + bytes((flags,)) + self.keepalive_s.to_bytes(2, "big")
        body += b"\x00" + payload  # no CONNECT properties
        return b"\x10" + _varint(len(body)) + body

    async def connect(self, timeout_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        cfg = self.config
        ssl_ctx = tls_context(cfg.ca_file) if cfg.tls else None
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: self,
                    cfg.host,
                    cfg.port,
                    ssl=ssl_ctx,
                    server_hostname=cfg.host if ssl_ctx is not None else None,
                ),
                timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"MQTT connect to {cfg.host}:{cfg.port} failed: {exc}") from exc
        self._connack = loop.create_future()
        assert self._transport is not None
        self._transport.write(self._connect_packet())
        try:
            rc = await asyncio.wait_for(asyncio.shield(self._connack), timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            self._abort()
            raise ConnectionError(
                f"MQTT connect to {cfg.host}:{cfg.port} failed: no CONNACK ({exc!r})"
            ) from exc
        if rc != 0:
            self._abort()
            raise ConnectionError(
                f"MQTT connect to {cfg.host}:{cfg.port} refused: reason code 0x{rc:02x}"
            )
        if self._keepalive_task is None or self._keepalive_task.done():
            self._keepalive_task = loop.create_task(self._keepalive(), name=f"{self.client_id}-ka")

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, hence no check).
        self._transport = transport  # type: ignore[assignment]
        self._buf.clear()
        self._last_read = self._last_write = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self._connected
        self._connected = False
        self._transport = None
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"connection lost ({exc})"))
        if self._closing:
            return
        if was:
            log.warning("MQTT %s: connection lost (%s); reconnecting", self.client_id, exc)
            if self._reconnect_task is None or self._reconnect_task.done():
                self._reconnect_task = asyncio.get_running_loop().create_task(
                    self._reconnect(), name=f"{self.client_id}-reconnect"
                )

    async def _reconnect(self) -> None:
        delay = 1.0
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self.connect(timeout_s=10.0)
                log.warning("MQTT %s: reconnected", self.client_id)
                return
            except ConnectionError as exc:
                log.info("MQTT %s: still not reachable (%s)", self.client_id, exc)
                delay = min(delay * 2, 30.0)

    async def _keepalive(self) -> None:
        """PINGREQ when idle for half the keepalive; a connection silent for 1.5 keepalives is
        dead (a half-open TCP connection never reports itself)."""
        period = self.keepalive_s / 2
        while not self._closing:
            await asyncio.sleep(min(period, 1.0))
            if not self._connected or self._transport is None:
                continue
            now = time.monotonic()
            if now - self._last_read > 1.5 * self.keepalive_s:
                log.warning("MQTT %s: broker silent; dropping the connection", self.client_id)
                self._abort()
            elif now - self._last_write > period:
                self._write(b"\xc0\x00")

    async def disconnect(self) -> None:
        self._closing = True
        for task in (self._reconnect_task, self._keepalive_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._transport is not None:
            if self._connected:
                self._transport.write(b"\xe0\x00")  # DISCONNECT, normal
            self._transport.close()
        self._connected = False
        # Nobody is left to wait for: publish_many callers get an error, not a hang.
        err = ConnectionError(f"MQTT {self.client_id}: disconnected")
        jobs = {id(j): j for _, j in self._inflight.values()}
        jobs.update({id(m[4]): m[4] for m in self._queue if m[4] is not None})
        for job in jobs.values():
            if not job.fut.done():
                job.fut.set_exception(err)
        self._inflight.clear()
        self._queue.clear()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._inflight)

    # --- sending ---------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self._last_write = time.monotonic()

    def enqueue(
        self, topic: bytes, payload: bytes, qos: int, retain: bool, job: _Job | None
    ) -> None:
        self._queue.append((topic, payload, qos, retain, job))

    def pump(self) -> None:
        """Send from the queue while the window has room (one write for all of them)."""
        if not self._connected or not self._queue:
            return
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        out: list[bytes] = []
        queue, inflight = self._queue, self._inflight
        mid = self._next_mid
        while queue and room > 0:
            topic, payload, qos, retain, job = queue.popleft()
            head = 0x30 | (1 if retain else 0)
            if qos:
                while mid in inflight:
                    mid = mid % 65535 + 1
                body = _str16(topic) + mid.to_bytes(2, "big") + b"\x00" + payload
                packet = bytes((head | 0x02,)) + _varint(len(body)) + body
                assert job is not None
                inflight[mid] = (packet, job)
                mid = mid % 65535 + 1
                room -= 1
            else:
                body = _str16(topic) + b"\x00" + payload
                packet = bytes((head,)) + _varint(len(body)) + body
            out.append(packet)
        self._next_mid = mid
        self._write(b"".join(out))

    # --- receiving -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        acked = 0
        inflight = self._inflight
        while pos + 2 <= n:
            first = buf[pos]
            if buf[pos + 1] < 128:
                length, start = buf[pos + 1], pos + 2
            else:
                got = _read_varint(buf, pos + 1)
                if got is None:
                    break
                length, start = got
            end = start + length
            if end > n:
                break
            kind = first >> 4
            if kind == _PUBACK:
                mid = (buf[start] << 8) | buf[start + 1]
                if length > 2 and buf[start + 2] >= 0x80:
                    self.refused += 1
                    log.warning(
                        "MQTT %s: publish refused by the broker (reason 0x%02x)",
                        self.client_id,
                        buf[start + 2],
                    )
                entry = inflight.pop(mid, None)
                if entry is not None:
                    entry[1].one_done()
                    acked += 1
            elif kind == _CONNACK:
                self._on_connack(bytes(buf[start:end]))
            elif kind == _DISCONNECT:
                reason = buf[start] if length else 0
                log.warning("MQTT %s: broker disconnected us (0x%02x)", self.client_id, reason)
            # PINGRESP and anything else: nothing to do
            pos = end
        del buf[:pos]
        if acked:
            self.pump()

    def _on_connack(self, body: bytes) -> None:
        rc = body[1] if len(body) > 1 else 0xFF
        if rc == 0:
            props = _connack_properties(body)
            self.window = max(1, min(self.max_inflight, props.get(_PROP_RECEIVE_MAXIMUM, 65535)))
            self.keepalive_s = props.get(_PROP_SERVER_KEEPALIVE, self.keepalive_s) or 30
            self._connected = True
            self.connects += 1
            if self._inflight:
                # The old connection's unacknowledged packets first, flagged DUP, same order.
                again = [bytes((p[0] | 0x08,)) + p[1:] for p, _ in self._inflight.values()]
                self._write(b"".join(again))
            self.pump()
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)


class PublisherPool(MqttClient):
    """Several :class:`PublishConnection` s, each message on the one its topic hashes to (so
    one device's commands keep their order): the broker's in-flight window per connection,
    times ``connections``. Publishing only (``subscribe`` is refused)."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        connections: int = 4,
        max_inflight: int = 100,
    ) -> None:
        if connections < 1:
            raise ValueError("VPP_MQTT_PUBLISH_CONNECTIONS: must be at least 1")
        if max_inflight < 1:
            raise ValueError("VPP_MQTT_PUBLISH_INFLIGHT: must be at least 1")
        super().__init__(client_id)
        self.members = [
            PublishConnection(config, f"{client_id}-{k}", max_inflight=max_inflight)
            for k in range(connections)
        ]

    @property  # type: ignore[override]
    def connects(self) -> int:
        return sum(m.connects for m in self.members)

    @connects.setter
    def connects(self, value: int) -> None:  # MqttClient.__init__ sets 0
        pass

    async def connect(self, timeout_s: float = 10.0) -> None:
        todo = [m for m in self.members if not m.connected]
        results = await asyncio.gather(
            *(m.connect(timeout_s) for m in todo), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ConnectionError(f"{len(errors)} of {len(todo)} connections failed: {errors[0]}")

    async def subscribe(self, filters: list[str], qos: int = 1) -> None:
        raise TypeError("PublisherPool only publishes; subscribe with mqtt_client()")

    def _member(self, topic: bytes) -> PublishConnection:
        return self.members[zlib.crc32(topic) % len(self.members)]

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        tb = topic.encode()
        m = self._member(tb)
        job = None
        if qos:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # Nobody awaits it: a failure at disconnect is retrieved here, not logged as lost.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            job = _Job(fut, 1)
        m.enqueue(tb, payload, qos, retain, job)
        m.pump()

    async def publish_many(self, messages: Iterable[OutMessage]) -> int:
        loop = asyncio.get_running_loop()
        members = self.members
        k = len(members)
        crc = zlib.crc32
        jobs: list[_Job | None] = [None] * k
        counts = [0] * k
        n = 0
        for topic, payload, qos, retain in messages:
            tb = topic.encode()
            i = crc(tb) % k
            job = None
            if qos:
                job = jobs[i]
                if job is None:
                    job = jobs[i] = _Job(loop.create_future(), 0)
                job.remaining += 1
            members[i]._queue.append((tb, payload, qos, retain, job))
            counts[i] += 1
            n += 1
        for i, m in enumerate(members):
            if counts[i]:
                m.pump()
        waits = [j.fut for j in jobs if j is not None and j.remaining > 0]
        if waits:
            await asyncio.gather(*waits)
        return n

    async def disconnect(self) -> None:
        await asyncio.gather(*(m.disconnect() for m in self.members))

    @property
    def connected(self) -> bool:
        return all(m.connected for m in self.members)

    @property
    def refused(self) -> int:
        return sum(m.refused for m in self.members)


def make_publisher(
    url: str,
    client_id: str,
    *,
    connections: int = 4,
    max_inflight: int = 100,
    broker: InProcessBroker | None = None,
    ca_file: str | None = None,
) -> MqttClient:
    """The event runner's publisher for ``VPP_MQTT_URL``: a :class:`PublisherPool` of
    ``connections`` (``VPP_MQTT_PUBLISH_CONNECTIONS``) with ``max_inflight``
    (``VPP_MQTT_PUBLISH_INFLIGHT``) each, or one in-process client for ``memory://``."""
    cfg = parse_mqtt_url(url, ca_file)
    if cfg.is_memory:
        return MemoryClient(client_id, broker=broker)
    return PublisherPool(cfg, client_id, connections=connections, max_inflight=max_inflight)
