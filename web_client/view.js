// vexpress-rt viewer: the avatar alone, over WHEP, for OBS's Browser Source or any screen. Plain JS, no build.
//
// URL: /view/{session_id}?token=<token>[&bg=transparent|<hex colour>][&key=<hex colour>][&fit=contain|cover][&muted=1]:
//   the session's view_url (its view-only token, which WHEP accepts and nothing else does; the session's own token
//   works too).
//   bg     what shows around the portrait: "transparent" (OBS composites the avatar over the scene), a key colour
//          such as 00ff00 (for a chroma-key filter), default black.
//   key    WebRTC carries no alpha, so a cut-out presenter (docs/framing.md) travels over a key colour: make the
//          session with `"background": "#00ff00"` and either key it in OBS (Chroma Key filter) or give key=00ff00
//          here: the page draws each frame into a canvas with the pixels near that colour made transparent (with
//          bg=transparent, OBS then gets the cut-out directly).
//   fit    contain (default: the whole portrait, letterboxed) or cover (fills the source, cropping).
//   muted  1: no sound (the default plays the avatar's voice; in OBS tick "Control audio via OBS").
//
// WHEP with trickle ICE (RFC 9725, RFC 8840): createOffer (video + audio, receive only) -> POST it to
// /v1/sessions/{id}/whep with the token as bearer -> the answer's Link rel="ice-server" headers (STUN/TURN, with the
// session's TURN credentials) become the configuration -> setLocalDescription (gathering starts now, with them) ->
// each candidate is PATCHed to the resource as an application/trickle-ice-sdpfrag (If-Match: its ETag) ->
// setRemoteDescription(answer). If the connection fails, the resource is DELETEd and a new one POSTed after a
// back-off (ICE restarts are not offered by the server), as when no frame arrives for 4 s; a session that ended
// (404) or a wrong token (401) stops it.
//
// Test hook: window.vexview = {state, pc, resource, patches, candidates, lastError, stats(), level()}.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const SESSION_ID = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  const TOKEN = params.get("token") || "";
  const ENDPOINT = `${location.origin}/v1/sessions/${encodeURIComponent(SESSION_ID)}/whep`;
  const TRICKLE = "application/trickle-ice-sdpfrag";
  const STALL_MS = 4000; // no new frame for this long while "connected": reconnect
  const MAX_ATTEMPTS = 360; // with back-off up to 10 s: about an hour of trying, then the page gives up
  const video = document.getElementById("avatar");

  const st = {
    state: "starting", pc: null, resource: null, etag: null, patches: 0, candidates: 0, lastError: null,
    audioCtx: null, analyser: null, buf: null, attempts: 0,
  };
  window.vexview = {
    get state() { return st.state; }, get pc() { return st.pc; }, get resource() { return st.resource; },
    get patches() { return st.patches; }, get candidates() { return st.candidates; },
    get lastError() { return st.lastError; }, stats, level,
  };

  // ---------- the look: background outside the portrait, fit, sound ----------
  function background(value) {
    if (!value) return "#000";
    if (value === "transparent") return "transparent";
    const hex = value.replace(/^#/, "");
    return /^[0-9a-fA-F]{3}([0-9a-fA-F]{3})?([0-9a-fA-F]{2})?$/.test(hex) ? `#${hex}` : "#000";
  }
  document.documentElement.style.setProperty("--bg", background(params.get("bg")));
  document.documentElement.style.setProperty("--fit", params.get("fit") === "cover" ? "cover" : "contain");
  video.muted = params.get("muted") === "1";
  document.getElementById("sound").addEventListener("click", () => {
    video.muted = false;
    video.play().catch(() => {});
    if (st.audioCtx) st.audioCtx.resume().catch(() => {});
    document.body.classList.remove("needs-click");
  });

  // ---------- chroma key (?key=): the key colour's pixels made transparent, in a canvas over the hidden video ----------
  const KEY_NEAR = 60; // colour distance (RGB, Euclidean) at or below which a pixel is fully transparent,
  const KEY_FAR = 110; // and at or above which it is opaque; between, partly (the anti-aliased, compressed rim)
  function keyColour(value) {
    const hex = (value || "").replace(/^#/, "");
    if (!/^[0-9a-fA-F]{6}$/.test(hex)) return null;
    return [0, 2, 4].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }
  function keyOut(pixels, key) { // RGBA bytes in place: alpha from the distance to the key colour
    const [kr, kg, kb] = key;
    const near2 = KEY_NEAR * KEY_NEAR, span = KEY_FAR - KEY_NEAR;
    for (let i = 0; i < pixels.length; i += 4) {
      const dr = pixels[i] - kr, dg = pixels[i + 1] - kg, db = pixels[i + 2] - kb;
      const d2 = dr * dr + dg * dg + db * db;
      if (d2 <= near2) pixels[i + 3] = 0;
      else if (d2 < KEY_FAR * KEY_FAR) pixels[i + 3] = Math.round((255 * (Math.sqrt(d2) - KEY_NEAR)) / span);
    }
    return pixels;
  }
  function startKeying(key) {
    const canvas = document.createElement("canvas");
    canvas.id = "keyed";
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    document.body.classList.add("keyed"); // view.html: the video stays (sound, decoding) but is not shown
    video.after(canvas);
    let shown = -1;
    function draw() {
      const w = video.videoWidth, h = video.videoHeight;
      if (w && h && video.currentTime !== shown) {
        shown = video.currentTime;
        if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
        ctx.drawImage(video, 0, 0, w, h);
        const image = ctx.getImageData(0, 0, w, h);
        keyOut(image.data, key);
        ctx.putImageData(image, 0, 0);
      }
      requestAnimationFrame(draw);
    }
    requestAnimationFrame(draw);
  }
  const KEY = keyColour(params.get("key"));
  if (KEY) startKeying(KEY);
  window.vexview.keyOut = keyOut; // the keying on its own, for tests

  function setState(s) { st.state = s; document.body.dataset.state = s; }
  function fail(where, err) {
    st.lastError = `${where}: ${err && err.message ? err.message : err}`;
    console.warn(st.lastError);
  }
  const auth = () => ({ Authorization: `Bearer ${TOKEN}` });

  // ---------- WHEP ----------
  function parseLinks(header) {
    // <turn:host?transport=udp>; rel="ice-server"; username="u"; credential="p"; credential-type="password"
    const servers = [];
    for (const part of (header || "").split(/,(?=\s*<)/)) {
      const m = part.match(/<([^>]+)>(.*)/);
      if (!m || !/rel="?ice-server"?/.test(m[2])) continue;
      const attr = (name) => (m[2].match(new RegExp(`${name}="([^"]*)"`)) || [])[1];
      const server = { urls: m[1] };
      if (attr("username")) { server.username = attr("username"); server.credential = attr("credential"); }
      servers.push(server);
    }
    return servers;
  }

  function mediaLines(sdp) {
    // mid -> its m= line, so that each trickled candidate goes under the m-line it belongs to
    const out = {};
    let mline = null;
    for (const line of sdp.split(/\r?\n/)) {
      if (line.startsWith("m=")) mline = line;
      else if (line.startsWith("a=mid:") && mline) out[line.slice(6)] = mline;
    }
    return out;
  }

  function iceCredentials(sdp) {
    const get = (name) => (sdp.match(new RegExp(`a=${name}:(.*)`)) || [])[1]?.trim();
    return { ufrag: get("ice-ufrag"), pwd: get("ice-pwd") };
  }

  function trickler(pc, offerSdp) {
    const { ufrag, pwd } = iceCredentials(offerSdp);
    const mlines = mediaLines(offerSdp);
    let pending = [], ended = false, timer = null;
    async function flush() {
      timer = null;
      if (!st.resource || (!pending.length && !ended)) return;
      const byMid = {};
      for (const c of pending) (byMid[c.sdpMid] = byMid[c.sdpMid] || []).push(c.candidate);
      const mids = Object.keys(byMid).length ? Object.keys(byMid) : Object.keys(mlines).slice(0, 1);
      let frag = `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\n`;
      for (const mid of mids) {
        frag += `${mlines[mid] || "m=audio 9 UDP/TLS/RTP/SAVPF 0"}\r\na=mid:${mid}\r\n`;
        for (const c of byMid[mid] || []) frag += `a=${c}\r\n`;
        if (ended) frag += "a=end-of-candidates\r\n";
      }
      st.candidates += pending.length;
      pending = [];
      const headers = { ...auth(), "Content-Type": TRICKLE };
      if (st.etag) headers["If-Match"] = st.etag;
      try {
        const resp = await fetch(st.resource, { method: "PATCH", headers, body: frag });
        st.patches += 1;
        if (!resp.ok && resp.status !== 405) fail("PATCH", `${resp.status} ${await resp.text()}`);
      } catch (err) { fail("PATCH", err); }
    }
    pc.addEventListener("icecandidate", (e) => {
      if (pc !== st.pc) return;
      if (e.candidate && e.candidate.candidate) pending.push(e.candidate);
      else if (!e.candidate) ended = true;
      if (!timer) timer = setTimeout(flush, 0); // candidates found together go in one PATCH
    });
  }

  async function connect() {
    st.attempts += 1;
    setState("connecting");
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    st.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const stream = new MediaStream();
    pc.addEventListener("track", (e) => {
      stream.addTrack(e.track);
      if (video.srcObject !== stream) { video.srcObject = stream; play(); }
      if (e.track.kind === "audio") listen(stream);
    });
    pc.addEventListener("connectionstatechange", () => {
      if (pc !== st.pc) return;
      if (pc.connectionState === "connected") { setState("playing"); st.attempts = 0; }
      if (pc.connectionState === "failed" || pc.connectionState === "closed") retry("connection " + pc.connectionState);
    });
    watch(pc);
    const offer = await pc.createOffer();
    trickler(pc, offer.sdp);
    const resp = await fetch(ENDPOINT, {
      method: "POST", headers: { ...auth(), "Content-Type": "application/sdp" }, body: offer.sdp,
    });
    if (!resp.ok) {
      const text = await resp.text();
      const permanent = resp.status === 401 || resp.status === 404;
      throw Object.assign(new Error(`POST ${resp.status}: ${text.slice(0, 200)}`), { permanent });
    }
    st.resource = new URL(resp.headers.get("Location"), ENDPOINT).href;
    st.etag = resp.headers.get("ETag");
    const answer = await resp.text();
    const servers = parseLinks(resp.headers.get("Link"));
    if (servers.length) pc.setConfiguration({ ...pc.getConfiguration(), iceServers: servers });
    await pc.setLocalDescription(offer); // gathering starts here, with the session's STUN/TURN servers
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
  }

  async function hangUp() {
    const pc = st.pc, resource = st.resource;
    st.pc = null; st.resource = null; st.etag = null;
    if (pc) pc.close();
    if (resource) {
      try { await fetch(resource, { method: "DELETE", headers: auth() }); } catch (err) { fail("DELETE", err); }
    }
  }

  function watch(pc) {
    // A stream that stops (the server ended this viewer, a network that went quiet) while the connection still
    // reads "connected": no new frame for STALL_MS means a new connection, rather than a frozen source in OBS.
    let last = -1, since = performance.now();
    const timer = setInterval(async () => {
      if (pc !== st.pc) { clearInterval(timer); return; }
      const s = await stats();
      const frames = s.video ? s.video.framesDecoded : 0;
      if (frames !== last) { last = frames; since = performance.now(); return; }
      if (st.state === "playing" && performance.now() - since > STALL_MS) {
        clearInterval(timer);
        retry(`no video for ${STALL_MS} ms`);
      }
    }, 1000);
  }

  let retrying = false;
  async function retry(reason) {
    if (retrying) return;
    retrying = true;
    fail("viewer", reason);
    await hangUp();
    if (st.attempts >= MAX_ATTEMPTS) { setState("gave-up"); retrying = false; return; }
    setState("waiting");
    await new Promise((r) => setTimeout(r, Math.min(10000, 500 * 2 ** Math.min(st.attempts, 5))));
    retrying = false;
    start();
  }

  function start() {
    connect().catch((err) => {
      if (err.permanent) { fail("viewer", err); hangUp(); setState("ended"); return; }
      retry(err.message || String(err));
    });
  }

  // ---------- sound ----------
  function play() {
    video.play().catch((err) => {
      // A browser that blocks autoplay with sound (OBS does not): play muted, one click brings the sound.
      if (err.name !== "NotAllowedError" || video.muted) return;
      video.muted = true;
      document.body.classList.add("needs-click");
      video.play().catch(() => {});
    });
  }

  function listen(stream) {
    // What the page hears, for the tests and for anyone checking a source: RMS of the remote audio (WebAudio;
    // not connected to the speakers, the <video> plays it). Headless Chromium reports totalAudioEnergy = 0.
    try {
      st.audioCtx = st.audioCtx || new AudioContext();
      st.analyser = st.audioCtx.createAnalyser();
      st.analyser.fftSize = 2048;
      st.buf = new Float32Array(st.analyser.fftSize);
      st.audioCtx.createMediaStreamSource(stream).connect(st.analyser);
      st.audioCtx.resume().catch(() => {});
    } catch (err) { fail("audio level", err); }
  }

  function level() {
    if (!st.analyser) return 0;
    st.analyser.getFloatTimeDomainData(st.buf);
    let s = 0;
    for (let i = 0; i < st.buf.length; i++) s += st.buf[i] * st.buf[i];
    return Math.sqrt(s / st.buf.length);
  }

  async function stats() {
    const out = { time: performance.now(), video: null, audio: null, pair: null };
    if (!st.pc) return out;
    const report = await st.pc.getStats();
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") {
        out.video = { framesDecoded: r.framesDecoded || 0, frameWidth: r.frameWidth, frameHeight: r.frameHeight };
      }
      if (r.type === "inbound-rtp" && r.kind === "audio") out.audio = { totalSamplesReceived: r.totalSamplesReceived || 0 };
      if (r.type === "transport" && r.selectedCandidatePairId) {
        const pair = report.get(r.selectedCandidatePairId);
        const l = pair && report.get(pair.localCandidateId), rm = pair && report.get(pair.remoteCandidateId);
        out.pair = { local: l && (l.address || l.ip), remote: rm && (rm.address || rm.ip), remoteType: rm && rm.candidateType };
      }
    });
    return out;
  }

  window.addEventListener("pagehide", () => {
    // The resource ends with the page (OBS hides or removes the source): keepalive lets the DELETE outlive it.
    if (st.resource) fetch(st.resource, { method: "DELETE", headers: auth(), keepalive: true }).catch(() => {});
  });

  if (!SESSION_ID || !TOKEN) { fail("viewer", "the URL needs /view/<session id>?token=<token>"); setState("ended"); }
  else start();
})();
