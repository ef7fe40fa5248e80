"""The fleet's id index (vpp/fleet/ids.py) answers as the dict it replaces would, through
offboarding (pop, in place) and onboarding (with_appended, a new index), also when ids share a
hash."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpp.fleet import ids as ids_module
from vpp.fleet.ids import IdIndex, rows_of

ID = st.text(alphabet="abcdef-0123", min_size=1, max_size=6)
OPS = st.lists(
    st.tuples(st.sampled_from(["pop", "append"]), st.lists(ID, min_size=1, max_size=4)),
    max_size=12,
)


def check(index: IdIndex, model: dict[str, int], probes: list[str]) -> None:
    assert len(index) == len(model)
    assert sorted(index) == sorted(model)
    for d in probes:
        assert index.get(d) == model.get(d), d
        assert (d in index) == (d in model), d
        assert index.get(d, -1) == model.get(d, -1)
    assert index.rows_of(probes).tolist() == [model.get(d, -1) for d in probes]
    assert rows_of(model, probes).tolist() == index.rows_of(probes).tolist()


def run(first: list[str], ops: list[tuple[str, list[str]]], probes: list[str]) -> None:
    start = list(dict.fromkeys(first))
    index = IdIndex.build(np.array(start, dtype=object))
    model = {d: i for i, d in enumerate(start)}
    rows = len(start)
    history: list[tuple[IdIndex, dict[str, int]]] = []
    for op, names in ops:
        if op == "pop":
            for d in names:
                if d in model:
                    assert index.pop(d) == model.pop(d)
                else:
                    with pytest.raises(KeyError):
                        index.pop(d)
        else:
            new = [d for d in dict.fromkeys(names) if d not in model]
            history.append((index, dict(model)))
            index = index.with_appended(new, rows)
            model.update({d: rows + i for i, d in enumerate(new)})
            rows += len(new)
        check(index, model, probes + names + start)
    # An index handed out before an onboarding still answers as it did then.
    for old, then in history[-1:]:
        live = {d: r for d, r in then.items() if d in old}
        assert {d: old[d] for d in old} == live


@settings(max_examples=150, deadline=None)
@given(first=st.lists(ID, max_size=20), ops=OPS, probes=st.lists(ID, max_size=8))
def test_the_index_answers_as_a_dict(first, ops, probes) -> None:
    run(first, ops, probes)


@settings(max_examples=150, deadline=None)
@given(first=st.lists(ID, max_size=20), ops=OPS, probes=st.lists(ID, max_size=8))
def test_ids_that_share_a_hash_are_never_confused(first, ops, probes) -> None:
    # Every id of one length shares one hash: most lookups go through the twins' dict.
    saved = ids_module._hash
    ids_module._hash = len  # type: ignore[assignment]
    try:
        run(first, ops, probes)
    finally:
        ids_module._hash = saved


def test_an_id_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        IdIndex.build(np.array(["a", "b", "a"], dtype=object))


def test_an_empty_index() -> None:
    index = IdIndex.build(np.zeros(0, dtype=object))
    assert len(index) == 0 and index.get("x") is None and "x" not in index
    assert index.rows_of(["x"]).tolist() == [-1]
    grown = index.with_appended(["x"], 0)
    assert grown["x"] == 0 and len(index) == 0
