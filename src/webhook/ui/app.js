// precall status page: plain JS, no build step. Everything from the server is written
// with textContent (Call-IDs and numbers come from SIP peers and must not become HTML).
"use strict";

// fetch() refuses relative URLs when the page URL holds credentials
// (http://admin:pw@host/ui/), so every request is built from the bare origin; the
// browser adds the Basic credentials it has for this origin.
const api = (path) => window.location.origin + path;

function $(root, selector) { return root.querySelector(selector); }

function showError(text) {
  const p = document.getElementById("error");
  p.textContent = text;
  p.hidden = !text;
}

async function getJson(path) {
  const response = await fetch(api(path), { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// Clipboard API where the page is a secure context (HTTPS, localhost), else the old
// select-and-copy way.
async function copy(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    button.classList.add("copied");
    setTimeout(() => { button.textContent = label; button.classList.remove("copied"); }, 1200);
  } catch (e) {
    showError("copy failed: " + e);
  }
}

// One POSIX shell word (like `precall curl`).
function shellQuote(s) {
  if (s !== "" && /^[A-Za-z0-9_\-./:=@%+,]+$/.test(s)) return s;
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

function curlFor(agent, url) {
  const body = JSON.stringify({ agentId: agent.id, phoneNumber: "+14155550123", customer_name: "Ada" });
  const head = ["curl -sS -X POST", shellQuote(url),
                "-H", shellQuote("Authorization: Bearer " + agent.apiKey),
                "-H", shellQuote("Content-Type: application/json")];
  if (!agent.webhookSecret) {
    return head.concat(["-d", shellQuote(body)]).join(" ");
  }
  // A signed agent: the signature holds a timestamp, so the snippet computes it when it
  // runs (the same snippet as `precall curl`).
  return "body=" + shellQuote(body) + "; t=$(date +%s); " +
    "sig=$(printf '%s.%s' \"$t\" \"$body\" | openssl dgst -sha256 -hmac " +
    shellQuote(agent.webhookSecret) + " -r | cut -d' ' -f1); " +
    head.concat(["-H", "\"X-Precall-Signature: t=$t,v1=$sig\"", "-d", "\"$body\""]).join(" ");
}

function formatWait(ms) {
  return ms >= 1000 ? (ms / 1000) + " s" : ms + " ms";
}

async function runTest(card, agent) {
  const form = $(card, ".test-form");
  const errorLine = $(card, ".test-error");
  const result = $(card, ".test-result");
  errorLine.hidden = true;
  let context;
  try {
    context = JSON.parse(form.elements.context.value || "{}");
    if (context === null || typeof context !== "object" || Array.isArray(context)) throw new Error("not an object");
  } catch (e) {
    errorLine.textContent = "Context must be a JSON object (" + e.message + ")";
    errorLine.hidden = false;
    return;
  }
  const payload = Object.assign({}, context, { agentId: agent.id, phoneNumber: form.elements.phoneNumber.value });
  const response = await fetch(api("/ui/api/test"), {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  const answer = await response.json().catch(() => ({ error: "HTTP " + response.status }));
  if (!response.ok) {
    errorLine.textContent = answer.error || ("HTTP " + response.status);
    errorLine.hidden = false;
    result.hidden = true;
    return;
  }
  $(card, ".test-status").textContent = answer.status;
  $(card, ".test-route").textContent = answer.route ? answer.route.label : "none";
  const body = $(card, ".test-headers tbody");
  body.replaceChildren();
  for (const h of answer.headers) {
    const row = body.insertRow();
    row.className = "test-header";
    row.insertCell().textContent = h.name;
    row.insertCell().textContent = h.value;
  }
  result.hidden = false;
  card.dataset.tested = "yes";
}

function renderAgents(data) {
  const holder = document.getElementById("agents");
  const template = document.getElementById("agent-card");
  const url = window.location.origin + data.webhookPath;
  holder.replaceChildren();
  const cards = {};
  for (const agent of data.agents) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.agent = agent.id;
    $(card, ".agent-id").textContent = agent.id + (data.defaultAgent === agent.id ? " (default)" : "");
    $(card, ".numbers").textContent = agent.numbers.join(", ") || "—";
    $(card, ".webhook-url").textContent = url;
    $(card, ".masked-key").textContent = agent.maskedKey;
    $(card, ".fallback").textContent = formatWait(agent.fallbackWaitMs);
    $(card, ".upstreams").textContent = agent.upstreams.join(" → ");
    $(card, ".inject").textContent = agent.injectMode + (agent.routes ? ", " + agent.routes + " routing rules" : "");
    $(card, ".copy-url").addEventListener("click", (e) => copy(url, e.target));
    $(card, ".copy-curl").addEventListener("click", (e) => copy(curlFor(agent, url), e.target));
    $(card, ".copy-key").addEventListener("click", (e) => copy(agent.apiKey, e.target));
    $(card, ".test-form").addEventListener("submit", (e) => {
      e.preventDefault();
      runTest(card, agent).catch((err) => showError(String(err)));
    });
    holder.appendChild(card);
    cards[agent.id] = { card, agent };
  }
  document.getElementById("held").textContent = data.held;
  return cards;
}

function renderCalls(data) {
  document.getElementById("held").textContent = data.held;
  const body = $(document.getElementById("calls"), "tbody");
  body.replaceChildren();
  if (data.calls.length === 0) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = 8;
    cell.className = "muted";
    cell.textContent = "no calls yet";
    return;
  }
  for (const c of data.calls) {
    const row = body.insertRow();
    row.className = "call";
    const cells = [new Date(c.endedMs).toLocaleTimeString(), c.agent, c.caller, c.status,
                   c.waitMs + " ms", String(c.answer), c.outcome, c.callId];
    cells.forEach((text, i) => {
      const cell = row.insertCell();
      cell.textContent = text;
      if (i === 2 || i === 7) cell.className = "mono";
    });
  }
}

// `#test={"agentId":..., "phoneNumber":..., ...context}`: fill in and run that agent's Test.
function testFromFragment(cards) {
  const match = window.location.hash.match(/^#test=(.*)$/);
  if (!match) return;
  let wanted;
  try { wanted = JSON.parse(decodeURIComponent(match[1])); } catch (e) { showError("bad #test= link: " + e.message); return; }
  const entry = cards[wanted.agentId];
  if (!entry) { showError("#test=: no agent " + wanted.agentId); return; }
  const form = $(entry.card, ".test-form");
  const context = Object.assign({}, wanted);
  delete context.agentId;
  delete context.phoneNumber;
  if (wanted.phoneNumber) form.elements.phoneNumber.value = wanted.phoneNumber;
  form.elements.context.value = JSON.stringify(context);
  runTest(entry.card, entry.agent).catch((err) => showError(String(err)));
}

async function refreshCalls() {
  try {
    renderCalls(await getJson("/ui/api/calls"));
    showError("");
  } catch (e) {
    showError(String(e));
  }
}

async function start() {
  try {
    const cards = renderAgents(await getJson("/ui/api/agents"));
    testFromFragment(cards);
  } catch (e) {
    showError(String(e));
  }
  await refreshCalls();
  setInterval(refreshCalls, 2000);
}

start();
