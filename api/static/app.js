/* VPP dashboard: plain JS, no build step. Every number comes from an authenticated /v1 call
 * that returns aggregates (never a list of devices), so the page stays fast with a million
 * devices. The API key is typed once and kept in this tab's sessionStorage. */
(function () {
  "use strict";

  const KEY_STORAGE = "vpp.apiKey";
  const REFRESH_MS = { fleet: 10000, map: 15000, region: 15000, forecast: 60000, requests: 10000, events: 3000, settlement: 30000 };
  const PAGES = ["fleet", "map", "region", "forecast", "requests", "events", "settlement"];
  // The us-atlas states are projected with this Albers USA into a 975×610 frame (vendor/README.md):
  // the load zones' latitude and longitude go through the same projection.
  const ATLAS_URL = "/static/vendor/us-atlas-states-albers-10m.json";
  const MAP_W = 975;
  const MAP_H = 610;

  const state = {
    page: null,
    param: null,
    timer: null,
    charts: {},
    fleetRegions: [],
    selectedEvent: null,
    selectedRequest: null,
    loading: false,
    registry: null, // region name → registry row (GET /v1/regions)
    registryAt: 0,
    quoteDirty: false, // the buyer typed a window: stop moving it with the forecast
    region: null,
    dev: { sig: "", cursors: [null], index: 0, next: null },
  };

  // ---------------------------------------------------------------------------------------------
  // Small helpers
  const $ = (id) => document.getElementById(id);
  const esc = (s) =>
    String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const num = (v) => (v === null || v === undefined || v === "" || isNaN(Number(v)) ? null : Number(v));
  const fmtInt = (v) => (num(v) === null ? "–" : Math.round(Number(v)).toLocaleString("en-US"));
  const fmtMW = (v, digits) => {
    const n = num(v);
    if (n === null) return "–";
    const d = digits ?? (Math.abs(n) >= 100 ? 1 : Math.abs(n) >= 1 ? 2 : 3);
    return n.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d }) + " MW";
  };
  const fmtPct = (v) => (num(v) === null ? "–" : (Number(v) * 100).toFixed(1) + " %");
  const pad = (n) => String(n).padStart(2, "0");

  function toMs(v) {
    if (v === null || v === undefined) return null;
    if (typeof v === "number") return v > 1e11 ? v : v * 1000;
    const t = Date.parse(v);
    return isNaN(t) ? null : t;
  }
  function fmtTime(v, withDate = true) {
    const ms = toMs(v);
    if (ms === null) return "–";
    const d = new Date(ms);
    const hm = pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
    return withDate ? `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${hm}` : hm;
  }
  function fmtWindow(start, end) {
    const a = toMs(start);
    const b = toMs(end);
    if (a === null) return "–";
    const sameDay = b !== null && new Date(a).toISOString().slice(0, 10) === new Date(b).toISOString().slice(0, 10);
    return fmtTime(a) + " → " + (b === null ? "?" : fmtTime(b, !sameDay));
  }
  const pick = (obj, names) => {
    if (!obj || typeof obj !== "object") return undefined;
    for (const n of names) if (obj[n] !== undefined && obj[n] !== null) return obj[n];
    return undefined;
  };
  // The list in a response: the response itself, or the first of the named keys holding an array,
  // or the only array-valued key. Tolerant on purpose: the dashboard should survive additions.
  function listOf(data, names) {
    if (Array.isArray(data)) return data;
    if (!data || typeof data !== "object") return [];
    for (const n of names || []) if (Array.isArray(data[n])) return data[n];
    for (const n of ["items", "data", "results", "rows"]) if (Array.isArray(data[n])) return data[n];
    const arrays = Object.values(data).filter(Array.isArray);
    return arrays.length === 1 ? arrays[0] : [];
  }
  function setStatus(id, message, bad) {
    const el = $(id);
    if (!el) return;
    el.textContent = message || "";
    el.classList.toggle("bad", !!bad);
  }
  function badge(status) {
    const s = String(status || "unknown");
    return `<span class="badge ${esc(s)}">${esc(s)}</span>`;
  }

  // ---------------------------------------------------------------------------------------------
  // API
  const getKey = () => sessionStorage.getItem(KEY_STORAGE);

  class ApiError extends Error {
    constructor(status, detail, missing) {
      super(detail);
      this.status = status;
      this.missing = missing;
    }
  }

  async function api(path, opts = {}) {
    const key = getKey();
    if (!key) {
      showLogin();
      throw new ApiError(401, "no API key");
    }
    const headers = Object.assign({ Authorization: "Bearer " + key }, opts.headers || {});
    let resp;
    try {
      resp = await fetch(path, Object.assign({}, opts, { headers }));
    } catch (err) {
      throw new ApiError(0, "the service does not answer (" + err.message + ")");
    }
    const text = await resp.text();
    let data = text;
    if ((resp.headers.get("content-type") || "").includes("json")) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        /* keep text */
      }
    }
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      showLogin("That key was not accepted (401): " + detailOf(data));
      throw new ApiError(401, detailOf(data));
    }
    if (!resp.ok) {
      // FastAPI answers an unknown route with exactly "Not Found": the endpoint is not there yet.
      const detail = detailOf(data);
      const missing = (resp.status === 404 && detail === "Not Found") || resp.status === 405;
      throw new ApiError(resp.status, detail, missing);
    }
    return data;
  }
  function detailOf(data) {
    if (data && typeof data === "object" && "detail" in data) {
      const d = data.detail;
      if (typeof d === "string") return d;
      if (Array.isArray(d)) return d.map((e) => e.msg || JSON.stringify(e)).join("; ");
      return JSON.stringify(d);
    }
    return typeof data === "string" ? data.slice(0, 200) : "";
  }
  function explain(err, what) {
    if (!(err instanceof ApiError)) return `${what}: ${err.message}`;
    if (err.missing) return `${what}: not available on this service yet.`;
    if (err.status === 403) return `${what}: your key's role may not see this (${err.message}).`;
    if (err.status === 0) return `${what}: ${err.message}`;
    return `${what}: ${err.status} ${err.message}`;
  }

  // ---------------------------------------------------------------------------------------------
  // Charts (uPlot)
  function chartWidth(el) {
    return Math.max(320, el.clientWidth || el.parentElement.clientWidth - 32 || 800);
  }
  function drawChart(name, el, series, data, extra = {}) {
    let chart = state.charts[name];
    const sig = series.map((s) => s.label).join("|");
    if (chart && chart._sig === sig && chart.root.isConnected) {
      chart.setData(data);
      return chart;
    }
    if (chart) chart.destroy();
    el.innerHTML = "";
    const height = extra.height || (el.classList.contains("small") ? 220 : 340);
    const opts = Object.assign(
      {
        width: chartWidth(el),
        height,
        series: [{ label: "UTC", value: (u, v) => (v == null ? "–" : fmtTime(v * 1000)) }].concat(series),
        axes: [
          { values: (u, ticks) => ticks.map((t) => fmtTime(t * 1000, false)), grid: { stroke: "#eef1f4" } },
          { label: extra.yLabel || "MW", grid: { stroke: "#eef1f4" }, size: 60 },
        ],
        scales: { x: { time: true } },
        cursor: { drag: { x: true, y: false } },
        legend: { live: true },
      },
      extra.opts || {},
    );
    chart = new uPlot(opts, data, el);
    chart._sig = sig;
    state.charts[name] = chart;
    return chart;
  }
  function dropChart(name) {
    if (state.charts[name]) {
      state.charts[name].destroy();
      delete state.charts[name];
    }
  }
  window.addEventListener("resize", () => {
    for (const chart of Object.values(state.charts)) {
      if (chart.root.isConnected && chart.root.parentElement) {
        chart.setSize({ width: chartWidth(chart.root.parentElement), height: chart.height });
      }
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Fleet
  // Rows of {region, kind, registered, online, available_mw}, wherever the response nests them
  // (a flat list, or regions → kinds); the region is inherited from the enclosing object or key.
  const STRUCTURAL = new Set(["kinds", "by_kind", "regions", "by_region", "rows", "items", "totals", "total", "points", "feeders", "sites", "map", "data"]);
  const KINDS = new Set(["battery", "solar", "thermostat"]);
  function fleetRows(data) {
    const rows = [];
    const walk = (node, region, keyName) => {
      if (Array.isArray(node)) {
        node.forEach((n) => walk(n, region, null));
        return;
      }
      if (!node || typeof node !== "object") return;
      const here = node.region ?? region;
      const kind = node.kind ?? (KINDS.has(keyName) ? keyName : null);
      if (kind && KINDS.has(kind) && (node.registered !== undefined || node.online !== undefined || node.available_mw !== undefined)) {
        rows.push({
          region: here || "?",
          kind,
          registered: num(pick(node, ["registered", "devices", "count"])) || 0,
          online: num(node.online) || 0,
          available_mw: num(pick(node, ["available_mw", "available_now_mw", "flexibility_mw"])) || 0,
          lat: num(node.lat),
          lon: num(node.lon),
        });
        return;
      }
      for (const [k, v] of Object.entries(node)) {
        if (!v || typeof v !== "object" || k === "totals" || k === "total") continue;
        const isRegionKey = !here && !Array.isArray(v) && !STRUCTURAL.has(k) && !KINDS.has(k) && !("kind" in v) && !("region" in v);
        walk(v, isRegionKey ? k : here, k);
      }
    };
    walk(data, undefined, null);
    return rows;
  }
  async function loadFleet() {
    let data;
    try {
      data = await api("/v1/fleet");
      setStatus("fleet-status", "");
    } catch (err) {
      setStatus("fleet-status", explain(err, "Fleet"), !err.missing);
      return;
    }
    const rows = fleetRows(data);
    state.fleetRegions = [...new Set(rows.map((r) => r.region))].sort();
    const total = rows.reduce(
      (a, r) => ({ registered: a.registered + r.registered, online: a.online + r.online, mw: a.mw + r.available_mw }),
      { registered: 0, online: 0, mw: 0 },
    );
    $("fleet-registered").textContent = fmtInt(total.registered);
    $("fleet-online").textContent = fmtInt(total.online);
    $("fleet-share").textContent = total.registered ? fmtPct(total.online / total.registered) : "–";
    $("fleet-available").textContent = fmtMW(total.mw);
    $("fleet-available").dataset.mw = String(total.mw);
    $("fleet-registered").dataset.value = String(total.registered);
    $("fleet-online").dataset.value = String(total.online);

    const tbody = $("fleet-table").querySelector("tbody");
    if (!rows.length) {
      tbody.innerHTML = `<tr><td colspan="6" class="empty">No devices registered yet.</td></tr>`;
    } else {
      const html = [];
      for (const region of state.fleetRegions) {
        const mine = rows.filter((r) => r.region === region).sort((a, b) => a.kind.localeCompare(b.kind));
        let sub = { registered: 0, online: 0, mw: 0 };
        for (const r of mine) {
          sub = { registered: sub.registered + r.registered, online: sub.online + r.online, mw: sub.mw + r.available_mw };
          const share = r.registered ? r.online / r.registered : 0;
          html.push(`<tr data-region="${esc(r.region)}" data-kind="${esc(r.kind)}">
            <td><a href="#region/${encodeURIComponent(r.region)}">${esc(r.region)}</a></td><td>${esc(r.kind)}</td>
            <td class="num" data-field="registered">${fmtInt(r.registered)}</td>
            <td class="num" data-field="online">${fmtInt(r.online)}</td>
            <td class="num"><div style="display:flex;gap:6px;align-items:center;justify-content:flex-end">
              <div class="bar" style="width:60px"><span style="width:${(share * 100).toFixed(1)}%"></span></div>${fmtPct(share)}</div></td>
            <td class="num" data-field="available_mw" data-mw="${r.available_mw}">${fmtMW(r.available_mw)}</td></tr>`);
        }
        const share = sub.registered ? sub.online / sub.registered : 0;
        html.push(`<tr class="subtotal" data-region="${esc(region)}" data-kind="all"><td>${esc(region)}</td><td>all</td>
          <td class="num">${fmtInt(sub.registered)}</td><td class="num">${fmtInt(sub.online)}</td>
          <td class="num">${fmtPct(share)}</td><td class="num">${fmtMW(sub.mw)}</td></tr>`);
      }
      tbody.innerHTML = html.join("");
    }
    const registry = await ensureRegistry();
    await drawUsMap($("fleet-map"), zonesOf(rows, registry), { fit: true });
  }

  // ---------------------------------------------------------------------------------------------
  // Regions and the US map
  async function ensureRegistry() {
    if (state.registry && Date.now() - state.registryAt < 300000) return state.registry;
    try {
      const data = await api("/v1/regions");
      state.registry = new Map(listOf(data, ["regions"]).map((r) => [r.name, r]));
      state.registryAt = Date.now();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      if (!state.registry) state.registry = new Map();
    }
    return state.registry;
  }

  // One entry per load zone: the registry's facts with the fleet's devices, online and MW; a
  // region with devices that the registry lacks sits at its devices' mean position, if any.
  function zonesOf(rows, registry) {
    const fleet = new Map();
    for (const r of rows) {
      let z = fleet.get(r.region);
      if (!z) {
        z = { devices: 0, online: 0, mw: 0, kinds: {}, latSum: 0, lonSum: 0, located: 0 };
        fleet.set(r.region, z);
      }
      z.devices += r.registered;
      z.online += r.online;
      z.mw += r.available_mw;
      z.kinds[r.kind] = (z.kinds[r.kind] || 0) + r.registered;
      if (r.lat !== null && r.lon !== null && r.registered) {
        z.latSum += r.lat * r.registered;
        z.lonSum += r.lon * r.registered;
        z.located += r.registered;
      }
    }
    const empty = { devices: 0, online: 0, mw: 0, kinds: {} };
    const zones = [];
    for (const [name, reg] of registry) {
      const z = fleet.get(name) || empty;
      zones.push({ name, reg, lat: num(reg.latitude), lon: num(reg.longitude), devices: z.devices, online: z.online, mw: z.mw, kinds: z.kinds });
    }
    for (const [name, z] of fleet) {
      if (registry.has(name)) continue;
      const lat = z.located ? z.latSum / z.located : null;
      const lon = z.located ? z.lonSum / z.located : null;
      zones.push({ name, reg: null, lat, lon, devices: z.devices, online: z.online, mw: z.mw, kinds: z.kinds });
    }
    return zones;
  }

  let atlasPromise = null;
  function loadAtlas() {
    if (!atlasPromise) {
      atlasPromise = fetch(ATLAS_URL)
        .then((r) => {
          if (!r.ok) throw new Error(`${ATLAS_URL} answered ${r.status}`);
          return r.json();
        })
        .then((topo) => {
          const path = d3.geoPath(); // the file is already projected: no projection here
          const states = topojson
            .feature(topo, topo.objects.states)
            .features.map((f) => `<path class="state" d="${path(f)}"><title>${esc(f.properties.name)}</title></path>`)
            .join("");
          const borders = path(topojson.mesh(topo, topo.objects.states, (a, b) => a !== b));
          const nation = path(topojson.feature(topo, topo.objects.nation));
          return `<g class="geo">${states}<path class="borders" d="${borders}"/><path class="nation" d="${nation}"/></g>`;
        })
        .catch((err) => {
          atlasPromise = null;
          throw err;
        });
    }
    return atlasPromise;
  }

  // Online share → colour: red (none online) through amber to the accent green (all online).
  function shareColor(share) {
    const hue = Math.round(4 + 166 * Math.max(0, Math.min(1, share)));
    return `hsl(${hue}, 72%, 36%)`;
  }

  async function drawUsMap(el, zones, opts = {}) {
    let geo;
    try {
      geo = await loadAtlas();
    } catch (err) {
      el.innerHTML = `<div class="note">The map's geography could not be loaded (${esc(err.message)}).</div>`;
      return;
    }
    const proj = d3.geoAlbersUsa().scale(1300).translate([MAP_W / 2, MAP_H / 2]);
    const placed = [];
    const unplaced = [];
    for (const z of zones) {
      const xy = z.lat !== null && z.lon !== null ? proj([z.lon, z.lat]) : null;
      if (xy) placed.push(Object.assign({ x: xy[0], y: xy[1] }, z));
      else if (z.devices) unplaced.push(z);
    }
    const busy = placed.filter((z) => z.devices > 0);
    const maxDevices = Math.max(1, ...busy.map((z) => z.devices));
    // The whole country, or (fit) the part around the zones with devices, with room for labels.
    let [vx, vy, vw, vh] = [0, 0, MAP_W, MAP_H];
    if (opts.fit && busy.length) {
      const xs = busy.map((z) => z.x);
      const ys = busy.map((z) => z.y);
      const pad = 70;
      vx = Math.min(...xs) - pad;
      vy = Math.min(...ys) - pad;
      vw = Math.max(...xs) + pad + 110 - vx; // labels sit on the right
      vh = Math.max(...ys) + pad - vy;
      const aspect = MAP_W / MAP_H;
      if (vw / vh < aspect) {
        vx -= (vh * aspect - vw) / 2;
        vw = vh * aspect;
      } else {
        vy -= (vw / aspect - vh) / 2;
        vh = vw / aspect;
      }
      if (vw > MAP_W) [vx, vy, vw, vh] = [0, 0, MAP_W, MAP_H];
    }
    // Map units per screen pixel: marks and text keep their size on screen at any zoom. The
    // drawing is as wide as the card, or less where its height (app.css) is the limit.
    const shown = Math.min(el.clientWidth || MAP_W, ((opts.maxHeight || 320) * MAP_W) / MAP_H);
    const k = vw / Math.max(shown, 300);
    const radius = (z) => (6 + 20 * Math.sqrt(z.devices / maxDevices)) * k;
    const f = (v) => v.toFixed(1);
    const title = (z) => {
      const where = z.reg ? `${z.reg.label} (${z.reg.iso})` : "not in the region registry";
      if (!z.devices) return `${z.name}: ${where}, no devices${z.reg && z.reg.sold === false ? ", not sold here" : ""}`;
      const kinds = Object.entries(z.kinds).map(([kd, n]) => `${fmtInt(n)} ${kd}`).join(", ");
      return `${z.name}: ${where}\n${fmtInt(z.devices)} devices (${kinds})\n${fmtInt(z.online)} online (${fmtPct(z.online / z.devices)})\navailable now ${fmtMW(z.mw)}`;
    };
    const dots = placed
      .filter((z) => !z.devices)
      .map((z) => `<circle class="zone empty" data-region="${esc(z.name)}" cx="${f(z.x)}" cy="${f(z.y)}" r="${f(2.8 * k)}"><title>${esc(title(z))}</title></circle>`)
      .join("");
    const markers = busy
      .sort((a, b) => b.devices - a.devices)
      .map((z) => {
        const r = radius(z);
        const share = z.online / z.devices;
        const c = shareColor(share);
        const tx = f(z.x + r + 4 * k);
        return `<g class="zone-marker" data-region="${esc(z.name)}" data-devices="${z.devices}" data-online="${z.online}" data-mw="${z.mw}" tabindex="0" role="link">
          <circle cx="${f(z.x)}" cy="${f(z.y)}" r="${f(r)}" fill="${c}" fill-opacity="0.6" stroke="${c}" stroke-width="${f(1.5 * k)}"/>
          <text class="zone-label" x="${tx}" y="${f(z.y - 2 * k)}" style="font-size:${f(13 * k)}px;stroke-width:${f(3 * k)}px">${esc(z.name)}</text>
          <text class="zone-sub" x="${tx}" y="${f(z.y + 12 * k)}" style="font-size:${f(11.5 * k)}px;stroke-width:${f(3 * k)}px">${fmtInt(z.devices)} · ${fmtPct(share)} online · ${fmtMW(z.mw)}</text>
          <title>${esc(title(z))}</title></g>`;
      })
      .join("");
    // Legend (under the map, so it never covers a state): size is devices, colour the share online.
    const grad = [0, 0.25, 0.5, 0.75, 1].map((t) => `${shareColor(t)} ${t * 100}%`).join(", ");
    const legend = `<div class="map-legend"><span><span class="grad" style="background:linear-gradient(90deg, ${grad})"></span>
      online share 0 % → 100 %</span><span>circle area: devices</span><span><span class="dot"></span> zone without devices</span></div>`;
    el.innerHTML =
      `<svg viewBox="${f(vx)} ${f(vy)} ${f(vw)} ${f(vh)}" preserveAspectRatio="xMidYMid meet" role="img" aria-label="US load zones">` +
      `<g style="stroke-width:${f(k)}">${geo}</g>${dots}${markers}</svg>${legend}` +
      (unplaced.length ? `<div class="note small">Not on the map (no coordinates): ${unplaced.map((z) => esc(z.name)).join(", ")}</div>` : "");
    el.dataset.zones = String(busy.length);
    el.querySelectorAll("[data-region]").forEach((g) => {
      const go = () => (location.hash = "#region/" + encodeURIComponent(g.dataset.region));
      g.addEventListener("click", go);
      g.addEventListener("keydown", (e) => e.key === "Enter" && go());
    });
  }

  async function loadMap() {
    let data;
    try {
      data = await api("/v1/fleet");
      setStatus("map-status", "");
    } catch (err) {
      setStatus("map-status", explain(err, "Fleet"), !err.missing);
      return;
    }
    const registry = await ensureRegistry();
    const zones = zonesOf(fleetRows(data), registry);
    await drawUsMap($("us-map"), zones, { maxHeight: 640 });
    const busy = zones.filter((z) => z.devices > 0).sort((a, b) => b.devices - a.devices);
    $("map-table").querySelector("tbody").innerHTML = busy.length
      ? busy
          .map((z) => {
            const share = z.online / z.devices;
            return `<tr class="clickable" data-region="${esc(z.name)}">
              <td><a href="#region/${encodeURIComponent(z.name)}">${esc(z.name)}</a></td>
              <td>${z.reg ? esc(z.reg.label) + ` <span class="muted">${esc(z.reg.iso)}</span>` : `<span class="muted">not in the registry</span>`}</td>
              <td class="num">${fmtInt(z.devices)}</td><td class="num">${fmtInt(z.online)}</td>
              <td class="num" style="color:${shareColor(share)}">${fmtPct(share)}</td><td class="num">${fmtMW(z.mw)}</td></tr>`;
          })
          .join("")
      : `<tr><td colspan="6" class="empty">No devices registered yet: every zone of the registry is drawn as a dot.</td></tr>`;
    $("map-table")
      .querySelectorAll("tr.clickable")
      .forEach((tr) => tr.addEventListener("click", () => (location.hash = "#region/" + encodeURIComponent(tr.dataset.region))));
  }

  // ---------------------------------------------------------------------------------------------
  // Region: the zone's facts, its fleet figures and its devices (filtered, paged by cursor)
  function fmtOffset(h) {
    const n = num(h);
    if (n === null) return "";
    const sign = n < 0 ? "−" : "+";
    const a = Math.abs(n);
    return `UTC${sign}${Math.floor(a)}${a % 1 ? ":" + pad(Math.round((a % 1) * 60)) : ""}`;
  }
  function fmtLatLon(lat, lon) {
    if (num(lat) === null || num(lon) === null) return "–";
    return `${Math.abs(lat).toFixed(2)}° ${lat >= 0 ? "N" : "S"}, ${Math.abs(lon).toFixed(2)}° ${lon >= 0 ? "E" : "W"}`;
  }

  async function loadRegion() {
    const registry = await ensureRegistry();
    let rows = [];
    try {
      rows = fleetRows(await api("/v1/fleet"));
      setStatus("region-status", "");
    } catch (err) {
      setStatus("region-status", explain(err, "Fleet"), !err.missing);
    }
    const withDevices = [...new Set(rows.map((r) => r.region))].sort();
    const name = state.param || state.region || withDevices[0] || [...registry.keys()][0];
    if (!name) {
      setStatus("region-status", "No regions yet.");
      return;
    }
    if (state.region !== name) {
      state.region = name;
      state.dev = { sig: "", cursors: [null], index: 0, next: null };
    }
    const select = $("region-select");
    const names = [...new Set([...withDevices, ...[...registry.keys()].sort(), name])];
    if (select.options.length !== names.length || select.value !== name) {
      select.innerHTML = names
        .map((n) => `<option value="${esc(n)}">${esc(n)}${withDevices.includes(n) ? "" : " (no devices)"}</option>`)
        .join("");
      select.value = name;
    }
    const reg = registry.get(name);
    $("region-title").textContent = name;
    $("region-subtitle").textContent = reg ? `${reg.label} · ${reg.iso} zone ${reg.zone}` : "not in the region registry";
    const mine = rows.filter((r) => r.region === name);
    const t = mine.reduce((a, r) => ({ n: a.n + r.registered, on: a.on + r.online, mw: a.mw + r.available_mw }), { n: 0, on: 0, mw: 0 });
    $("region-registered").textContent = fmtInt(t.n);
    $("region-registered").dataset.value = String(t.n);
    $("region-online").textContent = fmtInt(t.on);
    $("region-share").textContent = t.n ? fmtPct(t.on / t.n) : "–";
    $("region-available").textContent = fmtMW(t.mw);
    const kinds = mine.map((r) => `${fmtInt(r.registered)} ${esc(r.kind)}`).join(" · ") || "none";
    const facts = reg
      ? [
          ["ISO / zone", `${esc(reg.iso)} · ${esc(reg.zone)}`],
          ["Time zone", `${esc(reg.time_zone)} <span class="muted">(${fmtOffset(reg.utc_offset_h)} standard)</span>`],
          ["Load centre", fmtLatLon(reg.latitude, reg.longitude)],
          ["Climate", esc(reg.climate)],
          ["Weather", reg.weather ? `typical year ${esc(reg.weather.typical_year)}, ${num(reg.weather.distance_km)?.toFixed(0)} km away` : "–"],
          ["Sold here", reg.sold ? "yes" : "no (VPP_REGIONS)"],
          ["Devices by kind", kinds],
          ["Forecast", `<a href="#forecast" data-region="${esc(name)}" id="region-forecast-link">forecast and quote →</a>`],
        ]
      : [["Registry", "this region is not in the registry (GET /v1/regions)"], ["Devices by kind", kinds]];
    $("region-facts").innerHTML = facts.map(([k, v]) => `<div><span>${k}</span>${v}</div>`).join("");
    const link = $("region-forecast-link");
    if (link) link.addEventListener("click", () => (state.forecastRegion = name));
    await loadDevices(name);
  }

  function deviceSize(d) {
    if (d.kind === "battery") return `${((num(d.capacity_wh) || 0) / 1000).toFixed(1)} kWh · ${((num(d.max_discharge_w) || 0) / 1000).toFixed(1)} kW`;
    if (d.kind === "solar") return `${((num(d.rated_w) || 0) / 1000).toFixed(1)} kW`;
    if (d.kind === "thermostat") return `${((num(d.hvac_rated_w) || 0) / 1000).toFixed(1)} kW HVAC`;
    return "";
  }

  async function loadDevices(region) {
    const dev = state.dev;
    const filters = {
      region,
      kind: $("dev-kind").value,
      status: $("dev-status").value,
      id_prefix: $("dev-id").value.trim(),
      limit: $("dev-limit").value,
    };
    const sig = JSON.stringify(filters);
    if (sig !== dev.sig) Object.assign(dev, { sig, cursors: [null], index: 0, next: null });
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    if (dev.cursors[dev.index]) q.set("cursor", dev.cursors[dev.index]);
    const tbody = $("dev-table").querySelector("tbody");
    let data;
    try {
      data = await api("/v1/devices?" + q.toString());
    } catch (err) {
      const why =
        err.status === 403
          ? "Listing devices needs a key with the fleet role (its own tenant's devices) or admin; this key may not list them. The figures above are the whole fleet's."
          : explain(err, "Devices");
      tbody.innerHTML = `<tr><td colspan="9" class="empty" data-testid="dev-denied">${esc(why)}</td></tr>`;
      ["dev-first", "dev-prev", "dev-next"].forEach((id) => ($(id).disabled = true));
      $("dev-page").textContent = "";
      return;
    }
    if (sig !== dev.sig) return; // the filters changed while this page was on its way
    const devices = listOf(data, ["devices"]);
    dev.next = data.next_cursor || null;
    tbody.innerHTML = devices.length
      ? devices
          .map(
            (d) => `<tr data-id="${esc(d.id)}" data-kind="${esc(d.kind)}" data-online="${d.online ? "true" : "false"}">
            <td class="mono">${esc(d.id)}</td><td>${esc(d.kind)}</td><td class="num">${deviceSize(d)}</td>
            <td class="mono">${esc(d.site_id)}</td><td>${esc(d.feeder || "–")}</td>
            <td>${d.enrolled ? "yes" : `<span class="warn">opted out</span>`}</td>
            <td>${d.online ? "online" : `<span class="muted">offline</span>`}</td>
            <td><span class="fresh ${esc(d.freshness)}">${esc(d.freshness)}</span></td>
            <td class="num">${num(d.available_kw) === null ? "–" : Number(d.available_kw).toFixed(2) + " kW"}</td></tr>`,
          )
          .join("")
      : `<tr><td colspan="9" class="empty">No devices match.</td></tr>`;
    const per = Number(filters.limit);
    const first = dev.index * per + 1;
    $("dev-page").textContent = devices.length ? `page ${dev.index + 1} · devices ${fmtInt(first)}–${fmtInt(first + devices.length - 1)}` : `page ${dev.index + 1}`;
    $("dev-page").dataset.page = String(dev.index + 1);
    // Which filters the rows shown answer (tests and scripts wait on it, not on the rows).
    $("dev-table").dataset.filters = sig;
    $("dev-first").disabled = dev.index === 0;
    $("dev-prev").disabled = dev.index === 0;
    $("dev-next").disabled = !dev.next;
  }

  function pageDevices(step) {
    const dev = state.dev;
    if (step === "next" && dev.next) {
      dev.cursors = dev.cursors.slice(0, dev.index + 1).concat([dev.next]);
      dev.index += 1;
    } else if (step === "prev" && dev.index > 0) dev.index -= 1;
    else if (step === "first") dev.index = 0;
    else return;
    if (state.region) loadDevices(state.region);
  }

  // ---------------------------------------------------------------------------------------------
  // Forecast
  async function ensureRegions() {
    if (state.fleetRegions.length) return state.fleetRegions;
    try {
      state.fleetRegions = [...new Set(fleetRows(await api("/v1/fleet")).map((r) => r.region))].sort();
    } catch (_) {
      state.fleetRegions = [];
    }
    return state.fleetRegions;
  }

  const EVENT_LABELS = { PT15M: "15 min", PT30M: "30 min", PT1H: "1 h", PT2H: "2 h", PT3H: "3 h", PT4H: "4 h", PT5H: "5 h" };
  const STEP_MS = 900000;
  function durationMs(iso) {
    const m = /^PT(?:(\d+)H)?(?:(\d+)M)?$/.exec(iso || "");
    return m ? ((Number(m[1]) || 0) * 60 + (Number(m[2]) || 0)) * 60000 : 3600000;
  }
  // datetime-local inputs hold UTC here (the dashboard shows UTC everywhere).
  const toLocalInput = (ms) => new Date(ms).toISOString().slice(0, 16);
  const fromLocalInput = (v) => (v ? (v.length === 16 ? v + ":00" : v) + "Z" : "");

  async function loadForecast() {
    const select = $("forecast-region");
    const regions = await ensureRegions();
    if (select.options.length !== regions.length || [...select.options].some((o, i) => o.value !== regions[i])) {
      const keep = select.value;
      select.innerHTML = regions.map((r) => `<option>${esc(r)}</option>`).join("");
      if (regions.includes(keep)) select.value = keep;
    }
    if (state.forecastRegion && regions.includes(state.forecastRegion)) select.value = state.forecastRegion;
    state.forecastRegion = null;
    const region = select.value;
    if (!region) {
      setStatus("forecast-status", "No region with devices yet: register devices to see a forecast.");
      return;
    }
    const event = $("forecast-event").value || "PT1H";
    let data;
    try {
      data = await api(`/v1/forecast?region=${encodeURIComponent(region)}&step=PT15M&event=${encodeURIComponent(event)}`);
      setStatus("forecast-status", "");
    } catch (err) {
      setStatus("forecast-status", explain(err, "Forecast"), !err.missing);
      return;
    }
    let nowMw = null;
    try {
      nowMw = fleetRows(await api(`/v1/fleet?region=${encodeURIComponent(region)}`))
        .filter((r) => r.region === region)
        .reduce((a, r) => a + r.available_mw, 0);
    } catch (_) {
      /* the comparison is a bonus */
    }
    const rows = listOf(data, ["intervals"]);
    const xs = [];
    const p50 = [];
    const p90 = [];
    const committed = [];
    for (const r of rows) {
      const t = toMs(pick(r, ["start", "ts", "time"]));
      if (t === null) continue;
      xs.push(t / 1000);
      p50.push(num(r.p50_mw));
      p90.push(num(r.p90_mw));
      committed.push(num(r.committed_mw) ?? 0);
    }
    const shownEvent = data.event || event;
    const len = EVENT_LABELS[shownEvent] || shownEvent;
    let peakAt = -1;
    p90.forEach((v, i) => {
      if (v !== null && (peakAt < 0 || v > p90[peakAt])) peakAt = i;
    });
    const peak90 = peakAt >= 0 ? p90[peakAt] : null;
    const peakCommitted = Math.max(0, ...committed);
    $("fc-first-label").textContent = xs.length ? `P90, ${len} event from ${fmtTime(xs[0] * 1000, false)}` : "P90, next interval";
    $("fc-first").textContent = fmtMW(p90[0]);
    $("fc-first").dataset.mw = String(p90[0] ?? "");
    $("fc-peak").textContent = fmtMW(peak90);
    $("fc-peak").dataset.mw = String(peak90 ?? "");
    $("fc-peak-at").textContent = peakAt >= 0 ? `${len} event from ${fmtTime(xs[peakAt] * 1000)} UTC` : "";
    $("fc-committed").textContent = fmtMW(peakCommitted);
    $("fc-now").textContent = fmtMW(nowMw);
    $("fc-now").dataset.mw = String(nowMw ?? "");
    const meaning = $("forecast-meaning");
    meaning.dataset.event = shownEvent;
    meaning.innerHTML =
      `<strong>P90</strong> at a time is the MW ${esc(region)} can hold flat for an event of this length ` +
      `(<strong>${esc(len)}</strong>) starting then, with 90 % probability (P50: with 50 %). ` +
      `It is not the fleet page's <em>available now</em> (${fmtMW(nowMw)}), which adds up what the devices online could give ` +
      `at this moment for the next hour. The forecast is firm capacity: MW held for the whole event at P90, counting the ` +
      `batteries' stored energy and backup reserve, the homes' own load, thermostats' comfort limits under the weather ` +
      `forecast, and devices that go offline or opt out. A longer event holds less; a quote for a window is valued the same way.`;
    const note = $("forecast-note");
    note.dataset.event = shownEvent;
    note.textContent =
      `${region}: ${fmtInt(data.n_devices)} devices, ${rows.length} intervals of ${data.step || "PT15M"}, each valued as a ${len} event` +
      `${data.calibrated === false ? " (not yet calibrated: default figures)" : ""}. ` +
      `Peak P90 ${fmtMW(peak90)}, peak committed ${fmtMW(peakCommitted)}.`;
    drawChart(
      "forecast",
      $("forecast-chart"),
      [
        { label: "P50 MW", stroke: "#2563eb", width: 2, value: (u, v) => fmtMW(v) },
        { label: "P90 MW", stroke: "#0a7d6e", width: 2, value: (u, v) => fmtMW(v) },
        { label: "Committed MW", stroke: "#d97706", width: 2, fill: "rgba(217,119,6,0.18)", paths: uPlot.paths.stepped({ align: 1 }), value: (u, v) => fmtMW(v) },
      ],
      [xs, p50, p90, committed],
      { opts: { bands: [{ series: [1, 2], fill: "rgba(37,99,235,0.12)" }], scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.1, 0.1)] } } } },
    );
    // The preview's window follows the forecast (an hour ahead, one event long) until edited.
    if (!state.quoteDirty && xs.length) {
      const start = Math.ceil((xs[0] * 1000 + 3600000) / STEP_MS) * STEP_MS;
      $("quote-start").value = toLocalInput(start);
      $("quote-end").value = toLocalInput(start + durationMs(shownEvent));
    }
  }

  async function previewQuote(e) {
    e.preventDefault();
    const out = $("quote-result");
    const region = $("forecast-region").value;
    const body = {
      region,
      mw: Number($("quote-mw").value),
      start: fromLocalInput($("quote-start").value),
      end: fromLocalInput($("quote-end").value),
      firmness: Number($("quote-firmness").value),
    };
    out.hidden = false;
    out.dataset.status = "asking";
    out.innerHTML = `<span class="muted">Asking…</span>`;
    let p;
    try {
      p = await api("/v1/capacity-requests/preview", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (err) {
      out.dataset.status = "error";
      out.innerHTML = `<div class="error" data-testid="quote-error">${esc(explain(err, "Quote preview"))}</div>`;
      return;
    }
    const firm = "P" + Math.round(Number(p.firmness) * 100);
    out.dataset.status = p.status;
    out.dataset.quotedMw = String(p.quoted_mw);
    out.dataset.availableMw = String(p.available_mw ?? "");
    const kv = [
      ["Would quote", `<strong data-testid="quote-mw-out">${fmtMW(p.quoted_mw)}</strong> of ${fmtMW(p.mw)} asked`],
      [`Most this window holds (${firm})`, p.available_mw === null || p.available_mw === undefined ? "–" : fmtMW(p.available_mw)],
      ["Window (UTC)", `${fmtWindow(p.start, p.end)} <span class="muted">(${p.intervals} × 15 min)</span>`],
      ["Tightest interval", p.binding_interval ? fmtTime(p.binding_interval) : "–"],
      ["A quote now would expire", p.quote_would_expire_at ? fmtTime(p.quote_would_expire_at) : "–"],
      ["Price", `<span class="muted">not priced by this service (a request may carry the buyer's max_price_per_mwh, recorded)</span>`],
    ];
    out.innerHTML =
      `<div class="quote-head">${badge(p.status)} <span>${esc(p.region)}, ${firm}: preview only, nothing stored or booked</span></div>` +
      `<div class="kv">${kv.map(([k, v]) => `<div><span>${k}</span>${v}</div>`).join("")}</div>` +
      (p.reason ? `<div class="reason" data-testid="quote-reason">${esc(p.reason)}</div>` : "");
  }

  // ---------------------------------------------------------------------------------------------
  // Capacity requests
  async function listRequests() {
    const data = await api("/v1/capacity-requests?limit=200");
    return listOf(data, ["requests", "capacity_requests"]);
  }

  async function loadRequests() {
    let rows;
    try {
      rows = await listRequests();
      setStatus("requests-status", "");
    } catch (err) {
      setStatus("requests-status", explain(err, "Capacity requests"), !err.missing);
      return;
    }
    rows.sort((a, b) => (toMs(pick(b, ["created_at", "start"])) || 0) - (toMs(pick(a, ["created_at", "start"])) || 0));
    const tbody = $("requests-table").querySelector("tbody");
    if (!rows.length) {
      tbody.innerHTML = `<tr><td colspan="9" class="empty">No capacity requests yet. Quote one with
        <code>vpp requests quote --region ERCOT-NORTH --mw 5 --start … --end …</code></td></tr>`;
    } else {
      tbody.innerHTML = rows
        .map((r) => {
          const id = esc(r.id);
          return `<tr class="clickable${state.selectedRequest === r.id ? " selected" : ""}" data-id="${id}">
            <td class="mono">${id}</td><td>${esc(r.region)}</td><td>${badge(r.status)}</td>
            <td>${fmtWindow(r.start, r.end)}</td>
            <td class="num">${fmtMW(pick(r, ["mw", "requested_mw"]))}</td>
            <td class="num">${fmtMW(r.quoted_mw)}</td>
            <td class="num">${num(r.firmness) === null ? "–" : "P" + Math.round(r.firmness * 100)}</td>
            <td class="num">${fmtPct(r.performance)}</td>
            <td class="num"><a href="#settlement/${id}">settlement</a></td></tr>`;
        })
        .join("");
      tbody.querySelectorAll("tr.clickable").forEach((tr) =>
        tr.addEventListener("click", (e) => {
          if (e.target.tagName === "A") return;
          state.selectedRequest = tr.dataset.id;
          tbody.querySelectorAll("tr").forEach((t) => t.classList.toggle("selected", t === tr));
          loadRequestDetail(tr.dataset.id);
        }),
      );
    }
    if (state.selectedRequest) await loadRequestDetail(state.selectedRequest);
  }

  // Per-interval delivery of a request: intervals with target_mw and delivered_mw.
  function deliveryRows(req) {
    const rows = listOf(req, ["intervals", "delivery", "measured", "timeline"]);
    return rows.filter((r) => r && typeof r === "object" && (r.target_mw !== undefined || r.delivered_mw !== undefined));
  }

  async function loadRequestDetail(id) {
    let req;
    try {
      req = await api(`/v1/capacity-requests/${encodeURIComponent(id)}`);
    } catch (err) {
      setStatus("requests-status", explain(err, "Request " + id), !err.missing);
      return;
    }
    $("request-detail").hidden = false;
    $("request-detail-title").innerHTML = `${esc(req.id)} ${badge(req.status)}`;
    const kv = [
      ["Region", esc(req.region)],
      ["Window (UTC)", fmtWindow(req.start, req.end)],
      ["Asked", fmtMW(req.mw)],
      ["Quoted", fmtMW(req.quoted_mw)],
      ["Booked", fmtMW(req.committed_mw)],
      ["Direction", esc(req.direction || "load_reduction")],
      ["Firmness", num(req.firmness) === null ? "–" : "P" + Math.round(req.firmness * 100)],
      ["Delivered (avg)", req.delivery ? fmtMW(req.delivery.delivered_mw) : "–"],
      ["Performance", fmtPct(req.performance)],
      ["Quote expires", fmtTime(req.quote_expires_at)],
    ];
    if (req.reason) kv.push(["Reason", esc(req.reason)]);
    $("request-detail-kv").innerHTML = kv.map(([k, v]) => `<div><span>${k}</span>${v}</div>`).join("");
    const rows = deliveryRows(req);
    const el = $("request-chart");
    if (rows.length) {
      drawDelivery("request", el, rows);
      return;
    }
    // Not run yet: show the plan (target and what the fleet is expected to deliver).
    const plan = (req.plan && Array.isArray(req.plan.intervals) && req.plan.intervals) || [];
    if (!plan.length) {
      dropChart("request");
      el.innerHTML = `<div class="empty">No plan or delivery yet: commit the quote to plan it.</div>`;
      return;
    }
    const xs = plan.map((r) => (toMs(r.start) || 0) / 1000);
    drawChart(
      "request",
      el,
      [
        { label: "Target MW", stroke: "#6b7280", width: 2, dash: [6, 4], paths: uPlot.paths.stepped({ align: 1 }), value: (u, v) => fmtMW(v) },
        { label: "Planned MW", stroke: "#2563eb", width: 2, paths: uPlot.paths.stepped({ align: 1 }), value: (u, v) => fmtMW(v) },
      ],
      [xs, plan.map((r) => num(r.target_mw)), plan.map((r) => num(r.planned_mw))],
      { opts: { scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, 0.1)] } } } },
    );
  }

  function drawDelivery(name, el, rows) {
    const xs = [];
    const target = [];
    const delivered = [];
    for (const r of rows) {
      const t = toMs(pick(r, ["start", "interval_start", "ts", "time", "minute"]));
      if (t === null) continue;
      xs.push(t / 1000);
      target.push(num(pick(r, ["target_mw", "committed_mw"])));
      delivered.push(num(r.delivered_mw));
    }
    return drawChart(
      name,
      el,
      [
        { label: "Target MW", stroke: "#6b7280", width: 2, dash: [6, 4], paths: uPlot.paths.stepped({ align: 1 }), value: (u, v) => fmtMW(v) },
        { label: "Delivered MW", stroke: "#0a7d6e", width: 2, fill: "rgba(10,125,110,0.12)", value: (u, v) => fmtMW(v) },
      ],
      [xs, target, delivered],
      { opts: { scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, 0.1)] } } } },
    );
  }

  // ---------------------------------------------------------------------------------------------
  // Live events
  async function listEvents() {
    const out = new Map();
    let lastErr = null;
    for (const status of ["active", "recent"]) {
      try {
        const data = await api(`/v1/events?status=${status}`);
        for (const e of listOf(data, ["events"])) if (e && e.id && !out.has(e.id)) out.set(e.id, e);
      } catch (err) {
        lastErr = err;
      }
    }
    if (!out.size && lastErr) throw lastErr;
    return [...out.values()];
  }

  function eventTarget(e) {
    return num(pick(e, ["target_mw", "committed_mw", "mw", "quoted_mw"]));
  }

  async function loadEvents() {
    let events;
    try {
      events = await listEvents();
      setStatus("events-status", "");
    } catch (err) {
      setStatus("events-status", explain(err, "Events"), !err.missing);
      return;
    }
    const rank = { active: 0, scheduled: 1, committed: 1 };
    events.sort((a, b) => (rank[a.status] ?? 2) - (rank[b.status] ?? 2) || (toMs(b.start) || 0) - (toMs(a.start) || 0));
    if (state.param && events.some((e) => e.id === state.param)) state.selectedEvent = state.param;
    if (!state.selectedEvent || !events.some((e) => e.id === state.selectedEvent)) {
      state.selectedEvent = events.length ? events[0].id : null;
    }
    const list = $("event-list");
    if (!events.length) {
      list.innerHTML = `<li class="empty">No active or recent events.</li>`;
    } else {
      list.innerHTML = events
        .map(
          (e) => `<li data-id="${esc(e.id)}" class="${e.id === state.selectedEvent ? "selected" : ""}">
            <div class="id mono">${esc(e.id)} ${badge(e.status)}</div>
            <div class="meta">${esc(String(pick(e, ["type", "kind"]) || (String(e.id).startsWith("ge-") ? "grid event" : "capacity request")).replace(/_/g, " "))}
              · ${esc(e.region)} · ${fmtMW(eventTarget(e))}</div>
            <div class="meta source" data-source="${esc(e.source || "api")}">source: ${esc(e.source === "openadr" ? "OpenADR" + (e.source_id ? " event " + e.source_id : "") : "API")}</div>
            <div class="meta">${fmtWindow(e.start, e.end)}</div></li>`,
        )
        .join("");
      list.querySelectorAll("li[data-id]").forEach((li) =>
        li.addEventListener("click", () => {
          state.selectedEvent = li.dataset.id;
          history.replaceState(null, "", "#events/" + li.dataset.id);
          state.param = li.dataset.id;
          list.querySelectorAll("li").forEach((x) => x.classList.toggle("selected", x === li));
          loadTimeline(events.find((e) => e.id === li.dataset.id));
        }),
      );
    }
    await loadTimeline(events.find((e) => e.id === state.selectedEvent));
  }

  async function loadTimeline(ev) {
    const chartEl = $("event-chart");
    const actions = $("event-actions");
    if (!ev) {
      $("event-title").textContent = "No event selected";
      actions.innerHTML = "";
      return;
    }
    $("event-title").innerHTML = `${esc(ev.id)} ${badge(ev.status)} <span class="muted">${esc(ev.region)} · ${fmtWindow(ev.start, ev.end)}</span>`;
    const abortable = String(ev.id).startsWith("ge-") && ["active", "scheduled"].includes(ev.status);
    actions.innerHTML = abortable ? `<button type="button" class="danger" id="abort-event">Abort grid event</button>` : "";
    if (abortable) $("abort-event").addEventListener("click", () => abortEvent(ev.id));

    let data;
    try {
      data = await api(`/v1/events/${encodeURIComponent(ev.id)}/timeline`);
    } catch (err) {
      setStatus("events-status", explain(err, "Event timeline"), !err.missing);
      return;
    }
    const rows = listOf(data, ["timeline", "minutes", "points", "intervals"]);
    const last = rows.length ? rows[rows.length - 1] : {};
    const counters = (data && typeof data === "object" && !Array.isArray(data) && data.devices) || {};
    const counter = (name) => num(last[name]) ?? num(counters[name]) ?? num(data && data[name]);
    // Running: the latest minute's live estimate. Ended: the settlement's figures as the API
    // computes them (data.delivery: the same as the request's JSON, CSV and settlement page);
    // none computed here.
    const running = ["active", "scheduled"].includes(ev.status);
    const delivery = (!running && data && typeof data === "object" && !Array.isArray(data) && data.delivery) || null;
    $("ev-target-label").textContent = running ? "Target" : "Committed (avg)";
    $("ev-delivered-label").textContent = running ? "Delivered (live estimate)" : delivery ? "Delivered (settled, avg)" : "Delivered (not settled yet)";
    $("ev-target").textContent = fmtMW(running ? num(last.target_mw) ?? eventTarget(ev) : delivery ? delivery.committed_mw : eventTarget(ev));
    $("ev-delivered").textContent = running ? fmtMW(last.delivered_mw) : delivery ? fmtMW(delivery.delivered_mw) : "–";
    $("ev-commanded").textContent = fmtInt(counter("commanded"));
    $("ev-acknowledged").textContent = fmtInt(counter("acknowledged"));
    $("ev-opted-out").textContent = fmtInt(counter("opted_out"));
    $("ev-replaced").textContent = fmtInt(counter("replaced"));
    if (!rows.length) {
      dropChart("event");
      dropChart("event-devices");
      chartEl.innerHTML = `<div class="empty">No minutes measured yet: the window has not opened.</div>`;
      $("event-devices-chart").innerHTML = "";
      chartEl.dataset.points = "0";
      return;
    }
    drawDelivery("event", chartEl, rows);
    chartEl.dataset.points = String(rows.length);
    chartEl.dataset.lastTs = String(pick(last, ["ts", "minute", "start", "time"]) ?? "");
    chartEl.dataset.lastDelivered = String(last.delivered_mw ?? "");
    const xs = rows.map((r) => (toMs(pick(r, ["ts", "minute", "start", "time"])) || 0) / 1000);
    drawChart(
      "event-devices",
      $("event-devices-chart"),
      [
        { label: "Commanded", stroke: "#2563eb", width: 2, value: (u, v) => fmtInt(v) },
        { label: "Acknowledged", stroke: "#0a7d6e", width: 2, value: (u, v) => fmtInt(v) },
        { label: "Opted out", stroke: "#b45309", width: 2, value: (u, v) => fmtInt(v) },
        { label: "Replaced", stroke: "#7c3aed", width: 2, value: (u, v) => fmtInt(v) },
      ],
      [xs, ...["commanded", "acknowledged", "opted_out", "replaced"].map((k) => rows.map((r) => num(r[k])))],
      { yLabel: "devices", height: 200 },
    );
  }

  async function abortEvent(id) {
    if (!confirm(`Abort ${id}? Every device is restored at once.`)) return;
    try {
      await api(`/v1/grid-events/${encodeURIComponent(id)}/abort`, { method: "POST" });
      setStatus("events-status", `${id} aborted: restore commands sent.`);
    } catch (err) {
      setStatus("events-status", explain(err, "Abort"), true);
    }
    loadEvents();
  }

  // ---------------------------------------------------------------------------------------------
  // Settlement
  function parseCsv(text) {
    const rows = [];
    let row = [];
    let cell = "";
    let quoted = false;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (quoted) {
        if (c === '"' && text[i + 1] === '"') {
          cell += '"';
          i++;
        } else if (c === '"') quoted = false;
        else cell += c;
      } else if (c === '"') quoted = true;
      else if (c === ",") {
        row.push(cell);
        cell = "";
      } else if (c === "\n" || c === "\r") {
        if (c === "\r" && text[i + 1] === "\n") i++;
        row.push(cell);
        if (row.some((x) => x !== "")) rows.push(row);
        row = [];
        cell = "";
      } else cell += c;
    }
    row.push(cell);
    if (row.some((x) => x !== "")) rows.push(row);
    return rows;
  }

  async function loadSettlement() {
    const select = $("settlement-request");
    let requests = [];
    try {
      requests = (await listRequests()).filter((r) => ["completed", "active", "committed"].includes(r.status));
    } catch (err) {
      setStatus("settlement-status", explain(err, "Capacity requests"), !err.missing);
      return;
    }
    const ids = requests.map((r) => r.id);
    const want = state.param && ids.includes(state.param) ? state.param : select.value || ids[0];
    select.innerHTML = requests
      .map((r) => `<option value="${esc(r.id)}">${esc(r.id)} · ${esc(r.region)} · ${esc(r.status)}</option>`)
      .join("");
    if (!ids.length) {
      setStatus("settlement-status", "No committed or completed requests yet: nothing to settle.");
      return;
    }
    select.value = ids.includes(want) ? want : ids[0];
    let req = requests.find((r) => r.id === select.value);
    // The figures come from the request's own answer (delivery: one function over the same
    // intervals as its CSV and the demo's report); the page computes none of them.
    try {
      req = await api(`/v1/capacity-requests/${encodeURIComponent(req.id)}`);
    } catch (err) {
      setStatus("settlement-status", explain(err, "Request " + req.id), !err.missing);
    }
    let text;
    try {
      text = await api(`/v1/capacity-requests/${encodeURIComponent(req.id)}/settlement.csv`, { headers: { Accept: "text/csv" } });
      setStatus("settlement-status", "");
    } catch (err) {
      const msg = err.status === 404 && !err.missing ? `${req.id}: no settlement yet (${err.message}).` : explain(err, "Settlement");
      setStatus("settlement-status", msg, err.status !== 404 && !err.missing);
      text = "";
    }
    if (typeof text !== "string") text = JSON.stringify(text);
    const table = parseCsv(text);
    // The request's own id on every line says nothing here: leave that column out.
    const drop = table.length ? table[0].findIndex((h) => ["event_id", "request_id"].includes(h.trim().toLowerCase())) : -1;
    const rowsKept = drop >= 0 ? table.map((r) => r.filter((_, i) => i !== drop)) : table;
    const header = rowsKept.length ? rowsKept[0] : [];
    const body = rowsKept.slice(1);
    const col = (names) => header.findIndex((h) => names.includes(h.trim().toLowerCase()));
    const iStart = col(["interval_start", "start", "interval_start_utc", "ts"]);
    const iTarget = col(["target_mw", "committed_mw"]);
    const iDelivered = col(["delivered_mw"]);
    const delivery = (req && req.delivery) || null;
    const perf = delivery ? num(delivery.performance) : num(req.performance);
    const committedAvg = delivery ? num(delivery.committed_mw) : null;
    $("st-committed").textContent = fmtMW(committedAvg ?? pick(req, ["committed_mw", "quoted_mw", "mw"]));
    $("st-delivered").textContent = delivery ? fmtMW(delivery.delivered_mw) : "–";
    $("st-performance").textContent = fmtPct(perf);
    // What the performance leaves uncovered: committed × (1 − performance), the same figures.
    $("st-shortfall").textContent = committedAvg !== null && perf !== null ? fmtMW(committedAvg * (1 - perf)) : "–";
    const kpis = $("st-delivered").closest(".kpis");
    if (kpis) {
      kpis.dataset.intervals = delivery ? String(delivery.intervals) : "0";
      kpis.dataset.expectedIntervals = delivery ? String(delivery.expected_intervals) : "0";
    }
    $("st-delivered-note").textContent = delivery
      ? `over ${delivery.intervals} of ${delivery.expected_intervals} settlement intervals${req.settled ? "" : " (provisional)"}`
      : "";

    const dl = $("settlement-download");
    dl.disabled = !text;
    dl.onclick = () => {
      const blob = new Blob([text], { type: "text/csv" });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${req.id}-settlement.csv`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    };
    const thead = $("settlement-table").querySelector("thead");
    const tbody = $("settlement-table").querySelector("tbody");
    thead.innerHTML = header.length ? "<tr>" + header.map((h) => `<th>${esc(h)}</th>`).join("") + "</tr>" : "";
    tbody.innerHTML = body.length
      ? body
          .map((r) => "<tr>" + r.map((c) => `<td class="${num(c) !== null ? "num" : ""}">${/^\d{4}-\d\d-\d\dT/.test(c) ? fmtTime(c) : esc(c)}</td>`).join("") + "</tr>")
          .join("")
      : `<tr><td class="empty">No settlement lines yet.</td></tr>`;
    if (iStart >= 0 && body.length) {
      const rows = body.map((r) => ({ start: r[iStart], target_mw: iTarget >= 0 ? r[iTarget] : null, delivered_mw: iDelivered >= 0 ? r[iDelivered] : null }));
      drawDelivery("settlement", $("settlement-chart"), rows);
    } else {
      dropChart("settlement");
      $("settlement-chart").innerHTML = "";
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Navigation, login and refresh
  const LOADERS = { fleet: loadFleet, map: loadMap, region: loadRegion, forecast: loadForecast, requests: loadRequests, events: loadEvents, settlement: loadSettlement };

  function showLogin(message) {
    stopRefresh();
    $("login").hidden = false;
    $("nav").hidden = true;
    $("session").hidden = true;
    PAGES.forEach((p) => ($("page-" + p).hidden = true));
    $("login-error").textContent = message || "";
    setTimeout(() => $("key-input").focus(), 0);
  }

  function stopRefresh() {
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
  }

  async function refresh() {
    stopRefresh();
    const page = state.page;
    if (!page || !getKey()) return;
    if (state.loading) {
      // A control changed while a load runs: load again as soon as it is done.
      state.again = true;
      return;
    }
    state.loading = true;
    state.again = false;
    try {
      await LOADERS[page]();
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) console.error(err);
    } finally {
      state.loading = false;
    }
    stopRefresh();
    const again = state.again || state.page !== page;
    state.again = false;
    if (getKey()) state.timer = setTimeout(refresh, again ? 0 : REFRESH_MS[state.page]);
  }

  function route() {
    // A key may arrive in the fragment (#key=…, as `vpp demo` prints it): keep it, then drop it
    // from the address bar so it is not bookmarked or shared by accident.
    const hash = location.hash.replace(/^#/, "");
    const params = new URLSearchParams(hash.includes("=") ? hash : "");
    if (params.get("key")) {
      sessionStorage.setItem(KEY_STORAGE, params.get("key"));
      history.replaceState(null, "", location.pathname + "#" + (params.get("page") || "fleet"));
    }
    if (!getKey()) {
      showLogin();
      return;
    }
    const [page, param] = location.hash.replace(/^#/, "").split("/");
    state.page = PAGES.includes(page) ? page : "fleet";
    state.param = param ? decodeURIComponent(param) : null;
    $("login").hidden = true;
    $("nav").hidden = false;
    $("session").hidden = false;
    const key = getKey();
    $("key-label").textContent = key.length > 16 ? key.slice(0, 16) + "…" : "key";
    PAGES.forEach((p) => ($("page-" + p).hidden = p !== state.page));
    const tab = state.page === "region" ? "map" : state.page;
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === tab));
    refresh();
  }

  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    // Check the key before showing pages: 401 comes back to this form with the reason.
    try {
      await api("/v1/fleet");
    } catch (err) {
      if (err.status === 401) return;
    }
    $("key-input").value = "";
    $("login-error").textContent = "";
    if (!location.hash || location.hash === "#") location.hash = "#fleet";
    else route();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    Object.keys(state.charts).forEach(dropChart);
    state.fleetRegions = [];
    state.registry = null;
    state.region = null;
    showLogin();
  });
  $("forecast-region").addEventListener("change", () => refresh());
  $("forecast-event").addEventListener("change", () => refresh());
  $("quote-form").addEventListener("submit", previewQuote);
  ["quote-start", "quote-end"].forEach((id) => $(id).addEventListener("input", () => (state.quoteDirty = true)));
  $("region-select").addEventListener("change", () => {
    location.hash = "#region/" + encodeURIComponent($("region-select").value);
  });
  ["dev-kind", "dev-status", "dev-limit"].forEach((id) => $(id).addEventListener("change", () => state.region && loadDevices(state.region)));
  let idTimer = null;
  $("dev-id").addEventListener("input", () => {
    clearTimeout(idTimer);
    idTimer = setTimeout(() => state.region && loadDevices(state.region), 300);
  });
  $("dev-next").addEventListener("click", () => pageDevices("next"));
  $("dev-prev").addEventListener("click", () => pageDevices("prev"));
  $("dev-first").addEventListener("click", () => pageDevices("first"));
  $("settlement-request").addEventListener("change", () => {
    state.param = $("settlement-request").value;
    history.replaceState(null, "", "#settlement/" + state.param);
    refresh();
  });
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.page) refresh();
  });
  route();
})();
