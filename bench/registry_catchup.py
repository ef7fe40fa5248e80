"""How long an ingest worker takes to see one onboarding in a large registry, and how long Redis
is unavailable to everyone else meanwhile: the whole registry in one HGETALL (ingest before the
change log), the whole registry in HSCAN chunks (the reload that remains for start, a lost store,
a trimmed log), and the change log (``registry_changes``, what a running worker does now).

The longest PING another client waited, measured while each read runs, is the starvation the
single HGETALL caused at a million devices (the runner, the leases, GET /v1/fleet).

    python bench/registry_catchup.py [--devices 1000000] [--small] [--redis URL]

Uses its own key prefix on the given Redis and removes it after."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from store.state.redis import RedisStateStore, _text


async def _timed(store: RedisStateStore, work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Run ``work``: its time, and the longest PING round trip another client (a thread with
    its own connection, so not delayed by this event loop) saw meanwhile (seconds)."""
    other = redis.Redis.from_url(store.url)
    worst = 0.0
    done = threading.Event()

    def pinger() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = time.perf_counter()
            other.ping()
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.002)

    thread = threading.Thread(target=pinger)
    thread.start()
    try:
        t0 = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        thread.join()
        other.close()
    return elapsed, worst


async def main(devices: int, redis_url: str, repeats: int) -> None:
    store = RedisStateStore(redis_url, prefix=f"bench-regcatch-{uuid.uuid4().hex[:8]}")
    try:
        t0 = time.perf_counter()
        for lo in range(0, devices, 100_000):
            await store.registry_put(
                {f"dev-{i:07d}": i % 3 for i in range(lo, min(lo + 100_000, devices))}
            )
        print(f"registry of {devices} devices written in {time.perf_counter() - t0:.1f} s")
        key = store._k("reg")

        async def hgetall() -> None:  # the old registry_all
            raw = await store.redis.hgetall(key)
            {_text(k): int(v) for k, v in raw.items()}  # what the caller paid

        async def hscan_reload() -> None:
            await store.registry_cursor()
            await store.registry_all()

        results: dict[str, tuple[list[float], list[float]]] = {}
        for name, read in (
            ("whole HGETALL (before)", hgetall),
            ("whole HSCAN chunks (reload)", hscan_reload),
        ):
            times, pings = [], []
            for _ in range(repeats):
                await store.registry_put({f"new-{uuid.uuid4().hex[:8]}": 0})
                elapsed, worst = await _timed(store, read)
                times.append(elapsed)
                pings.append(worst)
            results[name] = times, pings
        times, pings = [], []
        for _ in range(repeats):
            cursor = await store.registry_cursor()
            await store.registry_put({f"new-{uuid.uuid4().hex[:8]}": 0})

            async def catch_up(cursor: Any = cursor) -> None:
                await store.registry_version()
                changes = await store.registry_changes(cursor)
                assert changes is not None and len(changes.changes) == 1

            elapsed, worst = await _timed(store, catch_up)
            times.append(elapsed)
            pings.append(worst)
        results["change log (after)"] = times, pings
        for name, (times, pings) in results.items():
            print(
                f"registry catch-up of 1 change in {devices} devices, {name}: "
                f"{statistics.median(times) * 1000:.1f} ms (median of {repeats}), "
                f"longest PING of another client meanwhile {max(pings) * 1000:.1f} ms"
            )
        before = statistics.median(results["whole HGETALL (before)"][0])
        after = statistics.median(results["change log (after)"][0])
        print(f"registry catch-up, before / after: {before / after:.0f}x")
    finally:
        # UNLINK: freeing a million-entry hash happens off Redis's main thread.
        async for k in store.redis.scan_iter(match=f"{store.prefix}:*", count=1000):
            await store.redis.unlink(k)
        await store.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=1_000_000)
    p.add_argument("--small", action="store_true", help="50 000 devices (well under a minute)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    asyncio.run(main(50_000 if a.small else a.devices, a.redis, a.repeats))
