// The ablate dashboard: one page, four views (experiments, an experiment, a
// trial, workers), all read from the coordinator's /api/v1. Views poll while
// something runs; the browser revalidates with the ETag, so an unchanged
// answer costs an empty 304 and no redraw.
"use strict";

const main = document.getElementById("main");
const live = document.getElementById("live");
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#7b4173", "#3182bd"];

let view = { timers: [], plots: [], token: 0 };

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const a = Math.abs(value);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? value.toExponential(3) : value.toPrecision(4).replace(/\.?0+$/, "");
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function age(createdAt) {
  const seconds = Math.max(0, (Date.now() - Date.parse(createdAt)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function stateTag(state) {
  return `<span class="state state-${esc(state)}">${esc(state)}</span>`;
}

class NotLoggedIn extends Error {}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 || response.status === 403) throw new NotLoggedIn(body.error || response.statusText);
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(error) {
  if (error instanceof NotLoggedIn) {
    main.innerHTML = `<h1>Not logged in</h1><p class="error">${esc(error.message)}</p>
      <p>Run <code>ablate dashboard</code> and open the link it prints (it logs this browser in).</p>`;
  } else {
    main.innerHTML = `<h1>Something went wrong</h1><p class="error">${esc(error.message)}</p>`;
  }
}

/// Runs `fn` now and every `ms` while this view is shown; `fn` returns false to stop.
function every(ms, fn) {
  const token = view.token;
  const tick = async () => {
    if (token !== view.token) return;
    let again = true;
    try { again = await fn(); } catch (error) { showError(error); return; }
    if (again !== false && token === view.token) view.timers.push(setTimeout(tick, ms));
  };
  return tick();
}

function leaveView() {
  view.timers.forEach(clearTimeout);
  view.plots.forEach((p) => p.destroy());
  view = { timers: [], plots: [], token: view.token + 1 };
  live.textContent = "";
}

function route() {
  leaveView();
  delete document.body.dataset.readyMs;
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  let m;
  if ((m = path.match(/^\/experiments\/([0-9a-f-]{36})$/))) return experimentView(m[1]);
  if ((m = path.match(/^\/trials\/([0-9a-f-]{36})$/))) return trialView(m[1]);
  if (path === "/workers") return workersView();
  return experimentsView(params);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// ---------------------------------------------------------------- experiments

function progress(e) {
  const total = Math.max(e.trials, 1);
  const done = e.succeeded + e.pruned + e.cancelled;
  return `<span class="bar" title="${e.succeeded} succeeded, ${e.failed} failed, ${e.running} running, ${e.pending} pending">` +
    `<span style="width:${(100 * done) / total}%;float:left"></span><span class="failed" style="width:${(100 * e.failed) / total}%;float:left"></span></span>` +
    ` <span class="muted">${done + e.failed}/${e.trials}</span>`;
}

/** An experiment's tags, each a link to the list filtered by it. */
function tagList(tags) {
  return (tags || []).map((t) => `<a class="tag" href="#/experiments?tag=${encodeURIComponent(t)}">${esc(t)}</a>`).join(" ");
}

function experimentsView(params) {
  main.innerHTML = `<h1>Experiments</h1>
    <div class="filters">
      <label>State<select id="f-state"><option value="">any</option>
        ${["running", "succeeded", "failed", "cancelled"].map((s) => `<option>${s}</option>`).join("")}</select></label>
      <label>Family<select id="f-family"><option value="">any</option></select></label>
      <label>Name<input id="f-name" placeholder="part of a name"></label>
      <label>Tag<input id="f-tag" placeholder="a tag"></label>
    </div>
    <div id="experiments"><p class="muted">Loading…</p></div>`;
  const state = document.getElementById("f-state");
  const family = document.getElementById("f-family");
  const name = document.getElementById("f-name");
  const tag = document.getElementById("f-tag");
  state.value = params.get("state") || "";
  name.value = params.get("name") || "";
  tag.value = params.get("tag") || "";
  const families = new Set();
  let last = "";
  const load = async () => {
    const q = new URLSearchParams({ state: state.value, family: family.value, name: name.value, tag: tag.value });
    const { experiments } = await api(`/api/v1/experiments?${q}`);
    experiments.forEach((e) => {
      if (!families.has(e.family)) {
        families.add(e.family);
        family.insertAdjacentHTML("beforeend", `<option>${esc(e.family)}</option>`);
      }
    });
    const text = JSON.stringify(experiments);
    if (text !== last) {
      last = text;
      document.getElementById("experiments").innerHTML = experiments.length === 0
        ? `<p class="muted">No experiments${state.value || family.value || name.value || tag.value ? " match" : " yet: <code>ablate submit SPEC</code>"}.</p>`
        : `<table id="experiments-table"><thead><tr><th>Name</th><th>Family</th><th>State</th><th>Progress</th><th>Best objective</th><th>Tags</th><th>Submitted by</th><th>Age</th></tr></thead><tbody>
          ${experiments.map((e) => `<tr data-id="${esc(e.id)}">
            <td><a href="#/experiments/${esc(e.id)}">${esc(e.name)}</a>${e.note ? ` <span class="muted" title="${esc(e.note)}">✎</span>` : ""}</td><td>${esc(e.family)}</td><td>${stateTag(e.state)}</td>
            <td>${progress(e)}</td>
            <td class="num">${e.best === null ? "" : `${esc(fmt(e.best))} <span class="muted">${esc(e.objective_metric || "")}</span>`}</td>
            <td>${tagList(e.tags)}</td>
            <td>${esc(e.submitted_by || "")}</td><td>${age(e.created_at)}</td></tr>`).join("")}</tbody></table>`;
    }
    const running = experiments.some((e) => e.state === "running");
    live.textContent = running ? "live: refreshing every 3 s" : "";
    return true;
  };
  let reload = every(3000, load);
  for (const input of [state, family, name, tag]) {
    input.addEventListener(input === name || input === tag ? "input" : "change", () => { last = ""; reload = load().catch(showError); });
  }
}

// ---------------------------------------------------------------- experiment

function numeric(values) {
  return values.length > 0 && values.every((v) => typeof v === "number" && Number.isFinite(v));
}

/// The axis to draw values on: a log scale of base 2 when they are all powers
/// of two, 10 when positive and spanning more than a decade and a half, else linear.
function axisFor(values) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (finite.length < 2 || finite.some((v) => v <= 0)) return { distr: 1 };
  if (finite.every((v) => Number.isInteger(Math.log2(v)))) return { distr: 3, log: 2 };
  const lo = Math.min(...finite), hi = Math.max(...finite);
  return hi / lo > 30 ? { distr: 3, log: 10 } : { distr: 1 };
}

function plotWidth(el) {
  return Math.max(280, Math.min(el.clientWidth || 900, 1300));
}

/// The tooltip of whatever the pointer is over that has a `data-tip` (one
/// listener for the page, not an element per point: a scatter of 10,000 trials
/// stays 10,000 elements).
const tip = document.createElement("div");
tip.id = "tip";
tip.hidden = true;
document.body.appendChild(tip);
function showTip(text, event) {
  tip.textContent = text;
  tip.style.left = `${event.pageX + 12}px`;
  tip.style.top = `${event.pageY + 12}px`;
  tip.hidden = false;
}
document.addEventListener("mouseover", (event) => {
  const target = event.target.closest && event.target.closest("[data-tip]");
  if (target) showTip(target.dataset.tip, event);
});
document.addEventListener("mouseout", (event) => {
  if (event.target.closest && event.target.closest("[data-tip]")) tip.hidden = true;
});

/// A canvas of `W` x `H` CSS pixels, drawn at the screen's pixel density.
const canvasHtml = (W, H) =>
  `<canvas width="${W * devicePixelRatio}" height="${H * devicePixelRatio}" style="width:${W}px;height:${H}px"></canvas>`;

/// The 2D context of a `canvasHtml` canvas, in CSS pixels; `tipAt(x, y)` names
/// what is drawn under the pointer (null: nothing), shown as the page's tooltip.
function drawOn(canvas, tipAt) {
  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const text = tipAt(event.clientX - rect.left, event.clientY - rect.top);
    if (text === null) tip.hidden = true; else showTip(text, event);
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  const ctx = canvas.getContext("2d");
  ctx.scale(devicePixelRatio, devicePixelRatio);
  return ctx;
}

/// Scatters of more points than this draw them on a canvas (10,000 circles in
/// SVG take longer to lay out than the rest of the page); fewer are SVG circles.
const SVG_POINTS = 2000;

/// Values placed between pixels `lo` and `hi` on the axis axisFor picks for them
/// (`at`), with their least and greatest for the ticks.
function scale(values, lo, hi) {
  const axis = axisFor(values);
  const f = axis.distr === 3 ? Math.log : (v) => v;
  const a = Math.min(...values.map(f)), b = Math.max(...values.map(f));
  return { at: (v) => (b === a ? (lo + hi) / 2 : lo + ((f(v) - a) * (hi - lo)) / (b - a)), min: Math.min(...values), max: Math.max(...values) };
}

/// A scatter of one point per trial (every trial, also where several share an
/// x value), appended to `box`: numbers on a linear or log axis (as axisFor
/// picks), other values as categories. Each point names its trial and value in
/// a tooltip.
function scatterPlot(box, { title, param, xLabel, yLabel, kinds, points }) {
  const W = 380, H = 240, left = 62, right = 12, top = 10, bottom = 36;
  const x = kinds
    ? { at: (v) => left + ((kinds.indexOf(fmt(v)) + 0.5) * (W - left - right)) / kinds.length }
    : scale(points.map((p) => p.x), left, W - right);
  const y = scale(points.map((p) => p.y), H - bottom, top);
  // Points that share an x spread a little sideways, so each stays visible.
  const seen = new Map();
  const at = points.map((p) => {
    const key = fmt(p.x);
    const n = seen.get(key) || 0;
    seen.set(key, n + 1);
    return [x.at(p.x) + ((n % 7) - 3) * 1.5, y.at(p.y), key];
  });
  const tipOf = (p, key) => `trial ${p.trial.ordinal}: ${param} = ${key}, ${yLabel} = ${fmt(p.y)}`;
  const onCanvas = points.length > SVG_POINTS;
  const circles = onCanvas ? "" : points.map((p, i) =>
    `<circle class="scatter-point" data-param="${esc(param)}" data-x="${esc(at[i][2])}" cx="${at[i][0].toFixed(1)}" cy="${at[i][1].toFixed(1)}" r="3.5" ` +
    `data-tip="${esc(tipOf(p, at[i][2]))}"/>`).join("");
  const xTicks = kinds
    ? kinds.map((k) => `<text x="${x.at(k).toFixed(1)}" y="${H - bottom + 14}" text-anchor="middle">${esc(k)}</text>`).join("")
    : `<text x="${left}" y="${H - bottom + 14}" text-anchor="start">${esc(fmt(x.min))}</text><text x="${W - right}" y="${H - bottom + 14}" text-anchor="end">${esc(fmt(x.max))}</text>`;
  const yTicks = `<text x="${left - 4}" y="${H - bottom}" text-anchor="end">${esc(fmt(y.min))}</text><text x="${left - 4}" y="${top + 8}" text-anchor="end">${esc(fmt(y.max))}</text>`;
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<h3>${esc(title)}</h3><div class="plot" style="width:${W}px;height:${H}px">
    ${onCanvas ? canvasHtml(W, H) : ""}
    <svg class="scatter" data-param="${esc(param)}" data-points="${points.length}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
    <rect x="${left}" y="${top}" width="${W - left - right}" height="${H - top - bottom}" class="frame"/>${circles}${xTicks}${yTicks}
    <text x="${(left + W - right) / 2}" y="${H - 4}" text-anchor="middle">${esc(xLabel)}</text>
    <text x="12" y="${(top + H - bottom) / 2}" text-anchor="middle" transform="rotate(-90 12 ${(top + H - bottom) / 2})">${esc(yLabel)}</text></svg></div>`;
  box.appendChild(card);
  if (!onCanvas) return;
  const ctx = drawOn(card.querySelector("canvas"), (px, py) => {
    let best = -1, gap = 25;
    at.forEach(([cx, cy], i) => { const d = (cx - px) ** 2 + (cy - py) ** 2; if (d < gap) { gap = d; best = i; } });
    return best < 0 ? null : tipOf(points[best], at[best][2]);
  });
  ctx.fillStyle = "rgba(31, 119, 180, 0.6)";
  ctx.beginPath();
  for (const [cx, cy] of at) { ctx.moveTo(cx + 3.5, cy); ctx.arc(cx, cy, 3.5, 0, 2 * Math.PI); }
  ctx.fill();
}

/// Several objectives: every succeeded trial with both values as a point, `y`
/// (the first objective) against `x` (another), the Pareto front's trials
/// (`front`, ordinals) marked and joined by the steps of the front; better is
/// down and to the left once `xSign`/`ySign` (-1 for a maximized objective)
/// are applied. Each point names its trial in a tooltip.
function paretoPlot(box, { title, xName, yName, xSign, ySign, trials, front }) {
  const W = 460, H = 300, left = 70, right = 14, top = 12, bottom = 40;
  const points = trials
    .filter((t) => t.state === "succeeded" && typeof t.metrics?.[xName] === "number" && typeof t.metrics?.[yName] === "number")
    .map((t) => ({ x: t.metrics[xName], y: t.metrics[yName], trial: t, front: front.includes(t.ordinal) }));
  if (points.length === 0) return;
  const x = scale(points.map((p) => p.x), left, W - right);
  const y = scale(points.map((p) => p.y), H - bottom, top);
  // The front as steps: sorted by x (better first), each point joined to the next
  // across, then down (or up, for a maximized y).
  const onFront = points.filter((p) => p.front).sort((a, b) => xSign * (a.x - b.x));
  let path = "";
  onFront.forEach((p, i) => {
    const [px, py] = [x.at(p.x).toFixed(1), y.at(p.y).toFixed(1)];
    path += i === 0 ? `M${px},${py}` : `H${px}V${py}`;
  });
  const tipOf = (p) => `trial ${p.trial.ordinal}: ${xName} = ${fmt(p.x)}, ${yName} = ${fmt(p.y)}${p.front ? " (on the front)" : ""}`;
  const circles = points.map((p) =>
    `<circle class="${p.front ? "front-point" : "pareto-point"}" data-ordinal="${p.trial.ordinal}" cx="${x.at(p.x).toFixed(1)}" cy="${y.at(p.y).toFixed(1)}" r="${p.front ? 5 : 3.5}" data-tip="${esc(tipOf(p))}"/>`).join("");
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<h3>${esc(title)}</h3>
    <svg class="pareto" data-front="${onFront.length}" data-points="${points.length}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
    <rect x="${left}" y="${top}" width="${W - left - right}" height="${H - top - bottom}" class="frame"/>
    <path class="front-line" d="${path}"/>${circles}
    <text x="${left}" y="${H - bottom + 14}" text-anchor="start">${esc(fmt(x.min))}</text><text x="${W - right}" y="${H - bottom + 14}" text-anchor="end">${esc(fmt(x.max))}</text>
    <text x="${left - 4}" y="${H - bottom}" text-anchor="end">${esc(fmt(y.min))}</text><text x="${left - 4}" y="${top + 8}" text-anchor="end">${esc(fmt(y.max))}</text>
    <text x="${(left + W - right) / 2}" y="${H - 4}" text-anchor="middle">${esc(xName)}${xSign < 0 ? " (maximized)" : ""}</text>
    <text x="12" y="${(top + H - bottom) / 2}" text-anchor="middle" transform="rotate(-90 12 ${(top + H - bottom) / 2})">${esc(yName)}${ySign < 0 ? " (maximized)" : ""}</text></svg>
    <p class="muted">${onFront.length} of ${points.length} trials on the Pareto front (larger, joined)</p>`;
  box.appendChild(card);
}

/// A uPlot of several (x, y) series, joined on one x axis.
function linePlot(el, { title, series, xLabel, yLabel, xAxis, yAxis, points, width, height }) {
  const nonEmpty = series.filter((s) => s.x.length > 0);
  if (nonEmpty.length === 0) {
    el.insertAdjacentHTML("beforeend", `<div class="card"><h3>${esc(title)}</h3><p class="muted">no points yet</p></div>`);
    return null;
  }
  const data = uPlot.join(nonEmpty.map((s) => [s.x, s.y]));
  // Series of a few points are drawn as points too, or they would not show.
  const few = nonEmpty.every((s) => s.x.length <= 3);
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<h3>${esc(title)}</h3>`;
  el.appendChild(card);
  const plot = new uPlot({
    width: width || plotWidth(el),
    height: height || 300,
    scales: { x: { time: false, ...(xAxis || {}) }, y: { ...(yAxis || {}) } },
    axes: [{ label: xLabel || "" }, { label: yLabel || "", size: 70 }],
    legend: { live: true },
    series: [{ label: xLabel || "x" }, ...nonEmpty.map((s, i) => ({
      label: s.label,
      stroke: s.color || PALETTE[i % PALETTE.length],
      width: 1.5,
      spanGaps: true,
      ...(points ? { paths: () => null, points: { show: true, size: 7, fill: s.color || PALETTE[i % PALETTE.length] } } : { points: { show: few, size: 6 } }),
    }))],
  }, data, card);
  view.plots.push(plot);
  return plot;
}

function experimentView(id) {
  const state = {
    experiment: null, trials: [], sort: { key: "ordinal", dir: 1 }, stateFilter: "", ranges: {},
    selected: new Set(), metric: null, metricPicked: false, candidates: [], lastTrials: "", lastCurves: "",
  };
  main.innerHTML = `<div id="head"><p class="muted">Loading…</p></div>
    <h2>Trials</h2>
    <div class="filters" id="trial-filters"></div>
    <div class="actions">
      <a id="export-csv" href="/api/v1/experiments/${esc(id)}/trials?format=csv">Export CSV</a>
      <a id="export-json" href="/api/v1/experiments/${esc(id)}/trials?format=json" target="_blank">Export JSON</a>
      <span class="muted" id="trial-count"></span>
    </div>
    <div class="scroll"><table id="trials"></table></div>
    <h2>Learning curves</h2>
    <div class="filters"><label>Metric<select id="metric"></select></label>
      <span class="muted" id="curve-note"></span></div>
    <div id="curves"></div>
    <div id="pareto-section" hidden><h2>Pareto front</h2><div class="row" id="pareto"></div></div>
    <h2>Objective against parameters</h2>
    <div class="row" id="scatter"></div>
    <h2>Parallel coordinates</h2>
    <div id="parallel"></div>
    <h2>Report</h2>
    <div id="report"><p class="muted">Loading…</p></div>
    <h2>Failures</h2>
    <div id="failures"></div>
    <h2>Spec</h2>
    <details><summary>spec text</summary><pre id="spec"></pre></details>`;

  const metricSelect = document.getElementById("metric");
  metricSelect.addEventListener("change", () => { state.metric = metricSelect.value; state.metricPicked = true; state.lastCurves = ""; drawCurves(); });

  const allParams = () => state.experiment ? state.experiment.params : [];
  // The swept parameters: those whose values differ between trials (all of them for one trial).
  // Worked out once per trial list (the table, filters and plots all ask).
  let swept = { trials: null, params: null, names: [] };
  const paramNames = () => {
    if (swept.trials !== state.trials || swept.params !== allParams()) {
      const varying = allParams().filter((p) => new Set(state.trials.map((t) => JSON.stringify(t.params[p]))).size > 1);
      swept = { trials: state.trials, params: allParams(), names: varying.length > 0 || state.trials.length > 1 ? varying : allParams() };
    }
    return swept.names;
  };
  const fixedParams = () => allParams().filter((p) => !paramNames().includes(p));

  function visibleTrials() {
    let rows = state.trials.filter((t) => !state.stateFilter || t.state === state.stateFilter);
    for (const [name, [lo, hi]] of Object.entries(state.ranges)) {
      rows = rows.filter((t) => {
        const v = t.params[name];
        if (typeof v !== "number") return lo === "" && hi === "";
        return (lo === "" || v >= Number(lo)) && (hi === "" || v <= Number(hi));
      });
    }
    const { key, dir } = state.sort;
    const value = (t) => key.startsWith("param:") ? t.params[key.slice(6)] : t[key];
    return rows.slice().sort((a, b) => {
      const x = value(a), y = value(b);
      if (x === y) return a.ordinal - b.ordinal;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }

  function drawFilters() {
    const box = document.getElementById("trial-filters");
    box.innerHTML = `<label>State<select id="t-state"><option value="">any</option>
      ${["pending", "running", "succeeded", "failed", "pruned", "cancelled"].map((s) => `<option>${s}</option>`).join("")}</select></label>` +
      paramNames().filter((p) => numeric(state.trials.map((t) => t.params[p]).filter((v) => v !== undefined)))
        .map((p) => `<label>${esc(p)} from–to<span><input class="range" data-param="${esc(p)}" data-end="0" placeholder="min">
          <input class="range" data-param="${esc(p)}" data-end="1" placeholder="max"></span></label>`).join("");
    const select = document.getElementById("t-state");
    select.value = state.stateFilter;
    select.addEventListener("change", () => { state.stateFilter = select.value; drawTable(); });
    box.querySelectorAll("input.range").forEach((input) => {
      input.addEventListener("input", () => {
        const p = input.dataset.param;
        const range = state.ranges[p] || ["", ""];
        range[Number(input.dataset.end)] = input.value.trim();
        state.ranges[p] = range;
        drawTable();
      });
    });
  }

  // The trial table draws only the rows in view (and a screenful either side):
  // spacer rows stand in for the rest, so 10,000 trials draw as fast as 100.
  const table = document.getElementById("trials");
  const scrollBox = table.parentElement;
  let rowHeight = 0;
  let drawnRows = "";
  function trialRow(t, params) {
    return `<tr class="trial-row" data-id="${esc(t.id)}">
        <td><input type="checkbox" data-id="${esc(t.id)}" ${state.selected.has(t.id) ? "checked" : ""}></td>
        <td><a href="#/trials/${esc(t.id)}">${t.ordinal}</a></td><td>${stateTag(t.state)}${t.reused_from ? ` <a class="tag reused" href="#/trials/${esc(t.reused_from)}" title="took this trial's results instead of running">reused</a>` : ""}</td>
        ${params.map((p) => `<td class="num">${esc(fmt(t.params[p]))}</td>`).join("")}
        <td class="num">${esc(fmt(t.objective))}${t.feasible === false ? ` <span class="muted" title="misses a constraint">infeasible</span>` : ""}</td><td class="num">${t.attempts}</td></tr>`;
  }
  function drawRows() {
    const rows = state.rows || [];
    const params = state.tableParams || [];
    const height = rowHeight || 28;
    const screen = Math.ceil((scrollBox.clientHeight || 520) / height);
    const first = Math.max(0, Math.floor(scrollBox.scrollTop / height) - screen);
    const last = Math.min(rows.length, first + 3 * screen);
    const span = params.length + 5;
    const spacer = (n) => n > 0 ? `<tr class="spacer" style="height:${n * height}px"><td colspan="${span}"></td></tr>` : "";
    const key = `${first}:${last}:${rows.length}:${height}`;
    const body = table.querySelector("tbody");
    if (!body || (key === drawnRows && body.dataset.version === state.tableVersion)) return;
    drawnRows = key;
    body.dataset.version = state.tableVersion;
    body.innerHTML = spacer(first) + rows.slice(first, last).map((t) => trialRow(t, params)).join("") + spacer(rows.length - last);
    if (!rowHeight) {
      const drawn = body.querySelector("tr.trial-row");
      const measured = drawn ? drawn.getBoundingClientRect().height : 0;
      if (measured > 0) {
        rowHeight = measured;
        drawRows();
      }
    }
  }
  scrollBox.addEventListener("scroll", () => requestAnimationFrame(drawRows), { passive: true });
  table.addEventListener("change", (event) => {
    const box = event.target;
    if (!box.matches("input[type=checkbox]")) return;
    if (box.checked) state.selected.add(box.dataset.id); else state.selected.delete(box.dataset.id);
    state.lastCurves = "";
    drawCurves();
  });

  function drawTable() {
    const params = paramNames();
    const rows = visibleTrials();
    state.rows = rows;
    state.tableParams = params;
    state.tableVersion = String((Number(state.tableVersion) || 0) + 1);
    const col = (key, label) => {
      const sorted = state.sort.key === key ? (state.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
      return `<th class="sortable ${sorted}" data-key="${esc(key)}">${esc(label)}</th>`;
    };
    const objective = state.experiment?.objective_metric || "objective";
    table.innerHTML = `<thead><tr><th title="draw its curves">curve</th>${col("ordinal", "#")}${col("state", "state")}
      ${params.map((p) => col(`param:${p}`, p)).join("")}${col("objective", objective)}${col("attempts", "attempts")}</tr></thead>
      <tbody></tbody>`;
    drawnRows = "";
    drawRows();
    const fixed = fixedParams().map((p) => `${p}=${fmt(state.trials[0]?.params[p])}`).join(", ");
    document.getElementById("trial-count").textContent = `${rows.length} of ${state.trials.length} trials shown` +
      (fixed ? ` · the same in every trial: ${fixed}` : "");
    document.querySelectorAll("#trials th.sortable").forEach((th) => th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      drawTable();
    }));
  }

  function drawHead() {
    const e = state.experiment;
    document.getElementById("head").innerHTML = `<h1 id="experiment-name">${esc(e.name)}</h1>
      <p>${stateTag(e.state)} · family <b>${esc(e.family)}</b> · ${progress(e)} ·
        ${e.running} running, ${e.pending} pending, ${e.failed} failed · objective ${esc(e.objective_metric || "none")}
        ${e.goal ? `(${esc(e.goal)})` : ""} · submitted by ${esc(e.submitted_by || "—")} ${age(e.created_at)} ago</p>
      ${(e.tags || []).length > 0 ? `<p id="experiment-tags">tags: ${tagList(e.tags)}</p>` : ""}
      ${e.note ? `<p id="experiment-note" class="note">${esc(e.note)}</p>` : ""}
      ${e.reused > 0 ? `<p class="muted">${e.reused} trials took the results of earlier experiments' trials instead of running (reuse)</p>` : ""}
      ${e.keep_checkpoints && e.keep_checkpoints !== "all" ? `<p class="muted">checkpoints kept per finished trial: ${esc(e.keep_checkpoints)}</p>` : ""}
      ${e.waiting ? `<p class="state state-waiting">waiting: ${esc(e.waiting)}</p>` : ""}`;
    document.getElementById("spec").textContent = e.spec_text;
    const failures = e.failures || [];
    document.getElementById("failures").innerHTML = failures.length === 0 ? `<p class="muted">none</p>` :
      failures.map((f) => `<div class="card"><h3><a href="#/trials/${esc(f.trial_id)}">trial ${f.ordinal}</a>, attempt ${f.attempt}: ${stateTag(f.outcome)} ${f.host ? `on ${esc(f.host)}` : ""}</h3>
        <p class="error">${esc(f.error || "")}</p>${f.stderr_tail ? `<pre>${esc(f.stderr_tail)}</pre>` : ""}</div>`).join("");
    const metrics = e.metrics || [];
    if (metricSelect.options.length !== metrics.length) {
      metricSelect.innerHTML = metrics.map((m) => `<option>${esc(m)}</option>`).join("");
      // A curve by default: the objective unless it is a single final value, else a
      // loss, else the rest; drawCurves moves on from one that has a point per trial.
      state.candidates = [
        ...metrics.filter((m) => m === e.objective_metric && !/_final$/.test(m)),
        ...metrics.filter((m) => /^(eval|train)_loss$/.test(m)),
        ...metrics.filter((m) => !/_final$/.test(m)),
        ...metrics,
      ].filter((m, i, all) => all.indexOf(m) === i);
      state.metric = state.metric || state.candidates[0];
      metricSelect.value = state.metric || "";
    }
  }

  async function drawCurves() {
    if (!state.metric) return;
    const box = document.getElementById("curves");
    const width = plotWidth(box);
    const q = new URLSearchParams({ metric: state.metric, points: String(Math.min(2000, width)) });
    // The ticked trials, else the best 10 by objective, feasible first (the table has them already).
    const sign = state.experiment.goal === "maximize" ? -1 : 1;
    const best = state.trials.filter((t) => typeof t.objective === "number")
      .sort((a, b) => (a.feasible === false) - (b.feasible === false) || sign * (a.objective - b.objective) || a.ordinal - b.ordinal)
      .slice(0, 10).map((t) => t.id);
    const chosen = state.selected.size > 0 ? [...state.selected] : best;
    if (chosen.length > 0) q.set("trials", chosen.join(","));
    const { series } = await api(`/api/v1/experiments/${id}/curves?${q}`);
    // A metric of one point per trial draws no curve: unless it was picked, try the next.
    if (!state.metricPicked && series.length > 0 && series.every((s) => s.values.length <= 1)) {
      const next = state.candidates[state.candidates.indexOf(state.metric) + 1];
      if (next) {
        state.metric = next;
        metricSelect.value = next;
        return drawCurves();
      }
    }
    const text = JSON.stringify(series);
    if (text === state.lastCurves) return;
    state.lastCurves = text;
    view.plots = view.plots.filter((p) => { if (p.root.closest("#curves")) { p.destroy(); return false; } return true; });
    box.innerHTML = "";
    document.getElementById("curve-note").textContent = state.selected.size > 0
      ? `${series.length} selected trials` : `the best ${series.length} trials by objective (tick trials in the table to choose)`;
    linePlot(box, {
      title: state.metric, xLabel: "step", yLabel: state.metric, width,
      yAxis: axisFor(series.flatMap((s) => s.values)),
      series: series.map((s) => ({ label: `trial ${s.ordinal}`, x: s.steps, y: s.values })),
    });
  }

  function drawScatter() {
    const box = document.getElementById("scatter");
    box.innerHTML = "";
    const done = state.trials.filter((t) => typeof t.objective === "number" && Number.isFinite(t.objective));
    if (done.length === 0) { box.innerHTML = `<p class="muted">no objective yet</p>`; return; }
    const objective = state.experiment.objective_metric || "objective";
    for (const p of paramNames()) {
      const values = done.map((t) => t.params[p]);
      const kinds = numeric(values) ? null : [...new Set(values.map((v) => fmt(v)))].sort();
      scatterPlot(box, {
        title: `${objective} vs ${kinds ? `${p} (${kinds.join(", ")})` : p}`, param: p, xLabel: p, yLabel: objective,
        kinds, points: done.map((t) => ({ x: t.params[p], y: t.objective, trial: t })),
      });
    }
  }

  /// With several objectives: the first against each other one, the front drawn.
  function drawPareto() {
    const e = state.experiment;
    const also = Array.isArray(e.also) ? e.also : [];
    document.getElementById("pareto-section").hidden = also.length === 0;
    const box = document.getElementById("pareto");
    box.innerHTML = "";
    const sign = (goal) => (goal === "maximize" ? -1 : 1);
    for (const other of also) {
      paretoPlot(box, {
        title: `${e.objective_metric} against ${other.metric}`, xName: other.metric, yName: e.objective_metric,
        xSign: sign(other.goal), ySign: sign(e.goal), trials: state.trials, front: e.pareto || [],
      });
    }
  }

  function drawParallel() {
    const box = document.getElementById("parallel");
    const done = state.trials.filter((t) => typeof t.objective === "number");
    const dims = paramNames().filter((p) => new Set(done.map((t) => fmt(t.params[p]))).size > 0);
    if (done.length === 0 || dims.length === 0) { box.innerHTML = `<p class="muted">no objective yet</p>`; return; }
    const axes = [...dims.map((p) => ({ name: p, get: (t) => t.params[p] })), { name: state.experiment.objective_metric || "objective", get: (t) => t.objective }];
    const W = Math.max(600, Math.min(box.clientWidth || 900, 1300)), H = 300, pad = 40, padX = 90;
    const scales = axes.map((a) => {
      const vals = done.map(a.get);
      if (numeric(vals)) {
        const log = axisFor(vals).distr === 3;
        const f = log ? Math.log : (v) => v;
        const lo = Math.min(...vals.map(f)), hi = Math.max(...vals.map(f));
        return { pos: (v) => (hi === lo ? 0.5 : (f(v) - lo) / (hi - lo)), lo: Math.min(...vals), hi: Math.max(...vals) };
      }
      const kinds = [...new Set(vals.map(fmt))].sort();
      return { pos: (v) => (kinds.length === 1 ? 0.5 : kinds.indexOf(fmt(v)) / (kinds.length - 1)), lo: kinds[0], hi: kinds[kinds.length - 1] };
    });
    const x = (i) => padX + (i * (W - 2 * padX)) / Math.max(axes.length - 1, 1);
    const y = (f) => H - pad - f * (H - 2 * pad);
    const objectiveScale = scales[scales.length - 1];
    const better = state.experiment.goal === "maximize" ? (f) => f : (f) => 1 - f;
    // The lines on a canvas (10,000 trials are one drawing, not 10,000 elements),
    // the axes in SVG over it; the line nearest the pointer names its trial.
    const ticks = axes.map((a, i) => `<line x1="${x(i)}" x2="${x(i)}" y1="${pad}" y2="${H - pad}" stroke="#98a2b3"/>
      <text x="${x(i)}" y="${pad - 22}" text-anchor="middle" font-weight="600">${esc(a.name)}</text>
      <text x="${x(i)}" y="${pad - 8}" text-anchor="middle">${esc(fmt(scales[i].hi))}</text>
      <text x="${x(i)}" y="${H - pad + 14}" text-anchor="middle">${esc(fmt(scales[i].lo))}</text>`).join("");
    box.innerHTML = `<div class="parallel" style="width:${W}px;height:${H}px" data-lines="${done.length}">
        ${canvasHtml(W, H)}
        <svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${ticks}</svg></div>
      <p class="muted">one line per trial with an objective; colour from worst (red) to best (blue)</p>`;
    const ys = done.map((t) => axes.map((a, i) => y(scales[i].pos(a.get(t)))));
    const ctx = drawOn(box.querySelector("canvas"), (px, py) => {
      const span = (W - 2 * padX) / Math.max(axes.length - 1, 1);
      const i = Math.max(0, Math.min(axes.length - 2, Math.floor((px - padX) / span)));
      const f = Math.max(0, Math.min(1, (px - x(i)) / span));
      let best = -1, gap = 5;
      ys.forEach((line, k) => {
        const d = Math.abs((axes.length > 1 ? line[i] + f * (line[i + 1] - line[i]) : line[0]) - py);
        if (d < gap) { gap = d; best = k; }
      });
      return best < 0 ? null : `trial ${done[best].ordinal}: ${fmt(done[best].objective)}`;
    });
    ctx.lineWidth = 1;
    ctx.globalAlpha = 0.55;
    // One path per shade (64 of them), worst first so the best lie on top.
    const shades = 64;
    const shadeOf = (t) => Math.round(better(objectiveScale.pos(t.objective)) * (shades - 1));
    const byShade = Array.from({ length: shades }, () => []);
    done.forEach((t, k) => { const s = shadeOf(t); if (s >= 0) byShade[s].push(k); });
    byShade.forEach((lines, s) => {
      if (lines.length === 0) return;
      ctx.strokeStyle = `hsl(${Math.round(10 + (200 * s) / (shades - 1))}, 70%, 45%)`;
      ctx.beginPath();
      for (const k of lines) ys[k].forEach((v, i) => (i ? ctx.lineTo(x(i), v) : ctx.moveTo(x(i), v)));
      ctx.stroke();
    });
  }

  // A report table shows its first rows and the rest on a click: a large
  // experiment's report lists every trial, which the trial table has already.
  const REPORT_ROWS = 100;
  const reportPath = `/api/v1/experiments/${id}/report?rows=${REPORT_ROWS}&text=false`;
  const reportRows = (rows) => rows.map((r) => `<tr>${r.map((c) => `<td>${esc(c)}</td>`).join("")}</tr>`).join("");

  // `pending`: the report already asked for (on the first load, with the trials).
  async function drawReport(pending) {
    const box = document.getElementById("report");
    try {
      const { report } = await (pending || api(reportPath));
      const v = report.verdict;
      const verdict = v.criteria.length === 0 ? "" : `<p class="verdict ${v.holds ? "holds" : "fails"}" id="verdict">verdict: ${v.holds ? "every criterion holds" : "NOT every criterion holds"}</p>
        <table><thead><tr><th></th><th>criterion</th><th>measured</th><th>needs</th></tr></thead><tbody>
        ${v.criteria.map((c) => `<tr><td>${c.holds ? "ok" : "no"}</td><td>${esc(c.name)}</td><td class="num">${c.measured === null ? "not measured" : esc(fmt(c.measured))}</td><td>${esc(c.threshold)}</td></tr>`).join("")}</tbody></table>`;
      box.innerHTML = `<h3>${esc(report.title)}</h3><p>${esc(report.summary)}</p>${verdict}
        ${report.tables.map((t, i) => `<h3>${esc(t.title)}</h3><div class="scroll"><table><thead><tr>${t.columns.map((c) => `<th>${esc(c)}</th>`).join("")}</tr></thead>
          <tbody data-table="${i}">${reportRows(t.rows)}</tbody></table></div>
          ${t.total_rows > t.rows.length ? `<button class="show-all" data-table="${i}">show all ${t.total_rows} rows</button>` : ""}`).join("")}
        <div class="row" id="figures"></div>`;
      box.querySelectorAll("button.show-all").forEach((button) => button.addEventListener("click", async () => {
        button.disabled = true;
        const whole = await api(`/api/v1/experiments/${id}/report?text=false`);
        box.querySelector(`tbody[data-table="${button.dataset.table}"]`).innerHTML = reportRows(whole.report.tables[Number(button.dataset.table)].rows);
        button.remove();
      }));
      const figures = document.getElementById("figures");
      for (const figure of report.figures) {
        for (const panel of figure.panels) {
          const xs = panel.series.flatMap((s) => s.points.map((p) => p[0]));
          const ys = panel.series.flatMap((s) => s.points.map((p) => p[1]));
          const series = panel.series.map((s) => {
            const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
            return { label: s.label, x: pts.map((p) => p[0]), y: pts.map((p) => p[1]) };
          });
          linePlot(figures, {
            title: `${figure.title}: ${panel.title}`, xLabel: panel.x_label, yLabel: panel.y_label, width: 460, height: 300,
            xAxis: panel.log_x ? { ...axisFor(xs), distr: 3 } : { distr: 1 },
            yAxis: panel.log_y ? { ...axisFor(ys), distr: 3 } : { distr: 1 },
            series,
          });
        }
      }
    } catch (error) {
      box.innerHTML = `<p class="muted">${esc(error.message)}</p>`;
    }
  }

  let drawnParams = "";
  every(3000, async () => {
    // The first load asks for the report with the trials rather than after them.
    const firstReport = state.lastTrials === "" ? api(reportPath) : null;
    firstReport?.catch(() => {});
    const [{ experiment }, { trials }] = await Promise.all([
      api(`/api/v1/experiments/${id}`), api(`/api/v1/experiments/${id}/trials`),
    ]);
    state.experiment = experiment;
    drawHead();
    const text = JSON.stringify(trials);
    if (text !== state.lastTrials) {
      state.lastTrials = text;
      state.trials = trials;
      if (drawnParams !== JSON.stringify(experiment.params)) {
        drawnParams = JSON.stringify(experiment.params);
        drawFilters();
      }
      // The curves and the report load while the rest is drawn.
      const loading = [drawCurves(), drawReport(firstReport)];
      drawTable();
      drawPareto();
      drawScatter();
      drawParallel();
      await Promise.all(loading);
    } else {
      await drawCurves();
    }
    // When the first full view is drawn (read by the bench): ms since navigation.
    if (!document.body.dataset.readyMs) document.body.dataset.readyMs = String(Math.round(performance.now()));
    const running = experiment.state === "running";
    live.textContent = running ? "live: refreshing every 3 s" : "";
    return running;
  });
}

// ---------------------------------------------------------------- trial

function trialView(id) {
  main.innerHTML = `<div id="trial-head"><p class="muted">Loading…</p></div>
    <div class="row"><div><h2>Parameters</h2><table class="kv" id="params"></table></div>
      <div><h2>Final metrics</h2><table class="kv" id="final"></table></div></div>
    <h2>Curves</h2><div class="row" id="trial-curves"></div>
    <h2>Attempts</h2><div id="attempts"></div>
    <h2>Log</h2><div id="log-attempts"></div><pre id="log" class="log">…</pre>
    <h2>Checkpoints</h2><div id="checkpoints"></div>`;
  let last = "";
  // The attempt whose log is shown; 0: the newest.
  let logAttempt = 0;
  const showLog = async () => {
    const box = document.getElementById("log");
    try {
      const { logs } = await api(`/api/v1/trials/${id}/logs?attempt=${logAttempt}`);
      const links = [];
      for (let a = 1; a <= logs.attempts; a++) {
        links.push(a === logs.attempt ? `<b>attempt ${a}</b>` : `<a href="" data-attempt="${a}">attempt ${a}</a>`);
      }
      const head = document.getElementById("log-attempts");
      head.innerHTML = `<p class="muted">${links.join(" · ")}${logs.running ? " · growing" : ""}</p>`;
      head.querySelectorAll("a[data-attempt]").forEach((a) => a.addEventListener("click", (e) => {
        e.preventDefault();
        logAttempt = Number(a.dataset.attempt);
        showLog();
      }));
      const follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      box.textContent = logs.text || "(nothing written yet)";
      if (follow) box.scrollTop = box.scrollHeight;
    } catch (e) {
      box.textContent = String(e.message || e);
    }
  };
  every(3000, async () => {
    const { trial } = await api(`/api/v1/trials/${id}`);
    await showLog();
    const text = JSON.stringify(trial);
    if (text !== last) {
      last = text;
      document.getElementById("trial-head").innerHTML = `<h1>trial ${trial.ordinal} of <a href="#/experiments/${esc(trial.experiment_id)}">${esc(trial.experiment)}</a></h1>
        ${trial.reused_from ? `<p id="reused-from">reused: it took the results of <a href="#/trials/${esc(trial.reused_from)}">trial ${esc(trial.reused_from)}</a> instead of running</p>` : ""}
        <p>${stateTag(trial.state)} · attempt ${trial.attempts} · objective ${esc(fmt(trial.objective))}
        ${trial.error ? `<br><span class="error">${esc(trial.error)}</span>` : ""}</p>`;
      const kv = (o) => Object.entries(o || {}).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${esc(fmt(v))}</td></tr>`).join("");
      document.getElementById("params").innerHTML = kv(trial.params);
      document.getElementById("final").innerHTML = kv(trial.metrics);
      const attempts = trial.attempt_log || [];
      document.getElementById("attempts").innerHTML = attempts.length === 0 ? `<p class="muted">none ended yet</p>` :
        `<table><thead><tr><th>attempt</th><th>outcome</th><th>host</th><th>device</th><th>ended</th><th>error</th></tr></thead><tbody>
        ${attempts.map((a) => `<tr><td>${a.attempt}</td><td>${stateTag(a.outcome)}</td><td>${esc(a.host || "")}</td><td>${esc(a.device || "")} ${esc(a.device_name || "")}</td>
          <td>${esc(a.finished_at || "")}</td><td class="error">${esc(a.error || "")}</td></tr>
          ${a.stderr_tail ? `<tr><td></td><td colspan="5"><pre>${esc(a.stderr_tail)}</pre></td></tr>` : ""}`).join("")}</tbody></table>`;
      const checkpoints = trial.checkpoints || [];
      document.getElementById("checkpoints").innerHTML = checkpoints.length === 0 ? `<p class="muted">none</p>` :
        `<table><thead><tr><th>step</th><th>object path</th><th>bytes</th><th>attempt</th></tr></thead><tbody>
        ${checkpoints.map((c) => `<tr><td class="num">${c.step}</td><td><code>${esc(c.path)}</code></td><td class="num">${c.bytes}</td><td class="num">${c.attempt}</td></tr>`).join("")}</tbody></table>`;
      const { series } = await api(`/api/v1/trials/${id}/curves?points=800`);
      const box = document.getElementById("trial-curves");
      view.plots.forEach((p) => p.destroy());
      view.plots = [];
      box.innerHTML = "";
      for (const s of series) {
        linePlot(box, {
          title: `${s.metric} (${s.total_points} points)`, xLabel: "step", yLabel: s.metric, width: 560, height: 260,
          yAxis: axisFor(s.values), series: [{ label: s.metric, x: s.steps, y: s.values }],
        });
      }
    }
    const running = trial.state === "running" || trial.state === "pending";
    live.textContent = running ? "live: refreshing every 3 s" : "";
    return running;
  });
}

// ---------------------------------------------------------------- workers

function workersView() {
  main.innerHTML = `<h1>Workers</h1><div id="workers"><p class="muted">Loading…</p></div>`;
  let last = "";
  every(3000, async () => {
    const { workers } = await api("/api/v1/workers");
    const text = JSON.stringify(workers);
    if (text !== last) {
      last = text;
      document.getElementById("workers").innerHTML = workers.length === 0 ? `<p class="muted">No worker has registered yet.</p>` :
        `<table id="workers-table"><thead><tr><th>worker</th><th>host</th><th>state</th><th>pool</th><th>slots</th><th>running</th><th>last seen</th></tr></thead><tbody>
        ${workers.map((w) => `<tr><td><code>${esc(w.id.slice(0, 8))}</code></td><td>${esc(w.hostname)}</td>
          <td>${stateTag(w.state)}${w.unhealthy ? `<br><span class="muted">${esc(w.unhealthy)}</span>` : ""}</td>
          <td>${esc(w.pool || "")} ${Object.entries(w.labels || {}).map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("")}</td>
          <td>${w.devices.map((d) => `<span class="tag">${esc(d)}</span>`).join("")}</td>
          <td>${w.running.map((r) => `<a href="#/trials/${esc(r.trial_id)}">${esc(r.experiment)}</a>`).join("<br>")}</td>
          <td title="${esc(w.last_seen_at)}">${age(w.last_seen_at)} ago</td></tr>`).join("")}</tbody></table>`;
    }
    live.textContent = "live: refreshing every 3 s";
    return true;
  });
}
