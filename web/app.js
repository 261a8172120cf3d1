// The serve page: chat for text models, image inspection with confidence bars for vision models.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value || localStorage.getItem("apiKey") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function load() {
  const resp = await fetch("/v1/info", { headers: headers() });
  if (resp.status === 401) {
    $("key-box").hidden = false;
    showError("This server needs an API key: enter it above.");
    return;
  }
  if (!resp.ok) { showError(await errorText(resp)); return; }
  info = await resp.json();
  showError("");
  $("model").replaceChildren(...info.models.map((m) => new Option(m, m)));
  $(info.model_type === "vlm" ? "inspect" : "chat").hidden = false;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").append(div);
  return div;
}

const history = [];

async function sendChat(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  $("send").disabled = true;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true }),
    });
    if (!resp.ok) { showError(await errorText(resp)); out.remove(); history.pop(); return; }
    showError("");
    // Server-sent events: "data: {...}" lines, ending with "data: [DONE]".
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) { showError(msg.error.message); continue; }
        const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
        if (delta && delta.content) out.textContent += delta.content;
      }
    }
    history.push({ role: "assistant", content: out.textContent });
  } catch (e) {
    showError("The request failed: " + e.message);
  } finally {
    $("send").disabled = false;
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function drawBars(fields) {
  const box = $("confidence");
  box.replaceChildren();
  for (const [name, p] of Object.entries(fields || {})) {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.dataset.field = name;
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    const value = document.createElement("span");
    value.textContent = p.toFixed(3);
    row.append(label, bar, value);
    box.append(row);
  }
}

async function inspect() {
  const file = $("image").files[0];
  if (!file) return;
  $("answer").textContent = "";
  $("confidence").replaceChildren();
  $("overall").textContent = "";
  $("preview").removeAttribute("src");
  const url = await readAsDataURL(file);
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("model").value,
      messages: [{ role: "user", content: [{ type: "image_url", image_url: { url } }] }] }),
  });
  if (!resp.ok) { showError(await errorText(resp)); return; }
  showError("");
  $("preview").src = url;
  const body = await resp.json();
  const choice = body.choices[0];
  let shown = choice.message.content;
  try { shown = JSON.stringify(JSON.parse(shown), null, 2); } catch (e) { /* shown as the model wrote it */ }
  $("answer").textContent = shown;
  drawBars(choice.field_confidence);
  $("overall").textContent = choice.confidence == null ? "" :
    "overall confidence " + choice.confidence.toFixed(3) + " (product of the fields' probabilities)";
}

$("chat-form").addEventListener("submit", sendChat);
$("image").addEventListener("change", () => inspect().catch((e) => showError("The request failed: " + e.message)));
$("key").addEventListener("change", () => { localStorage.setItem("apiKey", $("key").value); load(); });
load().catch((e) => showError("Cannot reach the server: " + e.message));
