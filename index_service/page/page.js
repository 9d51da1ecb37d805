// The page of the RETRO service: generate or explain, shade every token by what retrieval did to
// its log-probability, list each chunk's neighbours with their source, remove and restore documents.
// Plain DOM and fetch: no build step, nothing loaded from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let lastRun = null; // the last generate/explain call, rerun after a removal or a restoration

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function call(method, path, body) {
  const options = { method, headers: { ...authHeaders() } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(data.detail) ? data.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("; ") : data.detail;
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// Blue where retrieval raised a token's probability, red where it lowered it; full colour at ``scale``
// nats, the largest change in the result (stated in the legend), so that small effects are seen too.
function shade(delta, scale) {
  const alpha = Math.min(1, Math.abs(delta) / scale) * 0.85;
  return delta >= 0 ? `rgba(37, 99, 235, ${alpha.toFixed(3)})` : `rgba(220, 38, 38, ${alpha.toFixed(3)})`;
}

function tokenSpan(token, index, generatedFrom, scale) {
  const span = element("span", { class: "token", text: token.text });
  if (index >= generatedFrom) span.classList.add("generated");
  if (token.logprob !== null && token.logprob_no_retrieval !== null) {
    const delta = token.logprob - token.logprob_no_retrieval;
    span.dataset.delta = delta.toFixed(6);
    span.style.backgroundColor = shade(delta, scale);
    span.title = `log p with retrieval ${token.logprob.toFixed(3)}, without ${token.logprob_no_retrieval.toFixed(3)} (${delta >= 0 ? "+" : ""}${delta.toFixed(3)} nats)`;
  }
  return span;
}

function sourceLabel(source) {
  const where = source.position >= 0 ? `${source.source}:${source.position}` : source.source;
  const title = source.meta && (source.meta.title || source.meta.source);
  return title ? `${title} (${where})` : where;
}

function neighbourCard(n) {
  const remove = element("button", { class: "remove", type: "button", "data-doc-id": String(n.doc_id), text: "Remove this document from retrieval" });
  remove.addEventListener("click", () => changeDocument("delete", n.doc_id, remove));
  return element("div", { class: "neighbour", "data-doc-id": String(n.doc_id), "data-chunk-id": String(n.chunk_id) },
    element("div", { class: "meta", text: `${sourceLabel(n.source)} · document ${n.doc_id} · chunk ${n.chunk_id} · distance ${n.distance.toFixed(4)}${n.shift ? ` · read ${n.shift > 0 ? "+" : ""}${n.shift} tokens along` : ""}` }),
    element("div", { class: "text" }, element("span", { text: n.text }), element("span", { class: "continuation", text: n.continuation })),
    remove);
}

function render(result, generatedFrom) {
  const tokens = result.tokens || [];
  const scored = tokens.filter((t) => t.logprob !== null);
  const scale = Math.max(1e-3, ...scored.map((t) => Math.abs(t.logprob - t.logprob_no_retrieval)));
  $("scale").textContent = scored.length ? `· full colour: ${scale.toPrecision(2)} nats` : "";
  const chunks = $("chunks");
  chunks.replaceChildren();
  for (const chunk of result.chunks) {
    const end = chunk.index + 1 < result.chunks.length ? result.chunks[chunk.index + 1].start : tokens.length;
    const text = element("div", { class: "tokens" });
    if (tokens.length) tokens.slice(chunk.start, end).forEach((t, j) => text.append(tokenSpan(t, chunk.start + j, generatedFrom, scale)));
    else text.textContent = chunk.text;
    const neighbours = element("div", { class: "neighbours" });
    if (chunk.neighbours.length) chunk.neighbours.forEach((n) => neighbours.append(neighbourCard(n)));
    else neighbours.append(element("div", { class: "none", text: chunk.index === 0 ? "first chunk: conditioned on nothing" : "no neighbours" }));
    chunks.append(element("div", { class: "chunk", "data-index": String(chunk.index) },
      element("div", { class: "chunk-head", text: `chunk ${chunk.index} · tokens ${chunk.start}–${end - 1}` }), text, neighbours));
  }
  if (scored.length) {
    const mean = (key) => scored.reduce((s, t) => s + t[key], 0) / scored.length;
    $("summary").textContent = `${scored.length} tokens scored · mean log p with retrieval ${mean("logprob").toFixed(3)}, without ${mean("logprob_no_retrieval").toFixed(3)} nats`;
  } else $("summary").textContent = "";
  $("results").hidden = false;
  document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1); // how many results were shown
}

// ``done``: what led to this run (a removal, a restoration), said before its own result.
async function run(kind, done = "") {
  lastRun = kind;
  const button = $(kind);
  button.disabled = true;
  setStatus(kind === "generate" ? "generating…" : "explaining…");
  const started = performance.now();
  try {
    let result, generatedFrom = Infinity;
    if (kind === "generate") {
      result = await call("POST", "v1/generate", {
        prompt: $("prompt").value, max_new_tokens: Number($("max-new-tokens").value), temperature: Number($("temperature").value),
        top_k: Number($("top-k").value), seed: Number($("seed").value), retrieval: $("retrieval").checked, explain: true,
      });
      generatedFrom = result.prompt_tokens;
    } else {
      result = await call("POST", "v1/explain", { text: $("explain-text").value });
    }
    render(result, generatedFrom);
    setStatus(`${done}${kind === "generate" ? `generated ${result.generated_tokens} tokens` : "explained"} in ${((performance.now() - started) / 1000).toFixed(2)} s`);
  } catch (error) {
    setStatus(`${kind} failed: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// Removes ("delete") or restores a document through the audited endpoints, then reruns the last
// call so that the difference shows. A removal needs a reason; a restoration has a default one.
async function changeDocument(action, docId, button) {
  const [verb, past] = action === "delete" ? ["removing", "removed"] : ["restoring", "restored"];
  if (!$("token").value.trim()) return setStatus(`${verb} a document needs the admin token (Filtering the database, above)`, true);
  const reason = $("reason").value.trim() || (action === "restore" ? "restored from the page" : "");
  if (!reason) return setStatus("say why the document is removed (the reason goes to the audit log)", true);
  button.disabled = true;
  setStatus(`${verb} document ${docId}…`);
  try {
    const entry = await call("POST", `v1/documents/${action}`, { doc_ids: [docId], reason });
    const done = `document ${docId} ${past} (audit entry ${entry.seq}, ${entry.chunks} chunks); `;
    setStatus(done);
    await loadDeletions();
    if (lastRun) await run(lastRun, done);
  } catch (error) {
    setStatus(`${verb} document ${docId} failed: ${error.message}`, true);
    button.disabled = false;
  }
}

// The documents deleted now, replayed from the audit log (each entry deletes or restores some).
async function loadDeletions() {
  const deleted = new Map();
  for (let since = 0; ; ) {
    const page = await call("GET", `v1/deletions?since=${since}&limit=1000`);
    for (const entry of page.entries) {
      for (const doc of entry.doc_ids) {
        if (entry.action === "delete") deleted.set(doc, entry);
        else deleted.delete(doc);
      }
      since = entry.seq;
    }
    if (page.entries.length < 1000) break;
  }
  const list = $("deletions");
  list.replaceChildren();
  if (!deleted.size) list.append(element("li", { class: "none", text: "none" }));
  for (const [doc, entry] of [...deleted.entries()].sort((a, b) => a[0] - b[0])) {
    const restore = element("button", { class: "restore", type: "button", "data-doc-id": String(doc), text: "Restore" });
    restore.addEventListener("click", () => changeDocument("restore", doc, restore));
    list.append(element("li", { "data-doc-id": String(doc) },
      `document ${doc}: removed ${entry.time} by ${entry.actor} (“${entry.reason}”) `, restore));
  }
}

async function start() {
  try {
    info = await call("GET", "v1/info");
  } catch (error) {
    $("info").textContent = `cannot reach the service: ${error.message}`;
    return;
  }
  const model = info.model;
  $("info").textContent = `DB ${info.db}: ${info.chunks.toLocaleString()} chunks · ` + (model
    ? `model step ${model.step}, ${model.n_layer} layers × ${model.n_embd}, chunks of ${model.chunk_size} tokens, k = ${model.k}${model.retrieval ? "" : " (a baseline: no retrieval)"}`
    : "no model served (make serve RUN=runs/default): generation and explanation are off");
  if (!model) for (const id of ["generate", "explain"]) $(id).disabled = true;
  if (!info.admin) $("admin").querySelector(".hint").textContent = "Deleting is disabled on this service (no admin token configured).";
  $("generate-form").addEventListener("submit", (event) => { event.preventDefault(); run("generate"); });
  $("explain-form").addEventListener("submit", (event) => { event.preventDefault(); run("explain"); });
  await loadDeletions().catch((error) => setStatus(`deletions: ${error.message}`, true));
}

start();
