"""Where the test servers are and how a test builds its Settings.

Storage, ingest and dispatch tests run against the real local services (PostgreSQL, Redis,
Mosquitto); each test session gets its own PostgreSQL database, Redis key prefix and MQTT topic
root (all tagged with ``RUN_ID``), so several runs can share the servers.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from vpp.settings import Settings

PG_ADMIN_DSN = os.environ.get("VPP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_URL = os.environ.get("VPP_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")

RUN_ID = uuid.uuid4().hex[:8]


def unique(prefix: str) -> str:
    return f"{prefix}-{RUN_ID}-{uuid.uuid4().hex[:6]}"


def make_settings(database_url: str, **overrides: object) -> Settings:
    """Settings for a test: embedded defaults unless overridden, unique prefix and topic root."""
    values: dict[str, object] = {
        "database_url": database_url,
        "mqtt_url": "memory://",
        "redis_url": "memory://",
        "state_prefix": unique("vppt"),
        "topic_root": unique("vppt") + "/v1",
        "broker_credentials": "none",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def settings_for(db_url: str, **overrides: Any) -> Settings:
    """Embedded defaults on SQLite; the real Redis state store next to PostgreSQL."""
    if db_url.startswith("postgresql"):
        overrides.setdefault("redis_url", REDIS_URL)
    return make_settings(db_url, **overrides)
