"""The registry's change log, on both stores (the real Redis, a unique prefix): a reader holding
a cursor gets every put and removal written after it, in order, and is told to reload the
registry whole (None) when the log cannot say everything any more: trimmed past its cursor, the
store lost, or the registry rebuilt without the log. A whole read in chunks, with the cursor
taken before it, misses nothing written while it ran."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from store.state import make_state_store
from store.state.base import RegistryChanges, StateStore
from store.state.redis import RedisStateStore
from tests.helpers.settings import REDIS_URL, unique


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    url = "memory://" if request.param == "memory" else REDIS_URL
    st = make_state_store(url, unique("reglog"))
    yield st
    if isinstance(st, RedisStateStore):
        await st.flush_prefix()
    await st.close()


def apply(registry: dict[str, int], caught_up: RegistryChanges) -> dict[str, int]:
    out = dict(registry)
    for device_id, code in caught_up.changes.items():
        if code is None:
            out.pop(device_id, None)
        else:
            out[device_id] = code
    return out


async def test_changes_after_a_cursor_are_every_put_and_removal_in_order(
    store: StateStore,
) -> None:
    await store.registry_put({"old-1": 0, "old-2": 1})
    cursor = await store.registry_cursor()
    nothing = await store.registry_changes(cursor)
    assert nothing is not None and nothing.changes == {} and nothing.cursor == cursor

    await store.registry_put({"new-1": 2, "old-1": -1})  # one onboarded, one offboarded
    await store.registry_remove(["old-2"])
    await store.registry_put({"old-2": 0})  # back again: the later write wins
    await store.registry_remove(["new-1"])
    many = {f"bulk-{i:05d}": i % 3 for i in range(25_000)}  # three log chunks in one write
    await store.registry_put(many)
    await store.registry_put({"odd\nid": 1})  # a newline in an id survives the log

    caught_up = await store.registry_changes(cursor)
    assert caught_up is not None
    assert caught_up.changes == {"old-1": -1, "old-2": 0, "new-1": None, **many, "odd\nid": 1}
    assert caught_up.cursor.version == await store.registry_version()
    assert apply({"old-1": 0, "old-2": 1}, caught_up) == await store.registry_all()
    # From the new cursor: nothing more, until the next write.
    again = await store.registry_changes(caught_up.cursor)
    assert again is not None and again.changes == {}
    await store.registry_remove(["bulk-00007"])
    last = await store.registry_changes(caught_up.cursor)
    assert last is not None and last.changes == {"bulk-00007": None}


async def test_a_cursor_the_trimmed_log_no_longer_reaches_asks_for_a_whole_reload(
    store: StateStore,
) -> None:
    store.registry_log_max = 3  # type: ignore[attr-defined]
    await store.registry_put({"a": 0})
    behind = await store.registry_cursor()
    for i in range(4):
        await store.registry_put({f"d-{i}": 0})
    assert await store.registry_changes(behind) is None
    recent = await store.registry_cursor()
    await store.registry_put({"e": 1})
    caught_up = await store.registry_changes(recent)
    assert caught_up is not None and caught_up.changes == {"e": 1}


async def test_a_lost_or_rebuilt_store_asks_for_a_whole_reload(store: StateStore) -> None:
    await store.registry_put({"a": 0})
    cursor = await store.registry_cursor()

    async def load() -> dict[str, int]:
        return {"a": 0, "b": 1}

    await store.flush_prefix()  # type: ignore[attr-defined]
    assert await store.registry_changes(cursor) is None
    fresh = await store.registry_cursor()
    assert await store.rebuild(load) is True  # written without the log
    assert await store.registry_changes(fresh) is None
    rebuilt = await store.registry_cursor()
    await store.registry_put({"c": 2})
    caught_up = await store.registry_changes(rebuilt)
    assert caught_up is not None and caught_up.changes == {"c": 2}


async def test_a_whole_read_with_its_cursor_misses_nothing_written_while_it_ran(
    store: StateStore,
) -> None:
    base = {f"dev-{i:05d}": 0 for i in range(60_000)}
    await store.registry_put(base)
    # Another process's connection (the in-process store is one).
    writer = (
        RedisStateStore(REDIS_URL, store.prefix) if isinstance(store, RedisStateStore) else store
    )
    writes = 0

    async def write_between_chunks() -> None:
        nonlocal writes
        writes += 1
        # An onboarding, an offboarding and a removal of entries the scan has or has not
        # reached yet.
        await writer.registry_put({f"late-{writes}": 1, f"dev-{writes * 7:05d}": -1})
        await writer.registry_remove([f"dev-{59_999 - writes:05d}"])

    cursor = await store.registry_cursor()
    if isinstance(store, RedisStateStore):
        real_hscan = store.redis.hscan

        async def hscan(*args: Any, **kwargs: Any) -> Any:
            out = await real_hscan(*args, **kwargs)
            await write_between_chunks()
            return out

        store.redis.hscan = hscan  # type: ignore[method-assign]
        try:
            registry = await store.registry_all()
        finally:
            store.redis.hscan = real_hscan  # type: ignore[method-assign]
        assert writes >= 3  # the read really was in chunks, with writes in between
        await writer.close()
    else:
        # Its whole read is one instant: writes before it (seen by it and in the log) and
        # after it (only in the log).
        await write_between_chunks()
        registry = await store.registry_all()
        await write_between_chunks()
    caught_up = await store.registry_changes(cursor)
    assert caught_up is not None
    assert apply(registry, caught_up) == await store.registry_all()
    assert registry != await store.registry_all()  # the changes were needed


async def test_an_overlap_also_gives_the_changes_logged_just_before_the_cursor(
    store: StateStore,
) -> None:
    # A registry write is logged before its transaction commits: a reader that took its cursor
    # and then read the database re-reads what was logged just before it.
    await store.registry_put({"before": 0})
    cursor = await store.registry_cursor()
    await store.registry_remove(["gone"])
    plain = await store.registry_changes(cursor)
    assert plain is not None and plain.changes == {"gone": None}
    wide = await store.registry_changes(cursor, overlap_ms=60_000)
    assert wide is not None and wide.changes == {"before": 0, "gone": None}
    assert wide.cursor == plain.cursor  # the overlap does not count against the version
