/*
 * The measuring dashboard: the machine and the jobs, updated by polling the server's JSON API
 * (api/..., the same answers as the TCP protocol), and a page for each job with its request, its
 * log and its results (values, paged tables, charts from charts.js).
 * Builds every piece of the page with textContent: nothing the server sends is read as HTML.
 */
'use strict';

(() => {
  const POLL = 1000;            // ms between two looks at the jobs
  const MACHINE_EVERY = 3;      // machine figures every this many polls
  const HISTORY = 300;          // machine samples kept for its chart
  const RECENT = 30;            // finished jobs listed
  const TABLE_ROWS = 20;        // rows of a table result per page
  const CHART_ROWS = 10000;     // rows of a result drawn at most (one Result page)
  const ACTIVE = new Set(['queued', 'running']);

  // ---------------------------------------------------------------- talking to the server

  class ApiError extends Error {
    constructor(code, message) { super(message); this.code = code; }
  }

  /** The answer to api/<path>; rejects with ApiError carrying the protocol's Code and Message. */
  async function api(path, init = {}) {
    let response;
    try {
      response = await fetch('api/' + path, {
        credentials: 'same-origin',
        cache: 'no-store',
        ...init,
        headers: { Accept: 'application/json', ...(init.headers || {}) },
      });
    } catch (e) {
      throw new ApiError('Offline', 'the server cannot be reached');
    }
    let answer;
    try {
      answer = await response.json();
    } catch (e) {
      throw new ApiError('Internal', `the server answered ${response.status} without JSON`);
    }
    if (answer.Status === 'Error') {
      if (answer.Error.Code === 'Unauthorized') {
        location.assign('login?next=' + encodeURIComponent(location.hash || '#/'));
      }
      throw new ApiError(answer.Error.Code, answer.Error.Message);
    }
    return answer;
  }

  const jobPath = (id) => 'jobs/' + encodeURIComponent(id);

  // ---------------------------------------------------------------- small helpers

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (value !== undefined && value !== null) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '–';
    seconds = Math.max(0, seconds);
    if (seconds < 10) return seconds.toFixed(1) + ' s';
    if (seconds < 60) return Math.floor(seconds) + ' s';
    const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
    if (m < 60) return `${m} min ${String(s).padStart(2, '0')} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${String(m % 60).padStart(2, '0')} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function clock(iso) {
    if (!iso) return '–';
    const t = new Date(iso);
    const today = new Date().toDateString() === t.toDateString();
    return today ? t.toLocaleTimeString() : t.toLocaleString();
  }

  function value(v) {
    if (v === null || v === undefined) return '–';
    if (typeof v === 'number') return Number.isInteger(v) ? v.toLocaleString() : v.toPrecision(6).replace(/\.?0+$/, '');
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }

  function bar(percent) {
    const fill = el('span');
    fill.style.width = Math.min(100, Math.max(0, percent)) + '%';
    return el('div', { class: 'bar' + (percent >= 90 ? ' high' : '') }, fill);
  }

  function stateBadge(state) {
    return el('span', { class: 'state ' + state, text: state });
  }

  // The server's clock: elapsed times are measured on it, whatever the browser's says.
  let skew = 0;
  const serverNow = () => (Date.now() + skew) / 1e3;
  const since = (iso) => (iso ? serverNow() - Date.parse(iso) / 1e3 : null);

  // ---------------------------------------------------------------- cancelling

  /** A Cancel button: the first click asks to confirm, the second sends the POST. */
  function cancelButton(id) {
    let armed = null;
    const button = el('button', { class: 'cancel', type: 'button', text: 'Cancel', 'data-job': id });
    button.addEventListener('click', async () => {
      if (!armed) {
        button.textContent = 'Confirm cancel';
        armed = setTimeout(() => { armed = null; button.textContent = 'Cancel'; }, 4000);
        return;
      }
      clearTimeout(armed);
      button.disabled = true;
      button.textContent = 'Cancelling…';
      try {
        const answer = await api(jobPath(id) + '/cancel', { method: 'POST' });
        button.textContent = answer.Response.State;
      } catch (e) {
        button.textContent = 'Cancel failed';
        button.title = e.message;
      }
      refresh();
    });
    return button;
  }

  // ---------------------------------------------------------------- the overview

  /** Keep a tbody's rows in step with ``items`` by key, so that buttons survive each poll. */
  function syncRows(tbody, items, key, create, update, empty) {
    const rows = new Map([...tbody.querySelectorAll('tr[data-key]')].map((tr) => [tr.dataset.key, tr]));
    tbody.querySelector('tr.empty-row')?.remove();
    let cursor = tbody.firstElementChild;
    for (const item of items) {
      let tr = rows.get(key(item));
      if (tr) rows.delete(key(item));
      else { tr = create(item); tr.dataset.key = key(item); }
      update(tr, item);
      // Moved only when out of place, so that a row being clicked stays put.
      if (tr === cursor) cursor = cursor.nextElementSibling;
      else tbody.insertBefore(tr, cursor);
    }
    for (const tr of rows.values()) tr.remove();
    if (items.length === 0) {
      const cells = tbody.parentElement.querySelectorAll('th').length;
      tbody.append(el('tr', { class: 'empty-row' }, el('td', { class: 'empty', colspan: cells, text: empty })));
    }
  }

  function fileCell(path) {
    return el('td', { title: path, text: path.split('/').pop() });
  }

  function jobLink(id) {
    return el('a', { href: '#/jobs/' + encodeURIComponent(id), text: id });
  }

  const statuses = new Map();   // job id -> its last Status Response; kept for ended jobs

  function renderRunning(jobs) {
    syncRows($('running').tBodies[0], jobs, (j) => j.Job, (j) => el('tr', {},
      el('td', {}, jobLink(j.Job)), fileCell(j.File),
      el('td', {}, el('div', { class: 'progress' }, bar(0), el('span', { class: 'label' }))),
      el('td', { class: 'elapsed' }), el('td', {}, cancelButton(j.Job)),
    ), (tr, j) => {
      const status = statuses.get(j.Job) || {};
      const progress = status.Progress;
      const fill = tr.querySelector('.bar > span');
      const label = tr.querySelector('.progress .label');
      if (progress && progress.Total > 0) {
        fill.style.width = (100 * progress.Done / progress.Total).toFixed(1) + '%';
        label.textContent = `${progress.Done} / ${progress.Total} tasks`;
      } else {
        label.textContent = 'starting';
      }
      tr.dataset.done = progress ? progress.Done : '';
      tr.querySelector('.elapsed').textContent = duration(since(status.Started));
    }, 'no job is running');
  }

  function renderQueued(jobs) {
    syncRows($('queued').tBodies[0], jobs, (j) => j.Job, (j) => el('tr', {},
      el('td', {}, jobLink(j.Job)), fileCell(j.File),
      el('td', { text: clock(j.Submitted) }), el('td', { class: 'waiting' }), el('td', {}, cancelButton(j.Job)),
    ), (tr, j) => {
      tr.querySelector('.waiting').textContent = duration(since(j.Submitted));
    }, 'no job is waiting');
  }

  function renderRecent(jobs) {
    syncRows($('recent').tBodies[0], jobs, (j) => j.Job, (j) => el('tr', {},
      el('td', {}, jobLink(j.Job)), fileCell(j.File),
      el('td', {}, stateBadge(j.State)), el('td', { class: 'finished' }), el('td', { class: 'outcome' }),
    ), (tr, j) => {
      const status = statuses.get(j.Job) || {};
      tr.querySelector('.finished').textContent = clock(status.Finished);
      const outcome = tr.querySelector('.outcome');
      if (status.Error) {
        outcome.className = 'outcome message';
        outcome.textContent = `${status.Error.Code}: ${status.Error.Message}`;
        outcome.title = status.Error.Message;
      } else {
        outcome.className = 'outcome';
        outcome.textContent = status.Elapsed !== undefined ? duration(status.Elapsed) : '';
      }
    }, 'no job has ended yet');
  }

  async function pollJobs() {
    const list = (await api('jobs?limit=' + (RECENT + 100))).Response.Jobs;
    const running = list.filter((j) => j.State === 'running');
    const queued = list.filter((j) => j.State === 'queued').reverse();   // oldest first: next to run
    const recent = list.filter((j) => !ACTIVE.has(j.State)).slice(0, RECENT);
    // Running jobs change; ended ones do not once known.
    const wanted = [...running, ...recent.filter((j) => !statuses.has(j.Job) || ACTIVE.has(statuses.get(j.Job).State))];
    const answers = await Promise.allSettled(wanted.map((j) => api(jobPath(j.Job))));
    answers.forEach((answer, i) => {
      if (answer.status === 'fulfilled') statuses.set(wanted[i].Job, answer.value.Response);
    });
    const listed = new Set(list.map((j) => j.Job));
    for (const id of statuses.keys()) if (!listed.has(id)) statuses.delete(id);
    renderRunning(running);
    renderQueued(queued);
    renderRecent(recent);
  }

  function renderServer(status) {
    skew = (Date.parse(status.Started) + status.Uptime * 1e3) - Date.now();
    const state = status.State === 'running' ? '' : ` · ${status.State.toUpperCase()}`;
    $('server').textContent = `${location.host} · version ${status.Version} · pid ${status.Pid}${state}`;
    $('workers').replaceChildren(`${status.Workers.Busy} of ${status.Workers.Size} `, el('small', { text: `busy, template ${status.Workers.Template}` }));
    $('jobs-counts').replaceChildren(`${status.Jobs.Running} `, el('small', { text: 'running, ' }),
      `${status.Jobs.Queued} `, el('small', { text: 'queued' }));
    $('uptime').textContent = duration(status.Uptime);
  }

  let machinePlot = null;
  const history = [[], [], []];

  function renderMachine(stats) {
    $('cpu').replaceChildren(stats.Cpu.Percent.toFixed(0) + ' %', el('small', { text: ` of ${stats.Cpu.Count} cores` }));
    $('memory').replaceChildren(bytes(stats.Memory.Used), el('small', { text: ` of ${bytes(stats.Memory.Total)}` }));
    $('swap').replaceChildren(bytes(stats.Swap.Used), el('small', { text: ` of ${bytes(stats.Swap.Total)}` }));
    $('load').textContent = stats.Load.map((l) => l.toFixed(2)).join(' ');
    const last = stats.Jobs.LastHour || {};
    $('last-hour').replaceChildren(`${last.Done || 0} `, el('small', { text: 'done, ' }),
      `${(last.Failed || 0) + (last.Timeout || 0)} `, el('small', { text: 'failed' }));
    $('disks').replaceChildren(...Object.entries(stats.Disk).map(([root, disk]) => el('div', { class: 'disk' },
      el('span', { class: 'path', text: root }),
      el('span', { class: 'numbers', text: `${bytes(disk.Free)} free of ${bytes(disk.Total)}` }),
      bar(disk.Percent))));
    if (!machinePlot) machinePlot = MeasuringCharts.machine($('machine-chart'), ['CPU', 'Memory']);
    history[0].push(serverNow());
    history[1].push(stats.Cpu.Percent);
    history[2].push(stats.Memory.Percent);
    if (history[0].length > HISTORY) history.forEach((h) => h.shift());
    machinePlot.setData(history);
  }

  let polls = 0;
  async function pollOverview() {
    const work = [api('info/status').then((a) => renderServer(a.Response)), pollJobs()];
    if (polls++ % MACHINE_EVERY === 0) work.push(api('info/all-statistic').then((a) => renderMachine(a.Response)));
    const outcomes = await Promise.allSettled(work);
    const failed = outcomes.find((o) => o.status === 'rejected');
    if (failed) throw failed.reason;
  }

  // ---------------------------------------------------------------- one job's page

  let shown = null;   // {id, state, rendered} of the job page on screen

  function renderRequest(id, status) {
    const rows = [
      ['State', stateBadge(status.State)],
      ['Directory', status.Directory], ['Base', status.Base], ['File', status.File],
      ['Functions', status.Functions ? status.Functions.join(', ') : 'all, in the file\'s order'],
      ['Submitted', clock(status.Submitted)], ['Started', clock(status.Started)],
      ['Finished', clock(status.Finished)], ['Attempts', String(status.Attempts)],
    ];
    if (status.Elapsed !== undefined) rows.push(['Elapsed', duration(status.Elapsed)]);
    $('job-request').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', {}, v)]));
    $('job-actions').replaceChildren(...(ACTIVE.has(status.State) ? [cancelButton(id)] : []));
    const error = $('job-error');
    error.hidden = !status.Error;
    error.textContent = status.Error ? `${status.Error.Code}: ${status.Error.Message}` : '';
    const progress = status.Progress;
    $('job-progress').replaceChildren(...(status.State === 'running' ? [el('div', { class: 'progress' },
      bar(progress && progress.Total ? 100 * progress.Done / progress.Total : 0),
      el('span', { class: 'label', text: progress ? `${progress.Done} / ${progress.Total} tasks` : 'starting' }),
      el('span', { class: 'label', text: duration(since(status.Started)) }))] : []));
  }

  function tableOf(columns, records) {
    const numeric = (c) => records.length > 0 && typeof records[0][c] === 'number';
    return el('div', { class: 'table-wrap' }, el('table', {},
      el('thead', {}, el('tr', {}, ...columns.map((c) => el('th', { class: numeric(c) ? 'num' : null, text: c })))),
      el('tbody', {}, ...records.map((r) => el('tr', {}, ...columns.map((c) => el('td', { class: typeof r[c] === 'number' ? 'num' : null, text: value(r[c]) })))))));
  }

  /** A table result: its charts (from up to CHART_ROWS rows) and its rows, a page at a time. */
  async function renderTable(box, id, name, entry) {
    const base = `${jobPath(id)}/results/${encodeURIComponent(name)}`;
    const charts = el('div', { class: 'result-charts' });
    const table = el('div');
    const pager = el('div', { class: 'pager' });
    box.append(charts, table, pager);
    const first = (await api(`${base}?offset=0&limit=${Math.min(CHART_ROWS, Math.max(1, entry.Rows))}`)).Response;
    const drawn = MeasuringCharts.drawResult(charts, entry, first.Records, 0);
    if (drawn && first.Rows > first.Records.length) {
      charts.append(el('p', { class: 'muted', text: `The charts show the first ${first.Records.length.toLocaleString()} of ${first.Rows.toLocaleString()} rows.` }));
    }
    const columns = first.Records.length ? Object.keys(first.Records[0]) : [...(entry.Index || []), ...entry.Columns];
    const show = async (offset) => {
      const page = offset + TABLE_ROWS <= first.Records.length
        ? first.Records.slice(offset, offset + TABLE_ROWS)
        : (await api(`${base}?offset=${offset}&limit=${TABLE_ROWS}`)).Response.Records;
      table.replaceChildren(tableOf(columns, page));
      const last = Math.min(first.Rows, offset + page.length);
      pager.replaceChildren(
        el('button', { type: 'button', text: '‹ previous', disabled: offset === 0 ? '' : null, onclick: () => show(Math.max(0, offset - TABLE_ROWS)) }),
        el('span', { text: `rows ${first.Rows ? offset + 1 : 0}–${last} of ${first.Rows.toLocaleString()}` }),
        el('button', { type: 'button', text: 'next ›', disabled: last >= first.Rows ? '' : null, onclick: () => show(offset + TABLE_ROWS) }),
      );
    };
    await show(0);
  }

  async function renderResults(id, status) {
    const holder = $('job-results');
    holder.replaceChildren();
    delete holder.dataset.rendered;
    MeasuringCharts.sweep();
    const results = Object.entries(status.Results || {});
    if (results.length) holder.append(el('h2', { text: 'Results' }));
    for (const [name, entry] of results) {
      const tableKind = entry.Kind !== 'Scalar';
      const box = el('div', { class: 'result', 'data-result': name },
        el('h3', {}, name, el('span', { class: 'kind', text: tableKind ? `${entry.Kind} · ${entry.Rows.toLocaleString()} rows · ${entry.File}` : 'value' })));
      holder.append(box);
      if (!tableKind) {
        box.append(el('div', { class: 'scalar', text: value(entry.Value) }));
        continue;
      }
      try {
        await renderTable(box, id, name, entry);
      } catch (e) {
        box.append(el('div', { class: 'error', text: `${e.code}: ${e.message}` }));
      }
    }
    holder.dataset.rendered = id;   // every result is on the page
  }

  async function pollJob(id) {
    const [status, log] = await Promise.all([
      api(jobPath(id)), api(jobPath(id) + '/log'), api('info/status').then((a) => renderServer(a.Response)),
    ]);
    if (!shown || shown.id !== id) return;
    const response = status.Response;
    $('job-title').textContent = id;
    renderRequest(id, response);
    const pre = $('job-log');
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log.Response.Log || '(nothing printed)';
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    if (!ACTIVE.has(response.State) && !shown.rendered) {
      shown.rendered = true;
      await renderResults(id, response);
    }
    shown.state = response.State;
  }

  // ---------------------------------------------------------------- routing and polling

  function route() {
    const match = /^#\/jobs\/([^/]+)$/.exec(location.hash);
    $('overview').hidden = !!match;
    $('job').hidden = !match;
    if (match) {
      const id = decodeURIComponent(match[1]);
      if (!shown || shown.id !== id) {
        shown = { id, state: null, rendered: false };
        $('job-title').textContent = id;
        ['job-request', 'job-actions', 'job-progress', 'job-results', 'job-log'].forEach((x) => $(x).replaceChildren());
        $('job-error').hidden = true;
      }
    } else {
      shown = null;
    }
    refresh();
  }

  let timer = null;
  let busy = false;

  async function refresh() {
    clearTimeout(timer);
    if (busy) { timer = setTimeout(refresh, 100); return; }
    busy = true;
    try {
      await (shown ? pollJob(shown.id) : pollOverview());
      $('offline').hidden = true;
    } catch (e) {
      const page = $('offline');
      page.hidden = false;
      page.textContent = e.code === 'NotFound' ? e.message : `${e.code}: ${e.message}`;
      if (!(e instanceof ApiError)) console.error(e);
    } finally {
      busy = false;
      const wait = shown && !ACTIVE.has(shown.state) && shown.rendered ? 5 * POLL : POLL;
      if (!document.hidden) timer = setTimeout(refresh, wait);
    }
  }

  document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
  window.addEventListener('hashchange', route);
  window.addEventListener('DOMContentLoaded', route);
})();
