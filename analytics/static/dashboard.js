// The usertrail dashboard: reads the JSON API of the server that serves it
// (/api/v1/...) and draws every chart as SVG. No library, no outside request.
// Every drawn figure carries its number (data-key, data-value), so what is
// drawn can be checked against what the API says.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3563e9", "#12b76a", "#f79009", "#9e77ed", "#ee46bc", "#06aed4", "#667085"];
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(1, Number(params.get("refresh") || 5)) * 1000;

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function html(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function api(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// Horizontal bars: one row per item, its label, its bar and its number.
function bars(container, items, { key, value, max, format = String, note }) {
  const row = 26, labelW = 120, numberW = 180, width = 600;
  const svg = el("svg", { viewBox: `0 0 ${width} ${Math.max(1, items.length) * row + 4}`,
                          role: "img" });
  if (!items.length) svg.append(el("text", { x: 0, y: 18, class: "empty" }, "no data yet"));
  const top = max ?? Math.max(1, ...items.map((d) => d[value]));
  items.forEach((d, i) => {
    const y = i * row + 2;
    const w = Math.max(1, ((width - labelW - numberW) * d[value]) / top);
    svg.append(el("text", { x: 0, y: y + 16 }, d[key]));
    svg.append(el("rect", {
      x: labelW, y, width: w, height: row - 8, rx: 3, fill: COLORS[i % COLORS.length],
      class: "bar", "data-key": d[key], "data-value": d[value],
    }));
    const label = format(d[value]) + (note ? note(d) : "");
    svg.append(el("text", { x: labelW + w + 6, y: y + 16, class: "number" }, label));
  });
  container.replaceChildren(svg);
}

// Engagement: one column per day, the types stacked.
function columns(container, legend, report) {
  const width = 1000, height = 220, left = 40, bottom = 24;
  const days = report.days;
  const types = [...new Set(days.flatMap((d) => Object.keys(d.types)))].sort();
  const top = Math.max(1, ...days.map((d) => d.total));
  const step = (width - left) / Math.max(1, days.length);
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(el("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom,
                          class: "axis" }));
  svg.append(el("text", { x: 0, y: 12 }, String(top)));
  svg.append(el("text", { x: 0, y: height - bottom }, "0"));
  days.forEach((d, i) => {
    const x = left + i * step;
    const group = el("g", { class: "day", "data-key": d.day, "data-value": d.total });
    let y = height - bottom;
    types.forEach((t, j) => {
      const n = d.types[t] || 0;
      if (!n) return;
      const h = ((height - bottom - 16) * n) / top;
      y -= h;
      group.append(el("rect", { x: x + 1, y, width: Math.max(1, step - 2), height: h,
                                fill: COLORS[j % COLORS.length], "data-type": t,
                                "data-value": n }));
    });
    group.append(el("title", {}, `${d.day}: ${d.total}`));
    svg.append(group);
    if (days.length <= 31 ? i % 5 === 0 : i % Math.ceil(days.length / 6) === 0) {
      svg.append(el("text", { x, y: height - 6 }, d.day.slice(5)));
    }
  });
  container.replaceChildren(svg);
  legend.replaceChildren(...types.map((t, j) => {
    const span = html("span", t);
    const swatch = html("i");
    swatch.style.background = COLORS[j % COLORS.length];
    span.prepend(swatch);
    return span;
  }));
}

const number = (n) => n.toLocaleString("en-US");

async function refresh() {
  const engagementPath = "/api/v1/engagement?" + new URLSearchParams(
    [...params].filter(([k]) => ["days", "since", "until", "tz"].includes(k)));
  const [services, ratings, engagement, themes, segments] = await Promise.all([
    api("/api/v1/services"), api("/api/v1/ratings"), api(engagementPath),
    api("/api/v1/themes"), api("/api/v1/segments"),
  ]);
  bars(document.getElementById("services-chart"), services, {
    key: "service", value: "interactions", format: number,
    note: (d) => ` · ${number(d.users)} users`,
  });
  bars(document.getElementById("ratings-chart"), ratings, {
    key: "service", value: "averageRating", max: 5, format: (v) => v.toFixed(2),
    note: (d) => ` (${number(d.ratings)})`,
  });
  bars(document.getElementById("themes-chart"), themes, {
    key: "theme", value: "interactions", format: number,
  });
  bars(document.getElementById("segments-chart"), segments.distribution, {
    key: "segment", value: "count", format: number,
    note: (d) => d.avgConfidence === null ? "" : ` · confidence ${d.avgConfidence.toFixed(2)}`,
  });
  const coverage = document.getElementById("segments-coverage");
  coverage.dataset.total = segments.total;
  coverage.dataset.withSegments = segments.withSegments;
  coverage.textContent = segments.total
    ? `${number(segments.withSegments)} of ${number(segments.total)} users have a segment ` +
      `(${segments.percentage.toFixed(2)}%)`
    : "no user profiles yet";
  columns(document.getElementById("engagement-chart"),
          document.getElementById("engagement-legend"), engagement);
  document.getElementById("engagement-range").textContent =
    `${engagement.since} to ${engagement.until} (${engagement.timeZone})`;
  const status = document.getElementById("status");
  status.textContent = "updated " + new Date().toLocaleTimeString();
  status.dataset.refreshed = String(Number(status.dataset.refreshed || 0) + 1);
}

function table(rows, columns) {
  const t = html("table");
  const head = html("tr");
  columns.forEach((c) => head.append(html("th", c)));
  t.append(head);
  rows.forEach((r) => {
    const tr = html("tr");
    r.forEach((v) => tr.append(html("td", v === null || v === undefined ? "–" : String(v))));
    t.append(tr);
  });
  return t;
}

async function lookup(event) {
  event.preventDefault();
  const id = document.getElementById("lookup-id").value.trim();
  const out = document.getElementById("lookup-result");
  out.dataset.user = "";
  try {
    const u = await api("/api/v1/users/" + encodeURIComponent(id));
    const profile = html("div", null, { class: "profile" });
    const left = html("div");
    const p = u.profile;
    left.append(html("h3", u.userId, { id: "lookup-user" }));
    left.append(html("p", p && p.primarySegment
      ? `primary segment ${p.primarySegment} (confidence ${p.segmentConfidence.toFixed(2)})`
      : "no segment", { id: "lookup-primary" }));
    left.append(table((p ? p.segments : []).map((s) => [s.segment, s.score.toFixed(2),
                                                         s.reasons.join("; ")]),
                      ["segment", "score", "reasons"]));
    left.lastChild.id = "lookup-segments";
    const right = html("div");
    right.append(html("h3", "interactions per service"));
    right.append(table(u.services.map((s) => [s.service, s.interactions]),
                       ["service", "interactions"]));
    right.lastChild.id = "lookup-services";
    if (u.preferences) {
      right.append(html("h3", "preferences"));
      right.append(table(Object.entries(u.preferences).map(([k, v]) =>
        [k, Array.isArray(v) ? v.join(", ") : v]), ["", ""]));
    }
    right.append(html("h3", "latest"));
    right.append(table(u.latest.map((i) => [i.createdAt, i.type, i.service, i.theme, i.rating]),
                       ["when", "type", "service", "theme", "rating"]));
    profile.append(left, right);
    out.replaceChildren(profile);
    out.dataset.user = u.userId;
  } catch (error) {
    out.replaceChildren(html("p", error.message, { class: "error" }));
  }
}

async function loop() {
  try {
    await refresh();
  } catch (error) {
    document.getElementById("status").textContent = "cannot load: " + error.message;
  }
  setTimeout(loop, REFRESH_MS);
}

document.getElementById("lookup-form").addEventListener("submit", lookup);
loop();
