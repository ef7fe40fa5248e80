/* VPP dashboard: plain JS, no build step. Every number comes from an authenticated /v1 call
 * that returns aggregates (never a list of devices), so the page stays fast with a million
 * devices. The API key is typed once and kept in this tab's sessionStorage. */
(function () {
  "use strict";

  const KEY_STORAGE = "vpp.apiKey";
  const REFRESH_MS = { fleet: 10000, forecast: 60000, requests: 10000, events: 3000, settlement: 30000 };
  const PAGES = ["fleet", "forecast", "requests", "events", "settlement"];

  const state = {
    page: null,
    param: null,
    timer: null,
    charts: {},
    fleetRegions: [],
    selectedEvent: null,
    selectedRequest: null,
    loading: false,
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
  // Points with coordinates: regions or feeders (or sites) carrying lat/lon.
  function mapPoints(data) {
    const pts = [];
    const walk = (node, region) => {
      if (Array.isArray(node)) return node.forEach((n) => walk(n, region));
      if (!node || typeof node !== "object") return;
      const lat = num(pick(node, ["lat", "latitude"]));
      const lon = num(pick(node, ["lon", "lng", "longitude"]));
      const here = node.region ?? region;
      if (lat !== null && lon !== null) {
        pts.push({
          name: pick(node, ["feeder", "name", "id", "site_id"]) || here || "",
          region: here || "",
          lat,
          lon,
          devices: num(pick(node, ["registered", "devices", "count", "n_devices"])) || 1,
          mw: num(node.available_mw),
        });
      }
      for (const [k, v] of Object.entries(node)) if (v && typeof v === "object" && k !== "totals") walk(v, here);
    };
    walk(data, undefined);
    // One point per place: rows of one region (its kinds) merge, weighted by devices.
    const merged = new Map();
    for (const p of pts) {
      const m = merged.get(p.name);
      if (!m) {
        merged.set(p.name, Object.assign({}, p));
        continue;
      }
      const n = m.devices + p.devices;
      m.lat = (m.lat * m.devices + p.lat * p.devices) / n;
      m.lon = (m.lon * m.devices + p.lon * p.devices) / n;
      m.devices = n;
      m.mw = m.mw === null && p.mw === null ? null : (m.mw || 0) + (p.mw || 0);
    }
    return [...merged.values()];
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
            <td>${esc(r.region)}</td><td>${esc(r.kind)}</td>
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
    drawMap(mapPoints(data), rows);
  }

  function drawMap(points, rows) {
    const el = $("fleet-map");
    if (!points.length) {
      const regions = [...new Set(rows.map((r) => r.region))];
      el.innerHTML = `<div class="note">No coordinates in the fleet data.<br>Devices registered with
        <code>lat</code>/<code>lon</code> appear here by region or feeder.${regions.length ? "<br><br>Regions: " + regions.map(esc).join(", ") : ""}</div>`;
      return;
    }
    const W = 600;
    const H = 320;
    const m = 40;
    let [minLat, maxLat, minLon, maxLon] = [90, -90, 180, -180];
    for (const p of points) {
      minLat = Math.min(minLat, p.lat);
      maxLat = Math.max(maxLat, p.lat);
      minLon = Math.min(minLon, p.lon);
      maxLon = Math.max(maxLon, p.lon);
    }
    // Equirectangular with the longitude squeezed by cos(latitude): good enough at grid scale.
    const k = Math.cos((((minLat + maxLat) / 2) * Math.PI) / 180);
    const spanX = Math.max((maxLon - minLon) * k, 0.5);
    const spanY = Math.max(maxLat - minLat, 0.5);
    const scale = Math.min((W - 2 * m) / spanX, (H - 2 * m) / spanY);
    const cx = (minLon + maxLon) / 2;
    const cy = (minLat + maxLat) / 2;
    const x = (lon) => W / 2 + (lon - cx) * k * scale;
    const y = (lat) => H / 2 - (lat - cy) * scale;
    const maxDevices = Math.max(...points.map((p) => p.devices));
    const regions = [...new Set(points.map((p) => p.region))];
    const palette = ["#0a7d6e", "#2563eb", "#d97706", "#7c3aed", "#db2777", "#65a30d"];
    const color = (r) => palette[regions.indexOf(r) % palette.length];
    // Many points (feeders or sites): small dots; few (regions): labelled circles.
    const labelled = points.length <= 40;
    const circles = points
      .map((p) => {
        const r = labelled ? 6 + 22 * Math.sqrt(p.devices / maxDevices) : 3;
        const title = `${p.name} (${p.region}): ${fmtInt(p.devices)} devices${p.mw !== null ? ", " + fmtMW(p.mw) : ""}`;
        return `<g><circle cx="${x(p.lon).toFixed(1)}" cy="${y(p.lat).toFixed(1)}" r="${r.toFixed(1)}"
          fill="${color(p.region)}" fill-opacity="0.55" stroke="${color(p.region)}"><title>${esc(title)}</title></circle>
          ${labelled ? `<text x="${(x(p.lon) + r + 3).toFixed(1)}" y="${(y(p.lat) + 4).toFixed(1)}">${esc(p.name)}</text>` : ""}</g>`;
      })
      .join("");
    const legend = regions
      .map((r, i) => `<g transform="translate(12,${16 + i * 16})"><rect width="10" height="10" fill="${color(r)}"/><text x="15" y="9">${esc(r)}</text></g>`)
      .join("");
    el.innerHTML = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="xMidYMid meet">${circles}${legend}</svg>`;
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

  async function loadForecast() {
    const select = $("forecast-region");
    const regions = await ensureRegions();
    if (select.options.length !== regions.length || [...select.options].some((o, i) => o.value !== regions[i])) {
      const keep = select.value;
      select.innerHTML = regions.map((r) => `<option>${esc(r)}</option>`).join("");
      if (regions.includes(keep)) select.value = keep;
    }
    const region = select.value;
    if (!region) {
      setStatus("forecast-status", "No region with devices yet: register devices to see a forecast.");
      return;
    }
    let data;
    try {
      data = await api(`/v1/forecast?region=${encodeURIComponent(region)}&step=PT15M`);
      setStatus("forecast-status", "");
    } catch (err) {
      setStatus("forecast-status", explain(err, "Forecast"), !err.missing);
      return;
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
    const peak90 = Math.max(0, ...p90.filter((v) => v !== null));
    const peakCommitted = Math.max(0, ...committed);
    $("forecast-note").textContent =
      `${region}: ${fmtInt(data.n_devices)} devices, ${rows.length} intervals of ${data.step || "PT15M"}` +
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
  const LOADERS = { fleet: loadFleet, forecast: loadForecast, requests: loadRequests, events: loadEvents, settlement: loadSettlement };

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
    if (!state.loading) {
      state.loading = true;
      try {
        await LOADERS[page]();
        $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 401)) console.error(err);
      } finally {
        state.loading = false;
      }
    }
    if (state.page === page && getKey()) state.timer = setTimeout(refresh, REFRESH_MS[page]);
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
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === state.page));
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
    showLogin();
  });
  $("forecast-region").addEventListener("change", () => refresh());
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
