"""The dashboard is static: it loads without a key, ships its charting library (no CDN), and
every number on it comes from the authenticated /v1 API."""

from __future__ import annotations

import re

from api.routers.dashboard import STATIC_DIR
from tests.helpers.settings import make_settings


async def test_index_loads_without_a_key(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    resp = await client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert "<title>VPP dashboard</title>" in page
    assert 'id="key-input"' in page  # it asks for a key to fetch data
    # The page holds no data: nothing but the shell before a key is given.
    assert "vpp_" not in page.replace("vpp_…", "")


async def test_every_asset_the_page_names_is_served(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    page = (await client.get("/")).text
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert "/static/vendor/uplot.iife.min.js" in assets
    assert "/static/app.js" in assets
    for path in assets:
        resp = await client.get(path)
        assert resp.status_code == 200, path
        assert len(resp.content) > 100, path
    js = await client.get("/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript")
    # The live-events list says where each event came from (the API or an OpenADR event).
    assert "data-source" in js.text and "OpenADR" in js.text


def test_no_asset_is_fetched_from_the_network():
    """The service must work offline: no CDN, no external fonts or scripts."""
    for path in STATIC_DIR.rglob("*"):
        if path.suffix in (".html", ".css", ".js") and "vendor" not in path.parts:
            text = path.read_text()
            assert not re.search(r"(?:src|href)=\"https?://", text), path
            assert not re.search(r"@import\s+url\(\s*['\"]?https?://", text), path
            assert not re.search(r"fetch\(\s*['\"]https?://", text), path


def test_vendored_library_keeps_its_license():
    vendor = STATIC_DIR / "vendor"
    assert (vendor / "uplot.iife.min.js").stat().st_size > 20_000
    assert "MIT" in (vendor / "uplot.LICENSE").read_text()
    # The map's geography and the code that draws it: ISC, each with its licence file.
    for name in ("us-atlas", "topojson-client", "d3-geo", "d3-array"):
        text = (vendor / f"{name}.LICENSE").read_text()
        assert "Permission to use, copy, modify, and/or distribute this software" in text, name
    readme = (vendor / "README.md").read_text()
    for path in vendor.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} is not in vendor/README.md"


async def test_the_map_geography_is_served_as_json(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    resp = await client.get("/static/vendor/us-atlas-states-albers-10m.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    topo = resp.json()
    assert topo["type"] == "Topology"
    states = {g["properties"]["name"] for g in topo["objects"]["states"]["geometries"]}
    assert len(states) == 51 and {"Texas", "California", "Maine", "Alaska"} <= states
    # The page draws it with the scripts it loads.
    page = (await client.get("/")).text
    for script in ("d3-array.min.js", "d3-geo.min.js", "topojson-client.min.js"):
        assert f'src="/static/vendor/{script}"' in page


async def test_paths_outside_the_static_folder_are_404(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    for path in (
        "/static/../routers/dashboard.py",
        "/static/%2e%2e/routers/dashboard.py",
        "/static/..%2fapp.py",
        "/static/nope.js",
        "/static/vendor",
    ):
        resp = await client.get(path)
        assert resp.status_code == 404, path


async def test_data_still_needs_a_key(api_factory, sqlite_url):
    client, make_key = await api_factory(make_settings(sqlite_url))
    assert (await client.get("/v1/fleet")).status_code == 401
    headers = await make_key("acme", "operator")
    assert (await client.get("/v1/fleet", headers=headers)).status_code == 200


async def test_dashboard_is_not_in_the_api_document(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert not any(p.startswith("/static") for p in paths)
