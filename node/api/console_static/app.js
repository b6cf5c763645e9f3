// Allerac One: the console of an Allerac Mesh box. Plain JavaScript, no build step.
//
// Every call goes to this box's own HTTP API (the endpoints the `allerac` commands use),
// with the session's CSRF token in X-Allerac-CSRF: the session cookie alone opens nothing.
// Text from the API is only ever put in the page as text (textContent), never as markup.
"use strict";

const PAGES = {
  owner: ["mesh", "models", "people", "usage", "invite", "chat"],
  user: ["usage", "chat"],
};
const TITLES = { mesh: "Mesh", models: "Models", people: "People", usage: "Usage", invite: "Invite", chat: "Chat" };

const state = {
  session: null, // {role, user, csrf}
  status: null, // the latest /allerac/status (live)
  chat: [], // this chat's messages
  streamAbort: null,
};

// --- small helpers ----------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function fmt(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function plural(n, one, many) {
  return `${fmt(n)} ${n === 1 ? one : many}`;
}

function compact(n) {
  return new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 }).format(n);
}

// What a box is doing, in words: "idle, 9 slots" or "2 of 9 slots busy, 1 waiting".
function loadText(load) {
  const waiting = load.queued ? `, ${fmt(load.queued)} waiting` : "";
  if (!load.active_streams) return `idle, ${plural(load.slots, "slot", "slots")}${waiting}`;
  return `${fmt(load.active_streams)} of ${plural(load.slots, "slot", "slots")} busy${waiting}`;
}

// A model and its measured speed, one per line.
function modelLines(models) {
  return models.map((m) => el("div", {}, m.name, el("span", { class: "muted" }, m.tps ? ` · ${Math.round(m.tps)} tokens/s` : " · speed not measured yet")));
}

function ago(unixMs) {
  if (!unixMs) return "never";
  const s = Math.max(0, (Date.now() - unixMs) / 1000);
  if (s < 5) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function notice(text, isError) {
  const box = $("notice");
  box.textContent = text;
  box.className = isError ? "notice error" : "notice";
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, extraHeaders) {
  const headers = { ...(extraHeaders || {}) };
  if (state.session) headers["X-Allerac-CSRF"] = state.session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = "";
    try {
      const error = (await response.json()).error;
      message = error.message;
      code = error.code || "";
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (response.status === 401 && path !== "/console/sign-in") signedOut();
    throw new ApiError(response.status, message, code);
  }
  return response;
}

async function apiJson(method, path, body) {
  return (await api(method, path, body)).json();
}

// Server-sent events from a fetch body: calls onEvent(name, data) per event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// --- names: boxes are shown by their display names -------------------------------------------------

function names() {
  const map = {};
  const s = state.status;
  if (s) {
    map[s.node_id] = s.display_name;
    for (const p of s.peers) if (p.display_name) map[p.node_id] = p.display_name;
  }
  return map;
}

function boxName(nodeId) {
  return names()[nodeId] || (nodeId || "").slice(0, 15);
}

// --- sign-in and navigation ------------------------------------------------------------------

function signedOut() {
  state.session = null;
  if (state.streamAbort) state.streamAbort.abort();
  showSignIn();
}

function showSignIn(message) {
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  $("nav").replaceChildren();
  $("who").textContent = "";
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  const error = $("sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
}

async function boot() {
  const params = new URLSearchParams(location.search);
  const expired = params.get("login") === "expired";
  if (expired) history.replaceState(null, "", "/" + location.hash);
  const session = await (await fetch("/console/session", { credentials: "same-origin", cache: "no-store" })).json();
  if (!session.signed_in) {
    showSignIn(expired ? "That login link was used already or has expired: run allerac console again." : "");
    return;
  }
  start(session);
}

function start(session) {
  state.session = session;
  $("sign-in").hidden = true;
  $("who").textContent = session.role === "owner" ? "owner" : session.user;
  $("sign-out").hidden = false;
  const pages = PAGES[session.role];
  $("nav").replaceChildren(
    ...pages.map((page) => el("a", { href: `#${page}`, id: `nav-${page}`, "data-page": page }, TITLES[page])),
  );
  liveStatus();
  route();
}

function route() {
  if (!state.session) return;
  const pages = PAGES[state.session.role];
  let page = location.hash.slice(1);
  if (!pages.includes(page)) page = pages[0];
  for (const name of Object.keys(TITLES)) $(`page-${name}`).hidden = name !== page;
  for (const link of $("nav").children) link.classList.toggle("current", link.dataset.page === page);
  notice("");
  LOADERS[page]().catch((error) => notice(error.message, true));
}

// --- the live status stream ------------------------------------------------------------------

async function liveStatus() {
  const controller = new AbortController();
  state.streamAbort = controller;
  while (state.session && !controller.signal.aborted) {
    try {
      const response = await fetch("/allerac/status/stream", {
        headers: { "X-Allerac-CSRF": state.session.csrf },
        credentials: "same-origin",
        signal: controller.signal,
      });
      if (response.status === 401) return signedOut();
      if (!response.ok) throw new Error(`status stream: ${response.status}`);
      await readEvents(response, (name, data) => {
        if (name !== "status") return;
        state.status = JSON.parse(data);
        const first = !$("box-name").textContent;
        $("box-name").textContent = state.status.display_name;
        if (first && !$("rename-input").value) $("rename-input").value = state.status.display_name;
        if (!$("page-mesh").hidden) renderMesh();
      });
    } catch (error) {
      if (controller.signal.aborted) return;
      $("mesh-updated").textContent = "reconnecting…";
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// --- Mesh ------------------------------------------------------------------------------------

function loadMesh() {
  renderMesh();
  if (state.status) $("rename-input").value = state.status.display_name;
  return Promise.resolve();
}

async function renameBox(event) {
  event.preventDefault();
  try {
    const renamed = await apiJson("PUT", "/allerac/display-name", { display_name: $("rename-input").value.trim() });
    notice(`This box is now called ${renamed.display_name}; the other boxes see it with its next card.`);
  } catch (error) {
    notice(error.message, true);
  }
}

function renderMesh() {
  const s = state.status;
  if (!s) return;
  $("mesh-id").textContent = s.mesh_id;
  const fixedName = Boolean(s.display_name_in_config);
  $("rename-input").disabled = fixedName;
  $("rename-form").querySelector("button").disabled = fixedName;
  $("rename-note").hidden = !fixedName;
  $("mesh-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const rows = [
    el(
      "tr",
      { "data-node": s.node_id },
      el("td", {}, el("strong", {}, s.display_name), el("div", { class: "muted" }, "this box")),
      el("td", {}, el("span", { class: "pill up" }, s.load.draining ? "draining" : "up")),
      el("td", {}, "local"),
      el("td", { class: "muted" }, "–"),
      el("td", {}, loadText(s.load)),
      el("td", {}, ...modelLines(s.models.map((m) => ({ name: m.name, tps: m.tokens_per_second })))),
      el("td", { class: "muted" }, "its own ledger"),
    ),
  ];
  for (const p of s.peers) {
    const sync = p.ledger_sync;
    const speeds = p.tokens_per_second || {};
    rows.push(
      el(
        "tr",
        { "data-node": p.node_id },
        el("td", {}, el("strong", {}, p.display_name || p.node_id.slice(0, 15)), el("div", { class: "muted mono" }, p.node_id.slice(0, 15))),
        el("td", {}, el("span", { class: `pill ${p.state}` }, p.state)),
        el("td", {}, p.route),
        el("td", {}, `${p.rtt_ms.toFixed(1)} ms`),
        el("td", {}, loadText(p.load)),
        el("td", {}, ...modelLines(p.models.map((name) => ({ name, tps: speeds[name] })))),
        el("td", {}, sync ? (sync.error ? `failed ${ago(sync.at_unix_ms)}` : `${ago(sync.at_unix_ms)} (${plural(sync.records, "new record", "new records")})`) : "not pulled yet"),
      ),
    );
  }
  if (!s.peers.length) rows.push(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "No other box yet: add one from the Invite page.")));
  fill($("mesh-table").tBodies[0], rows);
  const relays = s.relays.map((r) => el("tr", {}, el("td", {}, r.address), el("td", {}, el("span", { class: `pill ${r.connected ? "up" : "down"}` }, r.connected ? "connected" : "reconnecting"))));
  fill($("relay-table").tBodies[0], relays.length ? relays : [el("tr", {}, el("td", { colSpan: 2, class: "muted" }, "no relay configured"))]);
}

// --- Models ----------------------------------------------------------------------------------

async function loadModels() {
  const models = (await apiJson("GET", "/v1/models")).data;
  const rows = await Promise.all(
    models.map(async (m) => {
      let pick = "–";
      try {
        const plan = await apiJson("GET", `/allerac/route?model=${encodeURIComponent(m.id)}`);
        const chosen = plan.candidates.find((c) => c.status === "chosen");
        pick = chosen ? `${boxName(chosen.node_id)} (${chosen.route})` : `nobody now: ${plan.reason}`;
      } catch (error) {
        pick = error.message;
      }
      return el(
        "tr",
        { "data-model": m.id },
        el("td", {}, el("strong", {}, m.id)),
        el("td", {}, (m.aliases || []).join(", ") || "–"),
        el("td", {}, fmt(m.context_length)),
        el("td", {}, m.quantization || "–"),
        el("td", {}, (m.served_by || []).map(boxName).join(", ")),
        el("td", { class: "pick" }, pick),
      );
    }),
  );
  fill($("models-table").tBodies[0], rows);
}

// --- People ----------------------------------------------------------------------------------

async function loadPeople() {
  const users = (await apiJson("GET", "/allerac/users")).users;
  const rows = users.map((u) => {
    const privacy = el("select", { "aria-label": `privacy of ${u.name}` }, ...["local-only", "mesh", "any"].map((p) => el("option", { value: p, selected: p === u.privacy }, p)));
    const quota = el("input", { value: u.quota, "aria-label": `quota of ${u.name}`, size: 28 });
    const states = (u.quota_state || []).map((q) =>
      el("div", {}, `${q.limit}: ${fmt(q.used)} used, ${fmt(q.reserved)} reserved, `, el("strong", {}, `${fmt(q.left)} left`), el("div", { class: "muted" }, `resets ${q.resets_at.replace("T", " ").replace(":00Z", " UTC")}`)),
    );
    const save = el("button", { type: "button", onclick: () => changePerson(u.name, privacy.value, quota.value) }, "Save");
    const remove = el("button", { type: "button", class: "danger", onclick: () => removePerson(u.name) }, "Remove");
    return el(
      "tr",
      { "data-user": u.name },
      el("td", {}, el("strong", {}, u.name)),
      el("td", {}, privacy),
      el("td", {}, quota),
      el("td", {}, ...(states.length ? states : [el("span", { class: "muted" }, "no limit")])),
      el("td", { class: "actions" }, save, remove),
    );
  });
  fill($("people-table").tBodies[0], rows.length ? rows : [el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "nobody yet: add the first person above"))]);
}

async function addPerson(event) {
  event.preventDefault();
  const body = { name: $("person-name").value.trim() };
  if ($("person-privacy").value) body.privacy = $("person-privacy").value;
  if ($("person-quota").value.trim()) body.quota = $("person-quota").value.trim();
  try {
    const added = await apiJson("POST", "/allerac/users", body);
    const models = (await apiJson("GET", "/v1/models")).data;
    const model = models.length ? models[0].id : "MODEL";
    $("new-key-name").textContent = added.name;
    $("new-key-value").textContent = added.api_key;
    $("new-key-snippet").textContent = [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${location.origin}/v1", api_key="${added.api_key}")`,
      "answer = client.chat.completions.create(",
      `    model="${model}", messages=[{"role": "user", "content": "Hello!"}]`,
      ")",
      "print(answer.choices[0].message.content)",
    ].join("\n");
    $("new-key").hidden = false;
    $("add-person").reset();
    notice(`Added ${added.name}.`);
    await loadPeople();
  } catch (error) {
    notice(error.message, true);
  }
}

async function changePerson(name, privacy, quota) {
  try {
    await apiJson("PATCH", `/allerac/users/${encodeURIComponent(name)}`, { privacy, quota });
    notice(`Saved ${name}.`);
    await loadPeople();
  } catch (error) {
    notice(error.message, true);
  }
}

async function removePerson(name) {
  if (!confirm(`Remove ${name}? Their API key stops working on every box.`)) return;
  try {
    await apiJson("DELETE", `/allerac/users/${encodeURIComponent(name)}`);
    notice(`Removed ${name}.`);
    await loadPeople();
  } catch (error) {
    notice(error.message, true);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents(button.previousElementSibling);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl-C";
  }
  setTimeout(() => (button.textContent = "Copy"), 2000);
}

// --- Usage -----------------------------------------------------------------------------------

const USAGE_GROUPS = ["user", "model", "tier", "node"];

async function loadUsage() {
  const period = $("usage-period").value;
  const [days, ...groups] = await Promise.all(
    ["day", ...USAGE_GROUPS].map((by) => apiJson("GET", `/allerac/usage?period=${period}&by=${by}`)),
  );
  USAGE_GROUPS.forEach((by, i) => renderUsageTable(by, groups[i]));
  renderChart(days.rows, period);
  renderVerification(groups[0]);
}

function renderUsageTable(by, report) {
  const total = Math.max(1, ...report.rows.map((r) => r.prompt_tokens + r.completion_tokens));
  const head = el("tr", {}, el("th", {}, by === "node" ? "box" : by === "user" ? "person" : by), el("th", { class: "num" }, "requests"), el("th", { class: "num" }, "prompt tokens"), el("th", { class: "num" }, "completion tokens"), el("th", {}, ""));
  const rows = report.rows.map((r) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${(100 * (r.prompt_tokens + r.completion_tokens)) / total}%`;
    return el(
      "tr",
      { "data-key": r[by] },
      el("td", {}, by === "node" ? r.display_name : r[by]),
      el("td", { class: "num" }, fmt(r.requests)),
      el("td", { class: "num" }, fmt(r.prompt_tokens)),
      el("td", { class: "num" }, fmt(r.completion_tokens)),
      el("td", { class: "barcell" }, bar),
    );
  });
  const table = $(`usage-${by}`);
  fill(table.tBodies[0], [head, ...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "no usage in this period"))])]);
}

function renderChart(rows, period) {
  const byDay = Object.fromEntries(rows.map((r) => [r.day, r.prompt_tokens + r.completion_tokens]));
  let days = Object.keys(byDay).sort();
  if (period === "month") {
    const now = new Date();
    const count = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 0)).getUTCDate();
    const prefix = now.toISOString().slice(0, 8);
    days = Array.from({ length: count }, (_, i) => `${prefix}${String(i + 1).padStart(2, "0")}`);
  }
  const top = Math.max(1, ...Object.values(byDay));
  const bars = days.map((day) => {
    const column = el("div", { class: "column", title: `${day}: ${fmt(byDay[day] || 0)} tokens`, "data-day": day });
    const bar = el("div", { class: "fill" });
    bar.style.height = `${(100 * (byDay[day] || 0)) / top}%`;
    const value = el("span", { class: "value" }, byDay[day] ? compact(byDay[day]) : "");
    column.append(value, bar, el("span", {}, day.slice(8)));
    return column;
  });
  $("usage-chart").replaceChildren(...(bars.length ? bars : [el("p", { class: "muted" }, "no usage in this period")]));
}

function renderVerification(report) {
  const box = $("usage-verification");
  const v = report.verification;
  const parts = [];
  if (v) {
    parts.push(
      el("p", {}, el("span", { class: `pill ${v.ok ? "up" : "down"}` }, v.ok ? "verified" : `${v.problems.length} problems`), ` ${plural(v.records, "signed record", "signed records")} from ${plural(v.nodes, "box", "boxes")}; ${v.awaiting_receipts ? `${plural(v.awaiting_receipts, "countersignature", "countersignatures")} awaited (kept by their entry boxes until the ledgers sync)` : "every record countersigned by its entry box"}.`),
    );
    for (const p of v.problems) parts.push(el("div", { class: "error" }, `${p.kind} at ${boxName(p.node_id)} #${p.seq}: ${p.detail}`));
  } else {
    parts.push(el("p", {}, `Your own usage (${state.session.user}), from the box's signed ledger.`));
  }
  for (const m of report.missing || []) parts.push(el("div", { class: "error" }, `missing from this box's ledger: ${boxName(m.node_id)} #${m.from_seq}–#${m.to_seq}`));
  box.replaceChildren(...parts);
}

// --- Invite ----------------------------------------------------------------------------------

async function loadInvite() {
  const data = await apiJson("GET", "/allerac/mesh/members");
  const peers = Object.fromEntries(((state.status && state.status.peers) || []).map((p) => [p.node_id, p]));
  const seen = (m) => {
    if (m.this_node) return "this box";
    if (m.revoked) return el("span", { class: "pill down" }, "revoked");
    const p = peers[m.node_id];
    return p ? el("span", { class: `pill ${p.state}` }, `${p.state} (${p.route})`) : el("span", { class: "muted" }, "not reached from here now");
  };
  const rows = data.members.map((m) =>
    el(
      "tr",
      { "data-node": m.node_id },
      el("td", {}, el("strong", {}, m.display_name || boxName(m.node_id))),
      el("td", { class: "mono" }, m.node_id),
      el("td", {}, m.role),
      el("td", {}, seen(m)),
      el("td", {}, m.this_node || m.revoked ? "" : el("button", { type: "button", class: "danger", onclick: () => revoke(m) }, "Revoke")),
    ),
  );
  fill($("members-table").tBodies[0], rows);
}

async function createInvite(event) {
  event.preventDefault();
  try {
    const ttl = Number($("invite-ttl").value);
    const invite = await apiJson("POST", "/allerac/mesh/invites", { role: $("invite-role").value, ttl_s: ttl });
    $("invite-code").textContent = invite.code;
    $("invite-expiry").textContent = `${invite.role}, valid until ${new Date(Date.now() + ttl * 1000).toLocaleString()}`;
    drawQr($("invite-qr"), invite.code);
    $("invite-result").hidden = false;
  } catch (error) {
    notice(error.message, true);
  }
}

function drawQr(canvas, text) {
  const qr = qrcode(0, "M"); // the smallest version that holds the code, medium error correction
  qr.addData(text, "Byte");
  qr.make();
  const count = qr.getModuleCount();
  const quiet = 4;
  const scale = Math.max(2, Math.floor(Math.min(360, Math.max(296, (count + 2 * quiet) * 3)) / (count + 2 * quiet)));
  const size = (count + 2 * quiet) * scale;
  canvas.width = size;
  canvas.height = size;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  ctx.fillStyle = "#000";
  for (let r = 0; r < count; r++) for (let c = 0; c < count; c++) if (qr.isDark(r, c)) ctx.fillRect((c + quiet) * scale, (r + quiet) * scale, scale, scale);
  canvas.dataset.modules = String(count);
}

async function revoke(member) {
  if (!confirm(`Revoke ${member.display_name || member.node_id}? Every box refuses it from now on.`)) return;
  try {
    const result = await apiJson("POST", "/allerac/mesh/revoke", { node_id: member.node_id });
    notice(`Revoked; told ${result.told.length} box(es) at once.`);
    await loadInvite();
  } catch (error) {
    notice(error.message, true);
  }
}

// --- Chat ------------------------------------------------------------------------------------

async function loadChat() {
  const select = $("chat-model");
  if (select.options.length) return;
  const models = (await apiJson("GET", "/v1/models")).data;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
}

function chatBubble(role, text) {
  const bubble = el("div", { class: `bubble ${role}` }, el("div", { class: "text" }, text));
  $("chat-log").append(bubble);
  return bubble;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  state.chat.push({ role: "user", content: text });
  chatBubble("user", text);
  const bubble = chatBubble("assistant", "");
  const answer = bubble.querySelector(".text");
  const send = $("chat-send");
  send.disabled = true;
  const headers = {};
  if ($("chat-privacy").value) headers["x-allerac-privacy"] = $("chat-privacy").value;
  try {
    const response = await api("POST", "/v1/chat/completions", { model: $("chat-model").value, messages: state.chat, stream: true, stream_options: { include_usage: true } }, headers);
    const node = response.headers.get("x-allerac-node");
    const route = response.headers.get("x-allerac-route");
    bubble.append(el("div", { class: "served-by", "data-node": node || "", "data-route": route || "" }, `answered by ${boxName(node)} (${route})`));
    await readEvents(response, (_, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
      if (chunk.usage) bubble.dataset.tokens = String(chunk.usage.completion_tokens);
    });
    bubble.classList.add("done");
    state.chat.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    bubble.classList.add("failed");
    answer.textContent += ` [${error.message}]`;
    state.chat.pop();
  } finally {
    send.disabled = false;
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
  }
}

// --- wiring ----------------------------------------------------------------------------------

const LOADERS = { mesh: loadMesh, models: loadModels, people: loadPeople, usage: loadUsage, invite: loadInvite, chat: loadChat };

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", route);
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const session = await (await api("POST", "/console/sign-in", { api_key: $("sign-in-key").value.trim() })).json();
      $("sign-in-key").value = "";
      start(session);
    } catch (error) {
      showSignIn(error.message);
    }
  });
  $("sign-out").addEventListener("click", async () => {
    try {
      await api("POST", "/console/sign-out", {});
    } finally {
      signedOut();
    }
  });
  $("rename-form").addEventListener("submit", renameBox);
  $("add-person").addEventListener("submit", addPerson);
  $("copy-key").addEventListener("click", (e) => copyText($("new-key-value").textContent, e.target));
  $("copy-invite").addEventListener("click", (e) => copyText($("invite-code").textContent, e.target));
  $("usage-period").addEventListener("change", () => loadUsage().catch((error) => notice(error.message, true)));
  $("invite-form").addEventListener("submit", createInvite);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    state.chat = [];
    $("chat-log").replaceChildren();
  });
  boot().catch((error) => showSignIn(error.message));
});
