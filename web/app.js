// The serve page: chat for text models; for vision models, image inspection with confidence bars and the
// review tab (the run's review queue: fix a field from the label map's values, or accept the answer).
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
  const reviewed = Object.values(info.per_model || {}).some((m) => m.review);
  $("tabs").hidden = !(info.model_type === "vlm" && reviewed);
  if (!$("tabs").hidden) loadReview().catch((e) => showError("The review queue failed: " + e.message));
}

function showTab(name) {
  $("inspect").hidden = name !== "inspect";
  $("review").hidden = name !== "review";
  $("tab-inspect").classList.toggle("active", name === "inspect");
  $("tab-review").classList.toggle("active", name === "review");
  if (name === "review") loadReview().catch((e) => showError("The review queue failed: " + e.message));
}

function confidenceBar(p, low) {
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = (100 * (p || 0)).toFixed(1) + "%";
  if (low) fill.className = "low";
  bar.append(fill);
  return bar;
}

async function reviewImage(img, url) {
  // The image route needs the API key header, which an <img src> cannot send: fetched, shown as a blob.
  const resp = await fetch(url, { headers: headers() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function reviewCard(item) {
  const card = document.createElement("div");
  card.className = "item";
  card.dataset.id = item.id;
  const img = document.createElement("img");
  img.alt = "image " + item.id;
  reviewImage(img, item.image_url);
  const box = document.createElement("div");
  box.className = "fields";
  const title = document.createElement("p");
  title.textContent = item.model + " · overall confidence " +
    (item.confidence == null ? "-" : item.confidence.toFixed(3));
  box.append(title);
  const values = (info.per_model[item.model] || {}).fields || {};
  const selects = {};
  for (const [name, allowed] of Object.entries(values)) {
    const row = document.createElement("div");
    const doubtful = (item.review_fields || []).includes(name);
    row.className = "field-row" + (doubtful ? " doubtful" : "");
    row.dataset.field = name;
    const label = document.createElement("span");
    label.textContent = name;
    const select = document.createElement("select");
    select.name = name;
    for (const v of allowed) {
      const option = new Option(String(v), JSON.stringify(v));
      if (JSON.stringify(v) === JSON.stringify((item.answer || {})[name])) option.selected = true;
      select.append(option);
    }
    selects[name] = select;
    const p = (item.field_confidence || {})[name];
    const value = document.createElement("span");
    value.textContent = p == null ? "-" : p.toFixed(3);
    row.append(label, select, confidenceBar(p, doubtful), value);
    box.append(row);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const save = document.createElement("button");
  save.type = "button";
  save.className = "save";
  save.textContent = "Save correction";
  save.addEventListener("click", () => {
    const fields = {};
    for (const [name, select] of Object.entries(selects)) fields[name] = JSON.parse(select.value);
    resolveItem(card, { fields });
  });
  const accept = document.createElement("button");
  accept.type = "button";
  accept.className = "accept";
  accept.textContent = "Accept answer";
  accept.addEventListener("click", () => resolveItem(card, { accept: true }));
  actions.append(save, accept);
  box.append(actions);
  card.append(img, box);
  return card;
}

async function resolveItem(card, body) {
  for (const b of card.querySelectorAll("button")) b.disabled = true;
  try {
    const resp = await fetch("/v1/review/" + encodeURIComponent(card.dataset.id), {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!resp.ok) { showError(await errorText(resp)); return; }
    showError("");
    const done = await resp.json();
    $("review-status").textContent = "Saved " + done.file;
    card.remove();
    updateCount(-1);
  } finally {
    for (const b of card.querySelectorAll("button")) b.disabled = false;
  }
}

let waiting = 0;
function updateCount(delta) {
  waiting += delta;
  $("review-count").textContent = waiting ? "(" + waiting + ")" : "";
  $("review-empty").hidden = waiting > 0;
}

async function loadReview() {
  const resp = await fetch("/v1/review?limit=100", { headers: headers() });
  if (!resp.ok) { showError(await errorText(resp)); return; }
  const body = await resp.json();
  $("review-items").replaceChildren(...body.data.map(reviewCard));
  waiting = 0;
  updateCount(body.total);
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
  $("overall").textContent = (choice.confidence == null ? "" :
    "overall confidence " + choice.confidence.toFixed(3) + " (product of the fields' probabilities)") +
    (choice.needs_review ? "; needs review (" + (choice.review_fields || []).join(", ") + ")" :
      choice.needs_review === false ? "; accepted" : "");
  if (choice.review_id) updateCount(1);
}

$("chat-form").addEventListener("submit", sendChat);
$("tab-inspect").addEventListener("click", () => showTab("inspect"));
$("tab-review").addEventListener("click", () => showTab("review"));
$("image").addEventListener("change", () => inspect().catch((e) => showError("The request failed: " + e.message)));
$("key").addEventListener("change", () => { localStorage.setItem("apiKey", $("key").value); load(); });
load().catch((e) => showError("Cannot reach the server: " + e.message));
