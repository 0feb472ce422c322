// pwemoe explorer: pick a preference r on the simplex, see lambda(r), the nearest measured
// results, evaluate r now, export it, or let constraints choose it (a certified selection).
// Talks only to this server's JSON API (no network).
"use strict";

const state = { run: null, k: 0, names: [], r: [], rows: [], pending: null, lambdaFor: "" };
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 3) => Number(x).toFixed(d);

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

// --- preference picking -------------------------------------------------------------------
function buildSliders() {
  const box = $("sliders");
  state.names.forEach((name, i) => {
    const row = document.createElement("div");
    row.className = "slider";
    row.innerHTML = `<label for="r-${i}">${name}</label>` +
      `<input type="range" id="r-${i}" min="0" max="1" step="0.01">` +
      `<input type="number" id="rn-${i}" min="0" max="1" step="0.01" aria-label="${name} weight">`;
    box.appendChild(row);
    const onChange = (ev) => setWeight(i, parseFloat(ev.target.value));
    row.querySelector(`#r-${i}`).addEventListener("input", onChange);
    row.querySelector(`#rn-${i}`).addEventListener("change", onChange);
  });
}

// Move one weight and rescale the others proportionally, so r stays on the simplex.
function setWeight(i, v) {
  if (!Number.isFinite(v)) return;
  v = Math.min(1, Math.max(0, v));
  const r = state.r.slice();
  const rest = r.reduce((s, x, j) => (j === i ? s : s + x), 0);
  for (let j = 0; j < r.length; j++) {
    if (j === i) continue;
    r[j] = rest > 1e-12 ? (r[j] * (1 - v)) / rest : (1 - v) / (r.length - 1);
  }
  r[i] = v;
  setPreference(r);
}

function setPreference(r) {
  const s = r.reduce((a, b) => a + b, 0);
  state.r = r.map((x) => x / s);
  state.r.forEach((x, i) => { $(`r-${i}`).value = x; $(`rn-${i}`).value = fmt(x, 2); });
  $("current-preference").textContent = "(" + state.r.map((x) => fmt(x)).join(", ") + ")";
  markOnSimplex();
  showNearest();
  clearTimeout(state.pending);
  state.pending = setTimeout(updateRouting, 60); // one request per burst of slider moves
}

// --- routing weights ----------------------------------------------------------------------
async function updateRouting() {
  const asked = state.r.slice();
  try {
    const res = await api("/api/routing_weights", { preference: asked });
    if (asked.some((x, i) => x !== state.r[i])) return; // a newer pick is on its way
    drawLambda(res);
    showError(null);
  } catch (e) { showError(e); }
}

function shortNames(names) {
  // drop the prefix every module shares, so the heat map's rows read as layers
  let p = names[0] || "";
  for (const n of names) while (!n.startsWith(p)) p = p.slice(0, p.lastIndexOf(".", p.length - 2) + 1);
  return names.map((n) => n.slice(p.length) || n);
}

function drawLambda(res) {
  const modules = Object.keys(res.routing_weights);
  const z = modules.map((m) => res.routing_weights[m]);
  const y = shortNames(modules);
  Plotly.react("heatmap", [{
    type: "heatmap", z, x: state.names, y, colorscale: "Blues", reversescale: true,
    texttemplate: "%{z:.2f}", hovertemplate: "%{y}<br>%{x}: λ = %{z:.4f}<extra></extra>",
  }], {
    margin: { t: 10, l: 160 }, height: Math.max(240, 22 * modules.length + 80),
    yaxis: { autorange: "reversed", automargin: true },
  }, { responsive: true });
  const head = "<tr><th>module</th>" + state.names.map((n) => `<th>${n}</th>`).join("") + "</tr>";
  const body = modules.map((m, j) => `<tr><td>${y[j]}</td>` +
    z[j].map((v) => `<td>${fmt(v, 4)}</td>`).join("") + "</tr>").join("");
  $("lambda-table").innerHTML = head + body;
  state.lambdaFor = res.preference.join(",");
  document.body.dataset.lambdaFor = state.lambdaFor; // for scripts and tests: which r the numbers are for
}

// --- measured results ---------------------------------------------------------------------
// the methods whose points are compared here: the subject (PWEMoE) and its reference baseline, by their
// roles in the method registry (GET /api/results: methods)
let LABELS = {};

function showNearest() {
  const rows = state.rows.filter((r) => r.preference && LABELS[r.method]);
  const dist = (p) => p.reduce((s, x, i) => s + Math.abs(x - state.r[i]), 0);
  const best = Object.keys(LABELS).flatMap((m) =>
    rows.filter((r) => r.method === m).sort((a, b) => dist(a.preference) - dist(b.preference)).slice(0, 3));
  const head = "<tr><th>method</th><th>r</th><th>L1 distance</th>" +
    state.names.map((n) => `<th>${n}</th>`).join("") + "</tr>";
  $("nearest").innerHTML = best.length === 0
    ? "<tr><td>no evaluated preferences yet: evaluate r, or run pwemoe evaluate</td></tr>"
    : head + best.map((r) => `<tr><td>${LABELS[r.method]}</td><td>(${r.preference.map((x) => fmt(x, 2)).join(", ")})</td>` +
      `<td>${fmt(dist(r.preference))}</td>` + state.names.map((n) => `<td>${fmt(r.accuracy[n], 4)}</td>`).join("") +
      "</tr>").join("");
}

async function loadResults() {
  const res = await api("/api/results");
  state.rows = res.rows;
  LABELS = Object.fromEntries(Object.entries(res.methods)
    .filter(([, m]) => m.role === "subject" || m.role === "reference").map(([name, m]) => [name, m.short]));
  $("results-note").textContent = res.rows.length === 0
    ? "No results yet for this run's models and data: run pwemoe evaluate, or evaluate a preference here."
    : `${res.rows.length} evaluated models from results.json` +
      (res.other_rows ? ` (${res.other_rows} rows from other models, routers or test data are not shown)` : "") +
      ". Hover a point for its preference and every task's value.";
  const figs = res.figures.accuracy.concat(res.figures.normalized);
  const box = $("figures");
  box.innerHTML = "";
  figs.filter((f) => f.name !== "ternary").forEach((f, i) => {
    const h = document.createElement("h3");
    h.textContent = f.title;
    const div = document.createElement("div");
    div.className = "fig";
    div.id = `front-${i}`;
    box.append(h, div);
    Plotly.newPlot(div, f.figure.data, f.figure.layout, { responsive: true });
  });
  if (state.k === 3) drawSimplex(res.figures.accuracy.find((f) => f.name === "ternary"));
  showNearest();
}

// --- k = 3: a clickable simplex -------------------------------------------------------------
function drawSimplex(fig) {
  const n = 20, a = [], b = [], c = [];
  for (let i = 0; i <= n; i++) for (let j = 0; j <= n - i; j++) { a.push(i / n); b.push(j / n); c.push((n - i - j) / n); }
  const pick = { type: "scatterternary", a, b, c, mode: "markers", name: "pick", hoverinfo: "none",
    marker: { size: 7, color: "rgba(0,0,0,0.08)" } };
  const data = (fig ? fig.figure.data : []).concat([pick, { type: "scatterternary", a: [0], b: [0], c: [0],
    mode: "markers", name: "picked", hoverinfo: "skip", marker: { size: 16, symbol: "x", color: "#d62728" } }]);
  const axis = (i) => ({ title: { text: state.names[i] }, min: 0 });
  const layout = fig ? fig.figure.layout : {};
  layout.ternary = layout.ternary || { aaxis: axis(0), baxis: axis(1), caxis: axis(2) };
  Object.assign(layout, { showlegend: false, margin: { t: 30, b: 20, l: 40, r: 40 }, height: 360 });
  Plotly.newPlot("simplex", data, layout, { responsive: true }).then((el) => {
    el.on("plotly_click", (ev) => {
      const p = ev.points[0];
      if (p && p.a !== undefined) setPreference([p.a, p.b, p.c]);
    });
    markOnSimplex();
  });
}

function markOnSimplex() {
  const el = $("simplex");
  if (state.k !== 3 || !el.data) return;
  Plotly.restyle(el, { a: [[state.r[0]]], b: [[state.r[1]]], c: [[state.r[2]]] }, [el.data.length - 1]);
}

// --- evaluate and export ------------------------------------------------------------------
async function evaluateNow() {
  const bar = $("eval-progress"), status = $("eval-status"), button = $("evaluate");
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  status.textContent = "evaluating…";
  try {
    let job = await api("/api/evaluate", { preference: state.r, wait: false });
    while (job.status === "running") {
      await new Promise((ok) => setTimeout(ok, 250));
      job = await api(`/api/jobs/${job.id}`);
      if (job.total) { bar.max = job.total; bar.value = job.done; }
    }
    if (job.status === "failed") throw new Error(job.error);
    bar.value = bar.max;
    const acc = job.row.accuracy;
    status.textContent = (job.row.reused ? "already measured: " : "measured: ") +
      state.names.map((n) => `${n} ${fmt(acc[n], 4)}`).join(", ");
    status.dataset.done = job.row.preference.join(",");
    await loadResults();
  } catch (e) { status.textContent = ""; showError(e); }
  button.disabled = false;
}

async function exportNow() {
  const status = $("export-status");
  status.textContent = "exporting…";
  try {
    const res = await api("/api/export", { preference: state.r, overwrite: true });
    status.textContent = `written to ${res.path}`;
    showError(null);
  } catch (e) { status.textContent = ""; showError(e); }
}

// --- generation (causal-LM runs): two preferences side by side, streamed -----------------------
function parsePreference(text) {
  const r = text.split(/[\s,]+/).filter((x) => x).map(Number);
  if (r.length !== state.k || r.some((x) => !Number.isFinite(x) || x < 0) || r.reduce((a, b) => a + b, 0) <= 0) {
    throw new Error(`B: give ${state.k} non-negative weights, e.g. ${Array(state.k).fill(1).join(",")}`);
  }
  return r;
}

// One streamed chat completion into `box`: server-sent events from POST /v1/chat/completions.
async function streamChat(preference, box) {
  box.textContent = "";
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model: state.run.model_name, preference, stream: true,
      messages: [{ role: "user", content: $("chat-prompt").value }],
      max_tokens: parseInt($("chat-max").value, 10), temperature: parseFloat($("chat-temp").value),
    }),
  });
  if (!res.ok) throw new Error((await res.json()).error.message);
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, at).trim();
      buf = buf.slice(at + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) throw new Error(ev.error.message);
      const delta = ev.choices.length ? ev.choices[0].delta.content : null;
      if (delta) box.textContent += delta;
      if (ev.choices.length && ev.choices[0].finish_reason) box.dataset.finish = ev.choices[0].finish_reason;
    }
  }
}

async function generateNow() {
  const button = $("chat-go");
  button.disabled = true;
  try {
    const a = state.r.slice(), b = parsePreference($("chat-other").value || a.join(","));
    $("chat-pref-a").textContent = "(" + a.map((x) => fmt(x, 2)).join(", ") + ")";
    $("chat-pref-b").textContent = "(" + b.map((x) => fmt(x, 2)).join(", ") + ")";
    ["chat-a", "chat-b"].forEach((id) => delete $(id).dataset.finish);
    await Promise.all([streamChat(a, $("chat-a")), streamChat(b, $("chat-b"))]); // one batch on the server
    showError(null);
  } catch (e) { showError(e); }
  button.disabled = false;
}

// --- choose by constraints (POST /api/select) ------------------------------------------------
function buildSelectPanel() {
  const tasks = state.run.tasks;
  const sense = (t) => (t.higher_is_better ? "maximize" : "minimize");
  $("sel-objective").innerHTML = tasks.map((t) => `<option value="${sense(t)}:${t.name}">${sense(t)} ${t.name}</option>`)
    .join("") + '<option value="maximize:mean">maximize the mean share of the experts</option>';
  $("sel-constraints").innerHTML = tasks.map((t, i) => '<div class="constraint">' +
    `<label for="sel-min-${i}">${t.name} ${t.higher_is_better ? "≥" : "≤"}</label>` +
    `<input type="number" id="sel-min-${i}" min="0" step="0.01" placeholder="none">` +
    `<select id="sel-unit-${i}" aria-label="${t.name} unit"><option value="expert">× expert</option>` +
    '<option value="absolute">absolute</option></select></div>').join("");
  $("select").addEventListener("click", selectNow);
  const missing = tasks.filter((t) => !t.validation).map((t) => t.name);
  if (missing.length) {
    $("select").disabled = true;
    $("select-status").textContent = `needs validation data for every task (none for ${missing.join(", ")})`;
  }
}

function selectQuery() {
  const [sense, target] = $("sel-objective").value.split(":");
  const require = [];
  state.run.tasks.forEach((t, i) => {
    const v = $(`sel-min-${i}`).value.trim();
    if (v !== "") require.push(`${t.name} ${t.higher_is_better ? ">=" : "<="} ${v}` +
      ($(`sel-unit-${i}`).value === "expert" ? " expert" : ""));
  });
  return { [sense]: target, require, confidence: parseFloat($("sel-confidence").value),
    budget: parseInt($("sel-budget").value, 10) };
}

async function selectNow() {
  const status = $("select-status"), button = $("select");
  button.disabled = true;
  status.textContent = "searching on the validation data…";
  delete status.dataset.status;
  try {
    const rec = await api("/api/select", selectQuery());
    const point = rec.chosen || rec.closest;
    setPreference(point.preference);
    const verdict = { certified: "certified", not_certified: "NOT certified", infeasible: "infeasible" }[rec.status];
    const pct = `${Math.round(100 * rec.confidence)}%`;
    status.textContent = rec.status === "infeasible"
      ? `infeasible: ${rec.binding.constraint} reaches at best ${fmt(rec.binding.best, 4)}; the sliders show the closest point`
      : `${verdict} at ${pct}: r = (${point.preference.map((x) => fmt(x)).join(", ")}), ` +
        `${rec.evaluation.candidates} preferences evaluated`;
    const rows = rec.certification ? rec.certification.constraints : point.search.constraints;
    const test = rec.test ? rec.test.constraints : [];
    $("select-result").innerHTML = "<tr><th>constraint</th><th>estimate</th><th>bound</th><th></th><th>test</th></tr>" +
      rows.map((c, j) => `<tr><td>${c.constraint}</td><td>${fmt(c.estimate, 4)}</td><td>${fmt(c.bound, 4)}</td>` +
        `<td>${c.met ? "✓" : "✗"}</td><td>${test[j] ? fmt(test[j].value, 4) : ""}</td></tr>`).join("") +
      `<tr><td colspan="5" class="hint">${rec.certification ? "certification part" : "search part"}; ` +
      "test: the test split, not used for the choice</td></tr>";
    status.dataset.status = rec.status;
    status.dataset.preference = point.preference.join(",");
    showError(null);
    await loadResults();
  } catch (e) { status.textContent = ""; showError(e); }
  button.disabled = false;
}

async function init() {
  try {
    state.run = await api("/api/run");
    state.k = state.run.k;
    state.names = state.run.tasks.map((t) => t.name);
    $("run-info").textContent = `${state.run.run} · ${state.k} tasks · ${state.run.targets.length} upcycled modules` +
      ` · step ${state.run.step} · ${state.run.device}`;
    if (state.k !== 3) $("simplex").hidden = true;
    buildSliders();
    buildSelectPanel();
    $("evaluate").addEventListener("click", evaluateNow);
    $("export").addEventListener("click", exportNow);
    if (state.run.generation) {
      $("chat").hidden = false;
      $("chat-go").addEventListener("click", generateNow);
      $("chat-other").value = Array(state.k).fill(0).map((x, i) => (i === 0 ? 1 : 0)).join(",");
    }
    state.r = Array(state.k).fill(1 / state.k);
    await loadResults();
    setPreference(state.r);
  } catch (e) { showError(e); }
}

init();
