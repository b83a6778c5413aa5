/* The GB28181 web console: plain JavaScript against the HTTP API of the same origin.
 *
 * Sign-in: a user account (POST /api/v1/session sets an HttpOnly cookie) or an API token
 * (?token= in the URL or the token form; kept in sessionStorage, sent as a Bearer header).
 * Views: the device/channel tree (by civil code or business group, state kept live from the
 * event feed), live video (WebRTC through WHEP, falling back to HTTP-FLV played by mpegts.js),
 * playback over the channel's records, a PTZ pad, a map of channel locations (Leaflet), the
 * online-rate dashboard and the live alarm list.
 *
 * URL parameters: token=<API token>, transport=auto|webrtc|flv (auto: WebRTC, then FLV),
 * tiles=<tile URL template> (overrides /api/v1/console/config; "" draws points on a blank map).
 * Libraries (vendor/): Leaflet and mpegts.js, pinned; all data is inserted as text, never HTML.
 */
(function () {
  "use strict";

  const params = new URLSearchParams(location.search);
  const TOKEN_KEY = "gb28181.token";
  const WEBRTC_FRAME_TIMEOUT_MS = 5000;
  const state = {
    token: null, user: null, config: null,
    treeBy: "civil", channels: new Map(), selected: null,
    player: null, playback: null, map: null, mapLayer: null, events: null, alarmsUnseen: 0,
    view: "live",
  };
  const $ = (id) => document.getElementById(id);

  // -- helpers ------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  /** fetch on the API: JSON in and out, the token as a Bearer header, the session cookie. */
  async function api(path, opts = {}) {
    const headers = Object.assign({}, opts.headers || {});
    if (state.token) headers.Authorization = "Bearer " + state.token;
    let body = opts.body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    const resp = await fetch(path, { method: opts.method || "GET", headers, body, credentials: "same-origin",
      keepalive: !!opts.keepalive });
    if (opts.raw) return resp;
    const type = resp.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await resp.json().catch(() => null) : await resp.text();
    if (!resp.ok) {
      const text = (data && data.error) || (typeof data === "string" && data) || resp.statusText;
      if (resp.status === 401 && !opts.quiet && state.user) signedOut("Signed out: " + text);
      throw new ApiError(resp.status, text);
    }
    return data;
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function pct(x) { return (x * 100).toFixed(1) + " %"; }

  function stateClass(s) {
    return s === "ON" ? "on" : s === "OFF" || !s ? "" : "warn";
  }

  // -- sign-in ------------------------------------------------------------------------------

  async function boot() {
    const fromUrl = params.get("token");
    if (fromUrl) {
      sessionStorage.setItem(TOKEN_KEY, fromUrl);
      params.delete("token");  // out of the address bar and the history
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
    wireStatic();
    try {
      const me = await api("/api/v1/session", { quiet: true });
      const user = me && (me.user || (me.name ? me : null));  // {"user": {...}} or the principal itself
      if (user) return signedIn(user);
    } catch (err) { /* no session (401), or a server without user accounts (404) */ }
    if (state.token) {
      try {
        const config = await api("/api/v1/console/config", { quiet: true });
        return signedIn({ name: "API token", role: "token" }, config);
      } catch (err) {
        sessionStorage.removeItem(TOKEN_KEY);
        state.token = null;
        showSignin(err.status === 401 ? "The API token was refused." : err.message);
        return;
      }
    }
    showSignin("");
  }

  function showSignin(message) {
    $("console").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("signin-user").focus();
  }

  async function signIn(ev) {
    ev.preventDefault();
    $("signin-error").textContent = "";
    state.token = null;
    try {
      const resp = await api("/api/v1/session", {
        method: "POST", quiet: true,
        json: { username: $("signin-user").value, password: $("signin-password").value },
      });
      $("signin-password").value = "";
      signedIn(resp.user);
    } catch (err) {
      $("signin-error").textContent = err.status === 404 || err.status === 405
        ? "This server has no user accounts yet: sign in with an API token."
        : "Sign-in failed: " + err.message;
    }
  }

  async function useToken(ev) {
    ev.preventDefault();
    const token = $("signin-token").value.trim();
    if (!token) return;
    state.token = token;
    try {
      const config = await api("/api/v1/console/config", { quiet: true });
      sessionStorage.setItem(TOKEN_KEY, token);
      $("signin-token").value = "";
      signedIn({ name: "API token", role: "token" }, config);
    } catch (err) {
      state.token = null;
      $("signin-error").textContent = err.status === 401 ? "The API token was refused." : err.message;
    }
  }

  async function signOut() {
    try { await api("/api/v1/session", { method: "DELETE", quiet: true }); } catch (err) { /* none */ }
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    signedOut("");
  }

  function signedOut(message) {
    state.user = null;
    stopPlayer();
    if (state.events) { state.events.close(); state.events = null; }
    showSignin(message);
  }

  /** config: the console config when the caller has fetched it already (checking a token). */
  async function signedIn(user, config) {
    state.user = user;
    $("signin").hidden = true;
    $("console").hidden = false;
    $("who").textContent = user.name + (user.role && user.role !== "token" ? " (" + user.role + ")" : "");
    try {
      state.config = config || await api("/api/v1/console/config");
    } catch (err) {
      state.config = { tiles_url: "", tiles_attribution: "", tier_targets: { 1: 0.95, 2: 0.9 } };
    }
    document.body.dataset.signedIn = "true";
    await loadTree();
    loadAlarms();
    openEvents();
  }

  // -- tree ---------------------------------------------------------------------------------

  async function loadTree() {
    const tree = $("tree");
    let data;
    try {
      data = await api("/api/v1/tree?by=" + state.treeBy + "&channels=true");
    } catch (err) {
      tree.replaceChildren(el("p", { class: "error" }, "Tree: " + err.message));
      return;
    }
    state.channels.clear();
    let online = 0;
    const small = data.tree.channels <= 200;  // a small tree opens whole; a big one two levels deep
    const render = (node, depth) => {
      if (node.kind === "channel") {
        state.channels.set(node.id, node);
        if (node.state && node.state !== "OFF") online++;
        const li = el("li", { class: "channel", dataset: { channelId: node.id, state: node.state || "OFF" } },
          el("button", { type: "button", title: node.id + " · tier " + node.tier, onclick: () => selectChannel(node.id) },
            el("span", { class: "dot " + stateClass(node.state) }), node.name || node.id,
            el("span", { class: "state muted" }, " " + (node.state || ""))));
        if (node.id === state.selected) li.classList.add("selected");
        return li;
      }
      const kids = el("ul", {}, node.children.map((c) => render(c, depth + 1)));
      if (node.kind === "root") return kids;
      return el("li", { class: "node", dataset: { nodeId: node.id, kind: node.kind } },
        el("details", { open: depth < 2 || small },
          el("summary", {}, node.name || node.id, " ", el("span", { class: "count" }, "(" + node.channels + ")")),
          kids));
    };
    tree.replaceChildren(render(data.tree, 0));
    $("tree-summary").textContent = online + " of " + state.channels.size + " channels online";
    tree.dataset.loaded = "true";
  }

  function setChannelState(channelId, s) {
    const node = state.channels.get(channelId);
    if (node) node.state = s;
    for (const li of document.querySelectorAll('.channel[data-channel-id="' + CSS.escape(channelId) + '"]')) {
      li.dataset.state = s;
      li.querySelector(".dot").className = "dot " + stateClass(s);
      li.querySelector(".state").textContent = " " + s;
    }
    if (state.mapLayer) drawMap();
  }

  function selectChannel(id) {
    state.selected = id;
    for (const li of document.querySelectorAll(".channel.selected")) li.classList.remove("selected");
    for (const li of document.querySelectorAll('.channel[data-channel-id="' + CSS.escape(id) + '"]')) li.classList.add("selected");
    const node = state.channels.get(id);
    $("channel-title").textContent = (node ? node.name + " · " : "") + id;
    clearTimeline();
    if (state.view === "playback") {
      stopPlayer();
      searchRecords();
    } else {
      showView("live");
      startLive(id);
    }
  }

  // -- video: WebRTC (WHEP) with an HTTP-FLV fallback (mpegts.js) ----------------------------

  function status(text, cls) {
    const p = $("player-status");
    p.textContent = text;
    p.className = cls || "muted";
  }

  function stopPlayer() {
    const p = state.player;
    state.player = null;
    const video = $("video");
    if (p) {
      if (p.timer) clearInterval(p.timer);
      if (p.mpegts) { try { p.mpegts.pause(); p.mpegts.unload(); p.mpegts.detachMediaElement(); p.mpegts.destroy(); } catch (e) { /* gone */ } }
      if (p.pc) { try { p.pc.close(); } catch (e) { /* gone */ } }
      // keepalive: the DELETE still goes out when the page is being closed.
      if (p.whep) api(p.whep, { method: "DELETE", quiet: true, keepalive: true }).catch(() => {});
      if (p.playbackId) {
        api("/api/v1/streams/" + encodeURIComponent(p.playbackId), { method: "DELETE", quiet: true, keepalive: true })
          .catch(() => {});
      }
    }
    video.srcObject = null;
    video.removeAttribute("src");
    delete video.dataset.transport;
    video.load();
    setPlaybackControls(false);
  }

  async function startLive(id) {
    stopPlayer();
    const mine = state.player = { channel: id, kind: "live" };
    const wanted = (params.get("transport") || "auto").toLowerCase();
    if (wanted !== "flv") {
      status("Connecting over WebRTC…");
      try {
        await playWebrtc(mine, id);
        return;
      } catch (err) {
        if (state.player !== mine) return;
        if (mine.pc) { mine.pc.close(); mine.pc = null; }
        if (mine.whep) { api(mine.whep, { method: "DELETE", quiet: true }).catch(() => {}); mine.whep = null; }
        if (wanted === "webrtc") { status("WebRTC failed: " + err.message, "error"); return; }
        status("WebRTC failed (" + err.message + "); falling back to HTTP-FLV…");
      }
    }
    try {
      const resp = await api("/api/v1/channels/" + encodeURIComponent(id) + "/play", { method: "POST" });
      if (state.player !== mine) return;
      playFlv(mine, resp.urls, "Live");
    } catch (err) {
      if (state.player === mine) status("Play failed: " + err.message, "error");
    }
  }

  async function playWebrtc(mine, id) {
    if (!window.RTCPeerConnection) throw new Error("this browser has no WebRTC");
    const pc = mine.pc = new RTCPeerConnection({ iceServers: [] });
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const video = $("video");
    const stream = new MediaStream();
    pc.ontrack = (ev) => {
      stream.addTrack(ev.track);
      if (video.srcObject !== stream) video.srcObject = stream;
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 2000);
    const resp = await api("/api/v1/channels/" + encodeURIComponent(id) + "/whep", {
      method: "POST", raw: true, body: pc.localDescription.sdp,
      headers: { "Content-Type": "application/sdp", Accept: "application/sdp" },
    });
    if (resp.status !== 201) {
      let text = resp.statusText;
      try { const j = await resp.json(); text = j.error || text; } catch (e) { /* not JSON */ }
      if (resp.status === 401) signedOut("Signed out: " + text);
      throw new Error("WHEP answered " + resp.status + ": " + text);
    }
    const location_ = resp.headers.get("Location");
    if (location_) mine.whep = new URL(location_, location.href).pathname;
    const answer = await resp.text();
    if (state.player !== mine) throw new Error("stopped");
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    video.play().catch(() => {});
    await framesWithin(video, WEBRTC_FRAME_TIMEOUT_MS);
    if (state.player !== mine) throw new Error("stopped");
    video.dataset.transport = "webrtc";
    status("Live over WebRTC", "muted");
  }

  function iceGathered(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { clearTimeout(timer); pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, ms);  // trickle-less: send what was gathered by then
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function framesWithin(video, ms) {
    return new Promise((resolve, reject) => {
      const start = video.currentTime;
      const t0 = performance.now();
      const tick = () => {
        if (video.readyState >= 2 && video.currentTime > start && video.videoWidth > 0) return resolve();
        if (performance.now() - t0 > ms) return reject(new Error("no video frames within " + ms / 1000 + " s"));
        setTimeout(tick, 100);
      };
      tick();
    });
  }

  /** Same-origin HTTP-FLV when the stream is served here; else WS-FLV from its media node
   * (a node is another origin and WebSockets need no CORS). Both URLs are signed. */
  function flvUrl(urls) {
    const http = urls.http_flv && new URL(urls.http_flv, location.href);
    if (http && http.origin === location.origin) return http.href;
    if (urls.ws_flv) return urls.ws_flv;
    return urls.server_flv || urls.http_flv;
  }

  function playFlv(mine, urls, label) {
    if (!window.mpegts || !mpegts.getFeatureList().mseLivePlayback) {
      status("This browser cannot play HTTP-FLV (no Media Source Extensions)", "error");
      return;
    }
    const video = $("video");
    video.srcObject = null;
    const url = flvUrl(urls);
    const player = mine.mpegts = mpegts.createPlayer(
      { type: "flv", isLive: true, hasAudio: false, url },
      { enableWorker: false, enableStashBuffer: false, lazyLoad: false, liveBufferLatencyChasing: true,
        autoCleanupSourceBuffer: true });
    player.on(mpegts.Events.ERROR, (type, detail, info) => {
      if (state.player === mine) status(label + " stream error: " + type + " " + detail + (info && info.msg ? " " + info.msg : ""), "error");
    });
    player.attachMediaElement(video);
    player.load();
    const played = player.play();
    if (played && played.catch) played.catch(() => {});
    video.dataset.transport = "flv";
    status(label + " over " + (url.startsWith("ws") ? "WS-FLV" : "HTTP-FLV") + " (mpegts.js)");
  }

  // -- playback ------------------------------------------------------------------------------

  function dayRange() {
    const value = $("pb-day").value;
    const start = value ? new Date(value + "T00:00:00") : new Date(new Date().toDateString());
    return [start.getTime(), start.getTime() + 86400000];
  }

  function clearTimeline() {
    for (const seg of $("timeline").querySelectorAll(".seg")) seg.remove();
    $("timeline-cursor").hidden = true;
    $("pb-status").textContent = "";
    state.records = [];
  }

  async function searchRecords() {
    const id = state.selected;
    if (!id) { $("pb-status").textContent = "Pick a channel first."; return; }
    clearTimeline();
    const [from, to] = dayRange();
    const end = Math.min(to, Date.now());
    if (end <= from) { $("pb-status").textContent = "That day has not begun."; return; }
    $("pb-status").textContent = "Searching records…";
    try {
      const data = await api("/api/v1/channels/" + encodeURIComponent(id) + "/records?start="
        + Math.floor(from / 1000) + "&end=" + Math.floor(end / 1000));
      if (state.selected !== id) return;
      state.records = data.items.filter((r) => r.start && r.end)
        .map((r) => ({ start: Date.parse(r.start), end: Date.parse(r.end), type: r.type, name: r.name }));
      const tl = $("timeline");
      for (const r of state.records) {
        const a = Math.max(r.start, from), b = Math.min(r.end, to);
        if (b <= a) continue;
        tl.append(el("div", {
          class: "seg" + (r.type === "alarm" ? " alarm" : ""),
          style: "left:" + ((a - from) / 864e5 * 100) + "%;width:" + ((b - a) / 864e5 * 100) + "%",
          title: new Date(r.start).toLocaleTimeString() + " – " + new Date(r.end).toLocaleTimeString() + " " + (r.type || ""),
        }));
      }
      $("pb-status").textContent = state.records.length + " records" + (data.complete === false ? " (incomplete answer)" : "")
        + (state.records.length ? "; click the timeline to play" : "");
    } catch (err) {
      $("pb-status").textContent = "Record search failed: " + err.message;
    }
  }

  function timelineClick(ev) {
    const rect = $("timeline").getBoundingClientRect();
    const [from] = dayRange();
    const at = from + (ev.clientX - rect.left) / rect.width * 864e5;
    const p = state.player;
    if (p && p.kind === "playback" && at >= p.start && at < p.end) {
      control({ action: "seek", offset: Math.floor((at - p.start) / 1000) });
      return;
    }
    const rec = (state.records || []).find((r) => at >= r.start && at < r.end);
    if (!rec) { $("pb-status").textContent = "No record at " + new Date(at).toLocaleTimeString(); return; }
    startPlayback(state.selected, Math.floor(at / 1000) * 1000, rec.end);
  }

  async function startPlayback(id, start, end) {
    stopPlayer();
    const mine = state.player = { channel: id, kind: "playback", start, end, scale: 1, paused: false };
    status("Opening playback…");
    try {
      const resp = await api("/api/v1/channels/" + encodeURIComponent(id) + "/playback", {
        method: "POST", json: { start: String(Math.floor(start / 1000)), end: String(Math.floor(end / 1000)) },
      });
      if (state.player !== mine) {
        api("/api/v1/streams/" + encodeURIComponent(resp.stream_id), { method: "DELETE", quiet: true }).catch(() => {});
        return;
      }
      mine.playbackId = resp.stream_id;
      playFlv(mine, resp.urls, "Playback");
      setPlaybackControls(true);
      mine.timer = setInterval(() => pollPlayback(mine), 2000);
    } catch (err) {
      if (state.player === mine) status("Playback failed: " + err.message, "error");
    }
  }

  async function pollPlayback(mine) {
    if (state.player !== mine) return;
    try {
      const s = await api("/api/v1/streams/" + encodeURIComponent(mine.playbackId), { quiet: true });
      const pos = s.position ? Date.parse(s.position) : NaN;
      if (!isNaN(pos)) {
        const [from] = dayRange();
        const cursor = $("timeline-cursor");
        cursor.hidden = false;
        cursor.style.left = ((pos - from) / 864e5 * 100) + "%";
        $("pb-position").textContent = new Date(pos).toLocaleTimeString() + (s.scale ? " ×" + s.scale : "");
      }
      if (s.state === "ended") {
        status("Playback ended" + (s.reason ? ": " + s.reason : ""));
        clearInterval(mine.timer);
      }
    } catch (err) {
      if (err.status === 404) { clearInterval(mine.timer); status("Playback ended"); }
    }
  }

  function setPlaybackControls(on) {
    $("pb-pause").disabled = !on;
    $("pb-speed").disabled = !on;
    $("pb-pause").textContent = "Pause";
    $("pb-speed").value = "1";
    if (!on) $("pb-position").textContent = "";
  }

  async function control(body) {
    const p = state.player;
    if (!p || !p.playbackId) return;
    try {
      await api("/api/v1/streams/" + encodeURIComponent(p.playbackId) + "/control", { method: "POST", json: body });
      $("pb-status").textContent = body.action + (body.scale ? " ×" + body.scale : "") + (body.offset !== undefined ? " +" + body.offset + " s" : "") + " sent";
    } catch (err) {
      $("pb-status").textContent = body.action + " failed: " + err.message;
    }
  }

  // -- PTZ -----------------------------------------------------------------------------------

  async function ptz(command) {
    const id = state.selected;
    if (!id) { $("ptz-status").textContent = "Pick a channel first."; return; }
    const speed = Number($("ptz-speed").value);
    try {
      await api("/api/v1/channels/" + encodeURIComponent(id) + "/ptz", { method: "POST", json: { command, speed } });
      $("ptz-status").textContent = command + " sent";
    } catch (err) {
      $("ptz-status").textContent = command + " failed: " + err.message;
    }
  }

  function wirePtz() {
    for (const button of document.querySelectorAll("[data-ptz]")) {
      const command = button.dataset.ptz;
      if (command === "stop") { button.addEventListener("click", () => ptz("stop")); continue; }
      // Held down it moves; let go and it stops (the server also stops a forgotten move).
      let moving = false;
      const go = (ev) => { if (ev.button > 0) return; moving = true; ptz(command); };
      const halt = () => { if (moving) { moving = false; ptz("stop"); } };
      button.addEventListener("pointerdown", go);
      button.addEventListener("pointerup", halt);
      button.addEventListener("pointerleave", halt);
      button.addEventListener("keydown", (ev) => { if ((ev.key === " " || ev.key === "Enter") && !ev.repeat) { ev.preventDefault(); moving = true; ptz(command); } });
      button.addEventListener("keyup", (ev) => { if (ev.key === " " || ev.key === "Enter") halt(); });
    }
  }

  // -- map -----------------------------------------------------------------------------------

  async function allChannels() {
    const out = [];
    for (let offset = 0; ; offset += 1000) {
      const page = await api("/api/v1/channels?kind=channel&limit=1000&offset=" + offset);
      const items = page.channels || [];
      out.push(...items);
      if (items.length < 1000) return out;
    }
  }

  async function openMap() {
    if (!window.L) { $("map-status").textContent = "Leaflet did not load."; return; }
    if (!state.map) {
      state.map = L.map("map", { worldCopyJump: true, attributionControl: true }).setView([35, 105], 4);
      const tiles = params.has("tiles") ? params.get("tiles") : (state.config && state.config.tiles_url) || "";
      if (tiles) {
        L.tileLayer(tiles, { maxZoom: 19, attribution: (state.config && state.config.tiles_attribution) || "" }).addTo(state.map);
      }
      state.mapLayer = L.featureGroup().addTo(state.map);
      state.mapTiles = tiles;
    }
    state.map.invalidateSize();
    try {
      state.mapChannels = await allChannels();
    } catch (err) {
      $("map-status").textContent = "Channels: " + err.message;
      return;
    }
    drawMap(true);
  }

  function drawMap(fit) {
    if (!state.map || !state.mapChannels) return;
    state.mapLayer.clearLayers();
    let placed = 0;
    for (const c of state.mapChannels) {
      const live = state.channels.get(c.channel_id);
      const s = live ? live.state : c.state;
      const lat = Number(c.latitude), lon = Number(c.longitude);
      if (!c.latitude || !c.longitude || !isFinite(lat) || !isFinite(lon) || Math.abs(lat) > 90 || Math.abs(lon) > 180) continue;
      placed++;
      const color = s === "ON" ? "#1f9d55" : s === "OFF" ? "#718096" : "#d69e2e";
      L.circleMarker([lat, lon], { radius: 7, color: "#fff", weight: 1.5, fillColor: color, fillOpacity: 0.95, className: "channel-point" })
        .bindTooltip((c.name || c.channel_id) + " · " + s)
        .on("click", () => selectChannel(c.channel_id))
        .addTo(state.mapLayer);
    }
    if (fit && placed) state.map.fitBounds(state.mapLayer.getBounds().pad(0.2), { maxZoom: 16 });
    $("map-status").textContent = placed + " of " + state.mapChannels.length + " channels have a location"
      + (state.mapTiles ? "" : " · no map tiles configured (console tiles_url, or ?tiles= in the URL)");
    $("map").dataset.points = String(placed);
  }

  // -- dashboard -----------------------------------------------------------------------------

  async function loadDashboard() {
    const since = $("dash-since").value;
    const targets = (state.config && state.config.tier_targets) || {};
    const header = (first) => el("tr", {}, el("th", {}, first), el("th", {}, "Channels"), el("th", {}, "Online now"),
      el("th", {}, "Online rate"), el("th", {}, ""), el("th", {}, "Working rate"), el("th", {}, "Target"));
    const row = (label, g, target) => {
      const below = target !== undefined && g.online_ratio < target;
      return el("tr", { dataset: { group: String(g.group) } },
        el("td", {}, label), el("td", {}, g.channels), el("td", {}, g.currently_online),
        el("td", {}, pct(g.online_ratio)),
        el("td", {}, el("div", { class: "meter" },
          el("div", { class: "fill" + (below ? " below" : ""), style: "width:" + (g.online_ratio * 100) + "%" }),
          target !== undefined ? el("div", { class: "target", style: "left:" + (target * 100) + "%" }) : null)),
        el("td", {}, pct(g.working_ratio)),
        el("td", {}, target === undefined ? "–" : el("span", { class: below ? "fail" : "pass" }, "≥ " + pct(target) + (below ? " missed" : " met"))));
    };
    try {
      const [tier, civil] = await Promise.all([
        api("/api/v1/reports/online?group_by=tier&since=" + since),
        api("/api/v1/reports/online?group_by=civil_code&since=" + since),
      ]);
      $("dash-tier").replaceChildren(header("Tier"), ...tier.groups.map((g) => row("Tier " + g.group, g, targets[String(g.group)])));
      $("dash-civil").replaceChildren(header("Civil code"), ...civil.groups.map((g) => row(g.group || "(none)", g, undefined)));
      if (!tier.groups.length) $("dash-tier").append(el("tr", {}, el("td", { colspan: 7 }, "No channels in this window.")));
    } catch (err) {
      $("dash-tier").replaceChildren(el("tr", {}, el("td", { class: "error" }, "Report: " + err.message)));
    }
  }

  // -- alarms and the event feed -------------------------------------------------------------

  function alarmRow(a, fresh) {
    return el("tr", { class: (a.channel_id ? "clickable" : "") + (fresh ? " fresh" : ""),
      onclick: a.channel_id && state.channels.has(a.channel_id) ? () => selectChannel(a.channel_id) : null },
    el("td", {}, fmtTime(a.alarm_time || a.received_at)), el("td", {}, a.priority),
    el("td", {}, a.type_name || a.method_name || a.type || ""), el("td", {}, a.device_id),
    el("td", {}, a.channel_id || ""), el("td", {}, a.description || ""));
  }

  async function loadAlarms() {
    try {
      const data = await api("/api/v1/alarms?limit=100");
      $("alarm-rows").replaceChildren(...data.alarms.map((a) => alarmRow(a, false)));
      $("alarm-status").textContent = data.count ? "" : "No alarms yet; new ones appear here as they come.";
    } catch (err) {
      $("alarm-status").textContent = "Alarms: " + err.message;
    }
  }

  function openEvents() {
    if (state.events) state.events.close();
    // EventSource sends the cookie but no headers: a token goes in the query.
    const q = "types=alarm,channel,device" + (state.token ? "&token=" + encodeURIComponent(state.token) : "");
    const es = state.events = new EventSource("/api/v1/events?" + q);
    const parse = (ev) => { try { return JSON.parse(ev.data); } catch (e) { return null; } };
    es.addEventListener("alarm", (ev) => {
      const e = parse(ev);
      if (!e) return;
      const rows = $("alarm-rows");
      rows.prepend(alarmRow(e.data, true));
      while (rows.children.length > 200) rows.lastChild.remove();
      $("alarm-status").textContent = "";
      if (state.view !== "alarms") {
        state.alarmsUnseen++;
        $("alarm-badge").textContent = String(state.alarmsUnseen);
        $("alarm-badge").hidden = false;
      }
    });
    es.addEventListener("channel.state", (ev) => {
      const e = parse(ev);
      if (e && e.data) setChannelState(e.data.channel_id, e.data.state);
    });
    es.addEventListener("gap", () => loadTree());
  }

  // -- views ---------------------------------------------------------------------------------

  function showView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".view-tab")) tab.setAttribute("aria-selected", String(tab.dataset.view === view));
    const player = view === "live" || view === "playback";
    $("view-player").hidden = !player;
    $("ptz").hidden = view !== "live";
    $("playback-panel").hidden = view !== "playback";
    $("view-map").hidden = view !== "map";
    $("view-dashboard").hidden = view !== "dashboard";
    $("view-alarms").hidden = view !== "alarms";
    if (view === "map") openMap();
    if (view === "dashboard") loadDashboard();
    if (view === "alarms") { state.alarmsUnseen = 0; $("alarm-badge").hidden = true; }
  }

  function wireStatic() {
    $("signin-form").addEventListener("submit", signIn);
    $("token-form").addEventListener("submit", useToken);
    $("signout").addEventListener("click", signOut);
    for (const tab of document.querySelectorAll(".view-tab")) {
      tab.addEventListener("click", () => {
        const view = tab.dataset.view;
        const wasPlayer = state.view === "live" || state.view === "playback";
        if (wasPlayer && (view === "live" || view === "playback") && view !== state.view) stopPlayer();
        showView(view);
        if (view === "live" && state.selected && !state.player) startLive(state.selected);
        if (view === "playback" && state.selected) searchRecords();
      });
    }
    for (const b of document.querySelectorAll(".tree-by")) {
      b.addEventListener("click", () => {
        state.treeBy = b.dataset.by;
        for (const o of document.querySelectorAll(".tree-by")) o.setAttribute("aria-selected", String(o === b));
        loadTree();
      });
    }
    wirePtz();
    const today = new Date();
    $("pb-day").value = today.getFullYear() + "-" + String(today.getMonth() + 1).padStart(2, "0") + "-" + String(today.getDate()).padStart(2, "0");
    $("pb-search").addEventListener("click", searchRecords);
    $("pb-day").addEventListener("change", searchRecords);
    $("timeline").addEventListener("click", timelineClick);
    $("pb-pause").addEventListener("click", () => {
      const p = state.player;
      if (!p || !p.playbackId) return;
      p.paused = !p.paused;
      control({ action: p.paused ? "pause" : "resume" });
      $("pb-pause").textContent = p.paused ? "Resume" : "Pause";
    });
    $("pb-speed").addEventListener("change", () => control({ action: "speed", scale: Number($("pb-speed").value) }));
    $("dash-refresh").addEventListener("click", loadDashboard);
    $("dash-since").addEventListener("change", loadDashboard);
    showView("live");
    window.addEventListener("pagehide", () => stopPlayer());
  }

  document.addEventListener("DOMContentLoaded", boot);
})();
