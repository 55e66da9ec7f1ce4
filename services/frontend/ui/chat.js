// The chat page: talks to this frontend's own OpenAI API (/v1/models, /v1/chat/completions).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let controller = null;  // the AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return "HTTP " + resp.status; }
}

let modelLoads = 0;  // loadModels calls so far: only the latest one's answer is shown

// Fills the model list from /v1/models, in one step (a request sent meanwhile never sees it
// empty), keeping the chosen model where it is still served.
async function loadModels() {
  const call = ++modelLoads;
  localStorage.setItem("pagedserve_api_key", $("api_key").value);
  const resp = await fetch("/v1/models", { headers: headers() });
  const cards = resp.ok ? (await resp.json()).data : null;
  const failure = resp.ok ? "" : "models: " + await errorText(resp);
  if (call !== modelLoads) return;  // a later call (another key) answers instead
  if (!cards) { setStatus(failure); return; }
  const select = $("model"), chosen = select.value;
  select.replaceChildren(...cards.map((card) => {
    const opt = document.createElement("option");
    opt.value = opt.textContent = card.id;
    return opt;
  }));
  if (cards.some((card) => card.id === chosen)) select.value = chosen;
  setStatus("");
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  return {
    model: $("model").value, messages: messages.concat(history), stream: true,
    stream_options: { include_usage: true }, temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value), max_tokens: parseInt($("max_tokens").value, 10),
  };
}

// Reads the SSE stream, appending each content delta to `div`; returns the completion tokens.
async function readStream(resp, div, started) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", tokens = 0, chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        div.textContent += delta.content;
        chunks += 1;
        const seconds = (performance.now() - started) / 1000;
        $("speed").textContent = (chunks / seconds).toFixed(1) + " tokens/s";
      }
    }
  }
  return tokens || chunks;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  const started = performance.now();
  let failed = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const tokens = await readStream(resp, div, started);
    const seconds = (performance.now() - started) / 1000;
    $("speed").textContent = tokens + " tokens in " + seconds.toFixed(1) + " s, " + (tokens / seconds).toFixed(1) + " tokens/s";
  } catch (e) {
    if (e.name === "AbortError") {
      $("speed").textContent += " (stopped)";
    } else {
      failed = true;
      div.classList.add("error");
      div.textContent += (div.textContent ? "\n" : "") + "Error: " + e.message;
    }
  } finally {
    if (failed) history.pop();  // the question goes unanswered: not part of the conversation
    else history.push({ role: "assistant", content: div.textContent });
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history.length = 0; $("messages").innerHTML = ""; $("speed").textContent = ""; });
$("api_key").addEventListener("change", loadModels);
$("api_key").value = localStorage.getItem("pagedserve_api_key") || "";
loadModels();
