// vexpress-rt browser client: plain JS, no build, no third-party code.
//
// Flow: (optional) upload a portrait -> POST /v1/sessions -> getUserMedia (mic) -> RTCPeerConnection with the mic
// track (audio sendrecv) and a video recvonly transceiver -> wait for ICE gathering to complete (non-trickle) ->
// POST the offer to the session's offer_url with its token -> set the answer. The server sends the avatar's video
// and the audio that drove it; both play in the <video> element.
//
// What the stats panel shows (computeStats), once a second, from RTCPeerConnection.getStats():
//   fps            delta of inbound video framesDecoded / delta of the report timestamps.
//   receive latency  RTT/2 (selected candidate pair) + video jitter-buffer delay per emitted frame + decode time per
//                  frame, over the last second. It is what this receiver adds; generation on the server is not in it.
//   A/V offset     video minus audio playout position, in ms (positive: the picture is ahead of the sound).
//                  Preferred: the difference of the inbound video and audio estimatedPlayoutTimestamp (both on the
//                  sender's NTP clock, from RTCP sender reports; the server sends both tracks on one clock).
//                  Fallback when those are absent: audio jitter-buffer delay minus (video jitter-buffer delay + video
//                  decode time), per emitted frame/sample over the last second: the two tracks leave the server
//                  together, so a difference in how long each waits here is their offset at playout.
//   avatar audio level  RMS of the remote audio through a WebAudio AnalyserNode (headless Chromium reports
//                  totalAudioEnergy = 0, so we measure what the page actually receives).
//
// Test hooks: ?loopback=1 keeps only 127.0.0.1 ICE candidates in the offer and uses no ICE servers; ?relay=1 sets
// iceTransportPolicy "relay" (media only through the session's TURN server: checks a TURN deployment);
// window.vexpress = {pc, session, state, info, offerSdp (as sent), lastError, stats(), remoteLevel(), micLevel()}.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const LOOPBACK = params.get("loopback") === "1";
  const RELAY = params.get("relay") === "1";
  const ICE_GATHER_TIMEOUT_MS = 5000;
  const KEY_STORE = "vexpress-rt.api-key";

  const ui = {
    video: $("avatar"), status: $("status"), select: $("avatar-select"), file: $("avatar-file"), kps: $("avatar-kps"),
    fps: $("fps"), steps: $("steps"), preset: $("preset"), apiKey: $("api-key"),
    framing: $("framing"), background: $("background"), backgroundColour: $("background-colour"),
    start: $("start"), interrupt: $("interrupt"), stop: $("stop"), mic: $("mic-level"),
    sFps: $("s-fps"), sRes: $("s-res"), sLat: $("s-lat"), sAv: $("s-av"), sRtt: $("s-rtt"),
    sLevel: $("s-level"), sLost: $("s-lost"), sRoute: $("s-route"),
    style: $("style"), live: [$("c-strength"), $("c-motion"), $("c-amplitude"), $("c-blinks")],
  };

  const st = {
    state: "idle", // idle | starting | live | stopping
    info: null, session: null, pc: null, localStream: null, remoteStream: null,
    audioCtx: null, micAnalyser: null, remoteAnalyser: null,
    timers: [], prev: null, derived: {}, lastError: null, uploading: false, offerSdp: null,
  };

  // ---------- small helpers ----------
  function setStatus(text) { ui.status.textContent = text; }
  function fail(where, err) {
    st.lastError = `${where}: ${err && err.message ? err.message : err}`;
    console.error(st.lastError);
    setStatus(`Error — ${st.lastError}`);
  }
  function apiKey() { return ui.apiKey.value.trim(); }
  function authHeaders(token) {
    const key = token || apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
  async function api(method, url, { json, body, token } = {}) {
    const headers = authHeaders(token);
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    const resp = await fetch(url, { method, headers, body });
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!resp.ok) {
      const err = data && (data.error || data.message);
      const msg = (err && (err.message || err)) || resp.statusText || text.slice(0, 200);
      const retry = resp.headers.get("Retry-After");
      throw new Error(`${method} ${url} → ${resp.status}: ${msg}${retry ? ` (retry after ${retry} s)` : ""}`);
    }
    return data;
  }
  function rms(analyser, buf) {
    analyser.getFloatTimeDomainData(buf);
    let s = 0;
    for (let i = 0; i < buf.length; i++) s += buf[i] * buf[i];
    return Math.sqrt(s / buf.length);
  }
  function makeAnalyser(stream) {
    const node = st.audioCtx.createAnalyser();
    node.fftSize = 2048;
    st.audioCtx.createMediaStreamSource(stream).connect(node); // not connected to the destination: no echo
    return { node, buf: new Float32Array(node.fftSize) };
  }
  function levelOf(a) { return a ? rms(a.node, a.buf) : 0; }
  function dbfsToMeter(x) { return x > 0 ? Math.min(1, Math.max(0, (20 * Math.log10(x) + 60) / 60)) : 0; }
  function fmt(v, digits = 0, unit = "") { return Number.isFinite(v) ? `${v.toFixed(digits)}${unit}` : "–"; }

  function setState(s) {
    st.state = s;
    const busy = s !== "idle";
    ui.start.disabled = busy || st.uploading;
    ui.stop.disabled = s !== "live" && s !== "starting";
    ui.interrupt.disabled = s !== "live";
    ui.select.disabled = busy;
    ui.file.disabled = busy;
    ui.kps.disabled = busy;
  }

  // ---------- server info, avatars ----------
  function iceServers() {
    // The session's list (POST /v1/sessions), else the server's (/v1/info); none in loopback mode.
    if (LOOPBACK) return [];
    const from = (o) => o && (o.ice_servers || o.iceServers);
    const list = from(st.session) || from(st.info);
    if (!Array.isArray(list)) return [];
    return list.map((s) => (typeof s === "string" ? { urls: s } : s));
  }

  function addAvatarOption(id, label, select) {
    if (!id || [...ui.select.options].some((o) => o.value === id)) return;
    const opt = new Option(label || id, id);
    ui.select.add(opt);
    if (select) ui.select.value = id;
  }

  // The generation controls take their ranges and defaults from the server (/v1/info "generation"), which
  // validates the same ranges: no limit is written here.
  function applyLimits(generation) {
    const controls = { steps: ui.steps };
    for (const [name, input] of Object.entries(controls)) {
      const lim = generation && generation[name];
      if (!input || !lim) continue;
      input.min = String(lim.min);
      input.max = String(lim.max);
      input.placeholder = `server default (${lim.default})`;
    }
  }

  // ---------- live controls (docs/controls.md) ----------
  // Sliders and pickers take their ranges, defaults and choices from /v1/info; a change while live is sent at once
  // (PATCH /v1/sessions/{id}), and before a session it goes into the session's request.
  function setupLiveControls(generation) {
    for (const input of ui.live) {
      const lim = generation && generation[input.dataset.field];
      if (!lim) continue;
      if (input.tagName === "SELECT") {
        if (!input.options.length) for (const c of lim.choices || []) input.add(new Option(c, c));
      } else {
        input.min = String(lim.min);
        input.max = String(input.dataset.field === "audio_attention_weight" ? Math.min(lim.max, 6) : lim.max);
      }
      input.value = String(lim.default);
      showValue(input);
    }
  }

  function showValue(input) {
    const out = $(`${input.id}-v`);
    if (out) out.textContent = input.value;
  }

  function liveFields() {
    const fields = {};
    for (const input of ui.live) {
      if (!input.value) continue;
      fields[input.dataset.field] = input.tagName === "SELECT" ? input.value : Number(input.value);
    }
    return fields;
  }

  async function sendControls(fields) {
    if (!st.session || st.state === "idle") return;
    try {
      const reply = await api("PATCH", st.session.url || `/v1/sessions/${st.session.id}`, {
        json: fields, token: st.session.token,
      });
      setStatus(`Controls changed (version ${reply.version}).`);
    } catch (err) {
      setStatus(`Control change refused: ${err.message}`);
    }
  }

  async function loadStyles() {
    try {
      const { styles } = await api("GET", "/v1/styles");
      for (const name of Object.keys(styles || {})) {
        if (![...ui.style.options].some((o) => o.value === name)) ui.style.add(new Option(name, name));
      }
      st.styles = styles || {};
    } catch (err) {
      console.warn(`could not read /v1/styles: ${err.message}`);
    }
  }

  function pickStyle() {
    const fields = (st.styles || {})[ui.style.value];
    if (!fields) return;
    for (const input of ui.live) {
      if (input.dataset.field in fields) { input.value = String(fields[input.dataset.field]); showValue(input); }
    }
    sendControls({ style: ui.style.value });
  }

  async function loadInfo() {
    try {
      st.info = await api("GET", "/v1/info");
      applyLimits(st.info && st.info.generation);
      setupLiveControls(st.info && st.info.generation);
      for (const name of (st.info && st.info.presets) || []) {
        if (![...ui.preset.options].some((o) => o.value === name)) ui.preset.add(new Option(name, name));
      }
      await loadStyles();
      const avatars = st.info && st.info.avatars;
      if (Array.isArray(avatars)) {
        for (const a of avatars) {
          if (a && a.id && !a.default) addAvatarOption(a.id, a.name || a.id, false);
        }
      }
    } catch (err) {
      // The page still works with defaults (no ICE servers); say so, without blocking.
      console.warn(`could not read /v1/info: ${err.message}`);
    }
  }

  async function uploadAvatar() {
    const file = ui.file.files && ui.file.files[0];
    if (!file) return;
    st.uploading = true; setState(st.state);
    setStatus(`Uploading ${file.name} (the server pre-encodes it; a few seconds)…`);
    try {
      const form = new FormData();
      form.append("image", file, file.name);
      form.append("name", file.name);
      if (ui.kps.value.trim()) form.append("kps", ui.kps.value.trim());
      const av = await api("POST", "/v1/avatars", { body: form });
      addAvatarOption(av.id, `Uploaded: ${av.name || file.name}`, true);
      ui.video.poster = URL.createObjectURL(file);
      setStatus(`Portrait ready (${av.id}).`);
    } catch (err) {
      fail("upload", err);
      ui.file.value = "";
    } finally {
      st.uploading = false; setState(st.state);
    }
  }

  // ---------- WebRTC ----------
  function keepLoopbackCandidates(sdp) {
    // a=candidate:<foundation> <component> <protocol> <priority> <address> <port> typ ...
    return sdp.split("\r\n")
      .filter((line) => !line.startsWith("a=candidate:") || line.split(" ")[4] === "127.0.0.1")
      .join("\r\n");
  }

  function waitIceGathering(pc, timeoutMs) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, timeoutMs); // send what we have: host candidates come first
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function onTrack(ev) {
    st.remoteStream.addTrack(ev.track);
    if (ui.video.srcObject !== st.remoteStream) ui.video.srcObject = st.remoteStream;
    if (ev.track.kind === "audio" && st.audioCtx) {
      st.remoteAnalyser = makeAnalyser(new MediaStream([ev.track]));
    }
    ui.video.play().catch((err) => console.warn(`autoplay: ${err.message}`));
  }

  async function start() {
    if (st.state !== "idle") return;
    st.lastError = null; st.prev = null; st.derived = {};
    setState("starting");
    try {
      // The AudioContext is made inside the click, so that it is allowed to run.
      st.audioCtx = new AudioContext();
      if (st.audioCtx.state === "suspended") await st.audioCtx.resume();

      setStatus("Opening a session…");
      const req = {};
      if (ui.select.value) req.avatar_id = ui.select.value;
      if (ui.fps.value) req.fps = Number(ui.fps.value);
      if (ui.preset.value) req.preset = ui.preset.value; // a schedule: steps, frames per call, lookahead
      if (ui.steps.value) req.steps = Number(ui.steps.value);
      // Presenter framing (docs/framing.md): the whole photo or a canvas, over the photo, a key colour or nothing
      if (ui.framing.value) req.framing = ui.framing.value;
      if (ui.background.value === "colour") req.background = ui.backgroundColour.value;
      else if (ui.background.value) req.background = ui.background.value;
      const asked = liveFields();
      Object.assign(req, asked);
      if (ui.style.value) req.style = ui.style.value;
      st.session = await api("POST", "/v1/sessions", { json: req });
      if (st.state !== "starting") return; // stopped meanwhile
      // Controls moved while the session was being made went into no request: send them now.
      const moved = Object.fromEntries(Object.entries(liveFields()).filter(([k, v]) => asked[k] !== v));
      if (ui.style.value && ui.style.value !== req.style) moved.style = ui.style.value;
      if (Object.keys(moved).length) sendControls(moved);

      setStatus("Asking for the microphone…");
      const mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true }, video: false,
      });
      if (st.state !== "starting") { mic.getTracks().forEach((t) => t.stop()); return; } // stopped meanwhile
      st.localStream = mic;
      st.micAnalyser = makeAnalyser(mic);

      const pc = new RTCPeerConnection({ iceServers: iceServers(), iceTransportPolicy: RELAY ? "relay" : "all" });
      st.pc = pc;
      st.remoteStream = new MediaStream();
      pc.addEventListener("track", onTrack);
      pc.addEventListener("connectionstatechange", () => {
        const s = pc.connectionState;
        if (s === "connected" && st.state === "starting") { setState("live"); setStatus("Live — speak now."); }
        if (s === "failed" && st.pc === pc) { fail("connection", "ICE/DTLS failed"); stop(); }
        if (s === "disconnected" && st.pc === pc) setStatus("Connection interrupted, waiting…");
      });
      const [micTrack] = st.localStream.getAudioTracks();
      pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [st.localStream] });
      pc.addTransceiver("video", { direction: "recvonly" });

      setStatus("Connecting…");
      await pc.setLocalDescription(await pc.createOffer());
      await waitIceGathering(pc, ICE_GATHER_TIMEOUT_MS);
      let sdp = pc.localDescription.sdp;
      if (LOOPBACK) sdp = keepLoopbackCandidates(sdp);
      st.offerSdp = sdp;
      const offerUrl = st.session.offer_url || `/v1/sessions/${st.session.id}/offer`;
      const answer = await api("POST", offerUrl, {
        json: { sdp, type: pc.localDescription.type }, token: st.session.token,
      });
      if (st.pc !== pc) return; // stopped meanwhile
      await pc.setRemoteDescription(answer);

      st.timers.push(setInterval(updateMeters, 100));
      st.timers.push(setInterval(() => computeStats().then(render).catch((e) => console.warn(e)), 1000));
    } catch (err) {
      if (st.state !== "starting") return; // stopped meanwhile: nothing failed
      fail("start", err);
      await stop();
    }
  }

  async function interrupt() {
    if (!st.session) return;
    try {
      await api("POST", `/v1/sessions/${st.session.id}/interrupt`, { token: st.session.token });
      setStatus("Interrupted — live.");
    } catch (err) {
      fail("interrupt", err);
    }
  }

  async function stop() {
    if (st.state === "idle" || st.state === "stopping") return;
    setState("stopping");
    for (const t of st.timers) clearInterval(t);
    st.timers = [];
    const session = st.session;
    st.session = null;
    if (session) {
      // Close the session first: closing the peer connection first can end it on the server already (then 404).
      try { await api("DELETE", `/v1/sessions/${session.id}`, { token: session.token }); } catch (err) {
        console.warn(`closing the session: ${err.message}`);
      }
    }
    if (st.pc) st.pc.close();
    st.pc = null;
    if (st.localStream) st.localStream.getTracks().forEach((t) => t.stop());
    st.localStream = null;
    ui.video.srcObject = null;
    st.remoteStream = null;
    st.micAnalyser = st.remoteAnalyser = null;
    if (st.audioCtx) st.audioCtx.close().catch(() => {});
    st.audioCtx = null;
    ui.mic.value = 0;
    setState("idle");
    if (!st.lastError) setStatus("Stopped.");
  }

  // ---------- meters and stats ----------
  function updateMeters() {
    ui.mic.value = dbfsToMeter(levelOf(st.micAnalyser));
    const lvl = levelOf(st.remoteAnalyser);
    st.derived.peakLevel = Math.max(st.derived.peakLevel || 0, lvl);
  }

  function addr(c) { return c ? { address: c.address || c.ip, port: c.port, protocol: c.protocol, type: c.candidateType } : null; }

  async function snapshot() {
    const pc = st.pc;
    if (!pc) return null;
    const report = await pc.getStats();
    const byId = new Map();
    report.forEach((r) => byId.set(r.id, r));
    const out = { time: null, connectionState: pc.connectionState, iceConnectionState: pc.iceConnectionState,
      video: null, audio: null, pair: null };
    let pair = null;
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && (r.kind === "video" || r.kind === "audio")) {
        const codec = r.codecId && byId.get(r.codecId);
        const s = {
          codec: codec ? codec.mimeType : null, packetsLost: r.packetsLost, packetsReceived: r.packetsReceived,
          jitterBufferDelay: r.jitterBufferDelay, jitterBufferEmittedCount: r.jitterBufferEmittedCount,
          estimatedPlayoutTimestamp: r.estimatedPlayoutTimestamp,
        };
        if (r.kind === "video") {
          Object.assign(s, { framesDecoded: r.framesDecoded, framesReceived: r.framesReceived,
            framesDropped: r.framesDropped, frameWidth: r.frameWidth, frameHeight: r.frameHeight,
            framesPerSecond: r.framesPerSecond, totalDecodeTime: r.totalDecodeTime });
          out.video = s;
          out.time = r.timestamp;
        } else {
          Object.assign(s, { totalSamplesReceived: r.totalSamplesReceived, concealedSamples: r.concealedSamples,
            totalAudioEnergy: r.totalAudioEnergy });
          out.audio = s;
          if (out.time === null) out.time = r.timestamp;
        }
      }
      if (r.type === "transport" && r.selectedCandidatePairId) pair = byId.get(r.selectedCandidatePairId);
    });
    if (!pair) {
      report.forEach((r) => {
        if (r.type === "candidate-pair" && (r.selected || (r.nominated && r.state === "succeeded"))) pair = r;
      });
    }
    if (pair) {
      out.pair = { state: pair.state, rtt: pair.currentRoundTripTime,
        local: addr(byId.get(pair.localCandidateId)), remote: addr(byId.get(pair.remoteCandidateId)) };
    }
    if (out.time === null) out.time = performance.now();
    return out;
  }

  function perUnit(cur, prev, key, countKey) {
    // Per emitted unit over the last interval; the running average when nothing was emitted since.
    if (!cur || cur[key] === undefined || !cur[countKey]) return NaN;
    if (prev && prev[countKey] !== undefined && cur[countKey] > prev[countKey]) {
      return (cur[key] - prev[key]) / (cur[countKey] - prev[countKey]);
    }
    return cur[key] / cur[countKey];
  }

  async function computeStats() {
    const cur = await snapshot();
    if (!cur) return null;
    const prev = st.prev;
    const d = st.derived;
    const v = cur.video, a = cur.audio;
    if (prev && prev.video && v && cur.time > prev.time) {
      d.fps = ((v.framesDecoded - prev.video.framesDecoded) * 1000) / (cur.time - prev.time);
    }
    const vJb = perUnit(v, prev && prev.video, "jitterBufferDelay", "jitterBufferEmittedCount") * 1000;
    const vDec = perUnit(v, prev && prev.video, "totalDecodeTime", "framesDecoded") * 1000;
    const aJb = perUnit(a, prev && prev.audio, "jitterBufferDelay", "jitterBufferEmittedCount") * 1000;
    const halfRtt = cur.pair && Number.isFinite(cur.pair.rtt) ? (cur.pair.rtt * 1000) / 2 : 0;
    d.latencyMs = vJb + (Number.isFinite(vDec) ? vDec : 0) + halfRtt;
    if (v && a && v.estimatedPlayoutTimestamp && a.estimatedPlayoutTimestamp) {
      d.avOffsetMs = v.estimatedPlayoutTimestamp - a.estimatedPlayoutTimestamp;
      d.avMethod = "estimatedPlayoutTimestamp";
    } else {
      d.avOffsetMs = aJb - (vJb + (Number.isFinite(vDec) ? vDec : 0));
      d.avMethod = "jitterBufferDelay";
    }
    d.level = d.peakLevel || 0; // peak RMS over the last second
    d.peakLevel = 0;
    st.prev = cur;
    return cur;
  }

  function render(cur) {
    if (!cur) return;
    const d = st.derived, v = cur.video, a = cur.audio;
    ui.sFps.textContent = fmt(d.fps, 1);
    ui.sRes.textContent = v && v.frameWidth ? `${v.frameWidth}×${v.frameHeight} ${v.codec || ""}` : "–";
    ui.sLat.textContent = fmt(d.latencyMs, 0, " ms");
    ui.sAv.textContent = Number.isFinite(d.avOffsetMs) ? `${d.avOffsetMs.toFixed(0)} ms (${d.avMethod})` : "–";
    ui.sRtt.textContent = cur.pair && Number.isFinite(cur.pair.rtt) ? fmt(cur.pair.rtt * 1000, 1, " ms") : "–";
    ui.sLevel.textContent = d.level > 0 ? `${(20 * Math.log10(d.level)).toFixed(0)} dBFS` : "silent";
    ui.sLost.textContent = `${v ? v.packetsLost ?? 0 : "–"} / ${a ? a.packetsLost ?? 0 : "–"}`;
    const p = cur.pair;
    ui.sRoute.textContent = p && p.local && p.remote
      ? `${p.local.address}:${p.local.port} ⇄ ${p.remote.address}:${p.remote.port} (${p.local.protocol})` : "–";
  }

  // ---------- wiring ----------
  ui.apiKey.value = localStorage.getItem(KEY_STORE) || "";
  ui.apiKey.addEventListener("change", () => {
    const k = apiKey();
    if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
    loadInfo();
  });
  ui.file.addEventListener("change", uploadAvatar);
  ui.style.addEventListener("change", pickStyle);
  for (const input of ui.live) {
    input.addEventListener("input", () => showValue(input));
    input.addEventListener("change", () => sendControls({ [input.dataset.field]: liveFields()[input.dataset.field] }));
  }
  ui.start.addEventListener("click", start);
  ui.interrupt.addEventListener("click", interrupt);
  ui.stop.addEventListener("click", stop);
  window.addEventListener("pagehide", () => {
    const s = st.session;
    if (s) fetch(`/v1/sessions/${s.id}`, { method: "DELETE", headers: authHeaders(s.token), keepalive: true });
  });

  window.vexpress = {
    get pc() { return st.pc; },
    get session() { return st.session; },
    get state() { return st.state; },
    get lastError() { return st.lastError; },
    get info() { return st.info; },
    /** The SDP offer as it was sent (after the ?loopback=1 candidate filter). */
    get offerSdp() { return st.offerSdp; },
    /** A fresh getStats() summary plus the derived numbers of the last 1 s update (fps, latencyMs, avOffsetMs). */
    async stats() {
      const cur = await snapshot();
      return cur && Object.assign(cur, { derived: { ...st.derived } });
    },
    /** RMS (0..1) of the remote (avatar) audio right now, measured with a WebAudio AnalyserNode. */
    remoteLevel() { return levelOf(st.remoteAnalyser); },
    /** RMS (0..1) of the local microphone right now. */
    micLevel() { return levelOf(st.micAnalyser); },
  };

  setState("idle");
  loadInfo();
})();
