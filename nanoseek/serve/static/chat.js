// The nanoseek web chat: one conversation, streamed from /v1/chat/completions. No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, needsKey: false };
const saved = JSON.parse(localStorage.getItem("nanoseek-settings") || "{}");

for (const [id, value] of Object.entries(saved)) if ($(id)) $(id).value = value;

function saveSettings() {
  const settings = {};
  for (const id of ["system", "temperature", "max-tokens", "api-key"]) settings[id] = $(id).value;
  localStorage.setItem("nanoseek-settings", JSON.stringify(settings));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function openSettings(open) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

// An assistant message: reasoning inside <think>...</think> goes into a folded <details>.
function render(bubble, text) {
  const start = text.indexOf("<think>");
  let thinking = null, answer = text;
  if (start >= 0) {
    const end = text.indexOf("</think>", start);
    thinking = end >= 0 ? text.slice(start + 7, end) : text.slice(start + 7);
    answer = text.slice(0, start) + (end >= 0 ? text.slice(end + 8) : "");
  }
  let details = bubble.querySelector("details");
  if (thinking !== null && !details) {
    details = document.createElement("details");
    details.innerHTML = "<summary>Thinking</summary><div class=\"thinking\"></div>";
    bubble.prepend(details);
  }
  if (details) details.querySelector(".thinking").textContent = thinking.trim();
  bubble.querySelector(".answer").textContent = answer.replace(/^\s+/, "");
}

function addMessage(role, text) {
  const bubble = document.createElement("div");
  bubble.className = "message " + role;
  const answer = document.createElement("div");
  answer.className = "answer";
  bubble.append(answer);
  if (role === "assistant") render(bubble, text);
  else answer.textContent = text;
  $("messages").append(bubble);
  $("messages").scrollTop = $("messages").scrollHeight;
  return bubble;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  showError("");
  $("prompt").value = "";
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const stats = document.createElement("div");
  stats.className = "stats";
  bubble.append(stats);

  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const sent = performance.now();
  let reply = "", first = null, last = null, chunks = 0, tokens = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const message = await errorText(response);
      if (response.status === 401) {
        openSettings(true);
        showError("The server needs an API key: " + message);
      } else showError(message);
      bubble.remove();
      state.messages.pop();
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          chunks += 1;
          reply += delta.content;
          render(bubble, reply);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(String(e.message || e));
  } finally {
    state.controller = null;
    setBusy(false);
  }
  const n = tokens !== null ? tokens : chunks;
  if (first !== null) {
    const rate = last > first && n > 1 ? ((n - 1) * 1000) / (last - first) : 0;
    stats.textContent = `${n} tokens · ${rate.toFixed(1)} tokens/s · first token ${Math.round(first - sent)} ms` +
      (controller.signal.aborted ? " · stopped" : "");
  } else if (controller.signal.aborted) stats.textContent = "stopped";
  state.messages.push({ role: "assistant", content: reply });
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
  $("prompt").focus();
});
$("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
for (const id of ["system", "temperature", "max-tokens", "api-key"]) $(id).addEventListener("change", saveSettings);

function showModel() {
  fetch("/v1/models", { headers: headers() }).then((r) => (r.ok ? r.json() : null)).then((models) => {
    $("model-name").textContent = models && models.data.length ? models.data[0].id : "";
  }).catch(() => {});
}
$("api-key").addEventListener("input", showModel);

// Whether the server wants a key (then the settings open on the key), and the model's name.
fetch("/health").then((r) => r.json()).then((health) => {
  state.needsKey = health.auth;
  if (health.auth && !$("api-key").value) openSettings(true);
  showModel();
}).catch(() => {});
