// The live event console: connects to /ws exactly as the product's
// snippet does (socket.io-client, path /ws, auth.token), shows the
// tenant's events as they arrive, and publishes through POST /v1/events.
// Everything it shows comes from the broker; no state is kept but the last
// event id (to resume after a reconnect) and the token in sessionStorage.
'use strict';

(function () {
  const MAX_SHOWN = 500;
  const $ = (id) => document.getElementById(id);
  const els = {
    state: $('state'), token: $('token'), tenant: $('tenant'), connect: $('connect'),
    disconnect: $('disconnect'), notice: $('notice'), filter: $('filter'), pause: $('pause'),
    clear: $('clear'), counts: $('counts'), events: $('events'), detailPanel: $('detail-panel'),
    detail: $('detail'), detailTitle: $('detail-title'), closeDetail: $('close-detail'),
    pubType: $('pub-type'), pubData: $('pub-data'), pubResult: $('pub-result'),
  };
  let socket = null;
  let paused = false;
  let received = 0;
  let held = [];            // events that arrived while paused
  const shown = [];         // newest first

  function setState(state, text) {
    els.state.dataset.state = state;
    els.state.textContent = text || state;
    els.state.className = 'state ' + (state === 'connected' ? 'on' : state === 'disconnected' ? 'off' : 'wait');
  }

  function notice(text, kind) {
    els.notice.textContent = text;
    els.notice.className = 'notice' + (kind ? ' ' + kind : '');
  }

  function matches(event) {
    const prefix = els.filter.value.trim();
    return !prefix || event.type.startsWith(prefix);
  }

  function row(event) {
    const li = document.createElement('li');
    li.dataset.type = event.type;
    if (event.type.startsWith('system.')) li.classList.add('system');
    const time = document.createElement('span');
    time.className = 'time';
    time.textContent = (event.timestamp || '').slice(11, 23);
    const type = document.createElement('span');
    type.className = 'type';
    type.textContent = event.type;
    const data = document.createElement('span');
    data.className = 'data';
    data.textContent = JSON.stringify(event.data);
    li.append(time, type, data);
    li.addEventListener('click', () => showDetail(event));
    return li;
  }

  function render() {
    els.events.replaceChildren(...shown.filter(matches).map(row));
    const visible = els.events.children.length;
    els.counts.textContent = `${received} events` + (visible !== shown.length ? `, ${visible} shown` : '') +
      (held.length ? `, ${held.length} held while paused` : '');
  }

  function add(event) {
    received += 1;
    if (paused) {
      held.push(event);
      render();
      return;
    }
    shown.unshift(event);
    if (shown.length > MAX_SHOWN) shown.length = MAX_SHOWN;
    if (matches(event)) {
      els.events.prepend(row(event));
      while (els.events.children.length > MAX_SHOWN) els.events.lastChild.remove();
    }
    els.counts.textContent = `${received} events`;
  }

  function showDetail(event) {
    els.detailTitle.textContent = event.type;
    els.detail.textContent = JSON.stringify(event, null, 2);
    els.detailPanel.hidden = false;
  }

  function connect(token) {
    if (socket) socket.disconnect();
    const auth = { token };
    const tenant = els.tenant.value.trim();
    if (tenant) auth.activeTenantId = tenant;
    sessionStorage.setItem('tc-console-token', token);
    setState('connecting');
    notice('');
    socket = io(location.origin, { path: '/ws', auth, transports: ['websocket', 'polling'] });
    socket.on('session', (s) => {
      setState('connected', `connected: ${s.tenant_id}`);
      const parts = [`tenant ${s.tenant_id}`];
      if (s.resumed) parts.push(s.recovered ? 'resumed, nothing missed' : 'resumed, but history did not reach back: events were missed');
      notice(parts.join(' · '), s.resumed && !s.recovered ? 'warn' : '');
    });
    socket.on('event', (event) => {
      // Resume from here after a reconnect (the broker replays what was missed).
      if (event.id) socket.auth.lastEventId = event.id;
      if (event.type === 'system.events_dropped') {
        notice(`rate limit: events dropped ${JSON.stringify(event.data.dropped || {})}`, 'warn');
      }
      add(event);
    });
    socket.on('disconnect_reason', (r) => notice(`disconnected: ${r.code}: ${r.message}`, 'warn'));
    socket.on('connect_error', (err) => {
      setState('disconnected', 'refused');
      notice(`refused: ${err.message}`, 'bad');
    });
    socket.on('disconnect', (reason) => {
      setState(socket.active ? 'reconnecting' : 'disconnected');
      if (reason !== 'io client disconnect') notice(`connection lost (${reason}); reconnecting…`, 'warn');
    });
    socket.io.on('reconnect_attempt', (n) => setState('reconnecting', `reconnecting (${n})`));
    els.connect.disabled = true;
    els.disconnect.disabled = false;
  }

  $('connect-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = els.token.value.trim();
    if (!token) {
      notice('paste a token first', 'bad');
      return;
    }
    connect(token);
  });
  els.disconnect.addEventListener('click', () => {
    if (socket) socket.disconnect();
    socket = null;
    setState('disconnected');
    els.connect.disabled = false;
    els.disconnect.disabled = true;
  });
  els.filter.addEventListener('input', render);
  els.pause.addEventListener('click', () => {
    paused = !paused;
    els.pause.textContent = paused ? 'Resume' : 'Pause';
    if (!paused) {
      const waiting = held;
      held = [];
      received -= waiting.length;
      waiting.forEach(add);
    }
    render();
  });
  els.clear.addEventListener('click', () => {
    shown.length = 0;
    held = [];
    received = 0;
    render();
  });
  els.closeDetail.addEventListener('click', () => { els.detailPanel.hidden = true; });

  $('publish-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    let data;
    try {
      data = JSON.parse(els.pubData.value);
    } catch (err) {
      els.pubResult.textContent = `data is not JSON: ${err.message}`;
      els.pubResult.className = 'notice bad';
      return;
    }
    const token = els.token.value.trim();
    const res = await fetch('/v1/events', {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ type: els.pubType.value.trim(), data }),
    });
    const body = await res.json().catch(() => ({}));
    if (res.ok) {
      els.pubResult.textContent = `published ${body.results?.[0]?.id ?? ''}`;
      els.pubResult.className = 'notice';
    } else {
      els.pubResult.textContent = `${body.code || res.status}: ${body.message || ''}`;
      els.pubResult.className = 'notice bad';
    }
  });

  // In development mode the broker hands the console its token (loopback
  // only); otherwise the last token pasted in this tab.
  (async () => {
    const kept = sessionStorage.getItem('tc-console-token');
    try {
      const res = await fetch('/console/dev-token');
      if (res.ok) {
        const { token } = await res.json();
        els.token.value = token;
        connect(token);
        return;
      }
    } catch { /* not in development mode */ }
    if (kept) els.token.value = kept;
  })();
})();
