"""Redis state store.

Layout (prefix ``vpp``):
- ``vpp:st:{bucket}``: hash device_id → 64-byte state record. Devices are spread over a fixed
  number of buckets so each hash stays small enough for Redis's listpack encoding (about
  70 bytes a device instead of several hundred for a key per device).
- ``vpp:on:{bucket}``: hash device_id → ``"1:ts"`` / ``"0:ts"`` online status.
- ``vpp:reg``: hash device_id → kind code (onboarded, enrolled devices), ``vpp:regv`` its version.
- ``vpp:acks``: list of raw acks from ingest to the event runner.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import redis.asyncio as aioredis

from vpp.state.base import StateStore, bucket_of

N_BUCKETS = 4096


class RedisStateStore(StateStore):
    def __init__(self, url: str, prefix: str = "vpp", n_buckets: int = N_BUCKETS) -> None:
        self.url = url
        self.prefix = prefix
        self.n_buckets = n_buckets
        self.redis = aioredis.from_url(url, decode_responses=False, health_check_interval=30)

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def _group(self, device_ids: list[str] | Mapping[str, object]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for d in device_ids:
            groups[bucket_of(d, self.n_buckets)].append(d)
        return groups

    async def put_states(self, records: Mapping[str, bytes]) -> None:
        if not records:
            return
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in self._group(records).items():
            pipe.hset(self._k("st", bucket), mapping={d: records[d] for d in ids})
        await pipe.execute()

    async def get_states(self, device_ids: list[str]) -> list[bytes | None]:
        if not device_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for d in device_ids:
            pipe.hget(self._k("st", bucket_of(d, self.n_buckets)), d)
        return list(await pipe.execute())

    async def _all_hash(self, kind: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        step = 512
        for lo in range(0, self.n_buckets, step):
            pipe = self.redis.pipeline(transaction=False)
            for b in range(lo, min(lo + step, self.n_buckets)):
                pipe.hgetall(self._k(kind, b))
            for h in await pipe.execute():
                out.update(h)
        return out

    async def all_states(self) -> dict[str, bytes]:
        return {k.decode(): v for k, v in (await self._all_hash("st")).items()}

    async def put_status(self, statuses: Mapping[str, tuple[bool, int]]) -> None:
        if not statuses:
            return
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in self._group(statuses).items():
            mapping = {d: f"{int(statuses[d][0])}:{statuses[d][1]}" for d in ids}
            pipe.hset(self._k("on", bucket), mapping=mapping)  # type: ignore[arg-type]
        await pipe.execute()

    async def all_status(self) -> dict[str, tuple[bool, int]]:
        out = {}
        for k, v in (await self._all_hash("on")).items():
            flag, _, ts = v.decode().partition(":")
            out[k.decode()] = (flag == "1", int(ts or 0))
        return out

    async def registry_put(self, devices: Mapping[str, int]) -> None:
        if not devices:
            return
        pipe = self.redis.pipeline(transaction=True)
        items = list(devices.items())
        for lo in range(0, len(items), 10_000):
            pipe.hset(self._k("reg"), mapping=dict(items[lo : lo + 10_000]))  # type: ignore[arg-type]
        pipe.incr(self._k("regv"))
        await pipe.execute()

    async def registry_remove(self, device_ids: list[str]) -> None:
        if not device_ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._k("reg"), *device_ids)
        pipe.incr(self._k("regv"))
        await pipe.execute()

    async def registry_all(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self._k("reg"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def registry_version(self) -> int:
        v = await self.redis.get(self._k("regv"))
        return int(v or 0)

    async def delete_devices(self, device_ids: list[str]) -> None:
        if not device_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in self._group(device_ids).items():
            pipe.hdel(self._k("st", bucket), *ids)
            pipe.hdel(self._k("on", bucket), *ids)
        await pipe.execute()

    async def push_acks(self, acks: list[bytes]) -> None:
        if acks:
            await self.redis.rpush(self._k("acks"), *acks)

    async def pop_acks(self, max_items: int = 10_000) -> list[bytes]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(self._k("acks"), 0, max_items - 1)
        pipe.ltrim(self._k("acks"), max_items, -1)
        items, _ = await pipe.execute()
        return list(items)

    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        px = int(ttl_s * 1000) if ttl_s else None
        await self.redis.set(self._k("kv", key), value, px=px)

    async def get_value(self, key: str) -> bytes | None:
        v = await self.redis.get(self._k("kv", key))
        return bytes(v) if v is not None else None

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        key = self._k("lease", name)
        px = int(ttl_s * 1000)
        if await self.redis.set(key, owner, nx=True, px=px):
            return True
        holder = await self.redis.get(key)
        if holder is not None and holder.decode() == owner:
            await self.redis.pexpire(key, px)
            return True
        return False

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def memory_bytes(self) -> int:
        total = 0
        for lo in range(0, self.n_buckets, 512):
            pipe = self.redis.pipeline(transaction=False)
            for b in range(lo, min(lo + 512, self.n_buckets)):
                pipe.memory_usage(self._k("st", b), samples=0)
            total += sum(int(x or 0) for x in await pipe.execute())
        return total

    async def flush_prefix(self) -> None:
        """Delete every key under this prefix (tests and benches)."""
        async for key in self.redis.scan_iter(match=f"{self.prefix}:*", count=5000):
            await self.redis.delete(key)

    async def close(self) -> None:
        await self.redis.aclose()
