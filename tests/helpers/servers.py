"""Private servers for fault tests: a Redis and a PostgreSQL of a test's own, on free ports,
that the test may kill (``kill -9``), stop and start again on the same port. The shared servers
on 127.0.0.1:6379 and :5432 are never touched.

    with private_redis() as r:          # redis-server, nothing on disk (as on these machines)
        settings = make_settings(..., redis_url=r.url)
        r.kill(); r.start()             # lost and replaced by an empty one

    with private_postgres() as pg:      # initdb as the postgres user, trust auth, database "test"
        url = pg.url                    # postgresql+asyncpg://postgres@127.0.0.1:<port>/test
        pg.stop(immediate=True); pg.start()

A private Mosquitto is :func:`tests.helpers.mosquitto.run_mosquitto`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.mosquitto import free_port

_PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _wait_port(port: int, up: bool, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return True
        except OSError:
            if not up:
                return True
        time.sleep(0.05)
    return False


class PrivateRedis:
    """``redis-server`` on a free port with persistence off; ``kill()`` then ``start()`` is a
    Redis lost and replaced by an empty one."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not _wait_port(self.port, up=True):
            raise RuntimeError(f"private redis did not start on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        _wait_port(self.port, up=False)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    with tempfile.TemporaryDirectory(prefix="vpp-redis-") as d:
        r = PrivateRedis(Path(d))
        r.start()
        try:
            yield r
        finally:
            r.kill()


def postgres_available() -> bool:
    return bool(_PG_BIN_DIRS) and (_PG_BIN_DIRS[0] / "initdb").exists()


class PrivatePostgres:
    """A PostgreSQL cluster made with ``initdb`` in a temporary directory, run as the postgres
    user (the server refuses root) on a free port, trust auth, database ``test``.

    ``fsync`` is off (fast; a killed server loses nothing, the OS still holds its writes), but
    ``synchronous_commit`` stays on: off, ``stop(immediate=True)`` would lose the transactions
    committed in the last few hundred ms, which a durability test must not mistake for a bug."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.bin = _PG_BIN_DIRS[0]
        self._user = pwd.getpwnam("postgres")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/test"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        uid, gid = self._user.pw_uid, self._user.pw_gid

        def demote() -> None:  # pragma: no cover - runs in the child
            os.setgid(gid)
            os.setuid(uid)

        return subprocess.run(
            list(args), preexec_fn=demote if os.geteuid() == 0 else None, check=check,
            capture_output=True, timeout=120, cwd=str(self.workdir),
        )  # fmt: skip

    def init(self) -> None:
        os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "-A", "trust", "--no-sync", "-E", "UTF8")  # fmt: skip
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.workdir}'\nfsync = off\n"
                "full_page_writes = off\nmax_connections = 200\n"
            )

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l",
                  str(self.workdir / "log"), "-w", "-t", "60", "start")  # fmt: skip
        if not _wait_port(self.port, up=True):
            raise RuntimeError(f"private postgres did not start on {self.port}")

    def create_database(self, name: str = "test") -> None:
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", name)  # fmt: skip

    def stop(self, immediate: bool = True) -> None:
        mode = "immediate" if immediate else "fast"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                  "stop", check=False)  # fmt: skip
        _wait_port(self.port, up=False)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    with tempfile.TemporaryDirectory(prefix="vpp-pg-") as d:
        pg = PrivatePostgres(Path(d))
        pg.init()
        pg.start()
        pg.create_database("test")
        try:
            yield pg
        finally:
            pg.stop(immediate=True)
