// The live page: opens a realtime session (WS /v1/realtime/video), plays each fMP4 fragment as it arrives through
// Media Source Extensions, and sends steering prompts. No framework, no build step, nothing from the network.
"use strict";

const $ = (id) => document.getElementById(id);
// What the page saw, for people debugging and for the browser test.
const state = { chunks: [], acks: [], errors: [], mime: null, done: null };
window.helios = state;

let ws = null, mediaSource = null, buffer = null, pending = [], parts = [], finished = false;

// location.origin, not a relative URL: fetch refuses URLs with credentials (a page opened as http://user:key@host/).
fetch(new URL("/health", location.origin)).then((r) => r.json()).then((h) => { $("model").textContent = h.model; }).catch(() => {});

function showError(message) {
  state.errors.push(message);
  $("error").textContent = message;
  $("error").hidden = false;
}

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("steer").disabled = !running;
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the image"));
    reader.readAsDataURL(file);
  });
}

async function start(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("download").hidden = true;
  Object.assign(state, { chunks: [], acks: [], errors: [], mime: null, done: null });
  parts = []; pending = []; finished = false;
  const message = { type: "session.start", format: "m4s", prompt: $("prompt").value, size: $("size").value };
  if ($("seconds").value) message.seconds = Number($("seconds").value);
  if ($("seed").value !== "") message.seed = Number($("seed").value);
  if ($("image").files.length) message.image_reference = await readImage($("image").files[0]);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}/v1/realtime/video`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { ws.send(JSON.stringify(message)); $("status").textContent = "queued"; };
  ws.onmessage = (e) => (typeof e.data === "string" ? onMessage(JSON.parse(e.data)) : onFragment(e.data));
  ws.onclose = () => { setRunning(false); if (!state.done && !state.errors.length) showError("the connection closed"); };
  setRunning(true);
}

function onMessage(m) {
  if (m.type === "video.start") {
    state.mime = m.config.mime;
    if (!window.MediaSource || !MediaSource.isTypeSupported(m.config.mime)) {
      showError(`this browser cannot play ${m.config.mime} through Media Source Extensions`);
      return;
    }
    openMedia(m.config);
  } else if (m.type === "video.chunk_metadata") {
    state.chunks.push(m);
    $("progress").value = (100 * (m.chunk_index + 1)) / m.num_chunks;
    const p = m.prompt;
    $("status").textContent = `chunk ${m.chunk_index + 1} of ${m.num_chunks}`;
    $("now-prompt").textContent = `now: “${p.prompt}”` + (p.weight < 1 ? ` (blending in, ${Math.round(p.weight * 100)}%)` : "");
  } else if (m.type === "session.interaction.queued") {
    state.acks.push({ ...m, chunks_seen: state.chunks.length });
    $("status").textContent = "steering: the new prompt starts with the next chunk";
  } else if (m.type === "session.done") {
    state.done = m;
    finished = true;
    $("status").textContent = m.stopped ? "stopped" : "done";
    endIfDrained();
    const blob = new Blob(parts, { type: "video/mp4" });
    $("download").href = URL.createObjectURL(blob);
    $("download").hidden = false;
  } else if (m.type === "error") {
    showError(m.message);
  }
}

function openMedia(config) {
  mediaSource = new MediaSource();
  $("video").src = URL.createObjectURL(mediaSource);
  mediaSource.addEventListener("sourceopen", () => {
    buffer = mediaSource.addSourceBuffer(config.mime);
    buffer.mode = "segments";
    buffer.addEventListener("updateend", () => { trimBackBuffer(); appendNext(); });
    buffer.addEventListener("error", () => showError("the browser could not decode a chunk"));
    appendNext();
  }, { once: true });
}

function onFragment(data) {
  parts.push(data);
  pending.push(data);
  appendNext();
}

function appendNext() {
  if (!buffer || buffer.updating) return;
  if (pending.length) {
    buffer.appendBuffer(pending.shift());
    $("video").play().catch(() => {});
  } else {
    endIfDrained();
  }
}

function endIfDrained() {
  if (finished && buffer && !buffer.updating && !pending.length && mediaSource.readyState === "open") {
    mediaSource.endOfStream();
  }
}

// A long video would fill the browser's buffer quota: drop what played more than a minute ago.
function trimBackBuffer() {
  const video = $("video");
  if (!buffer.updating && buffer.buffered.length && video.currentTime - buffer.buffered.start(0) > 90) {
    buffer.remove(0, video.currentTime - 60);
  }
}

function steer(event) {
  event.preventDefault();
  const prompt = $("steer-prompt").value.trim();
  if (!ws || ws.readyState !== WebSocket.OPEN || !prompt) return;
  const transition = Number($("transition").value || 0);
  ws.send(JSON.stringify({ type: "session.interaction",
                           interaction: { event: { prompt }, transition_chunks: transition } }));
}

$("start-form").addEventListener("submit", start);
$("steer-form").addEventListener("submit", steer);
$("stop").addEventListener("click", () => ws && ws.send(JSON.stringify({ type: "session.stop" })));
