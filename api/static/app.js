// The page's call: the microphone to /v1/realtime as 24 kHz PCM16, Moshi's audio to the player
// worklet, its text to the transcript. `window.lockstepStats` holds the live counters (the browser
// tests read them).

const MOSHI_RATE = 24000;
const $ = (id) => document.getElementById(id);
const SAMPLING = ["temperature", "top_k", "text_temperature", "text_top_k", "seed"];

const stats = window.lockstepStats = {
  state: "idle", calls: 0, sentFrames: 0, receivedSamples: 0, playedSamples: 0, bufferedMs: 0,
  underruns: 0, droppedSamples: 0, firstAudioMs: null, transcript: "", message: null, messageKind: null,
  downloadBytes: 0,
};
let call = null; // the call in progress
let config = { api_key_required: false, sampling: {} };

function setState(state, text) {
  stats.state = state;
  $("state").dataset.state = state;
  $("state").textContent = text;
  const button = $("connect");
  button.disabled = state === "connecting";
  button.textContent = state === "in-call" || state === "connecting" ? "Hang up" : "Connect";
  button.classList.toggle("hangup", state === "in-call" || state === "connecting");
}

function say(kind, text) {
  stats.message = text;
  stats.messageKind = kind;
  const box = $("message");
  box.textContent = text;
  box.className = kind === "info" ? "info" : "";
  box.hidden = !text;
}

const MESSAGES = {
  busy: "The server is busy: every session slot is taken. Try again in a moment.",
  key: "The server refused the API key. Enter the right key under Settings and connect again.",
  lost: "The connection to the server was lost.",
  mic: "The microphone is not available: allow this page to use it (the browser's address bar) and connect again.",
  insecure: "The browser gives the microphone only to secure pages: open this page over https:// (see the " +
            "server's --ssl-certfile) or from localhost.",
  draining: "The server is shutting down.",
  engine: "The server cannot take calls right now: its engine is unavailable. Try again later.",
};

async function loadConfig() {
  try {
    const r = await fetch("page-config.json");
    if (r.ok) config = await r.json();
  } catch (e) { /* the page still works with the defaults */ }
  $("key-row").hidden = !config.api_key_required;
  const s = config.sampling || {};
  for (const name of SAMPLING) if (s[name] !== null && s[name] !== undefined) $(name).placeholder = String(s[name]);
  $("greedy").checked = !!s.greedy;
  if (config.api_key_required) $("settings").open = true;
}

function realtimeUrl() {
  const url = new URL("v1/realtime", window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("model", "moshi");
  if ($("greedy").checked !== !!(config.sampling || {}).greedy) url.searchParams.set("greedy", $("greedy").checked);
  for (const name of SAMPLING) if ($(name).value !== "") url.searchParams.set(name, $(name).value);
  return url.toString();
}

function base64Pcm16(frame) {
  const pcm = new Int16Array(frame.length);
  for (let i = 0; i < frame.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(frame[i] * 32768)));
  let binary = "";
  const bytes = new Uint8Array(pcm.buffer);
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return [btoa(binary), pcm];
}

function pcm16FromBase64(b64) {
  const binary = atob(b64);
  const pcm = new Int16Array(binary.length >> 1);
  for (let i = 0; i < pcm.length; i++) pcm[i] = (binary.charCodeAt(2 * i) | (binary.charCodeAt(2 * i + 1) << 8)) << 16 >> 16;
  return pcm;
}

function level(id, samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const db = 10 * Math.log10(sum / samples.length + 1e-10);
  $(id).style.width = `${Math.max(0, Math.min(100, (db + 60) * 100 / 60))}%`;
}

async function openAudio() {
  if (!navigator.mediaDevices || !window.isSecureContext) throw Object.assign(new Error("insecure"), { kind: "insecure" });
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true,
      noiseSuppression: true, autoGainControl: true } });
  } catch (e) {
    throw Object.assign(new Error(e.message), { kind: "mic" });
  }
  let ctx = new AudioContext({ sampleRate: MOSHI_RATE, latencyHint: "interactive" });
  let source;
  try {
    source = ctx.createMediaStreamSource(stream);
  } catch (e) { // a browser that cannot mix rates: the worklets resample instead
    await ctx.close();
    ctx = new AudioContext({ latencyHint: "interactive" });
    source = ctx.createMediaStreamSource(stream);
  }
  stats.contextRate = ctx.sampleRate;
  await ctx.audioWorklet.addModule("worklets.js");
  const capture = new AudioWorkletNode(ctx, "capture");
  const player = new AudioWorkletNode(ctx, "player", { outputChannelCount: [1] });
  const mute = ctx.createGain();
  mute.gain.value = 0; // the capture node must reach the destination to be run, silently
  source.connect(capture).connect(mute).connect(ctx.destination);
  player.connect(ctx.destination);
  await ctx.resume();
  return { stream, ctx, capture, player };
}

async function connect() {
  say(null, "");
  $("download").hidden = true;
  $("transcript").textContent = "";
  Object.assign(stats, { sentFrames: 0, receivedSamples: 0, playedSamples: 0, bufferedMs: 0, underruns: 0,
    droppedSamples: 0, firstAudioMs: null, transcript: "" });
  setState("connecting", "Connecting…");
  const c = call = { you: [], moshi: [], firstSentAt: null, refusal: null, ended: false, audio: null, ws: null };
  stats.calls++;
  try {
    c.audio = await openAudio();
  } catch (e) {
    finish(c, e.kind || "mic");
    return;
  }
  if (c.ended) { // hung up while the microphone was being opened
    c.audio.stream.getTracks().forEach((t) => t.stop());
    c.audio.ctx.close();
    return;
  }
  const protocols = ["realtime"];
  const key = $("api-key").value.trim();
  if (key) protocols.push(`openai-insecure-api-key.${key}`);
  const ws = c.ws = new WebSocket(realtimeUrl(), protocols);
  c.audio.capture.port.onmessage = (e) => {
    if (ws.readyState !== WebSocket.OPEN || stats.state !== "in-call") return;
    const [b64, pcm] = base64Pcm16(e.data);
    ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: b64 }));
    c.you.push(pcm);
    stats.sentFrames++;
    if (c.firstSentAt === null) c.firstSentAt = performance.now();
    level("level-you", e.data);
  };
  c.audio.player.port.onmessage = (e) => {
    Object.assign(stats, e.data);
    $("fig-buffered").textContent = `${Math.round(e.data.bufferedMs)} ms`;
    $("fig-underruns").textContent = String(e.data.underruns);
    $("fig-heard").textContent = `${(e.data.playedSamples / MOSHI_RATE).toFixed(1)} s`;
    $("fig-sent").textContent = `${(stats.sentFrames * 0.08).toFixed(1)} s`;
  };
  ws.onmessage = (e) => onEvent(c, JSON.parse(e.data));
  ws.onclose = (e) => {
    if (c.ended) return;
    if (c.refusal) finish(c, c.refusal);
    else if (e.code === 1001) finish(c, "draining");
    else if (e.code === 1000 && e.reason === "idle_timeout") finish(c, "idle");
    else finish(c, "lost", e.code);
  };
}

function onEvent(c, event) {
  switch (event.type) {
    case "session.created":
      setState("in-call", "In a call: speak whenever you like");
      break;
    case "response.output_audio.delta": {
      const pcm = pcm16FromBase64(event.delta);
      const frame = Float32Array.from(pcm, (x) => x / 32768);
      c.audio.player.port.postMessage(frame, [frame.buffer]);
      c.moshi.push(pcm);
      stats.receivedSamples += pcm.length;
      if (stats.firstAudioMs === null && c.firstSentAt !== null) {
        stats.firstAudioMs = Math.round(performance.now() - c.firstSentAt);
        $("fig-latency").textContent = `${stats.firstAudioMs} ms`;
      }
      level("level-moshi", Float32Array.from(pcm, (x) => x / 32768));
      break;
    }
    case "response.output_audio_transcript.delta":
      stats.transcript += event.delta;
      $("transcript").textContent = stats.transcript;
      break;
    case "error": {
      const code = event.error.code;
      if (code === "invalid_api_key") c.refusal = "key";
      else if (code === "no_free_slot") c.refusal = /shutting down/.test(event.error.message) ? "draining" : "busy";
      else if (code === "engine_unavailable") c.refusal = "engine";
      else say("error", `The server said: ${event.error.message}`);
      break;
    }
    default:
      break;
  }
}

function finish(c, why, closeCode) {
  if (c.ended) return;
  c.ended = true;
  if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
  if (c.audio) {
    c.audio.stream.getTracks().forEach((t) => t.stop());
    c.audio.ctx.close();
  }
  if (why === "hangup") say("info", "");
  else if (why === "idle") say("info", "The call ended: no audio reached the server for a while.");
  else if (why === "lost") say("error", `${MESSAGES.lost}${closeCode ? ` (code ${closeCode})` : ""}`);
  else say("error", MESSAGES[why]);
  if (why === "key") { $("key-row").hidden = false; $("settings").open = true; }
  offerDownload(c);
  setState(why === "hangup" || why === "idle" ? "ended" : "failed", why === "hangup" ? "Call ended" : "Not connected");
  if (call === c) call = null;
  $("level-you").style.width = $("level-moshi").style.width = "0";
}

function offerDownload(c) {
  const you = concat(c.you), moshi = concat(c.moshi);
  const n = Math.max(you.length, moshi.length);
  if (n === 0) return;
  const data = new DataView(new ArrayBuffer(44 + n * 4));
  const text = (at, s) => [...s].forEach((ch, i) => data.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); data.setUint32(4, 36 + n * 4, true); text(8, "WAVE"); text(12, "fmt ");
  data.setUint32(16, 16, true); data.setUint16(20, 1, true); data.setUint16(22, 2, true);
  data.setUint32(24, MOSHI_RATE, true); data.setUint32(28, MOSHI_RATE * 4, true);
  data.setUint16(32, 4, true); data.setUint16(34, 16, true); text(36, "data"); data.setUint32(40, n * 4, true);
  for (let i = 0; i < n; i++) { // both sides on the server's clock: frame k of each
    data.setInt16(44 + 4 * i, i < you.length ? you[i] : 0, true);
    data.setInt16(46 + 4 * i, i < moshi.length ? moshi[i] : 0, true);
  }
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([data], { type: "audio/wav" }));
  link.download = `moshi-call-${new Date().toISOString().replace(/[:.]/g, "-")}.wav`;
  link.hidden = false;
  stats.downloadBytes = data.byteLength;
}

function concat(chunks) {
  const out = new Int16Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

$("connect").addEventListener("click", () => {
  if (call) finish(call, "hangup");
  else connect();
});
loadConfig();
setState("idle", "Ready");
