// The crossvit-serve page: sends each chosen image to /v1/classify and shows what came back.
"use strict";

const TOP_K = 5;          // predictions shown per image
const BRANCH_TOP = 3;     // predictions shown per branch
const CONCURRENCY = 2;    // requests in flight
const KEY_STORAGE = "crossvit-api-key";

const $ = (selector, root = document) => root.querySelector(selector);
const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  queue: [],         // [file, card] waiting to be sent
  running: 0,
  waitingForKey: [], // [file, card] that got 401
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, init = {}) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const response = await fetch(path, { ...init, headers });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : {};
    throw new ApiError(response.status, error.code || "http_error", error.message || `HTTP ${response.status}`);
  }
  return body;
}

function askForKey(message) {
  const form = $("#key-form");
  const firstTime = form.hidden;
  form.hidden = false;
  $("#key-message").textContent = message;
  if (firstTime) $("#api-key").focus();
}

async function loadModel() {
  try {
    const card = await api("/v1/models");
    const file = (card.weights.path || "").split("/").pop();
    const weights = card.weights.pretrained
      ? `weights ${file} (sha256 ${(card.weights.sha256 || "").slice(0, 12)}…)`
      : "random weights";
    const workers = `${card.worker_count} worker${card.worker_count === 1 ? "" : "s"}`;
    $("#model").textContent = `${card.name} · ${weights} · ${workers} (${card.precision.join(", ") || "starting"})`;
    $("#weights-warning").hidden = card.weights.pretrained;
    $("#key-form").hidden = true;
  } catch (error) {
    if (error.status === 401) {
      $("#model").textContent = "This server needs an API key.";
      askForKey(error.message);
    } else {
      $("#model").textContent = `Cannot read the model: ${error.message}`;
    }
  }
}

function percent(p) {
  return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
}

function fillBars(list, predictions) {
  list.replaceChildren(...predictions.map((p) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(p.probability);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.min(100, p.probability * 100)}%`;
    bar.append(fill);
    item.append(label, pct, bar);
    return item;
  }));
}

function showResult(card, result, timing) {
  $(".meta", card).textContent += ` · ${result.width} × ${result.height} px`;
  fillBars($(".top5", card), result.predictions);
  const agreement = $(".agreement", card);
  const agree = result.agreement.top1_agree;
  const verdict = document.createElement("strong");
  verdict.className = agree ? "agree" : "disagree";
  verdict.textContent = agree ? "Branches agree" : "Branches disagree";
  agreement.className = `agreement ${agree ? "agree" : "disagree"}`;
  agreement.replaceChildren(
    verdict,
    agree ? " on the top class" : " on the top class: worth a second look",
    ` · Jensen-Shannon divergence ${result.agreement.js_divergence.toFixed(3)} (0 same, 1 disjoint)`,
  );
  for (const branch of result.branches || []) {
    const section = $(`.branch[data-branch="${branch.branch}"]`, card);
    $("h3", section).textContent = `Branch ${branch.branch} · ${branch.resolution} px`;
    fillBars($("ol", section), branch.predictions.slice(0, BRANCH_TOP));
  }
  $(".timing", card).replaceChildren(...["decode", "queue", "inference", "total"].map((stage) => {
    const row = document.createElement("div");
    const name = document.createElement("dt");
    name.textContent = stage;
    const value = document.createElement("dd");
    value.textContent = `${timing[stage].toFixed(1)} ms`;
    row.append(name, value);
    return row;
  }));
  $(".answer", card).hidden = false;
  $(".error", card).hidden = true;
  card.setAttribute("aria-busy", "false");
}

function showError(card, error) {
  const message = $(".error", card);
  message.textContent = error.code ? `${error.message} (${error.code})` : error.message;
  message.hidden = false;
  card.setAttribute("aria-busy", "false");
}

async function classify(file, card) {
  const body = new FormData();
  body.append("images", file, file.name);
  try {
    const reply = await api(`/v1/classify?top_k=${TOP_K}&branches=true`, { method: "POST", body });
    showResult(card, reply.results[0], reply.timing_ms);
  } catch (error) {
    if (error.status === 401) {
      state.waitingForKey.push([file, card]);
      askForKey(error.message);
    }
    showError(card, error);
  }
}

function pump() {
  while (state.running < CONCURRENCY && state.queue.length) {
    const [file, card] = state.queue.shift();
    state.running += 1;
    classify(file, card).finally(() => {
      state.running -= 1;
      status();
      pump();
    });
  }
  status();
}

function status() {
  const pending = state.queue.length + state.running;
  $("#status").textContent = pending ? `Classifying ${pending} image${pending === 1 ? "" : "s"}…` : "";
}

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const thumb = $(".thumb", card);
  thumb.addEventListener("error", () => { thumb.hidden = true; });  // not an image the browser can show
  thumb.src = URL.createObjectURL(file);
  $(".name", card).textContent = file.name;
  $(".meta", card).textContent = `${Math.max(1, Math.round(file.size / 1024))} KB`;
  card.setAttribute("aria-busy", "true");
  return card;
}

function add(files) {
  const cards = files.map((file) => [file, newCard(file)]);
  $("#results").prepend(...cards.map(([, card]) => card));  // newest choice first, in the order chosen
  state.queue.push(...cards);
  pump();
}

function setUp() {
  const input = $("#files");
  input.addEventListener("change", () => {
    add([...input.files]);
    input.value = "";
  });
  const drop = $("#drop");
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    add([...event.dataTransfer.files].filter((f) => f.type.startsWith("image/") || f.type === ""));
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("#key-message").textContent = "";
    const retry = state.waitingForKey.splice(0);
    for (const [, card] of retry) {
      card.setAttribute("aria-busy", "true");
      $(".error", card).hidden = true;
    }
    state.queue.push(...retry);
    loadModel();
    pump();
  });
  loadModel();
}

setUp();
