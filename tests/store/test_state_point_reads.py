"""Point reads of some devices' states and online flags, on both stores (the real Redis, a
unique prefix): what the runner's closed loop reads every minute for its own devices instead of
rebuilding the whole fleet. Each id gets its own record and status back, in the order asked,
whatever bucket it lives in; an id never written, or a malformed record, reads as not there."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from store.state import make_state_store
from store.state.base import StateStore
from store.state.redis import RedisStateStore
from tests.helpers.settings import REDIS_URL, unique
from vpp.fleet.records import empty_state, pack_state


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    url = "memory://" if request.param == "memory" else REDIS_URL
    st = make_state_store(url, unique("points"))
    yield st
    if isinstance(st, RedisStateStore):
        await st.flush_prefix()
    await st.close()


async def test_records_and_statuses_come_back_per_id_in_the_order_asked(
    store: StateStore,
) -> None:
    ids = [f"dev-{i}" for i in range(300)]  # spread over many buckets
    recs = {d: record(i) for i, d in enumerate(ids[:200])}
    await store.put_states(recs)
    await store.put_states({ids[7]: b"torn"})  # malformed: read as not there
    await store.put_status({d: (i % 3 != 0, 1000 + i) for i, d in enumerate(ids[100:250])})
    odd = "dev-1\nwith-newline"
    await store.put_states({odd: record(999)})
    asked = ["nobody", *reversed(ids), ids[5], odd]

    got = await store.read_points(asked)

    stored = {**recs, odd: record(999)}
    stored.pop(ids[7])
    assert got.present.tolist() == [d in stored for d in asked]
    for i, d in enumerate(asked):
        if d in stored:
            assert got.records[i].tobytes() == stored[d], d
        else:
            assert np.isnan(got.records[i]["soc_pct"]), d  # an empty record
    flags = {d: i % 3 != 0 for i, d in enumerate(ids[100:250])}
    want = [b"-" if d not in flags else (b"1" if flags[d] else b"0") for d in asked]
    assert got.online.tobytes() == b"".join(want)
    empty = await store.read_points([])
    assert len(empty.records) == len(empty.present) == len(empty.online) == 0


def record(i: int) -> bytes:
    rec = empty_state()
    rec["recv_ms"] = 1_000 + i
    rec["soc_pct"] = i % 100
    return pack_state(rec)
