/*
 * Charts of job results, drawn by uPlot (vendor/uPlot.iife.min.js): a Series or DataFrame with a
 * time or numeric index as lines, with a categorical index as bars, each numeric column on a
 * chart of its own (small multiples) so that a count does not flatten a mean.
 * Reads nothing itself: it is given a result's entry (from a Job Status answer) and its records
 * (from Job Result pages). Exposes window.MeasuringCharts.
 */
'use strict';

(() => {
  const COLOURS = ['#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2', '#4f46e5', '#ca8a04'];
  const HEIGHT = 190;
  const utc = (seconds) => uPlot.tzDate(new Date(seconds * 1e3), 'Etc/UTC');

  /** What a dtype (as the server writes it in Types) is for a chart: time, number or category. */
  function kindOfType(dtype) {
    if (!dtype) return null;
    if (/datetime|timestamp|date/i.test(dtype)) return 'time';
    if (/^(u?int|float|Int|UInt|Float)\d*/.test(dtype)) return 'number';
    return 'category';
  }

  /** The same guess from the values alone, for a result written without Types. */
  function kindOfValues(values) {
    const present = values.filter((v) => v !== null && v !== undefined);
    if (present.length === 0) return null;
    if (present.every((v) => typeof v === 'number')) return 'number';
    if (present.every((v) => typeof v === 'string' && /^\d{4}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d(\.\d+)?)?)?/.test(v) && !Number.isNaN(parseTime(v)))) return 'time';
    return 'category';
  }

  function kindOf(types, name, values) {
    return kindOfType(types[name]) || kindOfValues(values) || 'category';
  }

  /** Seconds since the epoch of an ISO time; a time without a zone is UTC, as pandas writes it. */
  function parseTime(text) {
    const zoned = /([zZ]|[+-]\d\d:?\d\d)$/.test(text) || text.length <= 10 ? text : text + 'Z';
    return Date.parse(zoned.length <= 10 ? zoned + 'T00:00:00Z' : zoned) / 1e3;
  }

  /**
   * What to draw for one table result: the x values (with labels when categorical) and one
   * y series per numeric column. ``entry`` is the result's entry in a Job Status answer
   * (Columns, Index, Types); ``records`` the rows of its Result pages; ``offset`` the first row's number.
   */
  function plan(entry, records, offset) {
    const types = entry.Types || {};
    const index = entry.Index || [];
    const columns = (entry.Columns || []).filter((c) => !index.includes(c));
    let xKind, xName, xValues, labels = null;
    if (index.length === 0) {
      xKind = 'number';
      xName = 'row';
      xValues = records.map((_, i) => offset + i);
    } else if (index.length === 1) {
      xName = index[0];
      const raw = records.map((r) => r[xName]);
      xKind = kindOf(types, xName, raw);
      if (xKind === 'time') xValues = raw.map((v) => (v === null ? null : parseTime(String(v))));
      else if (xKind === 'number') xValues = raw;
      else labels = raw.map((v) => String(v));
    } else {
      xKind = 'category';
      xName = index.join(' / ');
      labels = records.map((r) => index.map((level) => String(r[level])).join(' / '));
    }
    if (xKind === 'category') xValues = labels.map((_, i) => i);
    const numeric = columns.filter((c) => kindOf(types, c, records.map((r) => r[c])) === 'number');
    // Lines need x in order, and a point with no x has no place on them.
    let order = xValues.map((_, i) => i).filter((i) => xValues[i] !== null && Number.isFinite(xValues[i]));
    if (xKind !== 'category') order.sort((a, b) => xValues[a] - xValues[b]);
    return {
      kind: xKind,
      xName,
      x: order.map((i) => xValues[i]),
      labels: labels && order.map((i) => labels[i]),
      series: numeric.map((c) => ({ name: c, values: order.map((i) => records[i][c]) })),
    };
  }

  function barRange(u, low, high) {
    const lo = Math.min(0, low), hi = Math.max(0, high);
    const pad = (hi - lo) * 0.05 || 1;
    return [lo < 0 ? lo - pad : 0, hi > 0 ? hi + pad : 0];
  }

  function options(drawing, column, colour, width) {
    const bars = drawing.kind === 'category';
    const n = drawing.x.length;
    const x = { time: drawing.kind === 'time' };
    const xAxis = { stroke: '#475467', grid: { stroke: '#eef0f3' }, ticks: { stroke: '#d0d5dd' } };
    if (bars) {
      x.range = () => [-0.5, n - 0.5];
      x.time = false;
      xAxis.incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
      xAxis.values = (u, splits) => splits.map((i) => {
        const label = drawing.labels[Math.round(i)];
        return label === undefined || i !== Math.round(i) ? '' : label.length > 16 ? label.slice(0, 15) + '…' : label;
      });
      xAxis.grid = { show: false };
    }
    return {
      width,
      height: HEIGHT,
      tzDate: utc,
      legend: { show: true, live: true },
      cursor: { points: { size: 6 } },
      // Bars stand on zero, or their heights would mislead; lines may zoom to their values.
      scales: bars ? { x, y: { range: barRange } } : { x },
      series: [
        { label: drawing.xName, value: bars ? (u, i) => (i === null ? '–' : drawing.labels[i]) : undefined },
        {
          label: column,
          stroke: colour,
          width: bars ? 1 : 1.5,
          fill: bars ? colour + 'bb' : colour + '18',
          paths: bars ? uPlot.paths.bars({ size: [0.7, 80] }) : undefined,
          points: { show: !bars && n <= 60 },
          spanGaps: false,
        },
      ],
      axes: [xAxis, { stroke: '#475467', size: 64, grid: { stroke: '#eef0f3' }, ticks: { stroke: '#d0d5dd' } }],
    };
  }

  const charts = [];

  /** Draw one chart per numeric column of a table result into ``container``; returns how many. */
  function drawResult(container, entry, records, offset) {
    const drawing = plan(entry, records, offset);
    container.textContent = '';
    if (drawing.series.length === 0 || drawing.x.length === 0) return 0;
    const grid = document.createElement('div');
    grid.className = 'charts';
    container.appendChild(grid);
    drawing.series.forEach((column, i) => {
      const holder = document.createElement('div');
      holder.className = 'chart';
      holder.dataset.column = column.name;
      holder.dataset.points = String(drawing.x.length);
      holder.dataset.kind = drawing.kind === 'category' ? 'bars' : 'lines';
      const title = document.createElement('div');
      title.className = 'title';
      title.textContent = column.name;
      holder.appendChild(title);
      grid.appendChild(holder);
      const width = Math.max(300, holder.clientWidth || 420);
      const colour = COLOURS[i % COLOURS.length];
      const plot = new uPlot(options(drawing, column.name, colour, width), [drawing.x, column.values], holder);
      holder.uplot = plot;
      charts.push({ holder, plot });
      sizes.observe(holder);
    });
    return drawing.series.length;
  }

  /** A line chart of the machine over time: ``history`` is {t: [...], series: {name: [...]}}. */
  function machine(container, names) {
    const width = Math.max(300, container.clientWidth || 600);
    const plot = new uPlot({
      width,
      height: 150,
      legend: { show: true },
      scales: { y: { range: [0, 100] } },
      series: [{ label: 'time' }, ...names.map((name, i) => ({
        label: name, stroke: COLOURS[i], width: 1.5, fill: COLOURS[i] + '14',
        value: (u, v) => (v === null ? '–' : v.toFixed(1) + ' %'),
      }))],
      axes: [{ stroke: '#475467', grid: { stroke: '#eef0f3' } }, { stroke: '#475467', size: 60, values: (u, s) => s.map((v) => v + ' %'), grid: { stroke: '#eef0f3' } }],
    }, [[], ...names.map(() => [])], container);
    container.uplot = plot;
    charts.push({ holder: container, plot });
    sizes.observe(container);
    return plot;
  }

  // A chart follows its box's width (the grid settles after the chart is made, and windows change).
  const sizes = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const plot = entry.target.uplot;
      const width = Math.max(300, Math.floor(entry.contentRect.width));
      if (plot && plot.width !== width) plot.setSize({ width, height: plot.height });
    }
  });

  /** Let go of the charts no longer on the page. */
  function sweep() {
    for (let i = charts.length - 1; i >= 0; i--) {
      if (!charts[i].holder.isConnected) {
        sizes.unobserve(charts[i].holder);
        charts[i].plot.destroy();
        charts.splice(i, 1);
      }
    }
  }

  window.MeasuringCharts = { drawResult, machine, plan, parseTime, sweep };
})();
