"""The state store: each device's latest state, its online status, the device registry that
ingest workers check, and the ack queue between ingest and the event runner.

Redis in production (``redis://``), an in-process store by default (``memory://``)."""

from __future__ import annotations

from store.state.base import StateStore


def make_state_store(url: str, prefix: str = "vpp", timeout_s: float = 20.0) -> StateStore:
    if url.startswith("memory://"):
        from store.state.memory import MemoryStateStore

        return MemoryStateStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from store.state.redis import RedisStateStore

        return RedisStateStore(url, prefix=prefix, timeout_s=timeout_s)
    raise ValueError(
        f"VPP_REDIS_URL: unsupported scheme in {url!r} (redis://, rediss://, memory://)"
    )


__all__ = ["StateStore", "make_state_store"]
