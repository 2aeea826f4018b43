// tidewater's web console: one page, no dependencies, served by the broker (embedded in
// the binary). It only calls the HTTP API (/v1/...), with the signed-in API key when
// authentication is on; what a principal may not see, the API does not list.
//
// Pages (by the URL's hash): #/ (overview), #/queues/NAME, #/streams/NAME,
// #/subscriptions/STREAM/NAME, #/groups/NAME. Every page refreshes itself every 2 s.

const REFRESH_MS = 2000;
// Queues with a sparkline, and groups with their lag and forecast, on the overview.
const MAX_DETAILED = 50;
const TOKEN_KEY = "tidewater.token";

// ---- DOM helpers: text is always set as text, never parsed as HTML ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// replaceChildren, leaving out what is not there (null would show as "null").
function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const fmt = {
  n(v) {
    if (v === undefined || v === null) return "-";
    return Number(v).toLocaleString("en-US");
  },
  rate(v) {
    return v === undefined || v === null ? "-" : `${Number(v).toFixed(1)}/s`;
  },
  ms(v) {
    if (v === undefined || v === null) return "-";
    if (v === 0) return "0s";
    if (v < 1000) return `${v}ms`;
    if (v < 60000) return `${(v / 1000).toFixed(1)}s`;
    if (v < 3600000) return `${Math.floor(v / 60000)}m${Math.floor((v % 60000) / 1000)}s`;
    return `${Math.floor(v / 3600000)}h${Math.floor((v % 3600000) / 60000)}m`;
  },
  bytes(v) {
    if (v === undefined || v === null) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${i ? v.toFixed(1) : v} ${units[i]}`;
  },
  time(ms) {
    return ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "-";
  },
};

function forecastTag(f) {
  if (!f) return h("span", { class: "tag" }, "-");
  const text = {
    empty: "empty",
    draining: `drains in ${fmt.ms(f.drain_ms)}`,
    growing: "growing",
    stalled: "stalled",
    unknown: "measuring…",
  }[f.trend] || f.trend;
  return h("span", { class: `tag ${f.trend}`, "data-trend": f.trend }, text);
}

function card(label, value, key) {
  return h("div", { class: "card", "data-stat": key || label }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

// ---- the API ----

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = { accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { message: text }; }
  if (!response.ok) {
    const err = new ApiError(response.status, json);
    if (response.status === 401) signIn(err.message);
    throw err;
  }
  return json;
}

const enc = encodeURIComponent;
const queuePath = (q) => `/v1/queues/${enc(q)}`;
const subPath = (stream, sub) => `/v1/streams/${enc(stream)}/subscriptions/${enc(sub)}`;

function errorBox(err) {
  const code = err && err.code ? `${err.code}: ` : "";
  return h("div", { class: "error", role: "alert" }, code + (err && err.message ? err.message : String(err)));
}

// ---- charts (SVG, drawn from the server's sample history) ----

function chart(samples, series, opts = {}) {
  const W = 600, H = 160, L = 44, B = 18, T = 8, R = 8;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": opts.label || "chart" });
  if (samples.length < 2) {
    svg.append(s("text", { x: L, y: H / 2 }, "collecting samples…"));
    return svg;
  }
  const t0 = samples[0].at_ms, t1 = samples[samples.length - 1].at_ms;
  let max = 0;
  for (const ser of series) for (const p of samples) max = Math.max(max, Number(ser.value(p)) || 0);
  max = max || 1;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / max) * (H - B - T);
  svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(s("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  svg.append(s("text", { x: 2, y: T + 8 }, opts.unit === "rate" ? `${max.toFixed(1)}/s` : fmt.n(Math.round(max))));
  svg.append(s("text", { x: 2, y: H - B }, "0"));
  svg.append(s("text", { x: L, y: H - 4 }, `${fmt.ms(t1 - t0)} ago`));
  svg.append(s("text", { x: W - R - 24, y: H - 4 }, "now"));
  const colors = ["#1d6fd8", "#e07b00", "#1b8a4b"];
  series.forEach((ser, i) => {
    const points = samples
      .filter((p) => ser.value(p) !== null && ser.value(p) !== undefined)
      .map((p) => `${x(p.at_ms).toFixed(1)},${y(Number(ser.value(p))).toFixed(1)}`)
      .join(" ");
    svg.append(s("polyline", { points, fill: "none", stroke: colors[i % 3], "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }));
  });
  return svg;
}

function legend(names) {
  return h("div", { class: "legend" }, names.map((n, i) => h("span", { class: `s${i}` }, n)));
}

function sparkline(samples) {
  const W = 120, H = 24;
  const svg = s("svg", { class: "spark", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (!samples || samples.length < 2) return svg;
  const max = Math.max(1, ...samples.map((p) => p.backlog));
  const t0 = samples[0].at_ms, t1 = samples[samples.length - 1].at_ms;
  const points = samples.map((p) => `${(((p.at_ms - t0) / Math.max(1, t1 - t0)) * W).toFixed(1)},${(H - 1 - (p.backlog / max) * (H - 2)).toFixed(1)}`).join(" ");
  svg.append(s("polyline", { points, fill: "none", stroke: "#1d6fd8", "stroke-width": 1.2, "vector-effect": "non-scaling-stroke" }));
  return svg;
}

// ---- sign-in ----

let signingIn = false;

function signIn(reason) {
  if (signingIn) return;
  signingIn = true;
  stopRefresh();
  const message = h("div");
  if (reason && sessionStorage.getItem(TOKEN_KEY)) message.append(errorBox({ message: reason }));
  const input = h("input", { name: "token", type: "password", autocomplete: "off", placeholder: "<key id>.<secret>", required: true });
  const form = h("form", { class: "panel signin", id: "signin", onsubmit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    signingIn = false;
    try {
      await api("GET", "/v1/auth/whoami");
      route();
    } catch (err) {
      put(message, errorBox(err));
      signingIn = true;
    }
  } },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Authentication is on: sign in with an API key (tidewater auth key create). The key stays in this tab only."),
    message,
    h("label", {}, "API key token", input),
    h("button", { type: "submit" }, "Sign in"));
  put(document.getElementById("main"), form);
  input.focus();
}

async function showWho() {
  const who = document.getElementById("who");
  try {
    const me = await api("GET", "/v1/auth/whoami");
    if (!me.authentication) {
      put(who, h("span", { class: "muted" }, "authentication off"));
    } else if (me.anonymous) {
      // Without a key the console would show only what anonymous is granted: ask for one.
      put(who, );
      signIn();
    } else {
      put(who, 
        h("span", { "data-principal": me.principal }, `signed in as ${me.principal}`),
        h("button", { class: "plain", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); location.hash = "#/"; signIn(); } }, "Sign out"));
    }
  } catch { /* the sign-in form says why */ }
}

// ---- refresh loop ----

let timer = null;
let renderCurrent = null;

function stopRefresh() {
  if (timer) clearInterval(timer);
  timer = null;
}

function every(render) {
  stopRefresh();
  renderCurrent = render;
  const tick = async () => {
    try {
      await render();
      document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) {
        document.getElementById("updated").textContent = `Update failed: ${err.message}`;
      }
    }
  };
  tick();
  timer = setInterval(tick, REFRESH_MS);
}

// A region of a page that refresh may replace, unless the user is working in it.
function region(id) {
  return h("div", { id });
}

function fill(id, ...children) {
  const el = document.getElementById(id);
  if (el) put(el, ...children);
}

// ---- overview ----

async function overview() {
  const main = document.getElementById("main");
  const createError = h("div");
  const name = h("input", { name: "queue", placeholder: "queue name", required: true, pattern: "[A-Za-z0-9._\\-]{1,200}" });
  const config = h("input", { name: "config", placeholder: '{"max_deliveries": 5} (optional)', class: "mono" });
  const create = h("form", { class: "inline", id: "create-queue", onsubmit: async (e) => {
    e.preventDefault();
    put(createError, );
    try {
      const body = config.value.trim() ? JSON.parse(config.value) : {};
      await api("PUT", queuePath(name.value.trim()), body);
      location.hash = `#/queues/${enc(name.value.trim())}`;
    } catch (err) {
      put(createError, errorBox(err));
    }
  } }, name, config, h("button", { type: "submit" }, "Create queue"));
  put(main, 
    h("h1", {}, "Overview"),
    h("section", { class: "panel" }, h("h2", {}, "Queues"), create, createError, region("queues")),
    h("section", { class: "panel" }, h("h2", {}, "Streams"), region("streams")),
    h("section", { class: "panel" }, h("h2", {}, "Subscriptions"), region("subscriptions")),
    h("section", { class: "panel" }, h("h2", {}, "Consumer groups"), region("groups")));
  every(async () => {
    const [queues, streams, subs, groups] = await Promise.all([
      api("GET", "/v1/queues"),
      api("GET", "/v1/streams").catch(() => ({ streams: [] })),
      api("GET", "/v1/subscriptions").catch(() => ({ subscriptions: [] })),
      api("GET", "/v1/groups").catch(() => ({ groups: [] })),
    ]);
    const byName = new Map(queues.queues.map((q) => [q.name, q]));
    // Sparklines and group details for the first MAX_DETAILED only: a refresh every 2 s
    // must not become thousands of requests.
    const histories = await Promise.all(queues.queues.map((q, i) => i < MAX_DETAILED
      ? api("GET", `${queuePath(q.name)}/history`).catch(() => ({ samples: [] }))
      : Promise.resolve({ samples: [] })));
    fill("queues", queues.queues.length === 0 ? h("p", { class: "muted" }, "No queues yet.") : h("table", {},
      h("thead", {}, h("tr", {}, ["queue", "depth", "in flight", "delayed", "oldest", "arrival", "service", "DLQ", "forecast", "last hour"].map((c, i) => h("th", { class: i && i < 8 ? "num" : "" }, c)))),
      h("tbody", {}, queues.queues.map((q, i) => {
        const f = q.stats.forecast || {};
        const dlq = q.config.dead_letter_queue && byName.get(q.config.dead_letter_queue);
        return h("tr", { "data-queue": q.name },
          h("td", {}, h("a", { href: `#/queues/${enc(q.name)}` }, q.name)),
          h("td", { class: "num depth" }, fmt.n(q.stats.depth)),
          h("td", { class: "num in-flight" }, fmt.n(q.stats.in_flight)),
          h("td", { class: "num delayed" }, fmt.n(q.stats.delayed)),
          h("td", { class: "num" }, fmt.ms(q.stats.oldest_age_ms)),
          h("td", { class: "num" }, fmt.rate(f.arrival_per_s)),
          h("td", { class: "num" }, fmt.rate(f.service_per_s)),
          h("td", { class: "num dlq" }, dlq ? h("a", { href: `#/queues/${enc(dlq.name)}` }, fmt.n(dlq.stats.total)) : "-"),
          h("td", {}, forecastTag(f)),
          h("td", {}, sparkline(histories[i].samples)));
      }))));
    fill("streams", streams.streams.length === 0 ? h("p", { class: "muted" }, "No streams.") : h("table", {},
      h("thead", {}, h("tr", {}, ["stream", "partitions", "records (end offsets)", "bytes"].map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
      h("tbody", {}, streams.streams.map((st) => h("tr", { "data-stream": st.name },
        h("td", {}, h("a", { href: `#/streams/${enc(st.name)}` }, st.name)),
        h("td", { class: "num" }, st.partitions.length),
        h("td", { class: "num" }, fmt.n(st.partitions.reduce((a, p) => a + p.end_offset, 0))),
        h("td", { class: "num" }, fmt.bytes(st.partitions.reduce((a, p) => a + p.bytes, 0))))))));
    fill("subscriptions", subs.subscriptions.length === 0 ? h("p", { class: "muted" }, "No subscriptions.") : h("table", {},
      h("thead", {}, h("tr", {}, ["subscription", "backlog", "in flight", "oldest", "forecast"].map((c, i) => h("th", { class: i && i < 4 ? "num" : "" }, c)))),
      h("tbody", {}, subs.subscriptions.map((sub) => h("tr", { "data-subscription": `${sub.stream}/${sub.name}` },
        h("td", {}, h("a", { href: `#/subscriptions/${enc(sub.stream)}/${enc(sub.name)}` }, `${sub.stream}/${sub.name}`)),
        h("td", { class: "num" }, fmt.n(sub.stats.total)),
        h("td", { class: "num" }, fmt.n(sub.stats.in_flight)),
        h("td", { class: "num" }, fmt.ms(sub.stats.oldest_age_ms)),
        h("td", {}, forecastTag(sub.stats.forecast)))))));
    const described = await Promise.all(groups.groups.map((g, i) => i >= MAX_DETAILED ? [null, null] : Promise.all([
      api("GET", `/v1/groups/${enc(g)}`).catch(() => null),
      api("GET", `/v1/groups/${enc(g)}/forecast`).catch(() => null),
    ])));
    fill("groups", groups.groups.length === 0 ? h("p", { class: "muted" }, "No consumer groups.") : h("table", {},
      h("thead", {}, h("tr", {}, ["group", "members", "lag", "lag age", "forecast"].map((c, i) => h("th", { class: i && i < 4 ? "num" : "" }, c)))),
      h("tbody", {}, groups.groups.map((g, i) => {
        const [info, fc] = described[i];
        const offsets = info ? info.offsets : [];
        return h("tr", { "data-group": g },
          h("td", {}, h("a", { href: `#/groups/${enc(g)}` }, g)),
          h("td", { class: "num" }, info ? info.members.length : "-"),
          h("td", { class: "num" }, fmt.n(offsets.reduce((a, o) => a + o.lag, 0))),
          h("td", { class: "num" }, fmt.ms(Math.max(0, ...offsets.map((o) => o.lag_ms)))),
          h("td", {}, forecastTag(fc && fc.forecast)));
      }))));
  });
}

// ---- a queue ----

function forecastCards(f) {
  if (!f) return h("div");
  return h("div", { class: "grid", id: "forecast" },
    card("arrival", fmt.rate(f.arrival_per_s), "arrival"),
    card("service", fmt.rate(f.service_per_s), "service"),
    card("consumers", fmt.n(f.consumers), "consumers"),
    card("per consumer", fmt.rate(f.per_consumer_per_s), "per_consumer"),
    card("drain", f.trend === "growing" || f.trend === "stalled" ? f.trend : fmt.ms(f.drain_ms), "drain"),
    card(`age objective ${fmt.ms(f.age_objective_ms)}`, f.age_objective_breach_ms === null ? "holds" : f.age_objective_breach_ms === 0 ? "crossed" : `in ${fmt.ms(f.age_objective_breach_ms)}`, "age_objective"),
    card(`consumers needed (${fmt.ms(f.drain_target_ms)})`, fmt.n(f.consumers_needed), "consumers_needed"),
    f.limited_by ? card("limited by", f.limited_by === "dispatch_rate" ? `dispatch rate ${fmt.rate(f.service_ceiling_per_s)}` : f.limited_by === "key_concurrency" ? "keys (key concurrency)" : "max in flight", "limited_by") : null);
}

function historyCharts(history) {
  const samples = history.samples || [];
  return h("div", { class: "two" },
    h("div", {}, h("h2", {}, "Backlog, last hour"), chart(samples, [
      { value: (p) => p.backlog }, { value: (p) => p.in_flight }, { value: (p) => p.delayed },
    ], { label: "backlog" }), legend(["backlog", "in flight", "delayed"])),
    h("div", {}, h("h2", {}, "Rates, last hour"), chart(samples, [
      { value: (p) => p.arrival_per_s }, { value: (p) => p.service_per_s },
    ], { unit: "rate", label: "rates" }), legend(["arrival", "service"])));
}

// A dead letter's history header, readable: times as times, the error list one a line.
function historyLine(name, value) {
  if (name.endsWith("-at") && /^\d+$/.test(value)) return h("div", {}, `${name}: ${fmt.time(Number(value))}`);
  if (name === "errors") {
    try {
      const errors = JSON.parse(value);
      if (Array.isArray(errors)) {
        return h("div", {}, "errors:", errors.map((e) => h("div", { class: "mono" }, `  ${fmt.time(e.at)}  ${e.error}`)));
      }
    } catch { /* shown as it is */ }
  }
  return h("div", {}, `${name}: ${value}`);
}

function messageRow(m, opts = {}) {
  const headers = Object.entries(m.headers || {});
  const history = headers.filter(([k]) => k.startsWith("tidewater-"));
  const own = headers.filter(([k]) => !k.startsWith("tidewater-"));
  const body = m.body !== undefined ? m.body : `(base64) ${m.body_base64}`;
  return h("tr", { "data-message": m.id },
    opts.select ? h("td", {}, h("input", { type: "checkbox", class: "pick", value: m.id, "aria-label": `select ${m.id}` })) : null,
    h("td", { class: "mono" }, m.id),
    h("td", { class: "body" }, h("div", { class: "mono" }, body.length > 400 ? `${body.slice(0, 400)}…` : body),
      own.length ? h("div", { class: "headers" }, own.map(([k, v]) => `${k}: ${v}`).join("  ·  ")) : null),
    h("td", {}, m.key || ""),
    h("td", { class: "num" }, fmt.n(m.delivery_count)),
    h("td", {}, fmt.time(m.published_at)),
    opts.history ? h("td", { class: "headers history" }, history.map(([k, v]) => historyLine(k.replace("tidewater-", ""), v))) : null,
    opts.actions ? h("td", {}, opts.actions) : null);
}

async function queuePage(name) {
  const main = document.getElementById("main");
  const initial = await api("GET", queuePath(name));
  // A dead-letter queue: another queue sends its dead letters here (or, by the default
  // naming, it ends in -dlq). Redriven messages keep their history, so headers do not tell.
  const isDlq = name.endsWith("-dlq") || (await api("GET", "/v1/queues")).queues.some((q) => q.config.dead_letter_queue === name);

  // Publish.
  const publishBody = h("textarea", { name: "body", rows: 3, placeholder: "message body (one message)" });
  const publishKey = h("input", { name: "key", placeholder: "key (optional)" });
  const publishNote = h("div");
  const publish = h("form", { id: "publish", onsubmit: async (e) => {
    e.preventDefault();
    put(publishNote, );
    try {
      const message = { body: publishBody.value };
      if (publishKey.value) message.key = publishKey.value;
      const reply = await api("POST", `${queuePath(name)}/messages`, { messages: [message] });
      put(publishNote, h("div", { class: "notice" }, `Published ${reply.ids[0]}.`));
      publishBody.value = "";
      renderCurrent && renderCurrent();
      browseMore(true).catch(() => {});
    } catch (err) { put(publishNote, errorBox(err)); }
  } }, publishBody, h("div", { class: "inline" }, publishKey, h("button", { type: "submit" }, "Publish")), publishNote);

  // Receive (a consumer in the console: lease, then ack or nack).
  const leased = h("div", { id: "leased" });
  const receive = h("form", { class: "inline", id: "consume", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const got = await api("POST", `${queuePath(name)}/receive`, { max: 10, lease_ms: 60000, consumer: "console" });
      if (got.messages.length === 0) { put(leased, h("p", { class: "muted" }, "Nothing to receive.")); return; }
      const settle = (m, how, row) => async () => {
        try {
          const body = { receipts: [m.receipt] };
          if (how === "nack") body.error = "nacked from the console";
          const reply = await api("POST", `${queuePath(name)}/${how}`, body);
          put(row, h("td", { colspan: 7, class: reply.failed.length ? "error" : "muted" },
            reply.failed.length ? `${how} failed: ${reply.failed[0].code}` : `${m.id}: ${how === "ack" ? "acknowledged" : "nacked"}`));
          renderCurrent && renderCurrent();
        } catch (err) { put(row, h("td", { colspan: 7 }, errorBox(err))); }
      };
      put(leased, h("table", {}, h("tbody", {}, got.messages.map((m) => {
        const actions = h("span");
        const row = messageRow(m, { actions });
        actions.append(h("button", { class: "plain", onclick: settle(m, "ack", row) }, "Ack"), " ", h("button", { class: "plain", onclick: settle(m, "nack", row) }, "Nack"));
        return row;
      }))));
    } catch (err) { put(leased, errorBox(err)); }
  } }, h("button", { type: "submit" }, "Receive up to 10"), h("span", { class: "muted" }, "leases them for 60 s; ack or nack each"));

  // Configuration: view and edit; the server validates.
  const configText = h("textarea", { name: "config", rows: 14, spellcheck: "false" }, JSON.stringify(initial.config, null, 2));
  const configNote = h("div", { id: "config-result" });
  const configForm = h("form", { id: "config", onsubmit: async (e) => {
    e.preventDefault();
    put(configNote, );
    let patch;
    try { patch = JSON.parse(configText.value); } catch (err) { put(configNote, errorBox({ code: "invalid_json", message: err.message })); return; }
    try {
      const reply = await api("PUT", queuePath(name), patch);
      configText.value = JSON.stringify(reply.config, null, 2);
      put(configNote, h("div", { class: "notice" }, "Saved."));
    } catch (err) { put(configNote, errorBox(err)); }
  } }, configText, h("div", { class: "inline" }, h("button", { type: "submit" }, "Save configuration"),
    h("span", { class: "muted" }, "Fields left out keep their value; the server checks every change.")), configNote);

  // Browse: peek without leasing.
  let from = 0;
  const browse = region("messages");
  const browseMore = async (reset) => {
    if (reset) from = 0;
    const page = await api("GET", `${queuePath(name)}/messages?max=20&from=${from}`);
    const rows = page.messages.map((m) => messageRow(m, { select: isDlq, history: isDlq }));
    const head = h("tr", {}, isDlq ? h("th", {}, h("input", { type: "checkbox", "aria-label": "select all", onchange: (e) => browse.querySelectorAll("input.pick").forEach((c) => { c.checked = e.target.checked; }) })) : null,
      ["id", "body", "key", "deliveries", "published"].map((c) => h("th", { class: c === "deliveries" ? "num" : "" }, c)), isDlq ? h("th", {}, "history") : null);
    put(browse, rows.length === 0 ? h("p", { class: "muted" }, "No waiting messages.") :
      h("table", {}, h("thead", {}, head), h("tbody", {}, rows)),
      page.next_from !== undefined && page.next_from !== null && rows.length === 20 ? h("button", { class: "plain", onclick: () => { from = page.next_from; browseMore(false); } }, "Next page") : null);
  };

  // Dead-letter queue: redrive selected or all at a rate, with progress; purge.
  const dlqPanel = isDlq ? (() => {
    const rate = h("input", { name: "rate", type: "number", min: 1, max: 100000, value: 100 });
    const progress = h("progress", { id: "redrive-progress", max: 1, value: 0 });
    const status = h("span", { id: "redrive-status", class: "muted" });
    const note = h("div");
    const follow = async (started) => {
      const total = started.moved + started.remaining || 1;
      progress.max = total;
      for (;;) {
        const p = await api("GET", `/v1/redrives/${enc(started.id)}`);
        progress.value = p.moved;
        status.textContent = `${started.id}: ${p.state}, moved ${p.moved}, remaining ${p.remaining}${p.skipped ? `, skipped ${p.skipped}` : ""}`;
        status.dataset.state = p.state;
        if (p.state !== "running") { browseMore(true); return; }
        await new Promise((r) => setTimeout(r, 300));
      }
    };
    const redrive = (selected) => async () => {
      put(note, );
      const body = { rate_per_s: Number(rate.value) || 100 };
      if (selected) {
        const ids = [...browse.querySelectorAll("input.pick:checked")].map((c) => c.value);
        if (ids.length === 0) { put(note, errorBox({ message: "Select messages first." })); return; }
        body.filter = { ids };
      }
      try { await follow(await api("POST", `${queuePath(name)}/redrive`, body)); } catch (err) { put(note, errorBox(err)); }
    };
    const confirmInput = h("input", { name: "confirm", placeholder: name, oninput: () => confirmInput.setCustomValidity("") });
    const dialog = h("dialog", { id: "purge-confirm" },
      h("form", { method: "dialog", onsubmit: async (e) => {
        if (e.submitter && e.submitter.value !== "purge") return;
        if (confirmInput.value !== name) { e.preventDefault(); confirmInput.setCustomValidity("type the queue's name"); confirmInput.reportValidity(); return; }
        try {
          const reply = await api("POST", `${queuePath(name)}/purge`, {});
          put(note, h("div", { class: "notice" }, `Purged ${reply.purged} messages.`));
          browseMore(true);
        } catch (err) { put(note, errorBox(err)); }
      } },
        h("p", {}, `Purge removes every message of '${name}' for good. Type the queue's name to confirm.`),
        confirmInput, " ",
        h("button", { class: "danger", value: "purge" }, "Purge"), " ",
        h("button", { class: "plain", value: "cancel", formnovalidate: true }, "Cancel")));
    return h("section", { class: "panel", id: "dlq" }, h("h2", {}, "Dead letters"),
      h("p", { class: "muted" }, "Each message keeps its source queue, deliveries and errors (history column). Redrive sends messages back to their source queue at the rate given."),
      h("div", { class: "inline" }, h("label", {}, "rate/s ", rate),
        h("button", { id: "redrive-selected", onclick: redrive(true) }, "Redrive selected"),
        h("button", { id: "redrive-all", class: "plain", onclick: redrive(false) }, "Redrive all"),
        progress, status,
        h("button", { class: "danger", id: "purge", onclick: () => { confirmInput.value = ""; dialog.showModal(); } }, "Purge…")),
      note, dialog);
  })() : null;

  put(main, 
    h("h1", {}, `Queue ${name}`, " ", isDlq ? h("span", { class: "tag" }, "dead-letter queue") : null),
    region("stats"),
    region("charts"),
    h("div", { class: "two" },
      h("section", { class: "panel" }, h("h2", {}, "Publish"), publish),
      h("section", { class: "panel" }, h("h2", {}, "Receive"), receive, leased)),
    dlqPanel,
    h("section", { class: "panel" }, h("h2", {}, isDlq ? "Messages" : "Waiting messages (peek: not leased)"),
      h("button", { class: "plain", onclick: () => browseMore(true) }, "Refresh"), browse),
    h("section", { class: "panel" }, h("h2", {}, "Configuration and policies"), configForm));
  browseMore(true).catch((err) => put(browse, errorBox(err)));

  every(async () => {
    // The first page follows the queue, unless the user is choosing messages on it.
    if (from === 0 && !browse.querySelector("input.pick:checked")) browseMore(true).catch(() => {});
    const [q, history] = await Promise.all([api("GET", queuePath(name)), api("GET", `${queuePath(name)}/history`)]);
    const st = q.stats;
    const policy = [];
    if (st.keys_in_flight !== undefined) policy.push(card("keys in flight", fmt.n(st.keys_in_flight), "keys_in_flight"), card("keys blocked", fmt.n(st.keys_blocked), "keys_blocked"));
    if (st.fair_flows !== undefined) policy.push(card("fair flows waiting", fmt.n(st.fair_flows), "fair_flows"));
    if (st.waiting_by_priority) policy.push(card("waiting by priority", st.waiting_by_priority.join(" / "), "waiting_by_priority"));
    if (st.coalesce_windows !== undefined) policy.push(card("coalescing windows", fmt.n(st.coalesce_windows), "coalesce_windows"));
    if (st.dispatch_rate_per_s !== undefined) policy.push(card("dispatch rate", fmt.rate(st.dispatch_rate_per_s), "dispatch_rate"));
    const tenants = Object.entries(q.quota_refused || {});
    const dlqName = q.config.dead_letter_queue;
    // Where messages wait, by key and by fairness value (only with those policies).
    const busiest = st.keys_in_flight !== undefined || st.fair_flows !== undefined
      ? await api("GET", `${queuePath(name)}/busiest?limit=10`).catch(() => null) : null;
    const keyLabel = (k) => k.key !== null ? k.key : h("span", { class: "mono" }, `base64:${k.key_base64}`);
    const waitTable = (id, title, heads, rows, none) => h("div", { class: "panel", id },
      h("h2", {}, title), rows.length === 0 ? h("p", { class: "muted" }, none) : h("table", {},
        h("thead", {}, h("tr", {}, heads.map((c, i) => h("th", { class: i ? "num" : "" }, c)))), h("tbody", {}, rows)));
    fill("stats",
      h("div", { class: "grid" },
        card("depth", fmt.n(st.depth), "depth"), card("in flight", fmt.n(st.in_flight), "in_flight"),
        card("delayed", fmt.n(st.delayed), "delayed"), card("oldest", fmt.ms(st.oldest_age_ms), "oldest_age"),
        card("published", fmt.n(st.published), "published"), card("acked", fmt.n(st.acked), "acked"),
        card("nacked", fmt.n(st.nacked), "nacked"), card("dead-lettered", fmt.n(st.dead_lettered), "dead_lettered")),
      h("div", {}, forecastTag(st.forecast), " ",
        dlqName ? h("span", {}, "dead letters go to ", h("a", { href: `#/queues/${enc(dlqName)}` }, dlqName)) : null),
      forecastCards(st.forecast),
      policy.length ? h("div", {}, h("h2", {}, "Policies at work"), h("div", { class: "grid" }, policy)) : null,
      busiest && busiest.keys ? waitTable("busiest-keys", "Busiest keys (key_concurrency)", ["key", "in flight", "waiting"],
        busiest.keys.map((k) => h("tr", { "data-key": k.key_base64 }, h("td", {}, keyLabel(k)), h("td", { class: "num" }, fmt.n(k.in_flight)), h("td", { class: "num" }, fmt.n(k.waiting)))), "No key holds a message.") : null,
      busiest && busiest.flows ? waitTable("busiest-flows", `Waiting by ${busiest.fair_by} (fairness)`, [busiest.fair_by, "waiting", "weight"],
        busiest.flows.map((f) => h("tr", { "data-flow": f.flow }, h("td", {}, f.flow), h("td", { class: "num" }, fmt.n(f.waiting)), h("td", { class: "num" }, String(f.weight)))),
        "Nothing sorted for fair scheduling now: messages are sorted as receives look ahead, and those held behind their key wait there.") : null,
      tenants.length ? h("div", { class: "panel" }, h("h2", {}, "Publishes refused by quota, per tenant"),
        h("table", {}, h("tbody", {}, tenants.map(([t, n]) => h("tr", { "data-tenant": t }, h("td", {}, t), h("td", { class: "num" }, fmt.n(n))))))) : null);
    fill("charts", h("section", { class: "panel" }, historyCharts(history)));
  });
}

// ---- streams, subscriptions, groups ----

async function streamPage(name) {
  put(document.getElementById("main"), h("h1", {}, `Stream ${name}`), region("stream"), region("stream-subs"));
  every(async () => {
    const [st, subs] = await Promise.all([api("GET", `/v1/streams/${enc(name)}`), api("GET", `/v1/streams/${enc(name)}/subscriptions`)]);
    fill("stream", h("section", { class: "panel" }, h("h2", {}, "Partitions"), h("table", {},
      h("thead", {}, h("tr", {}, ["partition", "start offset", "end offset", "records", "segments", "bytes"].map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
      h("tbody", {}, st.partitions.map((p) => h("tr", { "data-partition": p.partition },
        h("td", {}, p.partition), h("td", { class: "num" }, fmt.n(p.start_offset)), h("td", { class: "num" }, fmt.n(p.end_offset)),
        h("td", { class: "num" }, fmt.n(p.end_offset - p.start_offset)), h("td", { class: "num" }, p.segments), h("td", { class: "num" }, fmt.bytes(p.bytes)))))),
      h("h2", {}, "Configuration"), h("pre", { class: "mono" }, JSON.stringify(st.config, null, 2))));
    fill("stream-subs", h("section", { class: "panel" }, h("h2", {}, "Subscriptions"), subs.subscriptions.length === 0 ? h("p", { class: "muted" }, "None.") :
      h("ul", {}, subs.subscriptions.map((sub) => h("li", {}, h("a", { href: `#/subscriptions/${enc(name)}/${enc(sub.name)}` }, sub.name), " ", forecastTag(sub.stats.forecast))))));
  });
}

async function subscriptionPage(stream, sub) {
  put(document.getElementById("main"), h("h1", {}, `Subscription ${stream}/${sub}`), region("sub"), region("sub-charts"));
  every(async () => {
    const [info, history] = await Promise.all([api("GET", subPath(stream, sub)), api("GET", `${subPath(stream, sub)}/history`)]);
    const st = info.stats;
    fill("sub", h("div", { class: "grid" },
      card("backlog", fmt.n(st.total), "backlog"), card("ready", fmt.n(st.depth), "depth"), card("in flight", fmt.n(st.in_flight), "in_flight"),
      card("oldest", fmt.ms(st.oldest_age_ms), "oldest_age"), card("acked", fmt.n(st.acked), "acked"), card("dead-lettered", fmt.n(st.dead_lettered), "dead_lettered")),
      forecastCards(st.forecast),
      h("section", { class: "panel" }, h("h2", {}, "Place in each partition"), h("table", {},
        h("thead", {}, h("tr", {}, ["partition", "floor", "end", "pending"].map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
        h("tbody", {}, info.partitions.map((p) => h("tr", {}, h("td", {}, p.partition), h("td", { class: "num" }, fmt.n(p.floor)), h("td", { class: "num" }, fmt.n(p.end)), h("td", { class: "num" }, fmt.n(p.pending))))))));
    fill("sub-charts", h("section", { class: "panel" }, historyCharts(history)));
  });
}

async function groupPage(name) {
  const note = h("div", { id: "reset-result" });
  const target = h("select", { name: "to" }, ["earliest", "latest", "datetime", "offset", "shift-by"].map((t) => h("option", { value: t }, t)));
  const value = h("input", { name: "value", placeholder: "time (RFC 3339) or number" });
  const reset = (dry) => async (e) => {
    e.preventDefault();
    put(note, );
    const body = { dry_run: dry };
    const v = value.value.trim();
    if (target.value === "earliest" || target.value === "latest") body.to = target.value;
    else if (target.value === "datetime") body.to_datetime = v;
    else if (target.value === "offset") body.to_offset = Number(v);
    else body.shift_by = Number(v);
    try {
      const reply = await api("POST", `/v1/groups/${enc(name)}/offsets/reset`, body);
      put(note, h("div", { class: "notice" }, dry ? "Dry run: nothing changed." : "Offsets reset."),
        h("table", {}, h("tbody", {}, reply.offsets.map((o) => h("tr", {}, h("td", {}, `${o.stream}/${o.partition}`), h("td", { class: "num" }, o.from === null ? "-" : fmt.n(o.from)), h("td", {}, "→"), h("td", { class: "num" }, fmt.n(o.to)))))));
    } catch (err) { put(note, errorBox(err)); }
  };
  put(document.getElementById("main"), h("h1", {}, `Group ${name}`), region("group"), region("group-charts"),
    h("section", { class: "panel" }, h("h2", {}, "Reset offsets"),
      h("p", { class: "muted" }, "Only while the group has no members. A dry run shows what would change."),
      h("form", { class: "inline", id: "reset", onsubmit: reset(false) }, target, value,
        h("button", { type: "button", class: "plain", onclick: reset(true) }, "Dry run"), h("button", { type: "submit" }, "Reset")), note));
  every(async () => {
    const [info, fc, history] = await Promise.all([api("GET", `/v1/groups/${enc(name)}`), api("GET", `/v1/groups/${enc(name)}/forecast`).catch(() => null), api("GET", `/v1/groups/${enc(name)}/history`).catch(() => ({ samples: [] }))]);
    const owner = new Map();
    for (const m of info.members) for (const a of m.assigned) owner.set(`${a.stream}/${a.partition}`, m.member);
    fill("group",
      h("div", { class: "grid" }, card("members", info.members.length, "members"), card("generation", info.generation, "generation"),
        card("lag", fmt.n(info.offsets.reduce((a, o) => a + o.lag, 0)), "lag")),
      forecastCards(fc && fc.forecast),
      h("section", { class: "panel" }, h("h2", {}, "Lag per partition"), h("table", {},
        h("thead", {}, h("tr", {}, ["partition", "committed", "end", "lag", "lag age", "member"].map((c, i) => h("th", { class: i && i < 5 ? "num" : "" }, c)))),
        h("tbody", {}, info.offsets.map((o) => h("tr", { "data-partition": `${o.stream}/${o.partition}` },
          h("td", {}, `${o.stream}/${o.partition}`), h("td", { class: "num" }, fmt.n(o.committed)), h("td", { class: "num" }, fmt.n(o.end_offset)),
          h("td", { class: "num lag" }, fmt.n(o.lag)), h("td", { class: "num" }, fmt.ms(o.lag_ms)), h("td", { class: "mono" }, owner.get(`${o.stream}/${o.partition}`) || "-")))))));
    fill("group-charts", h("section", { class: "panel" }, h("h2", {}, "Lag, last hour"), chart(history.samples || [], [{ value: (p) => p.backlog }], { label: "lag" }), legend(["lag"])));
  });
}

// ---- routing ----

async function route() {
  if (signingIn) return;
  stopRefresh();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const main = document.getElementById("main");
  try {
    await showWho();
    if (signingIn) return;
    if (parts[0] === "queues" && parts[1]) await queuePage(parts[1]);
    else if (parts[0] === "streams" && parts[1]) await streamPage(parts[1]);
    else if (parts[0] === "subscriptions" && parts[2]) await subscriptionPage(parts[1], parts[2]);
    else if (parts[0] === "groups" && parts[1]) await groupPage(parts[1]);
    else await overview();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) put(main, h("h1", {}, "Not available"), errorBox(err), h("a", { href: "#/" }, "Back to the overview"));
  }
}

window.addEventListener("hashchange", route);
route();
