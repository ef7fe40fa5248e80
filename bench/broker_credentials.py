"""Per-device broker credentials at fleet scale, on a private Mosquitto 2.0.11 and database.

    .venv/bin/python bench/broker_credentials.py            # 100 000 onboarded, 1 000 000 tier
    .venv/bin/python bench/broker_credentials.py --small    # 1/20: 5 000 and 50 000

The chosen mechanism (VPP_BROKER_CREDENTIALS=password_file: logins in PostgreSQL, the broker agent,
SIGHUP, %u pattern ACLs), measured through the service's own onboarding path:

- ``onboard N devices with broker credentials: S s``: POST /v1/devices/bulk of N devices into an
  empty service, to the answer (the call returns once the agent has made the logins live);
  then a sample of the returned credentials logs in, to prove it.
- ``revoke one device in a M-device broker tier: S s``: the tier preloaded with M logins (one
  write, applied by the agent), one device connected; from ``revoke([id])`` to its return, and
  the live session is checked to be gone and the login refused. Revoke as deployed: the
  device goes on the broker's dynsec deny list at once; the peer in the same run is the same
  revoke waiting for the agent's reload of the whole password file instead.
- broker memory per device: the RSS of the mosquitto process with the base logins, then with
  the M logins loaded, difference / M.

And the peer measured in the same run, dynsec (the other mechanism): a broker preloaded with
S0 device clients and roles (written into its JSON before it starts), then the time to provision
K more through ``DynsecCredentialManager``; the cost per command per device already on the broker
gives the extrapolated onboarding of N devices from empty (sum over the fleet as it grows).

Needs PostgreSQL on 127.0.0.1:5432 (trust); it makes and drops a database of its own. Mosquitto
runs privately on free ports (tests/helpers/mosquitto.py); the shared servers are never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

# Run as a script, bench/ comes first on sys.path and its dispatch.py would shadow the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

PG_ADMIN = os.environ.get("VPP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = "vpp/v1"
REGIONS = ["ERCOT-NORTH", "ERCOT-HOUSTON", "CAISO-SP15", "PJM-DOM"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def battery_rows(n: int, prefix: str) -> list[dict[str, object]]:
    return [
        {
            "id": f"{prefix}-{i:07d}",
            "kind": "battery",
            "site_id": f"s-{i}",
            "region": REGIONS[i % 4],
            "capacity_wh": 13500,
            "max_discharge_w": 5000,
            "max_charge_w": 5000,
        }
        for i in range(n)
    ]


def sample_logins(broker: Any, creds: list[tuple[str, str]]) -> int:
    """How many of ``creds`` the broker accepts (each logs in and out)."""
    from tests.helpers.mosquitto import Client

    ok = 0
    for user, pw in creds:
        c = Client(broker, user, pw)
        if not c.connect().is_failure:
            ok += 1
            c.stop()
    return ok


async def onboard_through_api(broker: Any, db_url: str, n: int) -> float:
    from api.app import create_app
    from dispatch.services import Services
    from store.keys import create_api_key
    from vpp.settings import Settings

    settings = Settings(
        database_url=db_url,
        mqtt_url=broker.service_url,
        redis_url="memory://",
        broker_credentials="password_file",
        broker_apply_timeout_s=300,
        topic_root=ROOT,
    )
    svc = await Services.create(settings)
    app = create_app(services=svc)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=900
    )
    try:
        key = await create_api_key(svc.db, "bench", "fleet", svc.clock.now_ms())
        body = orjson.dumps(battery_rows(n, "onb"))
        t0 = time.perf_counter()
        r = await client.post(
            "/v1/devices/bulk",
            content=body,
            headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
        )
        elapsed = time.perf_counter() - t0
        assert r.status_code == 201, r.text[:500]
        devices = r.json()["devices"]
        assert len(devices) == n
        step = max(1, n // 20)
        sample = [(d["mqtt"]["username"], d["mqtt"]["password"]) for d in devices[::step]]
        accepted = await asyncio.to_thread(sample_logins, broker, sample)
        assert accepted == len(sample), f"only {accepted} of {len(sample)} sampled logins work"
        print(f"  (a sample of {len(sample)} returned credentials logged in)")
        return elapsed
    finally:
        await client.aclose()
        await svc.close()


async def tier_of(broker: Any, db_url: str, agent: Any, m: int, tier: str) -> None:
    """Revoke one device in an M-login tier, and the broker's memory per login."""
    from devices.credentials import (
        DynsecCredentialManager,
        PasswordFileCredentialManager,
        new_password,
        password_hashes,
    )
    from store.database import Database
    from tests.helpers.mosquitto import WAIT_S, Client

    db = Database(db_url)
    deny_list = DynsecCredentialManager(
        broker.host, broker.port, broker.service_username, broker.service_password, timeout_s=10
    )
    manager = PasswordFileCredentialManager(db, tier, apply_timeout_s=600, kicker=deny_list)
    no_deny_list = PasswordFileCredentialManager(db, tier, apply_timeout_s=600)
    try:
        rss_before = rss_kib(broker.pid)
        before_logins = agent.stats.logins
        ids = [f"tier-{i:07d}" for i in range(m)]
        passwords = [new_password() for _ in range(m)]
        t0 = time.perf_counter()
        hashes = password_hashes(passwords)
        t_hash = time.perf_counter() - t0
        t0 = time.perf_counter()
        generation = await manager.write_logins(ids, hashes)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        await manager.wait_applied(generation)
        t_apply = time.perf_counter() - t0
        rss_after = rss_kib(broker.pid)
        logins = agent.stats.logins - before_logins
        print(
            f"  (tier of {m} logins: hashes {t_hash:.1f} s, one write {t_write:.1f} s, agent "
            f"applied in {t_apply:.1f} s: file {agent.stats.last_write_s:.2f} s, reload to "
            f"canary {agent.stats.last_reload_s:.1f} s)"
        )
        print(
            f"broker memory per device: {(rss_after - rss_before) * 1024 / logins:.0f} bytes "
            f"(mosquitto RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB "
            f"with {logins} logins)"
        )
        victim, keep = m // 2, m // 3
        device = Client(broker, ids[victim], passwords[victim])
        other = Client(broker, ids[keep], passwords[keep])
        assert not device.connect().is_failure and not other.connect().is_failure
        t0 = time.perf_counter()
        await manager.revoke([ids[victim]])
        t_revoke = time.perf_counter() - t0
        dropped = device.disconnected.wait(WAIT_S)
        refused = Client(broker, ids[victim], passwords[victim]).connect().is_failure
        kept = not other.disconnected.is_set()
        device.stop()
        other.stop()
        assert dropped and refused and kept, (dropped, refused, kept)
        print(
            f"revoke one device in a {m}-device broker tier: {t_revoke:.2f} s "
            "(live session dropped, login refused, a neighbour kept; dynsec deny list)"
        )
        # The same without the deny list: revoke waits for the agent's reload of the whole file.
        victim = m // 4
        device = Client(broker, ids[victim], passwords[victim])
        assert not device.connect().is_failure
        t0 = time.perf_counter()
        await no_deny_list.revoke([ids[victim]])
        t_reload = time.perf_counter() - t0
        assert device.disconnected.wait(WAIT_S)
        device.stop()
        print(
            f"  (peer: the same revoke waiting for the reload of the {m}-login file instead: "
            f"{t_reload:.2f} s; deny list {t_reload / t_revoke:.0f}x faster)"
        )
    finally:
        await manager.close()
        await db.dispose()


def dynsec_file_with(path: Path, s0: int) -> None:
    """Add ``s0`` device clients and their roles to a dynsec file made by init-dynsec.sh, as
    DynsecCredentialManager makes them (the passwords are never used to log in)."""
    from devices.credentials import device_acls, device_role_name

    doc = json.loads(path.read_text())
    salt = base64.b64encode(secrets.token_bytes(12)).decode()
    digest = base64.b64encode(hashlib.sha512(b"x").digest()).decode()
    for i in range(s0):
        d = f"pre-{i:07d}"
        doc.setdefault("roles", []).append(
            {
                "rolename": device_role_name(d),
                "acls": [{**a, "priority": -1} for a in device_acls(ROOT, d)],
            }
        )
        doc.setdefault("clients", []).append(
            {
                "username": d,
                "password": digest,
                "salt": salt,
                "iterations": 101,
                "roles": [{"rolename": device_role_name(d)}],
            }
        )
    path.write_text(json.dumps(doc))


async def dynsec_peer(s0: int, k: int, n: int) -> None:
    from devices.credentials import DynsecCredentialManager
    from tests.helpers.mosquitto import _stop, _wait_listening, run_mosquitto

    with run_mosquitto(ROOT) as broker:
        # Stop it, preload the file, start it again on the same port with the same config.
        subprocess.run(["kill", str(broker.pid)], check=True)
        for _ in range(200):
            if not Path(f"/proc/{broker.pid}").exists():
                break
            await asyncio.sleep(0.05)
        dynsec_file_with(broker.workdir / "dynamic-security.json", s0)
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(broker.workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert _wait_listening(broker.host, broker.port, proc, 120), broker.log()[-2000:]
            manager = DynsecCredentialManager(
                broker.host,
                broker.port,
                broker.service_username,
                broker.service_password,
                topic_root=ROOT,
                timeout_s=900,
            )
            try:
                await manager.ping(60)
                t0 = time.perf_counter()
                pws = await manager.provision([f"new-{i:06d}" for i in range(k)])
                elapsed = time.perf_counter() - t0
            finally:
                await manager.close()
            assert len(pws) == k
            # Two commands a device, each rewriting the file of every device then on the broker.
            per_cmd_dev = elapsed / (2 * k * (s0 + k / 2))
            from_empty = per_cmd_dev * 2 * n * n / 2
            print(
                f"dynsec peer: {k} devices into a broker holding {s0}: {elapsed:.1f} s "
                f"({per_cmd_dev * 1e6:.2f} us per command per device on the broker); "
                f"onboard {n} devices from empty, extrapolated: {from_empty:.0f} s "
                f"({from_empty / 3600:.1f} h)"
            )
        finally:
            _stop(proc)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="1/20: 5 000 onboarded, 50 000 tier")
    p.add_argument("--onboard", type=int, default=None)
    p.add_argument("--tier", type=int, default=None)
    p.add_argument("--no-dynsec", action="store_true", help="skip the dynsec peer")
    a = p.parse_args()
    n = a.onboard or (5_000 if a.small else 100_000)
    m = a.tier or (50_000 if a.small else 1_000_000)
    s0, k = (500, 100) if a.small else (10_000, 1_000)

    from store.migrate import upgrade
    from tests.helpers.mosquitto import run_broker_agent, run_mosquitto

    if shutil.which("mosquitto_passwd") is None:
        raise SystemExit("mosquitto and mosquitto_passwd are needed")
    name = f"bench_broker_credentials_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        url = f"{base}/{name}"
        await asyncio.to_thread(upgrade, url)
        print(f"password_file (chosen), Mosquitto 2.0.11, cores: {os.cpu_count()}")
        with (
            run_mosquitto(ROOT, mechanism="password_file") as broker,
            run_broker_agent(broker, url) as agent,
        ):
            t = await onboard_through_api(broker, url, n)
            print(f"onboard {n} devices with broker credentials: {t:.2f} s")
        # A fresh broker and agent for the tier, holding exactly M logins: its memory is
        # measured from the base logins.
        with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + name) as conn:
            conn.execute("DELETE FROM broker_logins")
        with (
            run_mosquitto(ROOT, mechanism="password_file") as broker,
            # A reload of a million logins on a loaded machine can take more than 30 s.
            run_broker_agent(broker, url, tier="tier-2", reload_timeout_s=300) as agent,
        ):
            await tier_of(broker, url, agent.agent, m, "tier-2")
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if not a.no_dynsec:
        await dynsec_peer(s0, k, n)


if __name__ == "__main__":
    asyncio.run(main())
