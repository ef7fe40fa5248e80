"""Prometheus metrics, one definition per metric for the whole process (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_MESSAGES = Counter(
    "vpp_ingest_messages_total", "MQTT messages accepted by ingest", ["topic_kind"]
)
INGEST_REJECTED = Counter(
    "vpp_ingest_rejected_total", "MQTT messages dropped by ingest, by reason", ["reason"]
)
INGEST_REORDERED = Counter(
    "vpp_ingest_reordered_total",
    "Telemetry readings older than the stored state (another worker stored a newer one first), "
    "taken into the interval history but not the state",
)
INGEST_BATCH_SECONDS = Histogram(
    "vpp_ingest_batch_seconds", "Time to validate and store one ingest batch"
)
INGEST_CONNECTED = Gauge("vpp_ingest_connected", "1 while the ingest worker is connected")
HISTORY_ROWS = Counter("vpp_history_rows_total", "Interval-history rows written")
HISTORY_DROPPED = Counter(
    "vpp_ingest_history_dropped_total",
    "Valid readings dropped before reaching the interval history (the database down past "
    "history_buffer_max_rows, oldest intervals first, or the state store down past its buffer)",
)
HISTORY_PENDING = Gauge(
    "vpp_ingest_history_pending_readings",
    "Readings held by ingest, not yet committed to the interval history",
)
HISTORY_WRITE_CONFLICTS = Counter(
    "vpp_ingest_history_write_conflicts_total",
    "Interval-history transactions run again at once after a deadlock or serialization failure",
)
HISTORY_WRITE_FAILURES = Counter(
    "vpp_ingest_history_write_failures_total", "Interval-history writes that failed (retried)"
)

# The fleet and the dependencies as of the last scrape (refreshed by GET /metrics from the
# cached fleet snapshot and one ping each: api/routers/health.py).
FLEET_DEVICES = Gauge("vpp_fleet_devices", "Registered devices", ["region", "kind"])
FLEET_ONLINE = Gauge("vpp_fleet_online_devices", "Devices online now", ["region", "kind"])
FLEET_AVAILABLE_MW = Gauge("vpp_fleet_available_mw", "MW available now", ["region", "kind"])
DEPENDENCY_UP = Gauge(
    "vpp_dependency_up",
    "1 while the dependency answers (database, state_store, broker), as of the last scrape",
    ["dependency"],
)
EVENTS_ACTIVE = Gauge(
    "vpp_events_active", "Events the leader's runner is dispatching now (requests and grid events)"
)

COMMANDS_SENT = Counter("vpp_commands_sent_total", "Commands published", ["type"])
ACKS_RECEIVED = Counter("vpp_acks_total", "Command acknowledgements", ["status"])
DEVICES_REPLACED = Counter("vpp_devices_replaced_total", "Devices replaced during events", ["why"])
EVENT_DELIVERED_MW = Gauge(
    "vpp_event_delivered_mw", "Estimated delivered MW of a running event", ["event_id"]
)
EVENT_TARGET_MW = Gauge("vpp_event_target_mw", "Target MW of a running event now", ["event_id"])

HTTP_REQUESTS = Counter("vpp_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_RATE_LIMITED = Counter(
    "vpp_http_rate_limited_total", "Requests answered 429: their API key was over its rate limit"
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "vpp_rate_limit_store_errors_total",
    "Rate-limit checks the state store could not answer (the replica's own bucket decided)",
)
AUDIT_WRITE_FAILURES = Counter(
    "vpp_audit_write_failures_total", "Audit rows that could not be written after their action"
)

MARKET_REQUESTS = Counter(
    "vpp_market_requests_total",
    "Capacity-request outcomes: quoted, rejected, committed, conflict, cancelled, expired",
    ["outcome"],
)
PLANS_MADE = Counter("vpp_plans_total", "Dispatch plans stored, by why they were made", ["why"])

# The service as a VEN of upstream utility VTNs (dispatch/openadr/upstream.py), per upstream.
OPENADR_UPSTREAM_UP = Gauge(
    "vpp_openadr_upstream_up", "1 while the last poll of the upstream VTN worked", ["upstream"]
)
OPENADR_UPSTREAM_FAILURES = Counter(
    "vpp_openadr_upstream_failures_total", "Polls of an upstream VTN that failed", ["upstream"]
)
OPENADR_UPSTREAM_SKIPPED = Counter(
    "vpp_openadr_upstream_skipped_total",
    "Polls of an upstream VTN skipped while backing off after failures",
    ["upstream"],
)
