// The dashboard's only script: live updates, readable times, the workflow graph.
// Pages work without it (forms post, links navigate); it adds what a
// server-rendered page cannot do alone.
"use strict";

(function () {
  const body = document.body;
  const base = body.dataset.base || "/dashboard";

  // -- times ------------------------------------------------------------------

  const clock = new Intl.DateTimeFormat(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  // A time relative to now: "3 min ago", or for a time still to come (a
  // schedule's next run) "in 3 min"; null past a day either way.
  function relative(seconds) {
    if (seconds < 0) {
      const ahead = -seconds;
      if (ahead < 1) return "now";
      if (ahead < 60) return "in " + Math.ceil(ahead) + " s";
      if (ahead < 3600) return "in " + Math.ceil(ahead / 60) + " min";
      if (ahead < 86400) return "in " + Math.ceil(ahead / 3600) + " h";
      return null;
    }
    return ago(seconds);
  }

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 60) return Math.floor(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return null;
  }

  function elapsed(ms) {
    if (ms < 1000) return Math.max(0, Math.round(ms)) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    const s = Math.round(ms / 1000);
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function showTimes(root) {
    const now = Date.now();
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const at = new Date(el.getAttribute("datetime"));
      if (isNaN(at)) return;
      const exact = clock.format(at);
      el.title = at.toString();
      el.textContent = relative((now - at.getTime()) / 1000) || exact;
    });
    root.querySelectorAll("[data-since]").forEach((el) => {
      const at = new Date(el.dataset.since);
      if (!isNaN(at)) el.textContent = "running " + elapsed(now - at.getTime());
    });
  }

  // -- forms ------------------------------------------------------------------

  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });
  document.addEventListener("change", (event) => {
    const form = event.target.closest("form[data-autosubmit]");
    if (form && event.target.tagName === "SELECT") form.requestSubmit();
  });

  // -- the workflow graph -------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const NODE_W = 176, NODE_H = 58, GAP_X = 64, GAP_Y = 22, PAD = 12;

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function fit(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  // Layers by longest path from the sources, then each layer ordered by the
  // mean position of its inputs (a barycentre pass), so edges rarely cross.
  function layout(graph) {
    const ids = graph.nodes.map((n) => n.id);
    const preds = new Map(ids.map((id) => [id, []]));
    const succs = new Map(ids.map((id) => [id, []]));
    for (const e of graph.edges) {
      preds.get(e.target).push(e.source);
      succs.get(e.source).push(e.target);
    }
    const indegree = new Map(ids.map((id) => [id, preds.get(id).length]));
    const layer = new Map();
    const queue = ids.filter((id) => indegree.get(id) === 0);
    const order = [];
    while (queue.length) {
      const id = queue.shift();
      order.push(id);
      layer.set(id, Math.max(0, ...preds.get(id).map((p) => (layer.get(p) ?? -1) + 1)));
      for (const next of succs.get(id)) {
        indegree.set(next, indegree.get(next) - 1);
        if (indegree.get(next) === 0) queue.push(next);
      }
    }
    for (const id of ids) if (!layer.has(id)) { layer.set(id, 0); order.push(id); } // a cycle
    // A source (a text or image value) sits just before the first node it
    // feeds, so its edges do not run across whole layers of other nodes.
    for (const id of ids) {
      if (preds.get(id).length || !succs.get(id).length) continue;
      layer.set(id, Math.max(0, Math.min(...succs.get(id).map((s) => layer.get(s))) - 1));
    }
    const layers = [];
    for (const id of order) (layers[layer.get(id)] ||= []).push(id);
    const index = new Map();
    layers.forEach((ids) => ids.forEach((id, i) => index.set(id, i)));
    for (let l = 1; l < layers.length; l++) {
      const mean = (id) => {
        const ps = preds.get(id).filter((p) => layer.get(p) === l - 1);
        return ps.length ? ps.reduce((s, p) => s + index.get(p), 0) / ps.length : index.get(id);
      };
      layers[l].sort((a, b) => mean(a) - mean(b));
      layers[l].forEach((id, i) => index.set(id, i));
    }
    return { layers, layer, index };
  }

  function drawGraph(container, graph) {
    container.replaceChildren();
    if (!graph.nodes.length) return;
    const { layers, layer } = layout(graph);
    const vertical = container.clientWidth > 0 && container.clientWidth < 560;
    // An edge that skips a layer would run behind the nodes between: it goes
    // round them instead, along a lane kept free beside the nodes.
    const skips = (e) => layer.get(e.target) - layer.get(e.source) > 1;
    const LANE = graph.edges.some(skips) ? 22 : 0;
    const tallest = Math.max(...layers.map((l) => l.length));
    const span = (n, size, gap) => n * size + (n - 1) * gap;
    const pos = new Map();
    layers.forEach((ids, l) => {
      ids.forEach((id, i) => {
        if (vertical) {
          const offset = (span(tallest, NODE_W, GAP_Y) - span(ids.length, NODE_W, GAP_Y)) / 2;
          pos.set(id, {
            x: PAD + LANE + offset + i * (NODE_W + GAP_Y), y: PAD + l * (NODE_H + GAP_X),
          });
        } else {
          const offset = (span(tallest, NODE_H, GAP_Y) - span(ids.length, NODE_H, GAP_Y)) / 2;
          pos.set(id, {
            x: PAD + l * (NODE_W + GAP_X), y: PAD + LANE + offset + i * (NODE_H + GAP_Y),
          });
        }
      });
    });
    const across = span(layers.length, vertical ? NODE_H : NODE_W, GAP_X);
    const down = span(tallest, vertical ? NODE_W : NODE_H, GAP_Y);
    const width = 2 * PAD + (vertical ? down + LANE : across);
    const height = 2 * PAD + (vertical ? across : down + LANE);
    const lane = PAD + LANE / 3;
    const svg = el("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, class: "workflow",
      "aria-label": "workflow graph",
    }, container);
    const defs = el("defs", {}, svg);
    const marker = el("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse",
    }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }, marker);

    const byId = new Map(graph.nodes.map((n) => [n.id, n]));
    for (const e of graph.edges) {
      const a = pos.get(e.source), b = pos.get(e.target);
      let d;
      if (skips(e) && vertical) {
        const x1 = a.x, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
        d = `M ${x1} ${y1} C ${lane} ${y1}, ${lane} ${y1}, ${lane} ${y1 + GAP_X} ` +
          `L ${lane} ${y2 - GAP_X} C ${lane} ${y2}, ${lane} ${y2}, ${x2 - 2} ${y2}`;
      } else if (skips(e)) {
        const x1 = a.x + NODE_W / 2, y1 = a.y, x2 = b.x + NODE_W / 2, y2 = b.y;
        d = `M ${x1} ${y1} C ${x1} ${lane}, ${x1} ${lane}, ${x1 + GAP_X} ${lane} ` +
          `L ${x2 - GAP_X} ${lane} C ${x2} ${lane}, ${x2} ${lane}, ${x2} ${y2 - 2}`;
      } else if (vertical) {
        const x1 = a.x + NODE_W / 2, y1 = a.y + NODE_H, x2 = b.x + NODE_W / 2, y2 = b.y;
        const bend = (y2 - y1) / 2;
        d = `M ${x1} ${y1} C ${x1} ${y1 + bend}, ${x2} ${y2 - bend}, ${x2} ${y2 - 2}`;
      } else {
        const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
        const bend = (x2 - x1) / 2;
        d = `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2 - 2} ${y2}`;
      }
      const status = (byId.get(e.source).status || "").toLowerCase();
      const path = el("path", {
        d, class: `edge s-${status}`, "marker-end": "url(#arrow)",
        "data-source": e.source, "data-target": e.target,
      }, svg);
      if (e.handle) el("title", {}, path).textContent = `${e.source} → ${e.target}.${e.handle}`;
    }

    for (const node of graph.nodes) {
      const { x, y } = pos.get(node.id);
      const status = node.status || "PENDING";
      const holder = node.href ? el("a", { href: node.href, class: "node-link" }, svg) : svg;
      const g = el("g", {
        class: `node s-${status.toLowerCase()}`, transform: `translate(${x} ${y})`,
        "data-node-id": node.id, "data-status": status,
      }, holder);
      el("title", {}, g).textContent =
        `${node.id} (${node.type}): ${status}` + (node.error ? ` · ${node.error}` : "") +
        (node.href ? " · open its run" : "");
      el("rect", { width: NODE_W, height: NODE_H, rx: 9, class: "box" }, g);
      el("rect", { width: 6, height: NODE_H, rx: 3, class: "strip" }, g);
      el("text", { x: 16, y: 22, class: "label" }, g).textContent = fit(node.label, 20);
      el("text", { x: 16, y: 42, class: "type" }, g).textContent = fit(node.type, 12);
      el("text", { x: NODE_W - 10, y: 42, class: "status", "text-anchor": "end" }, g)
        .textContent = status;
    }
  }

  function showGraph(root) {
    const container = root.querySelector("#graph");
    const data = root.querySelector("#graph-data");
    if (!container || !data) return;
    try {
      drawGraph(container, JSON.parse(data.textContent));
    } catch (err) {
      container.textContent = "The graph could not be drawn: " + err;
    }
  }

  // -- live updates -------------------------------------------------------------

  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  let refreshing = false, again = false, lastRefresh = 0;
  const MIN_GAP_MS = 400;

  function setState(name, text) {
    if (!state) return;
    state.dataset.state = name;
    state.textContent = text;
  }

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    again = false;
    const wait = lastRefresh + MIN_GAP_MS - Date.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    try {
      const answer = await fetch(location.pathname + location.search, {
        headers: { "x-dashboard-fragment": "1" }, credentials: "same-origin", cache: "no-store",
      });
      if (answer.status === 401) { location.reload(); return; }
      if (answer.ok) {
        const html = await answer.text();
        const open = new Set([...live.querySelectorAll("details[open]")].map((d) => d.id || d.textContent.slice(0, 40)));
        live.innerHTML = html;
        live.querySelectorAll("details").forEach((d) => {
          if (open.has(d.id || d.textContent.slice(0, 40))) d.open = true;
        });
        showTimes(live);
        showGraph(live);
        body.dataset.refreshed = String(Number(body.dataset.refreshed || 0) + 1);
      }
    } catch (err) {
      setState("error", "offline");
    } finally {
      lastRefresh = Date.now();
      refreshing = false;
      if (again) refresh();
    }
  }

  function listen() {
    const after = body.dataset.live;
    if (after === undefined || !live || !window.EventSource) return;
    const params = new URLSearchParams({ after });
    if (body.dataset.liveRun) params.set("run", body.dataset.liveRun);
    const wantsDeliveries = body.dataset.liveDeliveries !== undefined;
    const source = new EventSource(`${base}/stream?${params}`);
    source.addEventListener("open", () => setState("live", "live"));
    source.addEventListener("error", () => {
      setState(source.readyState === EventSource.CLOSED ? "error" : "reconnecting",
        source.readyState === EventSource.CLOSED ? "not live (reload)" : "reconnecting…");
    });
    source.addEventListener("change", (event) => {
      setState("live", "live");
      const change = JSON.parse(event.data);
      if (wantsDeliveries && !change.deliveries) return;
      refresh();
    });
    window.addEventListener("pagehide", () => source.close());
  }

  // A run's own event stream (a read-only token for it): its log lines, as
  // they come, refresh the page's live part too. Closed at the final status,
  // or the browser would open it again and again.
  function followLogs() {
    const url = body.dataset.logStream;
    if (!url || !live || !window.EventSource) return;
    const source = new EventSource(url);
    source.addEventListener("log", () => refresh());
    source.addEventListener("status", (event) => {
      if (JSON.parse(event.data).is_final) source.close();
    });
    window.addEventListener("pagehide", () => source.close());
  }

  showTimes(document);
  showGraph(document);
  listen();
  followLogs();
  setInterval(() => showTimes(document), 1000);
  let width = window.innerWidth;
  window.addEventListener("resize", () => {
    if (Math.abs(window.innerWidth - width) > 40) { width = window.innerWidth; showGraph(document); }
  });
})();
