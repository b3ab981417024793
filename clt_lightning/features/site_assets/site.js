// clt-lightning latent site: vanilla JS, no dependencies, works from file:// (data files are
// scripts that call window.__clt.add(name, payload); fetch() of local JSON is blocked there).
"use strict";

window.__clt = {
  store: {},
  waiting: {},
  add(name, payload) {
    this.store[name] = payload;
    (this.waiting[name] || []).forEach((resolve) => resolve(payload));
    delete this.waiting[name];
  },
};

const CLT = (() => {
  const errors = [];
  function reportError(message) {
    errors.push(String(message));
    document.body.dataset.errors = String(errors.length);
    const box = document.getElementById("errors");
    if (box) { box.hidden = false; box.textContent = errors.join("\n"); }
  }
  window.addEventListener("error", (e) => reportError(e.message || "error loading " + (e.target && e.target.src)), true);
  window.addEventListener("unhandledrejection", (e) => reportError(e.reason && e.reason.message || e.reason));

  function load(name, path) {
    if (name in __clt.store) return Promise.resolve(__clt.store[name]);
    return new Promise((resolve, reject) => {
      (__clt.waiting[name] = __clt.waiting[name] || []).push(resolve);
      const script = document.createElement("script");
      script.src = path;
      script.onerror = () => reject(new Error("cannot load " + path + " (was the site copied whole?)"));
      document.head.appendChild(script);
    });
  }
  const pad = (n, width) => String(n).padStart(width, "0");
  const layerFile = (s) => "data/layer_" + pad(s, 2) + ".js";
  const chunkFile = (s, c) => "data/L" + pad(s, 2) + "/chunk_" + pad(c, 4) + ".js";
  const thumb = (id) => "thumbs/" + id + ".jpg";
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child.nodeType ? child : String(child));
    }
    return node;
  }
  function fmt(v, digits = 3) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    return Number(v.toPrecision(digits)).toString();
  }
  const pct = (v) => (v === null || v === undefined ? "–" : fmt(100 * v) + "%");
  const svgNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function flags(summary, freq) {
    const out = [];
    if (freq === 0) out.push(el("span", { class: "badge dead", title: "never fired in the pass" }, "dead"));
    if (freq > summary.dense_threshold) {
      out.push(el("span", { class: "badge dense", title: "fires on more than " + pct(summary.dense_threshold) + " of tokens" }, "dense"));
    }
    return out;
  }
  function facts(summary) {
    return [summary.dataset + " / " + summary.split, summary.sparsifier + " CLT",
      summary.n_layers + " layers × " + summary.n_latents.toLocaleString() + " latents",
      summary.n_images.toLocaleString() + " images (" + summary.n_tokens.toLocaleString() + " tokens)",
      "top " + summary.n_top + " per latent", "CLT " + summary.fingerprint, summary.created].join(" · ");
  }

  // ------------------------------------------------------------------ index page

  const state = { layer: 0, page: 0, pageSize: 50, sort: "freq", descending: true };

  function colour(v) { // white -> blue, v in [0, 1]
    const t = Math.max(0, Math.min(1, v));
    const c = (a, b) => Math.round(a + (b - a) * t);
    return "rgb(" + c(247, 28) + "," + c(248, 100) + "," + c(250, 200) + ")";
  }

  function shareFigure(summary) {
    const L = summary.n_layers, cell = Math.max(14, Math.min(30, Math.floor(300 / L)));
    const left = 54, top = 34, w = Math.max(330, left + L * cell + 70), h = top + L * cell + 44;
    const root = svg("svg", { width: w, height: h, role: "img", id: "share-heatmap" });
    root.append(svg("text", { x: 0, y: 14, "font-weight": 600 }, "Mean write share: source layer → target layer"));
    let max = 0;
    summary.mean_share.forEach((row) => row.forEach((v) => { max = Math.max(max, v || 0); }));
    summary.mean_share.forEach((row, s) => row.forEach((v, l) => {
      if (l < s) return;
      const rect = svg("rect", { x: left + l * cell, y: top + s * cell, width: cell - 1, height: cell - 1, fill: colour((v || 0) / (max || 1)) });
      rect.append(svg("title", {}, "source " + s + " → target " + l + ": " + pct(v)));
      root.append(rect);
    }));
    for (let i = 0; i < L; i++) {
      root.append(svg("text", { x: left - 6, y: top + i * cell + cell * 0.7, "text-anchor": "end" }, i));
      root.append(svg("text", { x: left + i * cell + cell / 2, y: top + L * cell + 14, "text-anchor": "middle" }, i));
    }
    root.append(svg("text", { x: left + (L * cell) / 2, y: top + L * cell + 32, "text-anchor": "middle" }, "target layer l"));
    root.append(svg("text", { x: 12, y: top + (L * cell) / 2, transform: "rotate(-90 12 " + (top + (L * cell) / 2) + ")", "text-anchor": "middle" }, "source layer s"));
    const barX = left + L * cell + 16;
    for (let i = 0; i < 20; i++) {
      root.append(svg("rect", { x: barX, y: top + (L * cell * i) / 20, width: 12, height: (L * cell) / 20 + 0.5, fill: colour(1 - i / 20) }));
    }
    root.append(svg("text", { x: barX + 16, y: top + 10 }, pct(max)));
    root.append(svg("text", { x: barX + 16, y: top + L * cell }, "0%"));
    const fig = document.getElementById("share-figure");
    fig.append(root, el("figcaption", { class: "hint" }, "Share of a latent's decoder norm written to each target, averaged over the latents of each source layer."));
  }

  function sparkline(counts) {
    const w = 128, h = 26, max = Math.max(1, ...counts), bw = w / counts.length;
    const root = svg("svg", { width: w, height: h });
    counts.forEach((c, i) => root.append(svg("rect", { x: i * bw, y: h - (h * c) / max, width: bw - 0.5, height: (h * c) / max, fill: "#1c64c8" })));
    return root;
  }

  function layerCards(summary) {
    const box = document.getElementById("layers");
    box.textContent = "";
    summary.layers.forEach((info) => {
      const card = el("div", { class: "layer-card" + (info.layer === state.layer ? " active" : ""), "data-layer": info.layer, onclick: () => selectLayer(summary, info.layer) },
        el("b", {}, "Layer " + info.layer), el("div", { class: "small" }, info.dead + " dead · " + info.dense + " dense"),
        el("div", { class: "small" }, "median freq. " + pct(info.median_freq) + " · dist " + fmt(info.mean_dist, 2)),
        sparkline(info.log_freq_hist));
      box.append(card);
    });
  }

  function selectLayer(summary, layer) {
    state.layer = layer;
    state.page = 0;
    history.replaceState(null, "", "#" + layer);
    layerCards(summary);
    return load("layer/" + layer, layerFile(layer)).then((table) => renderTable(summary, table));
  }

  function readControls() {
    const num = (id) => { const v = document.getElementById(id).value; return v === "" ? null : Number(v); };
    return { fmin: num("fmin"), fmax: num("fmax"), dmin: num("dmin"), hideDead: document.getElementById("hide-dead").checked,
      onlyDense: document.getElementById("only-dense").checked, search: document.getElementById("search").value.trim() };
  }

  function filtered(summary, table) {
    const c = readControls();
    let ids = [...Array(table.freq.length).keys()];
    const m = c.search.match(/^(?:(\d+)\s*[/:.]\s*)?(\d+)$/);
    if (c.search && m) {
      if (m[1] !== undefined && Number(m[1]) !== state.layer) return []; // no such layer
      ids = ids.filter((i) => String(i).startsWith(m[2]));
    }
    ids = ids.filter((i) => {
      const f = table.freq[i];
      if (c.hideDead && f === 0) return false;
      if (c.onlyDense && !(f > summary.dense_threshold)) return false;
      if (c.fmin !== null && 100 * f < c.fmin) return false;
      if (c.fmax !== null && 100 * f > c.fmax) return false;
      if (c.dmin !== null && !(table.dist[i] >= c.dmin)) return false;
      return true;
    });
    const key = state.sort, sign = state.descending ? -1 : 1;
    const value = (i) => (key === "id" ? i : table[key][i] === null ? -Infinity : table[key][i]);
    ids.sort((a, b) => sign * (value(a) - value(b)) || a - b);
    return ids;
  }

  function renderTable(summary, table) {
    const c = readControls();
    const m = c.search.match(/^(\d+)\s*[/:.]\s*(\d+)$/);
    if (m && Number(m[1]) !== state.layer && Number(m[1]) < summary.n_layers) {
      selectLayer(summary, Number(m[1]));
      return;
    }
    const ids = filtered(summary, table);
    document.getElementById("layer-title").textContent = "Layer " + state.layer + " latents";
    const pages = Math.max(1, Math.ceil(ids.length / state.pageSize));
    state.page = Math.min(state.page, pages - 1);
    const body = document.querySelector("#latents tbody");
    body.textContent = "";
    ids.slice(state.page * state.pageSize, (state.page + 1) * state.pageSize).forEach((i) => {
      const href = "latent.html#" + state.layer + "/" + i;
      const images = table.top[i].filter((id) => id >= 0).map((id) => el("img", { src: thumb(id), loading: "lazy", alt: "image " + id }));
      const thumbs = el("td", { class: "thumbs" }, el("a", { href }, images));
      body.append(el("tr", {},
        thumbs, el("td", {}, el("a", { href }, state.layer + "/" + i)), el("td", {}, pct(table.freq[i])),
        el("td", {}, pct(table.cls_freq[i])), el("td", {}, pct(table.img_freq[i])), el("td", {}, table.freq[i] ? fmt(table.mean[i]) : "–"),
        el("td", {}, table.freq[i] ? fmt(table.max[i]) : "–"), el("td", {}, fmt(table.dist[i], 2)),
        el("td", {}, el("span", { class: "bar", style: "width:" + Math.round(60 * (table.local[i] || 0)) + "px" }), " " + pct(table.local[i])),
        el("td", {}, flags(summary, table.freq[i]))));
    });
    document.getElementById("count").textContent = ids.length.toLocaleString() + " of " + table.freq.length.toLocaleString() + " latents";
    document.querySelectorAll("th[data-sort]").forEach((th) => th.classList.toggle("sorted", th.dataset.sort === state.sort));
    const pager = document.getElementById("pager");
    pager.textContent = "";
    const go = (p) => () => { state.page = p; renderTable(summary, table); };
    pager.append(el("button", { onclick: go(Math.max(0, state.page - 1)) }, "‹ prev"),
      el("span", { class: "hint" }, "page " + (state.page + 1) + " of " + pages),
      el("button", { onclick: go(Math.min(pages - 1, state.page + 1)) }, "next ›"));
    document.body.dataset.ready = "index";
  }

  function startIndex(summary) {
    document.getElementById("title").textContent = "CLT latents · " + summary.dataset + " · " + summary.sparsifier;
    document.getElementById("facts").textContent = facts(summary);
    document.getElementById("footer").textContent = "Written by `clt features`. Checkpoint: " + (summary.checkpoint || "–");
    shareFigure(summary);
    const rerender = () => { state.page = 0; renderTable(summary, __clt.store["layer/" + state.layer]); };
    ["fmin", "fmax", "dmin", "hide-dead", "only-dense", "search"].forEach((id) => document.getElementById(id).addEventListener("input", rerender));
    document.getElementById("sort").addEventListener("change", (e) => { state.sort = e.target.value; rerender(); });
    document.getElementById("descending").addEventListener("change", (e) => { state.descending = e.target.checked; rerender(); });
    document.querySelectorAll("th[data-sort]").forEach((th) => th.addEventListener("click", () => {
      state.descending = state.sort === th.dataset.sort ? !state.descending : true;
      state.sort = th.dataset.sort;
      document.getElementById("sort").value = state.sort;
      document.getElementById("descending").checked = state.descending;
      rerender();
    }));
    document.getElementById("search").addEventListener("keydown", (e) => {
      const m = e.target.value.trim().match(/^(?:(\d+)\s*[/:.]\s*)?(\d+)$/);
      if (e.key === "Enter" && m) {
        const layer = m[1] === undefined ? state.layer : Number(m[1]);
        location.href = "latent.html#" + layer + "/" + Number(m[2]);
      }
    });
    const initial = Number((location.hash || "#0").slice(1)) || 0;
    return selectLayer(summary, Math.min(initial, summary.n_layers - 1));
  }

  // ------------------------------------------------------------------ latent page

  const view = { group: "all", opacity: 0.7 };

  function parseHash(summary) {
    const m = (location.hash || "").match(/^#(\d+)\/(\d+)$/);
    if (!m) return { layer: 0, index: 0 };
    const layer = Number(m[1]), index = Number(m[2]);
    if (layer >= summary.n_layers || index >= summary.n_latents) {
      throw new Error("no latent " + layer + "/" + index + ": layers 0.." + (summary.n_layers - 1) + ", latents 0.." + (summary.n_latents - 1));
    }
    return { layer, index };
  }

  function drawHeat(canvas, heat, token, grid, scale, cls) {
    const size = canvas.width, cell = size / grid, ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, size, size);
    for (let p = 1; p < heat.length; p++) {
      const v = heat[p] / scale;
      if (v === 0) continue;
      const r = Math.floor((p - 1) / grid), c = (p - 1) % grid;
      ctx.fillStyle = (v > 0 ? "rgba(255,80,0," : "rgba(30,100,255,") + Math.min(1, Math.abs(v)) * view.opacity + ")";
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
    if (token > 0) {
      const r = Math.floor((token - 1) / grid), c = (token - 1) % grid;
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#fff";
      ctx.strokeRect(c * cell + 1, r * cell + 1, cell - 2, cell - 2);
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 1;
      ctx.strokeRect(c * cell + 2.5, r * cell + 2.5, cell - 5, cell - 5);
    }
    if (cls !== 0) {
      ctx.fillStyle = "rgba(0,0,0,0.6)";
      ctx.fillRect(0, size - 18, 86, 18);
      ctx.fillStyle = "#fff";
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillText("[CLS] " + fmt(cls), 4, size - 5);
    }
    canvas.dataset.drawn = "1";
  }

  function decodeHeat(record, T) {
    const bytes = atob(record.heat), out = [];
    const q = new Int8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) q[i] = (bytes.charCodeAt(i) << 24) >> 24;
    for (let r = 0; r < record.images.length; r++) {
      const row = new Float32Array(T);
      for (let t = 0; t < T; t++) row[t] = (q[r * T + t] / 127) * (record.heat_scale[r] || 0);
      out.push(row);
    }
    return out;
  }

  // The "all tokens" list: an image's all-token maximum is the larger of its [CLS] and
  // patch values, so the union of both lists, best entry per image, holds the top N.
  function allTokens(record, n) {
    const seen = new Set();
    return record.top.cls.concat(record.top.patches)
      .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]))
      .filter((e) => !seen.has(e[0]) && seen.add(e[0]))
      .slice(0, n);
  }

  function renderGrid(summary, record, heats) {
    const grid = document.getElementById("grid");
    grid.textContent = "";
    const entries = view.group === "all" ? allTokens(record, summary.n_top) : record.top[view.group] || [];
    const scale = Math.max(1e-30, ...entries.map((e) => Math.abs(e[1])));
    const classes = summary.dataset_classes || [];
    document.getElementById("grid-hint").textContent = entries.length
      ? "Ranked by the latent's " + (view.group === "cls" ? "activation at [CLS]" : view.group === "patches" ? "largest activation over patch tokens" : "largest activation over all tokens") +
        ". Overlay: activation at every patch (orange > 0, blue < 0), scaled to this panel's maximum " + fmt(scale) + "; outlined: the token of the ranking value."
      : "";
    if (!entries.length) grid.append(el("p", { class: "empty" }, "No image activates this latent in the pass."));
    entries.forEach(([slot, value, token]) => {
      const id = record.images[slot], heat = heats[slot];
      const canvas = el("canvas", { class: "heat", width: 156, height: 156 });
      const label = record.labels.length ? classes[record.labels[slot]] : null;
      const where = token === 0 ? "[CLS]" : "patch (" + Math.floor((token - 1) / summary.grid_size) + ", " + ((token - 1) % summary.grid_size) + ")";
      grid.append(el("div", { class: "card" }, el("div", { class: "frame" }, el("img", { class: "thumb", src: thumb(id), alt: "image " + id }), canvas),
        el("div", { class: "cap" }, el("b", {}, fmt(value)), " at " + where, el("br"), "image " + id + (label ? " · " + label : ""))));
      drawHeat(canvas, heat, token, summary.grid_size, scale, heat[0]);
    });
  }

  function barChart(values, labels, opts) {
    const w = 340, h = 190, left = 48, bottom = 36, top = 22;
    const root = svg("svg", { width: w, height: h, role: "img", class: opts.cls || "" });
    root.append(svg("text", { x: left, y: 13, "font-weight": 600 }, opts.title));
    const n = values.length, plotW = w - left - 10, plotH = h - top - bottom, bw = plotW / Math.max(1, n);
    const max = Math.max(1e-30, ...values.map((v) => Math.abs(v || 0)));
    const hasNeg = values.some((v) => v < 0);
    const zero = hasNeg ? top + plotH / 2 : top + plotH;
    values.forEach((v, i) => {
      const len = ((hasNeg ? plotH / 2 : plotH) * Math.abs(v || 0)) / max;
      const rect = svg("rect", { x: left + i * bw + 0.5, y: v >= 0 ? zero - len : zero, width: Math.max(1, bw - 1), height: len, fill: opts.colour || "#1c64c8" });
      rect.append(svg("title", {}, labels[i] + ": " + (opts.format || fmt)(v)));
      root.append(rect);
    });
    root.append(svg("line", { x1: left, x2: left + plotW, y1: zero, y2: zero, class: "axis" }));
    root.append(svg("line", { x1: left, x2: left, y1: top, y2: top + plotH, class: "axis" }));
    root.append(svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, max > 1e-29 ? (opts.format || fmt)(max) : "0"));
    root.append(svg("text", { x: left - 4, y: zero + 4, "text-anchor": "end" }, "0"));
    const every = Math.ceil(n / 12);
    labels.forEach((lab, i) => { if (i % every === 0) root.append(svg("text", { x: left + i * bw + bw / 2, y: top + plotH + 13, "text-anchor": "middle" }, lab)); });
    root.append(svg("text", { x: left + plotW / 2, y: h - 6, "text-anchor": "middle" }, opts.xlabel));
    root.append(svg("text", { x: 10, y: top + plotH / 2, transform: "rotate(-90 10 " + (top + plotH / 2) + ")", "text-anchor": "middle" }, opts.ylabel));
    return root;
  }

  function renderHistogram(summary, record) {
    const box = document.getElementById("hist");
    box.textContent = "";
    const [lo, hi] = summary.histogram_range, n = record.hist.length;
    const total = record.hist.reduce((a, b) => a + b, 0);
    if (!total) { box.append(el("p", { class: "empty" }, "Never fired: no activations to histogram.")); return; }
    // zoom on the populated bins (two empty bins of margin each side)
    const first = Math.max(0, record.hist.findIndex((c) => c > 0) - 2);
    const last = Math.min(n - 1, n - 1 - [...record.hist].reverse().findIndex((c) => c > 0) + 2);
    const counts = record.hist.slice(first, last + 1);
    const labels = counts.map((_, i) => fmt(lo + ((hi - lo) * (first + i)) / n, 2));
    box.append(barChart(counts, labels, { title: "log10 |activation| over the " + total.toLocaleString() + " firing tokens", xlabel: "log10 |activation| (scaled space)", ylabel: "tokens", format: (v) => Math.round(v).toLocaleString(), cls: "histogram" }));
  }

  function renderWrite(summary, layer, record) {
    const box = document.getElementById("write");
    box.textContent = "";
    const labels = record.share.map((_, j) => String(layer + j));
    box.append(barChart(record.share, labels, { title: "Share of decoder norm per target layer", xlabel: "target layer l", ylabel: "share", format: pct, cls: "write-profile" }));
    const n = summary.contribution_images;
    if (n) {
      box.append(barChart(record.contrib, labels, { title: "Mean contribution to y_hat_l (" + n + " images)", xlabel: "target layer l", ylabel: "contribution", colour: "#d9480f", cls: "contribution" }));
    } else {
      box.append(el("p", { class: "empty contribution" }, "Mean contributions not computed (latents.contribution_images = 0)."));
    }
    box.append(el("p", { class: "hint" }, "Raw decoder norms ‖W_dec[" + layer + "→l]‖: " + record.write.map((v) => fmt(v)).join(", ")));
  }

  function renderDirect(summary, record) {
    const box = document.getElementById("direct");
    box.textContent = "";
    if (!record.up) { box.append(el("p", { class: "empty" }, "Not available: the teacher has no text tower or the dataset no class names.")); return; }
    const names = summary.zero_shot_classes;
    const max = Math.max(1e-30, ...record.up.concat(record.down).map((e) => Math.abs(e[1])));
    const rows = (list, cls) => el("table", { class: "classes " + cls }, list.map(([c, v]) => el("tr", {},
      el("td", {}, names[c]), el("td", {}, el("span", { class: "bar", style: "width:" + Math.round((90 * Math.abs(v)) / max) + "px" })), el("td", {}, fmt(v)))));
    box.append(el("p", { class: "hint" }, "Change of ⟨image embedding, class text embedding⟩ per unit activation at the pooled token, through ln_post (linearised at the mean scale) and proj."),
      el("b", {}, "pushes up"), record.up.length ? rows(record.up, "up") : el("p", { class: "empty" }, "no class"),
      el("b", {}, "pushes down"), record.down.length ? rows(record.down, "down") : el("p", { class: "empty" }, "no class"));
  }

  function renderLatent(summary) {
    const { layer, index } = parseHash(summary);
    const chunk = Math.floor(index / summary.chunk);
    document.body.dataset.ready = "";
    return Promise.all([load("layer/" + layer, layerFile(layer)), load("chunk/" + layer + "/" + chunk, chunkFile(layer, chunk))]).then(([table, records]) => {
      const record = records[index];
      document.title = "Latent " + layer + "/" + index + " · CLT";
      document.getElementById("title").textContent = "Layer " + layer + " · latent " + index;
      document.getElementById("facts").textContent = facts(summary);
      const badges = document.getElementById("badges");
      badges.textContent = "";
      badges.append(...flags(summary, table.freq[index]));
      document.getElementById("prev").href = "#" + layer + "/" + Math.max(0, index - 1);
      document.getElementById("next").href = "#" + layer + "/" + Math.min(summary.n_latents - 1, index + 1);
      document.getElementById("back").href = "index.html#" + layer;
      const stats = [["token frequency", pct(table.freq[index])], ["[CLS] frequency", pct(table.cls_freq[index])],
        ["image frequency", pct(table.img_freq[index])], ["mean act. when active", table.freq[index] ? fmt(table.mean[index]) : "–"],
        ["max activation", table.freq[index] ? fmt(table.max[index]) : "–"], ["write distance (layers)", fmt(table.dist[index], 2)], ["local write share", pct(table.local[index])]];
      const box = document.getElementById("stats");
      box.textContent = "";
      stats.forEach(([k, v]) => box.append(el("div", { class: "stat" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))));
      const heats = decodeHeat(record, summary.tokens_per_image);
      renderGrid(summary, record, heats);
      renderHistogram(summary, record);
      renderWrite(summary, layer, record);
      renderDirect(summary, record);
      view.redraw = () => renderGrid(summary, record, heats);
      document.body.dataset.ready = "latent";
    });
  }

  function startLatent(summary) {
    document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => {
      view.group = b.dataset.group;
      document.querySelectorAll("#tabs button").forEach((x) => x.classList.toggle("active", x === b));
      if (view.redraw) view.redraw();
    }));
    document.getElementById("opacity").addEventListener("input", (e) => { view.opacity = e.target.value / 100; if (view.redraw) view.redraw(); });
    document.getElementById("jump").addEventListener("submit", (e) => {
      e.preventDefault();
      const m = document.getElementById("jump-to").value.trim().match(/^(\d+)\s*[/:.]\s*(\d+)$/);
      if (m) location.hash = "#" + m[1] + "/" + m[2];
    });
    window.addEventListener("hashchange", () => renderLatent(summary).catch((e) => reportError(e.message)));
    document.getElementById("footer").textContent = "Written by `clt features`. Checkpoint: " + (summary.checkpoint || "–");
    return renderLatent(summary);
  }

  function start() {
    const page = document.body.dataset.page;
    load("summary", "data/summary.js")
      .then((summary) => (page === "index" ? startIndex(summary) : startLatent(summary)))
      .catch((e) => reportError(e.message));
  }

  return { start, load, reportError };
})();
