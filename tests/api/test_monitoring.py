"""What an operator's Prometheus and Grafana see: /metrics carries the fleet, dependency and
event gauges the dashboard and the alert rules in deploy/ are written over, and every metric
those files name is one the service exports (a renamed metric would leave a panel blank and an
alert silent)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.devices import battery, uid
from tests.helpers.settings import make_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(vpp_[a-z0-9_]+)")


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_show_the_fleet_and_the_dependencies(
    api_factory: Any, sqlite_url: str
) -> None:
    client, make_key = await api_factory(make_settings(sqlite_url))
    fleet = await make_key("acme", "fleet")
    for _ in range(2):
        r = await client.post(
            "/v1/devices", json=battery(uid("b"), region="MISO-Z4"), headers=fleet
        )
        assert r.status_code == 201, r.text
    await client.services.fleet.snapshot(force=True)
    text = (await client.get("/metrics")).text
    assert _sample(text, "vpp_fleet_devices", region="MISO-Z4", kind="battery") == 2
    assert _sample(text, "vpp_fleet_online_devices", region="MISO-Z4", kind="battery") == 0
    for dep in ("database", "broker", "state_store"):
        assert _sample(text, "vpp_dependency_up", dependency=dep) == 1, dep


async def test_a_dependency_down_shows_as_zero(api_factory: Any, sqlite_url: str) -> None:
    client, _ = await api_factory(make_settings(sqlite_url, redis_url="redis://127.0.0.1:1/0"))
    text = (await client.get("/metrics")).text
    assert _sample(text, "vpp_dependency_up", dependency="state_store") == 0
    assert _sample(text, "vpp_dependency_up", dependency="database") == 1


def _exported(text: str) -> set[str]:
    names = set(re.findall(r"^# HELP (\S+)", text, re.M))
    # A histogram's series carry suffixes; a counter's family may be named with or without _total.
    out = set(names)
    for n in names:
        out |= {n + s for s in ("_bucket", "_sum", "_count", "_total")}
    return out


async def test_the_dashboard_and_the_alerts_name_only_exported_metrics(
    api_factory: Any, sqlite_url: str
) -> None:
    client, _ = await api_factory(make_settings(sqlite_url))
    exported = _exported((await client.get("/metrics")).text)

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "VppIngestStalled",
        "VppDependencyDown",
        "VppEventUnderDelivering",
        "VppIngestDisconnected",
    }
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        assert a["annotations"]["summary"], a["alert"]
        unknown = set(METRIC.findall(a["expr"])) - exported
        assert not unknown, f"{a['alert']} names {unknown}"

    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "vpp.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    titles = " | ".join(p["title"] for p in panels)
    for topic in ("Rejections", "Online share", "Events active", "Delivery against target",
                  "Acks", "Dependencies up"):  # fmt: skip
        assert topic in titles, topic
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            unknown = set(METRIC.findall(t["expr"])) - exported
            assert not unknown, f"panel {p['title']!r} names {unknown}"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yaml" in prom["rule_files"]
