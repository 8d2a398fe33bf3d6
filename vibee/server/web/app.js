// vibee's page: a playground that streams chat or raw completions with the sampling knobs (each
// token coloured by its probability), and a dashboard of the server's stats and metrics.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 120; // dashboard samples kept: two minutes at one a second
let mode = "chat";
let model = null;
let running = null; // the AbortController of the request being streamed
const chat = []; // the conversation so far: {role, content}

$("api-key").value = localStorage.getItem("vibee-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("vibee-api-key", $("api-key").value));

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

async function connect() {
  try {
    const models = await getJSON("/v1/models");
    model = models.data[0].id;
    $("model").textContent = model;
    $("model").dataset.ready = "1";
  } catch (err) {
    $("model").textContent = "not connected: " + err.message;
  }
}

// ---- playground -----------------------------------------------------------------------------

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    mode = tab.dataset.mode;
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    $("chat-log").hidden = mode !== "chat";
  });
}

function knob(id, parse) {
  const text = $(id).value.trim();
  return text === "" ? undefined : parse(text);
}

function requestBody(prompt) {
  const body = {
    model, stream: true, max_tokens: knob("max-tokens", parseInt), temperature: knob("temperature", parseFloat),
    top_p: knob("top-p", parseFloat), top_k: knob("top-k", parseInt), seed: knob("seed", parseInt),
    stream_options: { include_usage: true },
  };
  if (mode === "chat") {
    body.messages = chat.concat([{ role: "user", content: prompt }]);
    body.logprobs = true;
  } else {
    body.prompt = prompt;
    body.logprobs = 0;
  }
  return body;
}

// A token's background: from red (unlikely) to green (likely), by its probability.
function tokenColour(logprob) {
  const p = Math.exp(logprob);
  return `hsla(${Math.round(120 * p)}, 75%, 60%, 0.35)`;
}

function appendToken(text, logprob) {
  const out = $("output");
  if (logprob === undefined || logprob === null || !$("color-logprobs").checked) {
    out.append(document.createTextNode(text));
    return;
  }
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.dataset.logprob = String(logprob);
  span.title = `p = ${Math.exp(logprob).toFixed(3)} (logprob ${logprob.toFixed(3)})`;
  span.style.background = tokenColour(logprob);
  out.append(span);
}

// The tokens of one streamed chunk, as (text, logprob) pairs.
function chunkTokens(choice) {
  if (mode === "chat") {
    const entries = choice.logprobs && choice.logprobs.content;
    if (entries && entries.length) return entries.map((e) => [e.token, e.logprob]);
    return choice.delta && choice.delta.content ? [[choice.delta.content, null]] : [];
  }
  const lp = choice.logprobs;
  if (lp && lp.tokens && lp.tokens.length) return lp.tokens.map((t, i) => [t, lp.token_logprobs[i]]);
  return choice.text ? [[choice.text, null]] : [];
}

function addMessage(role, content) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  div.append(who, document.createTextNode(content));
  $("chat-log").append(div);
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt || running) return;
  $("error").hidden = true;
  $("output").textContent = "";
  $("output").dataset.chunks = "0";
  $("output").dataset.done = "";
  $("status").textContent = "streaming…";
  $("send").disabled = true;
  $("stop").disabled = false;
  running = new AbortController();
  const path = mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
  let text = "";
  let finish = null;
  let usage = null;
  const started = performance.now();
  try {
    const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(requestBody(prompt)),
                                     signal: running.signal });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message || String(obj.error));
          if (obj.usage) usage = obj.usage;
          for (const choice of obj.choices || []) {
            for (const [token, logprob] of chunkTokens(choice)) {
              text += token;
              appendToken(token, logprob);
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          $("output").dataset.chunks = String(Number($("output").dataset.chunks) + 1);
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    $("status").textContent = `${finish || "done"}` + (tokens ? ` · ${tokens} tokens in ${seconds.toFixed(2)} s` : "");
    if (mode === "chat") {
      chat.push({ role: "user", content: prompt }, { role: "assistant", content: text });
      addMessage("user", prompt);
      addMessage("assistant", text);
      $("prompt").value = "";
    }
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      $("error").textContent = err.message;
      $("error").hidden = false;
      $("status").textContent = "failed";
    }
  } finally {
    $("output").dataset.done = finish || "stopped";
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("send").addEventListener("click", send);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => {
  chat.length = 0;
  $("chat-log").textContent = "";
  $("output").textContent = "";
  $("status").textContent = "";
});

// ---- dashboard ------------------------------------------------------------------------------

// Each tile: an id, a label, how to read it from (stats, metrics), and how to show it.
const TILES = [
  ["running", "running requests", (s) => s.requests.running, (v) => v.toFixed(0)],
  ["waiting", "waiting requests", (s) => s.requests.waiting, (v) => v.toFixed(0)],
  ["batch", "batch size (recent)", (s) => s.batching.recent_avg_batch_size, (v) => v.toFixed(1)],
  ["gen-tps", "generated tokens/s", (s) => s.throughput.recent_generation_tokens_per_s, (v) => v.toFixed(1)],
  ["prefill-tps", "prefill tokens/s", (s) => s.throughput.recent_prefill_tokens_per_s, (v) => v.toFixed(1)],
  ["kv", "KV cache used", (s) => 100 * s.kv_cache.usage, (v) => v.toFixed(1) + " %"],
  ["prefix-hits", "prefix cache hits", (s) => 100 * s.kv_cache.prefix_cache_hit_rate, (v) => v.toFixed(1) + " %"],
  ["acceptance", "draft acceptance",
    (s) => (s.speculative_decoding && s.speculative_decoding.enabled ? 100 * (s.speculative_decoding.acceptance_rate || 0) : null),
    (v) => v.toFixed(1) + " %"],
  ["finished", "requests finished", (s) => s.requests.finished, (v) => v.toFixed(0)],
  ["ttft", "mean time to first token", (s, m) => (m.ttft_count ? 1000 * m.ttft_sum / m.ttft_count : null),
    (v) => v.toFixed(1) + " ms"],
];
const series = Object.fromEntries(TILES.map(([id]) => [id, []]));

function buildTiles() {
  for (const [id, label] of TILES) {
    const tile = document.createElement("div");
    tile.className = "stat";
    tile.innerHTML = `<div class="label"></div><div class="value" id="stat-${id}">–</div><canvas id="spark-${id}" width="240" height="40"></canvas>`;
    tile.querySelector(".label").textContent = label;
    $("stats").append(tile);
  }
}

// The figures of the Prometheus text the dashboard shows (sums over label sets).
function parseMetrics(text) {
  const want = { "vibee:time_to_first_token_seconds_sum": "ttft_sum", "vibee:time_to_first_token_seconds_count": "ttft_count" };
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const name = line.split(/[{ ]/)[0];
    if (name in want) out[want[name]] = (out[want[name]] || 0) + parseFloat(line.slice(line.lastIndexOf(" ") + 1));
  }
  return out;
}

function drawSpark(id, values) {
  const canvas = $("spark-" + id);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const xs = values.filter((v) => v !== null);
  if (xs.length < 2) return;
  const max = Math.max(...xs, 1e-9);
  ctx.strokeStyle = "#2f6fed";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (HISTORY - 1)) * canvas.width;
    const y = canvas.height - 2 - ((v || 0) / max) * (canvas.height - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

async function poll() {
  try {
    const [stats, metricsText] = await Promise.all([
      getJSON("/v1/inference/stats"),
      fetch("/metrics").then((r) => r.text()),
    ]);
    const metrics = parseMetrics(metricsText);
    for (const [id, , read, show] of TILES) {
      const value = read(stats, metrics);
      const list = series[id];
      list.push(value === undefined ? null : value);
      if (list.length > HISTORY) list.shift();
      const el = $("stat-" + id);
      el.textContent = value === null || value === undefined ? "–" : show(value);
      el.dataset.value = value === null || value === undefined ? "" : String(value);
      drawSpark(id, list);
    }
    $("stats").dataset.polls = String(Number($("stats").dataset.polls || 0) + 1);
  } catch (err) {
    $("stats").dataset.error = err.message;
  }
}

buildTiles();
connect();
poll();
setInterval(poll, 1000);
