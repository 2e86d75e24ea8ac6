// kiln web UI: live farm overview (server-sent events), sweep actions, the gallery's query box,
// count and infinite scroll, keepers, copy buttons. No framework, no CDN. User text is only
// ever placed with textContent; HTML comes from the server, which escapes it.
"use strict";

const CSRF = { "x-kiln-csrf": "1" };

async function post(url, body) {
  const r = await fetch(url, {
    method: "POST",
    headers: Object.assign({ "content-type": "application/json" }, CSRF),
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const text = await r.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) {
    // An error page: its message is the element with class "error".
    const doc = new DOMParser().parseFromString(text, "text/html");
    const e = doc.querySelector(".error");
    data = { error: e ? e.textContent : r.statusText };
  }
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "href" || k === "title" || k === "style") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function duration(ms) {
  if (ms < 0) return "—";
  const s = Math.floor(ms / 1000);
  if (ms < 1000) return ms + " ms";
  if (ms < 60000) return s + " s";
  if (ms < 3600000) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + (Math.floor(s / 60) % 60) + " min";
}

function bar(done, failed, total) {
  const b = el("div", { class: "bar" });
  const pd = total ? (100 * done) / total : 0;
  const pf = total ? (100 * failed) / total : 0;
  b.append(el("span", { style: "width:" + pd.toFixed(2) + "%" }));
  b.append(el("span", { class: "failed", style: "left:" + pd.toFixed(2) + "%;width:" + pf.toFixed(2) + "%" }));
  return b;
}

// ---- farm overview ----------------------------------------------------------------------
function sweepRow(s) {
  const actions = el("td", { class: "actions" });
  for (const a of ["pause", "resume", "cancel", "retry"]) {
    const allowed = (a === "pause" && s.state === "active") || (a === "resume" && s.state === "paused") ||
      (a === "cancel" && s.state !== "cancelled" && !s.finished) || (a === "retry" && s.failed > 0);
    const b = el("button", { "data-action": a, "data-sweep": s.id }, a === "retry" ? "retry failed" : a);
    b.disabled = !allowed;
    actions.append(b);
  }
  return el("tr", { "data-sweep": s.id },
    el("td", {}, el("a", { href: "/sweeps/" + s.id }, "#" + s.id + " " + s.name)),
    el("td", {}, el("span", { class: "state " + s.state }, s.finished ? "finished" : s.state)),
    el("td", {}, bar(s.done, s.failed, s.total)),
    el("td", { class: "num", "data-f": "done" }, s.done),
    el("td", { class: "num", "data-f": "failed" }, s.failed),
    el("td", { class: "num", "data-f": "running" }, s.running),
    el("td", { class: "num", "data-f": "total" }, s.total),
    el("td", { class: "num", "data-f": "rate" }, s.rate.toFixed(2)),
    el("td", { class: "num", "data-f": "eta" }, s.finished ? "done" : duration(s.eta_ms)),
    el("td", {}, el("a", { href: "/gallery?q=" + encodeURIComponent("sweep = " + s.id) }, "images")),
    actions);
}

function workerRow(w) {
  const cell = w.cell ? el("a", { href: "/cells/" + w.cell }, "cell " + w.cell) : el("span", { class: "dim" }, "idle");
  const step = w.cell ? w.step + "/" + w.total : "";
  const errs = el("td", {});
  for (const e of w.errors) errs.append(el("div", { class: "error", title: e.at_text }, e.text));
  return el("tr", { "data-worker": w.id },
    el("td", {}, "#" + w.id + " " + w.name),
    el("td", {}, el("span", { class: "state " + w.status }, w.status)),
    el("td", {}, w.device),
    el("td", {}, cell),
    el("td", { class: "num", "data-f": "step" }, step),
    el("td", { class: "num" }, w.rate.toFixed(2)),
    el("td", {}, w.last_seen),
    errs);
}

function liveFarm() {
  const root = document.getElementById("farm");
  if (!root) return;
  const sweeps = document.getElementById("sweeps-body");
  const workers = document.getElementById("workers-body");
  const status = document.getElementById("live");
  const show = (farm) => {
    sweeps.replaceChildren(...farm.sweeps.map(sweepRow));
    workers.replaceChildren(...farm.workers.map(workerRow));
    root.dataset.updated = farm.at;
    if (status) { status.textContent = "live · " + farm.at + " UTC"; status.className = "dim"; }
  };
  show(JSON.parse(root.dataset.farm));
  if (!window.EventSource) return;
  const es = new EventSource("/events");
  es.addEventListener("farm", (ev) => show(JSON.parse(ev.data)));
  es.onerror = () => { if (status) { status.textContent = "reconnecting…"; status.className = "error"; } };
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  b.disabled = true;
  const msg = document.getElementById("action-result");
  try {
    const r = await post("/sweeps/" + b.dataset.sweep + "/" + b.dataset.action);
    if (msg) { msg.textContent = r.message; msg.className = "dim"; }
  } catch (e) {
    if (msg) { msg.textContent = e.message; msg.className = "error"; }
    b.disabled = false;
  }
});

// ---- gallery -----------------------------------------------------------------------------
function queryBox() {
  const q = document.getElementById("q");
  const list = document.getElementById("q-keys");
  if (!q || !list) return;
  let keys = null;
  const suggest = async () => {
    if (keys === null) {
      keys = [];
      try { keys = (await (await fetch("/keys", { credentials: "same-origin" })).json()).keys || []; } catch (_) {}
    }
    const v = q.value;
    const m = /([A-Za-z_][\w.]*)$/.exec(v);
    const word = m ? m[1] : "";
    const head = v.slice(0, v.length - word.length);
    const opts = keys.filter((k) => k.startsWith(word) && k !== word).slice(0, 30)
      .map((k) => el("option", { value: head + k }));
    list.replaceChildren(...opts);
  };
  q.addEventListener("input", suggest);
  q.addEventListener("focus", suggest, { once: true });
}

async function count() {
  const c = document.getElementById("count");
  if (!c || !c.dataset.src) return;
  try {
    const r = await (await fetch(c.dataset.src, { credentials: "same-origin" })).json();
    if (r.error) { c.textContent = r.error; c.className = "count error"; return; }
    c.textContent = r.count.toLocaleString("en-US") + (r.count === 1 ? " match" : " matches");
    c.dataset.count = r.count;
  } catch (e) { c.textContent = "count unavailable"; }
}

function infinite() {
  const grid = document.getElementById("grid");
  if (!grid || !("IntersectionObserver" in window)) return;
  let busy = false;
  const io = new IntersectionObserver(async (entries) => {
    const more = document.getElementById("more");
    if (busy || !more || !entries.some((e) => e.isIntersecting)) return;
    busy = true;
    try {
      const r = await fetch(more.href + "&fragment=1", { credentials: "same-origin" });
      const html = await r.text();
      const t = document.createElement("template");
      t.innerHTML = html; // the server's own escaped markup
      const next = t.content.getElementById("more");
      grid.append(...t.content.querySelectorAll(".tile"));
      if (next) { more.href = next.href; io.observe(more); } else { more.remove(); }
    } finally { busy = false; }
  }, { rootMargin: "600px" });
  const more = document.getElementById("more");
  if (more) io.observe(more);
}

// ---- keepers and copy ------------------------------------------------------------------
async function keeper(cell, change) {
  const r = await post("/cells/" + cell + "/keeper", change);
  const box = document.querySelector(".keeper[data-cell='" + cell + "']");
  if (!box) return;
  const star = box.querySelector("[data-star]");
  star.classList.toggle("on", r.starred);
  star.textContent = r.starred ? "★ starred" : "☆ star";
  star.dataset.star = r.starred ? "1" : "0";
  box.querySelectorAll("[data-rate]").forEach((b) => b.classList.toggle("on", Number(b.dataset.rate) <= r.rating && r.rating > 0));
  box.dataset.rating = r.rating;
}

document.addEventListener("click", async (ev) => {
  const s = ev.target.closest(".keeper [data-star]");
  const rt = ev.target.closest(".keeper [data-rate]");
  const cp = ev.target.closest("[data-copy]");
  const box = ev.target.closest(".keeper");
  const err = document.getElementById("keeper-error");
  try {
    if (s) await keeper(box.dataset.cell, { starred: s.dataset.star !== "1" });
    if (rt) {
      const n = Number(rt.dataset.rate);
      await keeper(box.dataset.cell, { rating: Number(box.dataset.rating) === n ? 0 : n });
    }
  } catch (e) { if (err) err.textContent = e.message; }
  if (cp) {
    const text = document.getElementById(cp.dataset.copy).textContent;
    try { await navigator.clipboard.writeText(text); cp.textContent = "copied"; }
    catch (_) {
      const r = document.createRange(); r.selectNodeContents(document.getElementById(cp.dataset.copy));
      const sel = getSelection(); sel.removeAllRanges(); sel.addRange(r); cp.textContent = "selected: Ctrl+C";
    }
  }
});

document.addEventListener("DOMContentLoaded", () => { liveFarm(); queryBox(); count(); infinite(); });
