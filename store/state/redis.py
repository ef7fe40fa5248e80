"""Redis state store.

Layout (prefix ``vpp``):
- ``vpp:st:{bucket}``: hash device_id → 64-byte state record. Devices are spread over a fixed
  number of buckets so each hash stays small enough for Redis's listpack encoding (about
  70 bytes a device instead of several hundred for a key per device).
- ``vpp:on:{bucket}``: hash device_id → ``"1:ts"`` / ``"0:ts"`` online status.
- ``vpp:reg``: hash device_id → kind code (onboarded, enrolled devices), ``vpp:regv`` its version.
- ``vpp:reg:log``: stream of the registry's writes (``registry_changes``), one entry per chunk of
  up to 10 000 devices: field ``p`` (put) or ``r`` (removed) the ids joined by ``\n`` (field
  ``l``, their lengths as little-endian uint16, when an id holds a newline), ``c`` the put's kind
  codes as int8, ``e`` on the last chunk of a write (writes there == the version's steps).
- ``vpp:fleet:registry``: the fleet cache's registry image (``put_blob``): the head
  ``token:chunks:bytes``, the image in 4 MiB chunks under ``vpp:fleet:registry:{token}:{i}``.
- ``vpp:acks``: list of raw acks from ingest to the event runner (drained by the leader only).
- ``vpp:gen``: the generation token written by the last build (missing: the store was lost),
  ``vpp:rebuild``: the rebuild lock (its holder's token, with a TTL).
- ``vpp:lease:{name}``: a lease's owner id, with the lease's TTL (``vpp:lease:leader``: the replica
  that leads the runner, housekeeping and calibration).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.state.base import RegistryChanges, RegistryCursor, StateStore
from vpp.fleet.records import STATE_DTYPE, PackedStates, PackedStatus, bucket_of, pack_records

N_BUCKETS = 4096

# Conditional write of the latest state, atomic in Redis, so several ingest workers sharing the
# MQTT load (and a worker restarted with no memory) never put an older reading over a newer one.
# A record is written only if it is newer than the stored one: by seq when both have one (and ts
# must not go back), else by ts. Returns, for each refused record, its device id and the stored
# record (the caller re-seeds its ordering check from it).
# Arguments are four blobs instead of three arguments a record (redis-py spends about a
# microsecond packing each argument, more than Redis spends on the write): ARGV[1] the key
# prefix of the state hashes, ARGV[2] the device ids back to back, ARGV[3] the 64-byte records
# back to back, ARGV[4] per record two little-endian uint16: its bucket and the length of its
# id. The script names its keys itself, which a standalone Redis allows (this store already
# needs one: its pipelines span hash slots).
_PUT_IF_NEWER = """
local prefix, ids, recs, meta = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local refused = {}
local pos = 1
for i = 0, #meta / 4 - 1 do
  local bucket, len = struct.unpack('<HH', meta, 4 * i + 1)
  local dev = string.sub(ids, pos, pos + len - 1)
  pos = pos + len
  local new = string.sub(recs, 64 * i + 1, 64 * i + 64)
  local key = prefix .. bucket
  local old = redis.call('HGET', key, dev)
  local ok = true
  if old and #old == 64 then
    local ots, _, oseq = struct.unpack('<i8i8i8', old)
    local nts, _, nseq = struct.unpack('<i8i8i8', new)
    if nseq >= 0 and oseq >= 0 then
      ok = nseq > oseq and nts >= ots
    else
      ok = nts > ots
    end
  end
  if ok then
    redis.call('HSET', key, dev, new)
  else
    refused[#refused + 1] = dev
    refused[#refused + 1] = old
  end
end
return refused
"""
# Take the lease if free, renew it if ours (KEYS[1] the lease, ARGV[1] the owner, ARGV[2] ms).
_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Records per script call: bounds how long one call holds Redis (about 2 µs a record).
_SCRIPT_CHUNK = 5000

# Rebuild of a lost store, in three scripts that each first check the caller still holds the
# rebuild lock: a Redis lost again while the rebuild ran has lost the lock too, and then nothing
# more is written (no generation over a half-filled registry).
# Fill: KEYS reg, lock; ARGV token, the ids back to back, per id a little-endian uint16 of its
# length, per id one byte of its kind code + 1 (blobs, as in _PUT_IF_NEWER: a million entries
# cost redis-py seconds as separate arguments), the lock's TTL in ms (each call renews it).
# HSETNX: an entry written since the loss (onboarding, offboarding) is newer than the database
# read and is kept.
_REBUILD_FILL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local ids, lens, codes = ARGV[2], ARGV[3], ARGV[4]
local pos = 1
for i = 1, #codes do
  local len = struct.unpack('<H', lens, 2 * i - 1)
  redis.call('HSETNX', KEYS[1], string.sub(ids, pos, pos + len - 1), string.byte(codes, i) - 1)
  pos = pos + len
end
return 1
"""
# Finish: KEYS lock, regv, gen; ARGV token, version, generation.
_REBUILD_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[1])
return 1
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The registry's change log: the cursor (the log's end, with the version there) and the entries
# after a cursor, each read atomically with the version. XINFO gives the highest id trimmed off
# (``max-deleted-entry-id``, Redis 7): a cursor below it has missed entries.
# KEYS log, regv; ARGV (changes only) the cursor's stream id, entries at most.
_REGISTRY_CURSOR = """
local v = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return {v, '0-0'} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then return {v, info[i + 1]} end
end
return {v, '0-0'}
"""
_REGISTRY_CHANGES = """
local v = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return {v} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local maxdel, last = '0-0', '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then maxdel = info[i + 1] end
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {v, maxdel, last, entries}
"""
# The online flags of a few status hashes (KEYS), per hash two bulk strings: its ids, each
# followed by "\n", and the first byte of each value ("1"/"0"), in the hash's order. Two
# strings a hash instead of two a device: the client makes no object per device, and Redis,
# another process, does the joining. (Tried for the state hashes too: Lua's copy of HGETALL's
# reply costs Redis about ten times the HGETALL, more than the client saves on 64-byte records.)
_STATUS_FLAGS = """
local out = {}
for i = 1, #KEYS do
  local flat = redis.call('HGETALL', KEYS[i])
  local ids, flags = {}, {}
  for j = 1, #flat / 2 do
    ids[j] = flat[2 * j - 1]
    flags[j] = string.sub(flat[2 * j], 1, 1)
  end
  out[2 * i - 1] = ''
  if #ids > 0 then out[2 * i - 1] = table.concat(ids, '\\n') .. '\\n' end
  out[2 * i] = table.concat(flags)
end
return out
"""
_READ_LANES = 4  # concurrent pipelines of a whole-fleet read (each kind: states, statuses)
_STATUS_KEYS = 8  # status hashes per script call: about a millisecond of Redis at 250 devices each
REGISTRY_CHUNK = 10_000  # devices per HSET/HDEL and per change-log entry
REGISTRY_LOG_MAX = 10_000  # change-log entries kept (a worker further behind reloads it whole)
REGISTRY_LOG_AGE_MS = 600_000  # and none older than this: bounds the log's memory after imports
_REGISTRY_SCAN_COUNT = 20_000  # registry entries per HSCAN of a full reload (~10 ms of Redis)
_REGISTRY_LOG_READ = 20  # change-log entries per read (at most 200 000 devices)

# Longer than a registry load of a million devices; a holder that dies frees it after this.
REBUILD_LOCK_TTL_S = 30.0
_REBUILD_CHUNK = 5000  # registry entries per fill call
_BLOB_CHUNK = 4 << 20  # bytes per key of a large value (put_blob): short SETs and GETs


class RedisStateStore(StateStore):
    def __init__(
        self, url: str, prefix: str = "vpp", n_buckets: int = N_BUCKETS, timeout_s: float = 20.0
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.n_buckets = n_buckets
        # One retry on a connection error: after Redis restarts, every pooled connection is dead
        # and its next command would fail once before the pool reconnects.
        self.redis = aioredis.from_url(
            url,
            decode_responses=False,
            health_check_interval=30,
            # A reply late by this much is an outage (VPP_REDIS_TIMEOUT_S); a refused or reset
            # connection is one at once.
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 5.0),
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        # Whole-fleet reads of the state hashes on a RESP2 client whose HGETALL stays the flat
        # reply: redis-py 8 speaks RESP3, where hiredis builds each hash as a dict, and that
        # costs the client twice as much as the read itself (0.91 s against 0.43 s for a
        # million states, measured). Only ``_all_hash_flat`` uses it.
        self._flat = aioredis.from_url(
            url,
            decode_responses=False,
            protocol=2,
            health_check_interval=30,
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 5.0),
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._flat.set_response_callback("HGETALL", _flat_reply)
        self._put_if_newer = self.redis.register_script(_PUT_IF_NEWER)
        self._rebuild_fill = self.redis.register_script(_REBUILD_FILL)
        self._rebuild_finish = self.redis.register_script(_REBUILD_FINISH)
        self._release_lock = self.redis.register_script(_RELEASE_LOCK)
        self._acquire_lease = self.redis.register_script(_ACQUIRE_LEASE)
        self._release_lease = self.redis.register_script(_RELEASE_LEASE)
        self._registry_cursor = self.redis.register_script(_REGISTRY_CURSOR)
        self._registry_changes = self.redis.register_script(_REGISTRY_CHANGES)
        self._status_flags = self.redis.register_script(_STATUS_FLAGS)
        self.registry_log_max = REGISTRY_LOG_MAX

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

    async def put_states_if_newer(self, records: Mapping[str, bytes]) -> dict[str, bytes]:
        """Write each record unless the stored one is as new or newer (ingest's write path).

        One script call per 5000 records: a few arguments each instead of a pipelined command
        each, which is what keeps redis-py's per-command cost off the ingest hot path. Returns
        ``{device_id: stored record}`` for the records refused as older."""
        refused: dict[str, bytes] = {}
        if not records:
            return refused
        items = list(records.items())
        n = self.n_buckets
        st = self._k("st", "")
        for lo in range(0, len(items), _SCRIPT_CHUNK):
            chunk = items[lo : lo + _SCRIPT_CHUNK]
            enc = [d.encode() for d, _ in chunk]
            meta: list[int] = []
            for e in enc:
                meta.append(zlib.crc32(e) % n)  # == bucket_of(d, n)
                meta.append(len(e))
            recs = b"".join(rec for _, rec in chunk)
            if len(recs) != len(chunk) * STATE_DTYPE.itemsize:
                raise ValueError("put_states_if_newer: every record must be 64 bytes")
            args: list[bytes | str] = [
                st,
                b"".join(enc),
                recs,
                struct.pack(f"<{len(meta)}H", *meta),
            ]
            out = await self._put_if_newer(keys=[], args=args)
            for i in range(0, len(out), 2):
                refused[out[i].decode()] = bytes(out[i + 1])
        return refused

    async def get_states(self, device_ids: list[str]) -> list[bytes | None]:
        if not device_ids:
            return []
        # One HMGET a bucket (a closed-loop step reads tens of thousands of devices).
        groups = self._group(device_ids)
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in groups.items():
            pipe.hmget(self._k("st", bucket), ids)
        found: dict[str, bytes | None] = {}
        for ids, values in zip(groups.values(), await pipe.execute(), strict=True):
            found.update(zip(ids, values, strict=True))
        return [found[d] for d in device_ids]

    async def _all_hash(self, kind: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        step = 8
        for lo in range(0, self.n_buckets, step):
            pipe = self.redis.pipeline(transaction=False)
            for b in range(lo, min(lo + step, self.n_buckets)):
                pipe.hgetall(self._k(kind, b))
            for h in await pipe.execute():
                out.update(h)
        return out

    async def all_states(self) -> dict[str, bytes]:
        return {k.decode(): v for k, v in (await self._all_hash("st")).items()}

    async def _all_hash_flat(self, kind: str) -> list[list[bytes]]:
        """Every bucket's hash as its flat reply (field, value, field, value, ...), in bucket
        order, empty buckets left out: no dict per bucket."""
        step = 128  # smaller pipelines: shorter event-loop stalls while replies are parsed

        async def lane(lo: int, hi: int) -> list[list[bytes]]:
            out: list[list[bytes]] = []
            for a in range(lo, hi, step):
                pipe = self._flat.pipeline(transaction=False)
                for b in range(a, min(a + step, hi)):
                    pipe.hgetall(self._k(kind, b))
                out.extend(h for h in await pipe.execute() if h)
            return out

        return [h for part in await self._lanes(lane) for h in part]

    async def _lanes(self, lane: Callable[[int, int], Awaitable[list[Any]]]) -> list[list[Any]]:
        """``lane(lo, hi)`` over _READ_LANES contiguous bucket ranges at once, each on its own
        connection: Redis answers one lane's next pipeline while the client parses another's
        replies (one lane left each waiting on the other)."""
        n, k = self.n_buckets, _READ_LANES
        bounds = [n * i // k for i in range(k + 1)]
        return list(await asyncio.gather(*(lane(lo, hi) for lo, hi in itertools.pairwise(bounds))))

    async def all_states_packed(self) -> list[PackedStates]:
        """One chunk a bucket, its ids as one blob (``PackedIds``): joined in C, no decoding
        of a million ids, and the reader compares a chunk with its cached one in one memcmp."""
        out: list[PackedStates] = []
        for flat in await self._all_hash_flat("st"):
            names, values = flat[0::2], flat[1::2]
            ids, recs = _id_blob(names), b"".join(values)
            if ids is None or len(recs) != STATE_DTYPE.itemsize * len(names):
                out.append(pack_records(names, values))  # leaves bad records out
            else:
                out.append((ids, recs))
        return out

    async def all_status_packed(self) -> list[PackedStatus]:
        """One chunk a bucket, in bucket order (empty ones left out), as the states: the ids
        as one blob and the flags from the first byte of each value ("1:ts" / "0:ts"), joined
        by a script in Redis (``_STATUS_FLAGS``)."""
        sha = await self.redis.script_load(_STATUS_FLAGS)  # for EVALSHA in the pipelines
        # Short pipelines (8 calls, about 6 ms of Redis): a longer one held Redis for 50 ms at
        # a time while the states' reads of the same build queued behind it (both reads of a
        # million devices: 1.05 s with 64 calls, 0.80 s with 8, measured).
        step = 8

        async def lane(lo: int, hi: int) -> list[PackedStatus]:
            keys = [self._k("on", b) for b in range(lo, hi)]
            calls = [keys[a : a + _STATUS_KEYS] for a in range(0, len(keys), _STATUS_KEYS)]
            out: list[PackedStatus] = []
            for a in range(0, len(calls), step):
                pipe = self.redis.pipeline(transaction=False)
                for ks in calls[a : a + step]:
                    pipe.evalsha(sha, len(ks), *ks)
                replies = await pipe.execute()
                for ks, reply in zip(calls[a : a + step], replies, strict=True):
                    for key, ids, flags in zip(ks, reply[::2], reply[1::2], strict=True):
                        if not flags:
                            continue
                        if ids.count(b"\n") == len(flags):
                            out.append((ids, np.frombuffer(flags, dtype=np.uint8) == ord("1")))
                        else:  # an id holding a newline: this bucket the slow way
                            h = await self.redis.hgetall(key)
                            values = np.array(list(h.values()), dtype="S1")
                            out.append((list(h), values == b"1"))
            return out

        return [c for part in await self._lanes(lane) for c in part]

    async def put_status(self, statuses: Mapping[str, tuple[bool, int]]) -> None:
        if not statuses:
            return
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in self._group(statuses).items():
            mapping = {d: f"{int(statuses[d][0])}:{statuses[d][1]}" for d in ids}
            pipe.hset(self._k("on", bucket), mapping=mapping)  # type: ignore[arg-type]
        await pipe.execute()

    async def get_online(self, device_ids: list[str]) -> list[bool | None]:
        groups = self._group(device_ids)
        pipe = self.redis.pipeline(transaction=False)
        for bucket, ids in groups.items():
            pipe.hmget(self._k("on", bucket), ids)
        found: dict[str, bool | None] = {}
        for ids, values in zip(groups.values(), await pipe.execute(), strict=True):
            flags = (None if v is None else v[:1] == b"1" for v in values)
            found.update(zip(ids, flags, strict=True))
        return [found[d] for d in device_ids]

    async def all_status(self) -> dict[str, tuple[bool, int]]:
        out = {}
        for k, v in (await self._all_hash("on")).items():
            flag, _, ts = v.decode().partition(":")
            out[k.decode()] = (flag == "1", int(ts or 0))
        return out

    async def registry_put(self, devices: Mapping[str, int]) -> None:
        if not devices:
            return
        items = list(devices.items())
        pipe = self.redis.pipeline(transaction=True)  # registry, log and version move together
        for lo in range(0, len(items), REGISTRY_CHUNK):
            chunk = dict(items[lo : lo + REGISTRY_CHUNK])
            pipe.hset(self._k("reg"), mapping=chunk)  # type: ignore[arg-type]
            try:
                codes = struct.pack(f"<{len(chunk)}b", *chunk.values())
            except struct.error as exc:
                raise ValueError(f"registry_put: kind codes must fit in int8 ({exc})") from exc
            fields = _log_ids(b"p", list(chunk))
            fields[b"c"] = codes
            self._log_xadd(pipe, fields, last=lo + REGISTRY_CHUNK >= len(items))
        self._log_trim(pipe)
        pipe.incr(self._k("regv"))
        await pipe.execute()

    async def registry_remove(self, device_ids: list[str]) -> None:
        if not device_ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        for lo in range(0, len(device_ids), REGISTRY_CHUNK):
            chunk = device_ids[lo : lo + REGISTRY_CHUNK]
            pipe.hdel(self._k("reg"), *chunk)
            last = lo + REGISTRY_CHUNK >= len(device_ids)
            self._log_xadd(pipe, _log_ids(b"r", chunk), last=last)
        self._log_trim(pipe)
        pipe.incr(self._k("regv"))
        await pipe.execute()

    def _log_xadd(self, pipe: Any, fields: dict[bytes, bytes], last: bool) -> None:
        if last:
            fields[b"e"] = b"1"
        # Exact trimming: a bound, not a memory optimisation, and tests trim to a few entries.
        pipe.xadd(self._k("reg", "log"), fields, maxlen=self.registry_log_max, approximate=False)

    def _log_trim(self, pipe: Any) -> None:
        # Entries of a bulk import are ~120 kB each: an age bound too, so ten thousand of them
        # never sit in Redis. A worker idle longer than that reloads the registry whole.
        oldest = int(time.time() * 1000) - REGISTRY_LOG_AGE_MS
        pipe.xtrim(self._k("reg", "log"), minid=f"{max(oldest, 0)}-0", approximate=True)

    async def registry_all(self) -> dict[str, int]:
        # HSCAN in chunks, not one HGETALL: a million entries in one reply held Redis for
        # seconds (every other client waited) and outlasted the socket timeout, whose retry
        # started it over.
        out: dict[str, int] = {}
        key, cursor = self._k("reg"), 0
        while True:
            cursor, chunk = await self.redis.hscan(key, cursor, count=_REGISTRY_SCAN_COUNT)
            assert isinstance(chunk, dict)  # field → value (no_values not asked for)
            out.update({_text(k): int(v) for k, v in chunk.items()})
            if not cursor:
                return out

    async def registry_cursor(self) -> RegistryCursor:
        keys = [self._k("reg", "log"), self._k("regv")]
        version, position = await self._registry_cursor(keys=keys, args=[])
        return RegistryCursor(_text(position), int(version))

    async def registry_changes(
        self, cursor: RegistryCursor, overlap_ms: int = 0
    ) -> RegistryChanges | None:
        try:
            after = _stream_id(cursor.position)
        except ValueError:
            return None
        keys = [self._k("reg", "log"), self._k("regv")]
        changes: dict[str, int | None] = {}
        position, writes = cursor.position, 0
        if overlap_ms > 0 and after > (0, 0):  # the log's ids are Redis's clock in ms
            position = f"{max(after[0] - overlap_ms, 0)}-0"
        cut = after
        while True:
            reply = await self._registry_changes(keys=keys, args=[position, _REGISTRY_LOG_READ])
            version = int(reply[0])
            if len(reply) == 1:  # no log (lost, or never written): fine only if nothing moved
                ok = not changes and version == cursor.version
                return RegistryChanges({}, cursor) if ok else None
            max_deleted, last_id, entries = _stream_id(reply[1]), _stream_id(reply[2]), reply[3]
            if cut < max_deleted or cut > last_id:
                return None  # trimmed past the cursor, or a cursor of a store since lost
            for entry_id, flat in entries:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                _fold_entry(fields, changes)
                position = _text(entry_id)
                if _stream_id(position) > cut:  # the overlap before the cursor does not count
                    writes += b"e" in fields
            if len(entries) < _REGISTRY_LOG_READ:
                break
        if cursor.version + writes != version:
            return None  # the registry was written without the log (a rebuild, an old writer)
        return RegistryChanges(changes, RegistryCursor(position, version))

    stores_blobs = True

    async def put_blob(self, name: str, data: bytes) -> None:
        # Chunks under a fresh token, then the head (token, chunk count, length) swapped in one
        # SET: a reader follows one head. The previous chunks expire a minute later, not at
        # once, so a reader that took the old head as this write finished still gets them.
        token = uuid.uuid4().hex
        chunks = [data[lo : lo + _BLOB_CHUNK] for lo in range(0, len(data), _BLOB_CHUNK)]
        for lo in range(0, len(chunks), 8):  # 32 MB a round trip
            pipe = self.redis.pipeline(transaction=False)
            for i in range(lo, min(lo + 8, len(chunks))):
                pipe.set(self._k(name, token, i), chunks[i])
            await pipe.execute()
        old = await self.redis.set(self._k(name), f"{token}:{len(chunks)}:{len(data)}", get=True)
        if isinstance(old, bytes | str):
            head = _blob_head(old)
            if head is not None and head[0] != token:
                pipe = self.redis.pipeline(transaction=False)
                for i in range(head[1]):
                    pipe.pexpire(self._k(name, head[0], i), 60_000)
                await pipe.execute()

    async def get_blob(self, name: str) -> bytes | None:
        raw = await self.redis.get(self._k(name))
        head = None if raw is None else _blob_head(raw)
        if head is None:
            return None
        token, count, size = head
        pipe = self.redis.pipeline(transaction=False)
        for i in range(count):
            pipe.get(self._k(name, token, i))
        parts = await pipe.execute()
        if any(p is None for p in parts):
            return None  # replaced long enough ago that its chunks expired
        data = b"".join(parts)
        return data if len(data) == size else None

    async def registry_version(self) -> int:
        v = await self.redis.get(self._k("regv"))
        return int(v or 0)

    async def generation(self) -> str | None:
        v = await self.redis.get(self._k("gen"))
        return None if v is None else _text(v)

    async def rebuild(self, load_registry: Callable[[], Awaitable[Mapping[str, int]]]) -> bool:
        if await self.generation() is not None:
            return False
        lock, token = self._k("rebuild"), uuid.uuid4().hex
        ttl_ms = int(REBUILD_LOCK_TTL_S * 1000)
        if not await self.redis.set(lock, token, nx=True, px=ttl_ms):
            return False  # another process is rebuilding
        try:
            if await self.generation() is not None:
                return False  # finished by another process just before we took the lock
            chunks = await asyncio.to_thread(_fill_chunks, await load_registry())
            reg = self._k("reg")
            for ids, lens, codes in chunks:
                # Each chunk renews the lock: a million devices on a loaded machine take longer
                # than one TTL to fill, and a lock lost mid-fill started the rebuild over, for
                # ever (the registry never finished, ingest held every message).
                args: list[bytes | str | int] = [token, ids, lens, codes, ttl_ms]
                if not await self._rebuild_fill(keys=[reg, lock], args=args):
                    return False  # lost again meanwhile: the next check starts over
            # A version no process has cached (they hold small counters or an older rebuild's
            # microseconds), so every fleet cache and ingest worker reloads.
            version = time.time_ns() // 1000
            finish_keys = [lock, self._k("regv"), self._k("gen")]
            finish_args: list[str | int] = [token, version, uuid.uuid4().hex]
            return bool(await self._rebuild_finish(keys=finish_keys, args=finish_args))
        finally:
            try:
                await self._release_lock(keys=[lock], args=[token])
            except Exception:  # the store went away again; the lock's TTL frees it
                pass

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
        return v.encode() if isinstance(v, str) else v

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        # One script: a renewal never extends a lease another owner took in between.
        held = await self._acquire_lease(
            keys=[self._k("lease", name)], args=[owner, int(ttl_s * 1000)]
        )
        return bool(held)

    async def lease_holder(self, name: str) -> str | None:
        holder = await self.redis.get(self._k("lease", name))
        return None if holder is None else _text(holder)

    async def release_lease(self, name: str, owner: str) -> bool:
        return bool(await self._release_lease(keys=[self._k("lease", name)], args=[owner]))

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
        await self._flat.aclose()


def _fill_chunks(registry: Mapping[str, int]) -> list[tuple[bytes, bytes, bytes]]:
    """The registry as _REBUILD_FILL's blobs, _REBUILD_CHUNK entries a call (worker thread)."""
    items = list(registry.items())
    out = []
    for lo in range(0, len(items), _REBUILD_CHUNK):
        enc = [d.encode() for d, _ in items[lo : lo + _REBUILD_CHUNK]]
        codes = bytes(int(code) + 1 for _, code in items[lo : lo + _REBUILD_CHUNK])
        out.append((b"".join(enc), struct.pack(f"<{len(enc)}H", *map(len, enc)), codes))
    return out


def _log_ids(field: bytes, ids: list[str]) -> dict[bytes, bytes]:
    """A change-log entry's ids: joined by newlines, plus their lengths if one holds one."""
    enc = [d.encode() for d in ids]
    if any(b"\n" in e for e in enc):
        return {field: b"".join(enc), b"l": struct.pack(f"<{len(enc)}H", *map(len, enc))}
    return {field: b"\n".join(enc)}


def _split_ids(blob: bytes, lens: bytes | None) -> list[str]:
    if lens is None:
        return blob.decode().split("\n")
    out, pos = [], 0
    for n in struct.unpack(f"<{len(lens) // 2}H", lens):
        out.append(blob[pos : pos + n].decode())
        pos += n
    return out


def _fold_entry(fields: Mapping[bytes, bytes], changes: dict[str, int | None]) -> None:
    """Apply one change-log entry to ``changes`` (later entries overwrite earlier ones)."""
    lens = fields.get(b"l")
    if b"p" in fields:
        ids = _split_ids(fields[b"p"], lens)
        codes = struct.unpack(f"<{len(ids)}b", fields[b"c"])
        changes.update(zip(ids, codes, strict=True))
    elif b"r" in fields:
        changes.update(dict.fromkeys(_split_ids(fields[b"r"], lens)))


def _stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _id_blob(names: Sequence[bytes]) -> bytes | None:
    """``names`` each followed by b"\\n"; None if one holds a newline itself (never a device
    id onboarded through the API)."""
    blob = b"\n".join(names) + b"\n"
    return blob if blob.count(b"\n") == len(names) else None


def _flat_reply(response: Any, **_: Any) -> Any:
    return response  # HGETALL on the RESP2 client: the flat list as it came


def _blob_head(raw: bytes | str) -> tuple[str, int, int] | None:
    token, _, rest = _text(raw).partition(":")
    count, _, size = rest.partition(":")
    try:
        return token, int(count), int(size)
    except ValueError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
