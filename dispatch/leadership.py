"""Leadership among the replicas of ``vpp serve``: one process leads the singleton background
jobs (the event runner, quote housekeeping, the forecast calibrator); every replica serves the
API and runs ingest.

The leader holds a lease in the shared state store (``{prefix}:lease:leader``) and renews it every
third of its TTL from a task of its own, so a long runner tick never lets it lapse. Followers try
to take it on the same cadence: when the leader dies (``kill -9``) its lease expires after one
TTL and a follower takes it on its next try, within ``ttl × 4/3``.

A process trusts its own leadership only until ``renewal sent + ttl × 0.8``: the store's key
expires at the earliest at ``renewal sent + ttl``, so a leader that cannot renew (the store down,
the process stalled) stops acting before anyone else can start. ``is_leader`` reads that local
deadline (no round trip), so jobs may check it before every action.

Owner ids are unique per process (``host:pid:random``): two replicas on one host with the same
settings never share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from devices.outage_log import OutageLog
from dispatch.periodic import Periodic
from store.outages import STATE_STORE
from store.state import StateStore
from vpp.settings import Settings

log = logging.getLogger(__name__)

LEADER_LEASE = "leader"
# Share of the TTL a holder trusts its lease for after sending a renewal (see the module doc).
TRUST_SHARE = 0.8
# Default lease TTL, in wall seconds: a minute of service time, within these bounds (a sped-up
# clock must not make leadership flap on a stalled event loop; a real one must not wait long).
MIN_DEFAULT_TTL_S = 4.0
MAX_DEFAULT_TTL_S = 10.0


def replica_id() -> str:
    """This process's owner id: host, pid and a random part (a restarted pid never collides)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def lease_ttl_s(settings: Settings) -> float:
    """``VPP_LEADER_LEASE_S`` if set, else a minute of service time in [4, 10] wall seconds."""
    if settings.leader_lease_s is not None:
        return float(settings.leader_lease_s)
    return min(MAX_DEFAULT_TTL_S, max(MIN_DEFAULT_TTL_S, 60.0 / settings.time_scale))


class Leadership(Periodic):
    """``Leadership(state, settings)``: ``await start()`` / ``await stop()``; ``is_leader``."""

    task_name = "leadership"

    def __init__(
        self,
        state: StateStore,
        settings: Settings,
        *,
        owner: str | None = None,
        name: str = LEADER_LEASE,
    ) -> None:
        self.state = state
        self.name = name
        self.owner = owner or replica_id()
        self.ttl_s = lease_ttl_s(settings)
        self._trusted_until = 0.0  # monotonic deadline of our own leadership
        self._was_leader = False
        self.changes = 0  # times this process became leader
        self.on_change: list[Callable[[bool], None]] = []
        self.outages = OutageLog(log, "leader lease")

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._trusted_until

    @property
    def renew_period_s(self) -> float:
        return self.ttl_s / 3.0

    async def renew(self) -> bool:
        """One attempt to take or renew the lease; True if this process leads now."""
        sent = time.monotonic()
        try:
            held = await asyncio.wait_for(
                self.state.acquire_lease(self.name, self.owner, self.ttl_s), self.ttl_s / 2
            )
        except TimeoutError as exc:  # the store does not answer: as good as down
            self.outages.failed(exc, STATE_STORE)
            held = False
        except Exception as exc:  # the store is down: leadership lapses by its deadline
            if not self.outages.failed(exc):
                log.exception("leader lease")
            held = False
        else:
            self.outages.recovered()
        if held:
            self._trusted_until = sent + self.ttl_s * TRUST_SHARE
        else:
            self._trusted_until = min(self._trusted_until, time.monotonic())
        self._notify()
        return held

    def _notify(self) -> None:
        now = self.is_leader
        if now == self._was_leader:
            return
        self._was_leader = now
        if now:
            self.changes += 1
        log.warning("replica %s %s", self.owner, "leads" if now else "follows")
        for callback in list(self.on_change):
            try:
                callback(now)
            except Exception:
                log.exception("leadership callback")

    async def holder(self) -> str | None:
        """Who holds the lease now (any replica), or None."""
        return await self.state.lease_holder(self.name)

    async def _run(self) -> None:
        while True:
            await self.renew()
            # Wake at the renewal period, or at our own deadline if that comes first (so the
            # followers' callbacks see a lapse at once).
            wait = self.renew_period_s
            if self.is_leader:
                wait = min(wait, max(0.01, self._trusted_until - time.monotonic()))
            await asyncio.sleep(wait)
            self._notify()

    async def start(self) -> None:
        if self._task is None:
            await self.renew()
            await super().start()

    async def stop(self) -> None:
        """Stop renewing and hand the lease back, so another replica takes over at once."""
        await super().stop()
        if self._trusted_until > 0:
            self._trusted_until = 0.0
            self._notify()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.state.release_lease(self.name, self.owner), 3)

    def describe(self) -> dict[str, object]:
        return {"id": self.owner, "leader": self.is_leader, "lease_ttl_s": self.ttl_s}
