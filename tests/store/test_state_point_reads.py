"""Point reads of some devices' states and online flags, on both stores (the real Redis, a
unique prefix): what the runner's closed loop reads every minute for its own devices instead of
rebuilding the whole fleet. Each id gets its own record back, in the order asked, whatever
bucket it lives in; an id never written reads as None."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from store.state import make_state_store
from store.state.base import StateStore
from store.state.redis import RedisStateStore
from tests.helpers.settings import REDIS_URL, unique


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    url = "memory://" if request.param == "memory" else REDIS_URL
    st = make_state_store(url, unique("points"))
    yield st
    if isinstance(st, RedisStateStore):
        await st.flush_prefix()
    await st.close()


async def test_states_and_online_flags_come_back_per_id_in_the_order_asked(
    store: StateStore,
) -> None:
    ids = [f"dev-{i}" for i in range(300)]  # spread over many buckets
    await store.put_states({d: f"rec-{d}".encode() for d in ids[:200]})
    await store.put_status({d: (i % 3 != 0, 1000 + i) for i, d in enumerate(ids[100:250])})
    asked = ["nobody", *reversed(ids), ids[5], "dev-1\nwith-newline"]

    records = await store.get_states(asked)
    online = await store.get_online(asked)

    assert records == [(f"rec-{d}".encode() if d in ids[:200] else None) for d in asked]
    flags = {d: i % 3 != 0 for i, d in enumerate(ids[100:250])}
    assert online == [flags.get(d) for d in asked]
    assert await store.get_states([]) == [] and await store.get_online([]) == []
