"""Fixtures of the API tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.devices import NOW
from tests.helpers.settings import settings_for
from vpp.clock import ManualClock


@pytest.fixture()
async def api(db_url: str, api_factory: Any) -> Any:
    """A client on a fresh database (SQLite, then PostgreSQL with Redis) with a ManualClock at
    NOW and a fleet key of tenant acme in its headers. (test_capacity_requests and
    test_api_robustness define an ``api`` of their own.)"""
    client, make_key = await api_factory(settings_for(db_url), ManualClock(NOW))
    client.headers.update(await make_key("acme", "fleet"))
    return client
