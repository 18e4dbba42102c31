// The visearch page: upload or drop a photo, optionally drag a product box, and show what
// the server answers (POST /api/search; GET /api/info). No framework and nothing fetched
// from another site: the page must work on machines without internet access.
"use strict";

const $ = (id) => document.getElementById(id);
// box coordinates are the photo's own pixels; the canvas draws it `scale` times larger
// (small photos are enlarged so boxes can be drawn on them)
const state = { file: null, image: null, scale: 1, box: null, drag: null, answer: null };
const MIN_SIDE = 480;

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : (x ?? "");
}

function setState(name, message = "") {
  document.body.dataset.state = name;
  $("status").textContent = message;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------- health / version panel
async function loadInfo() {
  const badge = $("health-status");
  try {
    const r = await fetch("/api/info");
    const data = await r.json();
    const h = data.health || {};
    const ok = h.server === "SERVING" && h.service === "SERVING";
    badge.textContent = ok ? "SERVING" : `${h.server || "?"} / ${h.service || "?"}`;
    badge.className = "badge " + (ok ? "ok" : "bad");
    badge.title = `server: ${h.server}, visearch.v1.VisualSearch: ${h.service}`;
    if (!data.index) {
      $("index-version").textContent = data.error || "unavailable";
      return;
    }
    const ix = data.index;
    $("index-version").textContent = ix.version;
    $("index-items").textContent = ix.ntotal;
    $("index-dim").textContent = ix.dim;
    $("index-detector").textContent = ix.hasDetector ? "detector" : "no detector";
    $("index-built").textContent = ix.builtAt ? `built ${ix.builtAt}` : "";
    $("index-categories").textContent = (ix.categories || [])
      .map((c) => `${c.category} ${c.count}`).join(" · ");
  } catch (e) {
    badge.textContent = "UNREACHABLE";
    badge.className = "badge bad";
  }
}

// ---------------------------------------------------------------- the photo and boxes
function toImage(e) {
  const c = $("photo");
  const r = c.getBoundingClientRect();
  return [(e.clientX - r.left) * c.width / r.width / state.scale,
          (e.clientY - r.top) * c.height / r.height / state.scale];
}

function strokeBox(ctx, b, color, width, dash = []) {
  const s = state.scale;
  ctx.setLineDash(dash);
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.strokeRect(b.x1 * s, b.y1 * s, (b.x2 - b.x1) * s, (b.y2 - b.y1) * s);
}

function draw() {
  const c = $("photo");
  const ctx = c.getContext("2d");
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0, c.width, c.height);
  const lw = Math.max(2, Math.round(c.width / 200));
  const a = state.answer;
  if (a) {
    ctx.font = `${Math.max(12, lw * 6)}px sans-serif`;
    const min = parseFloat($("min-score").value) || 0;
    const dets = a.detections || [];
    const shown = dets.filter((d) => d.score >= min);
    $("det-count").textContent = `detections (${shown.length} of ${dets.length} drawn)`;
    for (const d of shown) {
      strokeBox(ctx, d.box, "#ffb300", lw);
      ctx.fillStyle = "#ffb300";
      ctx.fillText(`${d.category} ${fmt(d.score, 2)}`, d.box.x1 * state.scale + lw,
                   d.box.y1 * state.scale + lw * 7);
    }
    if (a.mainObject && a.mainObject.box) strokeBox(ctx, a.mainObject.box, "#00c853", lw * 2);
  }
  const b = state.drag || state.box;
  if (b) strokeBox(ctx, b, "#2962ff", lw, [lw * 3, lw * 2]);
  $("legend").hidden = false;
}

function normBox(x1, y1, x2, y2) {
  return { x1: Math.min(x1, x2), y1: Math.min(y1, y2), x2: Math.max(x1, x2), y2: Math.max(y1, y2) };
}

function setupCanvas() {
  const c = $("photo");
  c.addEventListener("mousedown", (e) => {
    if (!state.image) return;
    const [x, y] = toImage(e);
    state.drag = { x0: x, y0: y, ...normBox(x, y, x, y) };
  });
  c.addEventListener("mousemove", (e) => {
    if (!state.drag) return;
    const [x, y] = toImage(e);
    Object.assign(state.drag, normBox(state.drag.x0, state.drag.y0, x, y));
    draw();
  });
  window.addEventListener("mouseup", () => {
    if (!state.drag) return;
    const b = state.drag;
    state.drag = null;
    if (b.x2 - b.x1 >= 4 && b.y2 - b.y1 >= 4) {  // a click is not a box
      state.box = { x1: b.x1, y1: b.y1, x2: b.x2, y2: b.y2 };
      $("clear-box").disabled = false;
      search();
    } else {
      draw();
    }
  });
}

function loadFile(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  state.answer = null;
  $("clear-box").disabled = true;
  $("search").disabled = false;
  clearError();
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    state.image = img;
    state.scale = Math.max(1, MIN_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    $("photo").width = Math.round(img.naturalWidth * state.scale);
    $("photo").height = Math.round(img.naturalHeight * state.scale);
    draw();
    search();
  };
  img.onerror = () => {
    // The browser cannot show it; the server still decides (and says why it refuses).
    state.image = null;
    $("photo").width = 0;
    $("photo").height = 0;
    search();
  };
  img.src = url;
}

// ---------------------------------------------------------------- search and answer
async function search() {
  if (!state.file) return;
  const q = new URLSearchParams({ top_k: $("top-k").value || "10",
                                  rerank: $("rerank").checked ? "1" : "0" });
  if (state.box) {
    for (const k of ["x1", "y1", "x2", "y2"]) q.set(k, state.box[k].toFixed(1));
  }
  setState("searching", "searching…");
  clearError();
  let data;
  let ok = false;
  try {
    const r = await fetch(`/api/search?${q}`, {
      method: "POST", body: state.file,
      headers: { "Content-Type": state.file.type || "application/octet-stream" },
    });
    ok = r.ok;
    data = await r.json().catch(() => ({ error: `HTTP ${r.status} ${r.statusText}` }));
  } catch (e) {
    data = { error: `the server cannot be reached: ${e}` };
  }
  if (!ok) {
    state.answer = null;
    $("answer").hidden = true;
    $("results-section").hidden = true;
    $("results").replaceChildren();
    draw();
    showError(data.code ? `${data.error} (${data.code})` : data.error);
    setState("error", "");
    return;
  }
  state.answer = data;
  draw();
  render(data);
  setState("done", `${(data.results || []).length} results from ${data.indexVersion}`);
  loadInfo();
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function renderPairs(container, value) {
  // Issue 19's fields: rendered whatever their exact shape (a map, or a list of records).
  container.replaceChildren();
  const entries = Array.isArray(value)
    ? value.map((v) => [v.name ?? v.attribute ?? v.category ?? "", v])
    : Object.entries(value || {});
  for (const [k, v] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "object" ? Object.entries(v)
      .filter(([kk]) => kk !== "name" && kk !== "attribute")
      .map(([kk, vv]) => `${kk}: ${fmt(vv)}`).join(", ") : fmt(v);
    container.append(dt, dd);
  }
  return entries.length;
}

function render(data) {
  const mo = data.mainObject || {};
  const cat = data.category || {};
  $("main-object").innerHTML = "";
  const p = document.createElement("p");
  const what = { request: "your box", image: "the whole photo", detector: "detected" };
  p.textContent = `Chosen object: ${what[mo.source] || mo.source || "?"}` +
    `${mo.category ? ", " + mo.category : ""}` +
    `${mo.source === "detector" ? ", score " + fmt(mo.score) : ""}` +
    `${mo.fallback ? " (no confident detection: the whole photo)" : ""}. ` +
    `Category: ${cat.category || "(none)"} (${fmt(cat.score)}, by ${cat.source || "?"}).`;
  $("main-object").appendChild(p);
  const tbody = $("votes").querySelector("tbody");
  tbody.replaceChildren();
  const votes = [...(cat.votes || [])].sort((a, b) => b.combined - a.combined);
  for (const v of votes) {
    const tr = document.createElement("tr");
    if (v.category === cat.category) tr.className = "chosen";
    cell(tr, v.category);
    cell(tr, fmt(v.detector));
    cell(tr, fmt(v.neighbours));
    cell(tr, fmt(v.combined));
    tbody.appendChild(tr);
  }
  const top = data.categoryTop;
  $("category-top").hidden = !top || !top.length;
  if (top && top.length) {
    const ol = $("category-top").querySelector("ol");
    ol.replaceChildren(...top.map((t) => {
      const li = document.createElement("li");
      const score = t.probability ?? t.score ?? t.prob;
      li.textContent = `${t.category} ${fmt(score)}`;
      return li;
    }));
  }
  const attrs = data.attributes;
  $("attributes").hidden = !renderPairs($("attributes").querySelector("dl"), attrs);
  $("timings").textContent = (data.timings || [])
    .map((t) => `${t.stage} ${fmt(t.ms, 1)} ms`).join(" · ");
  $("answer").hidden = false;

  const list = $("results");
  list.replaceChildren();
  (data.results || []).forEach((r, i) => {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.sku = r.sku;
    const img = document.createElement("img");
    img.alt = r.sku;
    img.src = r.thumbnail;
    img.onerror = () => {  // a version built before thumbnails, or an item without one
      const none = document.createElement("div");
      none.className = "noimg";
      none.textContent = "no thumbnail";
      img.replaceWith(none);
    };
    const sku = document.createElement("div");
    sku.className = "sku";
    sku.textContent = `${i + 1}. ${r.sku}`;
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = r.title || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `score ${fmt(r.score)} · ${r.category}`;
    li.append(img, sku, title, meta);
    if (r.attributes && Object.keys(r.attributes).length) {
      const dl = document.createElement("dl");
      dl.className = "meta";
      renderPairs(dl, r.attributes);
      li.appendChild(dl);
    }
    list.appendChild(li);
  });
  $("results-section").hidden = false;
}

// ---------------------------------------------------------------- wiring
function setup() {
  setState("idle");
  setupCanvas();
  $("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    loadFile(e.dataTransfer.files[0]);
  });
  $("search").addEventListener("click", search);
  $("clear-box").addEventListener("click", () => {
    state.box = null;
    $("clear-box").disabled = true;
    search();
  });
  $("refresh").addEventListener("click", loadInfo);
  $("min-score").addEventListener("input", draw);
  loadInfo();
}

setup();
