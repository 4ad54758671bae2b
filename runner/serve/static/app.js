// The page's client: the microphone through an AudioWorklet, PCM16 over /v1/realtime in vLLM's dialect or
// OpenAI's, the live transcript and each token's latency beyond the delay (from sending the audio it needed).
"use strict";

const RATES = { vllm: 16000, openai: 24000 };
const CHUNK_S = 0.08;
const LATENCIES_KEPT = 200;
const MEL_LOOKAHEAD_S = 0.0125; // a token's last log-mel frame needs 12.5 ms of audio after it

const toggle = document.getElementById("toggle");
const statusLine = document.getElementById("status");
const transcript = document.getElementById("transcript");
const latencyLine = document.getElementById("latency");
const dialectSelect = document.getElementById("dialect");
const delaySelect = document.getElementById("delay");

let live = null; // the running session: socket, audio graph, what was sent when

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function base64(int16) {
  const bytes = new Uint8Array(int16.buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function percentile(values, fraction) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(fraction * sorted.length))];
}

// When the sample `index` of the stream was sent (ms, performance.now()), or the end's time past the audio.
function sentAt(session, index) {
  while (session.sent.length > 1 && session.sent[0][0] < index) session.sent.shift();
  const [samples, time] = session.sent[0] || [0, performance.now()];
  return samples >= index ? time : session.endedAt || time;
}

function onDelta(session, text, endS) {
  transcript.textContent += text;
  const due = Math.round((endS + session.delayMs / 1000 + MEL_LOOKAHEAD_S) * session.rate);
  const latency = performance.now() - sentAt(session, due);
  session.latencies.push(latency);
  if (session.latencies.length > LATENCIES_KEPT) session.latencies.shift();
  const p50 = percentile(session.latencies, 0.5);
  const p95 = percentile(session.latencies, 0.95);
  latencyLine.textContent =
    `Latency per token beyond the delay: ${latency.toFixed(0)} ms (p50 ${p50.toFixed(0)} ms, ` +
    `p95 ${p95.toFixed(0)} ms over the last ${session.latencies.length})`;
}

function onEvent(session, event) {
  switch (event.type) {
    case "transcription.delta":
    case "conversation.item.input_audio_transcription.delta":
      onDelta(session, event.delta, event.end_s);
      break;
    case "transcription.done":
    case "conversation.item.input_audio_transcription.completed":
      setStatus(`Done: ${event.usage ? JSON.stringify(event.usage) : ""}`);
      session.socket.close();
      break;
    case "error":
      setStatus(`Error: ${typeof event.error === "string" ? event.error : event.error.message}`, true);
      break;
    case "conversation.item.input_audio_transcription.failed":
      setStatus(`Error: ${event.error.message}`, true);
      break;
    default:
      break;
  }
}

function configure(session, model) {
  if (session.dialect === "vllm") {
    session.socket.send(JSON.stringify({ type: "session.update", model, delay_ms: session.delayMs }));
    session.socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    return;
  }
  const input = {
    format: { type: "audio/pcm", rate: session.rate },
    transcription: { model, delay_ms: session.delayMs },
    turn_detection: null,
  };
  session.socket.send(JSON.stringify({ type: "session.update", session: { type: "transcription", audio: { input } } }));
}

async function start() {
  const dialect = dialectSelect.value;
  const rate = RATES[dialect];
  const session = {
    dialect, rate, delayMs: Number(delaySelect.value), sent: [], samples: 0, latencies: [], endedAt: null,
  };
  transcript.textContent = "";
  setStatus("Starting the microphone…");
  const models = await (await fetch("/v1/models")).json();
  session.stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  session.context = new AudioContext({ sampleRate: rate });
  await session.context.audioWorklet.addModule("/static/pcm-worklet.js");
  const source = session.context.createMediaStreamSource(session.stream);
  session.node = new AudioWorkletNode(session.context, "pcm16-writer", {
    numberOfOutputs: 0,
    processorOptions: { chunkSamples: Math.round(rate * CHUNK_S) },
  });
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = dialect === "openai" ? "?intent=transcription" : "";
  session.socket = new WebSocket(`${scheme}://${location.host}/v1/realtime${query}`);
  session.socket.onmessage = (message) => onEvent(session, JSON.parse(message.data));
  session.socket.onclose = () => stopAudio(session);
  session.socket.onopen = () => {
    configure(session, models.data[0].id);
    session.node.port.onmessage = (message) => {
      const pcm = new Int16Array(message.data);
      if (session.socket.readyState !== WebSocket.OPEN || session.endedAt) return;
      session.socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(pcm) }));
      session.samples += pcm.length;
      session.sent.push([session.samples, performance.now()]);
    };
    source.connect(session.node);
    setStatus("Listening: speak, then press Stop.");
  };
  live = session;
  toggle.textContent = "Stop";
}

function stopAudio(session) {
  if (session.context) session.context.close();
  if (session.stream) session.stream.getTracks().forEach((track) => track.stop());
  session.context = null;
  session.stream = null;
  if (live === session) {
    live = null;
    toggle.textContent = "Start";
  }
}

function stop(session) {
  session.endedAt = performance.now();
  stopAudio(session);
  if (session.socket.readyState === WebSocket.OPEN) {
    const commit = session.dialect === "vllm"
      ? { type: "input_audio_buffer.commit", final: true }
      : { type: "input_audio_buffer.commit" };
    session.socket.send(JSON.stringify(commit));
    setStatus("Finishing the transcript…");
  }
}

toggle.addEventListener("click", () => {
  if (live) {
    stop(live);
    return;
  }
  start().catch((error) => {
    setStatus(`Could not start: ${error.message}`, true);
    if (live) stopAudio(live);
  });
});
