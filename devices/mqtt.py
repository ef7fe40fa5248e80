"""MQTT transport: one small client interface over two implementations.

- :class:`PahoClient`: paho-mqtt 2.x speaking MQTT 5 to Mosquitto (or any MQTT 5 broker). paho
  runs its network loop in its own thread and reconnects with exponential backoff; subscriptions
  are re-made on every reconnect. We use paho rather than aiomqtt on the hot paths because its
  receive rate is about twice aiomqtt's here (see bench/ingest.py), and we hand messages to
  asyncio in batches, not one by one.
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
import itertools
import logging
import ssl
import threading
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
