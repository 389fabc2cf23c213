// edgeroom's page: the box's streams as live WHEP players, its rooms (join one with your
// camera), vision results and detections as they arrive, and the services' health.
// Plain JavaScript, no build step, nothing fetched from elsewhere. Every text from the box
// goes into the DOM as text (textContent / text nodes), never as HTML.
'use strict';

(() => {
  const TOKEN_KEY = 'edgeroom.token';
  const REFRESH_MS = 4000;
  const MAX_EVENTS = 50;
  const RETRY_MS = 3000;

  // the test hook: tests call getStats on these
  const hook = window.edgeroom = {players: {}, joined: null, events: [], token: false};

  let token = null;
  let running = false;
  let timer = null;
  let source = null;                 // the EventSource
  const players = new Map();         // stream -> {pc, location, figure, video, retry}
  let call = null;                   // {room, pc, location, stream}

  const $ = id => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') node.className = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class AuthError extends Error {}

  // -- the token --
  function takeTokenFromUrl() {
    const url = new URL(location.href);
    const t = url.searchParams.get('token');
    if (t !== null) {
      localStorage.setItem(TOKEN_KEY, t);
      url.searchParams.delete('token');        // keep it out of the address bar and history
      history.replaceState(null, '', url.pathname + url.search + url.hash);
    }
  }

  function askToken(message) {
    stop();
    token = null;
    hook.token = false;
    $('app').hidden = true;
    $('change-token').hidden = true;
    $('login').hidden = false;
    $('token-error').textContent = message || '';
    setConn('signed out', 'bad');
    $('token-input').focus();
  }

  $('token-form').addEventListener('submit', e => {
    e.preventDefault();
    const t = $('token-input').value.trim();
    if (!t) return;
    localStorage.setItem(TOKEN_KEY, t);
    $('token-input').value = '';
    start(t);
  });
  $('change-token').addEventListener('click', () => {
    localStorage.removeItem(TOKEN_KEY);
    askToken('');
  });

  // -- the API --
  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers, {Authorization: `Bearer ${token}`});
    const r = await fetch(path, Object.assign({}, options, {headers}));
    if (r.status === 401) {
      let why = 'the box refused the token';
      try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
      localStorage.removeItem(TOKEN_KEY);
      askToken(`The box refused the token: ${why}`);
      throw new AuthError(why);
    }
    return r;
  }

  async function getJson(path) {
    const r = await api(path);
    if (!r.ok) throw new Error(`${path}: ${r.status} ${r.statusText}`);
    return r.json();
  }

  function setConn(text, cls) {
    const c = $('conn');
    c.textContent = text;
    c.className = `badge ${cls || ''}`;
  }

  // -- start and stop --
  function start(t) {
    stop();
    token = t;
    hook.token = true;
    running = true;
    $('login').hidden = true;
    $('app').hidden = false;
    $('change-token').hidden = false;
    setConn('connecting', '');
    listen();
    refresh();
    timer = setInterval(refresh, REFRESH_MS);
  }

  function stop() {
    running = false;
    if (timer) clearInterval(timer);
    timer = null;
    if (source) source.close();
    source = null;
    for (const stream of [...players.keys()]) removePlayer(stream);
    leave();
  }

  async function refresh() {
    try {
      const [streams, rooms, status] = await Promise.all(
        [getJson('/api/streams'), getJson('/api/rooms'), getJson('/api/status')]);
      if (!running) return;
      renderStreams(streams);
      renderRooms(rooms);
      renderStatus(status);
      setConn('connected', 'good');
    } catch (e) {
      if (e instanceof AuthError || !running) return;
      setConn('unreachable', 'bad');
      console.warn('refresh:', e);
    }
  }

  // -- WebRTC: one offer, ICE gathered in full (no trickle), the answer from the box --
  function gathered(pc, ms = 3000) {
    return new Promise(resolve => {
      if (pc.iceGatheringState === 'complete') return resolve();
      const done = () => { if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); } };
      const t = setTimeout(resolve, ms);     // send what we have
      pc.addEventListener('icegatheringstatechange', done);
    });
  }

  async function negotiate(pc, path) {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const r = await api(path, {method: 'POST', headers: {'Content-Type': 'application/sdp'},
                               body: pc.localDescription.sdp});
    if (r.status !== 201 && r.status !== 200) {
      let why = `${r.status} ${r.statusText}`;
      try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
      throw new Error(why);
    }
    const loc = r.headers.get('Location');
    await pc.setRemoteDescription({type: 'answer', sdp: await r.text()});
    return loc ? new URL(loc, location.href).pathname : null;
  }

  function hangUp(loc) {
    if (loc && token) api(loc, {method: 'DELETE', keepalive: true}).catch(() => {});
  }

  function attach(video, e) {
    const stream = e.streams && e.streams[0] ? e.streams[0] : (video.srcObject || new MediaStream());
    if (!e.streams || !e.streams[0]) stream.addTrack(e.track);
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch(() => {});
  }

  // -- the streams: one WHEP player per video stream --
  const isVideo = s => (s.kind === 'encoded' || s.kind === 'video') && !String(s.stream).endsWith('-audio');

  function renderStreams(streams) {
    const video = (Array.isArray(streams) ? streams : []).filter(isVideo);
    const names = new Set(video.map(s => s.stream));
    for (const name of [...players.keys()]) if (!names.has(name)) removePlayer(name);
    for (const s of video) {
      if (!players.has(s.stream)) addPlayer(s.stream);
      const p = players.get(s.stream);
      p.info.textContent = [s.kind, s.rate_hz ? `${Number(s.rate_hz).toFixed(1)} fps` : null,
                            s.status && s.status !== 'alive' ? s.status : null].filter(Boolean).join(' · ');
    }
    $('no-streams').hidden = video.length > 0;
  }

  function addPlayer(name) {
    const video = el('video', {muted: '', autoplay: '', playsinline: ''});
    video.muted = true;
    const state = el('span', {class: 'badge'}, 'starting');
    const info = el('span', {class: 'muted'});
    const sound = el('button', {type: 'button', class: 'small', title: 'sound on/off'}, 'sound off');
    sound.addEventListener('click', () => {
      video.muted = !video.muted;
      sound.textContent = video.muted ? 'sound off' : 'sound on';
    });
    const figure = el('figure', {class: 'player', 'data-stream': name}, video,
                      el('figcaption', {}, el('strong', {}, name), ' ', info, ' ', state, sound));
    $('streams').append(figure);
    const p = {name, pc: null, location: null, figure, video, state, info, retry: null};
    players.set(name, p);
    play(p);
  }

  async function play(p) {
    const pc = new RTCPeerConnection();
    p.pc = pc;
    hook.players[p.name] = pc;
    pc.addTransceiver('video', {direction: 'recvonly'});
    pc.addTransceiver('audio', {direction: 'recvonly'});
    pc.addEventListener('track', e => attach(p.video, e));
    pc.addEventListener('connectionstatechange', () => {
      if (p.pc !== pc) return;
      p.state.textContent = pc.connectionState;
      p.state.className = `badge ${pc.connectionState === 'connected' ? 'good' : ''}`;
      if (pc.connectionState === 'failed') retry(p);
    });
    try {
      p.location = await negotiate(pc, `/whep/${encodeURIComponent(p.name)}`);
    } catch (e) {
      if (e instanceof AuthError || p.pc !== pc) return;
      p.state.textContent = `error: ${e.message}`;
      p.state.className = 'badge bad';
      console.warn(`whep ${p.name}:`, e);
      retry(p);
    }
  }

  function retry(p) {
    if (p.retry || !players.has(p.name)) return;
    p.retry = setTimeout(() => {
      p.retry = null;
      if (players.get(p.name) !== p || !running) return;
      close(p);
      play(p);
    }, RETRY_MS);
  }

  function close(p) {
    hangUp(p.location);
    p.location = null;
    if (p.pc) p.pc.close();
    p.pc = null;
    p.video.srcObject = null;
  }

  function removePlayer(name) {
    const p = players.get(name);
    if (!p) return;
    if (p.retry) clearTimeout(p.retry);
    close(p);
    p.figure.remove();
    players.delete(name);
    delete hook.players[name];
  }

  // -- the rooms, and joining one --
  function fmtTime(t) {
    const n = Number(t);
    return Number.isFinite(n) && n > 0 ? new Date(n * 1000).toLocaleTimeString() : '';
  }

  function renderRooms(rooms) {
    const box = $('rooms');
    const names = Object.keys(rooms || {}).sort();
    box.replaceChildren(...names.map(room => {
      const sessions = Array.isArray(rooms[room]) ? rooms[room] : [];
      const inThis = call && call.room === room;
      const button = el('button', {type: 'button', class: 'join'}, inThis ? 'Leave' : 'Join this room');
      button.disabled = Boolean(call && !inThis);
      button.addEventListener('click', () => (inThis ? leave() : join(room)));
      return el('div', {class: 'room card', 'data-room': room},
        el('h3', {}, room, ' ', el('span', {class: 'muted'}, `${sessions.length} session(s)`), button),
        el('ul', {class: 'sessions'}, ...sessions.map(s => el('li', {'data-session': s.session || ''},
          el('strong', {}, s.session || '?'), ' ',
          el('span', {class: 'muted'}, [s.kind, s.service, fmtTime(s.since) && `since ${fmtTime(s.since)}`]
            .filter(Boolean).join(' · ')),
          el('ul', {class: 'tracks'}, ...(Array.isArray(s.tracks) ? s.tracks : []).map(t =>
            el('li', {}, `${t.kind || t.id || 'track'}: ${t.stream || '?'}${t.format ? ` (${t.format})` : ''}`)))))));
    }));
    $('no-rooms').hidden = names.length > 0;
  }

  async function join(room) {
    if (call) return;
    const session = `web-${Math.random().toString(16).slice(2, 8)}`;
    const pc = new RTCPeerConnection();
    call = {room, pc, location: null, stream: null};
    hook.joined = pc;
    $('call-room').textContent = room;
    $('call-state').textContent = 'starting';
    $('call-section').hidden = false;
    $('remote-video').srcObject = null;
    refreshRoomButtons();
    const mine = call;
    try {
      const stream = await navigator.mediaDevices.getUserMedia({video: true, audio: true});
      mine.stream = stream;
      if (call !== mine) { stream.getTracks().forEach(t => t.stop()); return; }
      $('local-video').srcObject = stream;
      stream.getTracks().forEach(t => pc.addTrack(t, stream));
      // three more video tracks to receive on: in a bridged room of four or more, every other participant
      // gets a track of its own (docs/bridge.md); a track with nobody on it stays hidden
      const more = [0, 1, 2].map(() => pc.addTransceiver('video', {direction: 'recvonly'}));
      pc.addEventListener('track', e => {
        const i = more.indexOf(e.transceiver);
        if (i < 0) attach($('remote-video'), e);
        else attachMore(i, e.track);
      });
      pc.addEventListener('connectionstatechange', () => {
        if (call === mine) $('call-state').textContent = pc.connectionState;
      });
      const path = `/rooms/${encodeURIComponent(room)}/call?session=${encodeURIComponent(session)}`;
      mine.location = await negotiate(pc, path);
      if (call !== mine) hangUp(mine.location);
      else refresh();
    } catch (e) {
      if (e instanceof AuthError) return;
      console.warn(`join ${room}:`, e);
      if (call === mine) {
        leave();
        $('call-section').hidden = false;
        $('call-room').textContent = room;
        $('call-state').textContent = `could not join: ${e.message}`;
      }
    }
  }

  function attachMore(i, track) {
    const players = $('call-section').querySelector('.players');
    const video = el('video', {id: `remote-video-${i + 2}`, autoplay: '', playsinline: ''});
    video.muted = true;                       // the room's sound comes with the first track
    const figure = el('figure', {class: 'player more'}, video, el('figcaption', {}, 'another participant'));
    figure.hidden = true;
    video.addEventListener('resize', () => { figure.hidden = !video.videoWidth; });
    video.srcObject = new MediaStream([track]);
    players.appendChild(figure);
    video.play().catch(() => {});
  }

  function leave() {
    if (!call) { $('call-section').hidden = true; return; }
    const c = call;
    call = null;
    hook.joined = null;
    hangUp(c.location);
    if (c.stream) c.stream.getTracks().forEach(t => t.stop());
    c.pc.close();
    $('local-video').srcObject = null;
    $('remote-video').srcObject = null;
    $('call-section').querySelectorAll('figure.more').forEach(f => f.remove());
    $('call-section').hidden = true;
    refreshRoomButtons();
  }
  $('leave').addEventListener('click', () => { leave(); refresh(); });

  function refreshRoomButtons() {
    for (const card of document.querySelectorAll('#rooms .room')) {
      const b = card.querySelector('button.join');
      const inThis = call && call.room === card.dataset.room;
      b.textContent = inThis ? 'Leave' : 'Join this room';
      b.disabled = Boolean(call && !inThis);
    }
  }

  // -- the services' health --
  function renderStatus(status) {
    status = status || {};
    if (status.box) { $('box-name').textContent = status.box; document.title = status.box; }
    const rows = (Array.isArray(status.services) ? status.services : []).map(s => {
      const state = String(s.state || '?');
      return el('tr', {'data-service': s.service || ''},
        el('td', {}, s.service || '?'),
        el('td', {}, el('span', {class: `badge ${stateClass(state)}`}, state)),
        el('td', {}, typeof s.status === 'string' ? s.status : (s.status ? JSON.stringify(s.status) : '')));
    });
    $('services').tBodies[0].replaceChildren(...rows);
  }

  function stateClass(state) {
    if (['ready', 'alive', 'running', 'active'].includes(state)) return 'good';
    if (['failed', 'dead', 'stuck', 'error'].includes(state)) return 'bad';
    return 'warn';
  }

  // -- events (Server-Sent Events: no headers, so the token is a query parameter) --
  const TOPICS = ['hook.ON_VIDEO_DETECTION', 'hook.ON_VISION_RESULT', 'vision.view', 'service.state',
                  'hook.ON_VIDEO_SESSION_STARTED', 'hook.ON_VIDEO_SESSION_ENDED'];

  function listen() {
    const es = new EventSource(`/api/events?access_token=${encodeURIComponent(token)}`);
    source = es;
    for (const topic of TOPICS) es.addEventListener(topic, e => onEvent(topic, e.data));
    es.addEventListener('error', () => {
      if (source !== es || es.readyState !== EventSource.CLOSED) return;  // it reconnects by itself
      source = null;
      // refused (a 401?) or gone: ask the API, which shows the token form on a 401; listen again later
      setTimeout(() => { if (running && !source) { refresh(); listen(); } }, RETRY_MS);
    });
  }

  function onEvent(topic, raw) {
    let ev;
    try { ev = JSON.parse(raw); } catch (_) { return; }
    if (!ev || typeof ev !== 'object') return;
    hook.events.unshift(ev);
    hook.events.length = Math.min(hook.events.length, 200);
    const d = ev.data && typeof ev.data === 'object' ? ev.data : {};
    const pct = c => (Number.isFinite(Number(c)) ? ` ${Math.round(Number(c) * 100)}%` : '');
    let what = topic, text = '', detail = null, cls = '';
    if (topic === 'hook.ON_VIDEO_DETECTION') {
      what = 'detection'; cls = 'detection';
      const labels = Array.isArray(d.labels) ? d.labels.join(', ') : (d.labels || '');
      text = `${d.stream || d.room || ''}: ${labels}${pct(d.confidence)}`;
      const dets = Array.isArray(d.detections) ? d.detections : [];
      if (dets.length > 1) detail = dets.slice(0, 10).map(x => `${x.label || '?'}${pct(x.confidence)}`).join(' · ');
    } else if (topic === 'hook.ON_VISION_RESULT') {
      what = 'vision'; cls = 'vision';
      const r = d.result && typeof d.result === 'object' ? d.result : {};
      text = `${d.stream || d.room || ''}: ${r.description || (typeof d.result === 'string' ? d.result : '')}`;
      const labels = Array.isArray(r.labels) ? r.labels.join(', ') : '';
      detail = [d.question && `asked: ${d.question}`, labels && `labels: ${labels}`].filter(Boolean).join(' · ');
    } else if (topic === 'vision.view') {
      what = 'room view'; cls = 'vision';
      text = `${d.room || ''}: ${d.note || ''}`;
    } else if (topic === 'service.state') {
      what = 'service';
      text = `${d.service || ev.source || ''}: ${d.previous ? `${d.previous} → ` : ''}${d.state || ''}`;
      refresh();
    } else {
      what = topic.endsWith('_STARTED') ? 'session started' : 'session ended';
      text = `${d.room || ''}: ${d.session || ''}`;
      refresh();
    }
    const item = el('li', {class: cls, 'data-topic': topic},
      el('span', {class: 'time'}, fmtTime(ev.time) || new Date().toLocaleTimeString()),
      el('span', {class: 'what'}, what), el('span', {class: 'text'}, text),
      detail ? el('div', {class: 'detail muted'}, detail) : null);
    const list = $('events');
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    $('no-events').hidden = true;
  }

  // -- go --
  window.addEventListener('pagehide', stop);
  takeTokenFromUrl();
  const saved = localStorage.getItem(TOKEN_KEY);
  if (saved) start(saved); else askToken('');
})();
