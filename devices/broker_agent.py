"""The broker agent: makes the device logins in PostgreSQL live in one Mosquitto's password file.

Runs beside a Mosquitto (same host or pod: a shared volume for the file, a shared process
namespace for the signal), as ``vpp broker-agent``. It loads every live login once (one COPY),
then loops:

1. read the rows of ``broker_logins`` with a generation above the one applied (the service's
   writers commit generations in order, so nothing committed late is skipped);
2. apply them to its in-memory logins (a NULL hash removes one);
3. write the password file atomically (temporary file + rename): the base file (the service's
   and gateways' logins, from deploy), a canary login with a new random password, then every
   device line, joined in one piece;
4. SIGHUP the broker, which re-reads the file and disconnects every client whose login is gone;
5. log in as the canary with the new password until the broker accepts it: the reload is done;
6. record the generation as applied in ``broker_tier`` (what ``provision``/``revoke`` wait for).

Everything pending when a turn starts goes into one reload, so a burst of onboardings costs one
reload, not one each. A database or broker that is down is logged once and retried; the agent
never exits on it. A password file that disappears (a broker restarted from an empty volume) is
written again from memory on the next turn.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from devices.credentials import SALT_BYTES, new_password
from store.database import Database

log = logging.getLogger(__name__)

CANARY_USERNAME = "vpp-canary"


@dataclass
class AgentConfig:
    database_url: str
    password_file: Path
    tier: str = "default"
    base_file: Path | None = None  # lines copied first (service, gateways): deploy's init script
    broker_pid: int | None = None
    broker_pid_file: Path | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    canary_username: str = CANARY_USERNAME
    poll_s: float = 0.05  # how often to look for new rows when idle
    reload_timeout_s: float = 120.0  # how long a reload may take before it is signalled again


@dataclass
class AgentStats:
    reloads: int = 0
    last_reload_s: float = 0.0  # from the file write to the canary accepted
    last_write_s: float = 0.0
    logins: int = 0
    errors: list[str] = field(default_factory=list)


def canary_line(username: str, password: str) -> bytes:
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return b"%s:$6$%s$%s\n" % (username.encode(), base64.b64encode(salt), base64.b64encode(digest))


def parse_login_lines(data: bytes) -> dict[bytes, bytes]:
    """``device_id:hash`` lines (COPY text output) -> {device_id: its whole line}."""
    out: dict[bytes, bytes] = {}
    for line in data.splitlines(keepends=True):
        user, sep, _ = line.partition(b":")
        if sep:
            out[user] = line if line.endswith(b"\n") else line + b"\n"
    return out


async def try_login(
    host: str, port: int, username: str, password: str, timeout_s: float
) -> int | None:
    """One MQTT 3.1.1 CONNECT: the CONNACK's return code (0 accepted, then DISCONNECT), or None
    when the broker does not answer."""

    def field_(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b

    client_id = f"vpp-agent-canary-{secrets.token_hex(3)}".encode()
    body = (
        field_(b"MQTT")
        + bytes([4, 0xC2])  # protocol level 4; username, password, clean session
        + struct.pack("!H", 10)
        + field_(client_id)
        + field_(username.encode())
        + field_(password.encode())
    )
    length = b""
    n = len(body)
    while True:  # the MQTT variable-length "remaining length"
        digit, n = n % 128, n // 128
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"\x10" + length + body)
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), timeout_s)
        if connack[0] != 0x20:
            return None
        if connack[3] == 0:
            writer.write(b"\xe0\x00")
            await writer.drain()
        return connack[3]
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class BrokerAgent:
    def __init__(self, config: AgentConfig, db: Database | None = None) -> None:
        self.config = config
        self.db = db or Database(config.database_url)
        self._own_db = db is None
        self.logins: dict[bytes, bytes] = {}
        self.applied: int | None = None  # generation held in memory (None: not loaded yet)
        self.written: int | None = None  # generation the broker has confirmed
        self.stats = AgentStats()
        self._stop = asyncio.Event()
        self._down: str | None = None  # the failure logged last: log a failure once
        self._written_stat: tuple[int, int, int] | None = None
        self._pending: str | None = None  # the canary password of a reload not yet confirmed
        self._pending_started = 0.0

    # -- pieces --
    async def _fetch(self, since: int) -> tuple[int, bytes]:
        """The rows with a generation above ``since`` as ``device_id:hash`` lines (``\\N`` for a
        revoked one), by COPY, and the highest generation, in one snapshot."""
        async with self.db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            chunks: list[bytes] = []

            async def sink(data: bytes) -> None:
                chunks.append(data)

            async with driver.transaction(isolation="repeatable_read", readonly=True):
                top = await driver.fetchval(
                    "SELECT coalesce(max(generation), 0) FROM broker_logins"
                )
                if int(top) > since:
                    # COPY's text format with ':' as the delimiter writes password-file lines.
                    live = " AND password_hash IS NOT NULL" if since == 0 else ""  # first load
                    await driver.copy_from_query(
                        "SELECT device_id, password_hash FROM broker_logins "
                        f"WHERE generation > $1{live}",
                        since,
                        output=sink,
                        format="text",
                        delimiter=":",
                    )
        return int(top), b"".join(chunks)

    async def load_all(self) -> None:
        """Every live login and the generation they make up, in one snapshot."""
        top, data = await self._fetch(0)
        self.logins = parse_login_lines(data)
        self.applied = top
        self.stats.logins = len(self.logins)
        log.info("broker agent: %d logins loaded, generation %d", len(self.logins), self.applied)

    async def read_changes(self) -> int:
        """Apply the rows written since ``applied``; the number of rows."""
        assert self.applied is not None
        top, data = await self._fetch(self.applied)
        if top <= self.applied:
            return 0
        logins = self.logins
        lines = data.splitlines(keepends=True)
        for line in lines:
            user, _, rest = line.partition(b":")
            if rest.startswith(b"\\N"):
                logins.pop(user, None)
            else:
                logins[user] = line
        self.applied = top
        self.stats.logins = len(logins)
        return len(lines)

    def write_file(self, canary_password: str) -> None:
        """The whole password file, atomically: base lines, the canary, every device."""
        started = time.perf_counter()
        path = self.config.password_file
        base = b""
        if self.config.base_file is not None and self.config.base_file.exists():
            base = self.config.base_file.read_bytes()
            if base and not base.endswith(b"\n"):
                base += b"\n"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(base)
            f.write(canary_line(self.config.canary_username, canary_password))
            f.write(b"".join(self.logins.values()))
        os.chmod(tmp, 0o644)  # the broker may run as another user of the pod
        os.replace(tmp, path)
        self._written_stat = _identity(path)
        self.stats.last_write_s = time.perf_counter() - started

    def _file_is_ours(self) -> bool:
        """The password file is the one this agent wrote last (not lost with a volume, nor
        re-seeded with the base logins only by the init step)."""
        try:
            return _identity(self.config.password_file) == self._written_stat
        except FileNotFoundError:
            return False

    def broker_pid(self) -> int | None:
        if self.config.broker_pid is not None:
            return self.config.broker_pid
        if self.config.broker_pid_file is not None:
            try:
                return int(self.config.broker_pid_file.read_text().strip())
            except (OSError, ValueError):
                return None
        return None

    async def reload_broker(self, canary_password: str) -> bool:
        """SIGHUP the broker and wait until the canary's new password is accepted.

        Signalled only once the broker has answered a CONNECT: Mosquitto 2.0.11 writes its pid
        file before it installs its signal handlers (and loads the password file in between), so
        a SIGHUP to a broker still starting would kill it. A broker that restarts reads the new
        file by itself; a new pid is signalled again in case it read the old one.
        """
        deadline = time.monotonic() + self.config.reload_timeout_s
        signalled: int | None = None
        while time.monotonic() < deadline and not self._stop.is_set():
            code = await try_login(
                self.config.broker_host,
                self.config.broker_port,
                self.config.canary_username,
                canary_password,
                timeout_s=max(1.0, deadline - time.monotonic()),
            )
            if code == 0:
                return True
            pid = self.broker_pid()
            if code is not None and pid is not None and pid != signalled:
                try:
                    os.kill(pid, signal.SIGHUP)
                    signalled = pid
                except ProcessLookupError:
                    pass  # gone: its successor reads the new file at start
                continue
            await asyncio.sleep(0.02)
        return False

    async def record_applied(self, generation: int) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO broker_tier (name, applied_generation, applied_at_ms) "
                    "VALUES (:name, :generation, :now) ON CONFLICT (name) DO UPDATE SET "
                    "applied_generation = EXCLUDED.applied_generation, "
                    "applied_at_ms = EXCLUDED.applied_at_ms"
                ),
                {
                    "name": self.config.tier,
                    "generation": generation,
                    "now": int(time.time() * 1000),
                },
            )

    async def step(self) -> bool:
        """One turn of the loop; True if it reloaded the broker.

        A reload that outlasts ``reload_timeout_s`` stays pending: the next turn waits for the
        same canary (and signals again only if the broker refuses it), rather than writing a new
        file, which would restart a slow reload forever.
        """
        if self._pending is None:
            if self.applied is None:
                await self.load_all()
            else:
                await self.read_changes()
            assert self.applied is not None
            if self.written == self.applied and self._file_is_ours():
                return False
            self._pending = new_password()
            self._pending_started = time.perf_counter()
            self.write_file(self._pending)
        elif not self._file_is_ours():
            self.write_file(self._pending)
        assert self.applied is not None
        if not await self.reload_broker(self._pending):
            raise RuntimeError(
                f"broker at {self.config.broker_host}:{self.config.broker_port} has not accepted "
                f"the canary login within {self.config.reload_timeout_s:.0f} s of a reload "
                "(still waiting)"
            )
        await self.record_applied(self.applied)
        self.written = self.applied
        self._pending = None
        self.stats.reloads += 1
        self.stats.last_reload_s = time.perf_counter() - self._pending_started
        log.info(
            "broker agent: generation %d live, %d logins, file %.2f s, reload %.2f s",
            self.applied,
            len(self.logins),
            self.stats.last_write_s,
            self.stats.last_reload_s,
        )
        return True

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                reloaded = await self.step()
                if self._down is not None:
                    log.warning("broker agent: recovered (%s)", self._down)
                    self._down = None
            except Exception as exc:  # the agent must outlive any outage
                reason = f"{type(exc).__name__}: {exc}"
                if self._down is None:
                    log.error("broker agent: %s; retrying", reason)
                self._down = reason
                self.stats.errors.append(reason)
                del self.stats.errors[:-20]
                reloaded = False
                await self._sleep(1.0)
            if not reloaded:
                await self._sleep(self.config.poll_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        self.stop()
        if self._own_db:
            await self.db.dispose()
