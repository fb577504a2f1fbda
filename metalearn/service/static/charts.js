/* Small SVG charts (lines with optional ±CI bands, bars), drawn without any library so the pages
   work offline. Every chart keeps its data in data-* attributes, which the browser test reads. */
"use strict";

const Charts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f6fdb", "#e4572e", "#1f8a4c", "#8e44ad", "#d4a017", "#17a2b8", "#c0398b",
    "#6c757d", "#5d4037", "#20c997"];

  function color(index) {
    return PALETTE[index % PALETTE.length];
  }

  function node(tag, attrs, parent) {
    const element = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) element.setAttribute(key, value);
    if (parent) parent.appendChild(element);
    return element;
  }

  /* "Nice" tick values covering [lo, hi], never closer than minStep, and the decimals they need. */
  function ticks(lo, hi, count, minStep) {
    if (!(hi > lo)) return { values: [lo], digits: 2 };
    const raw = Math.max((hi - lo) / count, minStep || 0);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw * (1 - 1e-9)) || raw;
    const values = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toFixed(10));
    const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9)) + (Math.abs(step / power - Math.round(step / power)) > 1e-6 ? 1 : 0);
    return { values, digits };
  }

  function format(value, digits) {
    if (Math.abs(value) >= 100000) return value.toExponential(1);
    return value.toFixed(Math.min(digits, 6));
  }

  function extent(values, fallback) {
    const finite = values.filter((v) => Number.isFinite(v));
    if (!finite.length) return fallback;
    let lo = Math.min(...finite), hi = Math.max(...finite);
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 0.5; hi += Math.abs(hi) * 0.1 || 0.5; }
    return [lo, hi];
  }

  /* Room above and below the data, so no point sits on the axis. */
  function padded([lo, hi]) {
    const room = (hi - lo) * 0.08;
    return [lo - room, hi + room];
  }

  function legend(container, series) {
    const box = document.createElement("div");
    box.className = "legend";
    series.forEach((s, i) => {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = s.color || color(i);
      item.append(swatch, s.label);
      box.appendChild(item);
    });
    container.appendChild(box);
  }

  /* Lines. options: series [{label, color, points: [{x, y, lo?, hi?}]}], xLabel, yLabel,
     yDomain [lo, hi] (else from the data), height, width, legend (default true), empty (text). */
  function line(container, options) {
    const width = options.width || 560, height = options.height || 260;
    const margin = { top: 12, right: 16, bottom: options.xLabel ? 40 : 26, left: options.yLabel ? 56 : 44 };
    const series = (options.series || []).filter((s) => s.points && s.points.length);
    container.replaceChildren();
    const svg = node("svg", { class: "chart line-chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
    svg.dataset.series = String(series.length);
    svg.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
    container.appendChild(svg);
    if (!series.length) {
      node("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, svg)
        .textContent = options.empty || "no data yet";
      return svg;
    }
    const xs = series.flatMap((s) => s.points.map((p) => p.x));
    const ys = series.flatMap((s) => s.points.flatMap((p) => [p.y, p.lo, p.hi]));
    const [x0, x1] = extent(xs, [0, 1]);
    const [y0, y1] = options.yDomain || padded(extent(ys, [0, 1]));
    const plotW = width - margin.left - margin.right, plotH = height - margin.top - margin.bottom;
    const sx = (x) => margin.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
    const sy = (y) => margin.top + (1 - (y - y0) / (y1 - y0 || 1)) * plotH;
    const grid = node("g", { class: "grid" }, svg);
    const axis = node("g", { class: "axis" }, svg);
    const yTicks = ticks(y0, y1, Math.max(2, Math.min(5, Math.floor(plotH / 28))));
    for (const t of yTicks.values) {
      node("line", { x1: margin.left, x2: width - margin.right, y1: sy(t), y2: sy(t) }, grid);
      node("text", { x: margin.left - 6, y: sy(t) + 4, "text-anchor": "end" }, axis).textContent = format(t, yTicks.digits);
    }
    const xTicks = ticks(x0, x1, Math.max(2, Math.min(8, Math.floor(plotW / 70))), options.xInteger ? 1 : 0);
    for (const t of xTicks.values) {
      node("line", { x1: sx(t), x2: sx(t), y1: height - margin.bottom, y2: height - margin.bottom + 4 }, axis);
      node("text", { x: sx(t), y: height - margin.bottom + 16, "text-anchor": "middle" }, axis).textContent = format(t, xTicks.digits);
    }
    node("line", { x1: margin.left, x2: width - margin.right, y1: height - margin.bottom, y2: height - margin.bottom }, axis);
    if (options.xLabel) {
      node("text", { x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle" }, axis).textContent = options.xLabel;
    }
    if (options.yLabel) {
      node("text", { x: 14, y: margin.top + plotH / 2, "text-anchor": "middle",
        transform: `rotate(-90 14 ${margin.top + plotH / 2})` }, axis).textContent = options.yLabel;
    }
    series.forEach((s, i) => {
      const stroke = s.color || color(i);
      const banded = s.points.filter((p) => Number.isFinite(p.lo) && Number.isFinite(p.hi));
      if (banded.length > 1) {
        const upper = banded.map((p) => `${sx(p.x)},${sy(p.hi)}`);
        const lower = banded.slice().reverse().map((p) => `${sx(p.x)},${sy(p.lo)}`);
        node("polygon", { points: upper.concat(lower).join(" "), fill: stroke, "fill-opacity": 0.13 }, svg);
      }
      const path = s.points.filter((p) => Number.isFinite(p.y)).map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ");
      const polyline = node("polyline", { class: "series", points: path, stroke }, svg);
      if (s.dash) polyline.setAttribute("stroke-dasharray", "5 4");
      const marks = s.points.length <= 30;
      for (const p of s.points) {
        if (!Number.isFinite(p.y)) continue;
        if (marks) node("circle", { cx: sx(p.x), cy: sy(p.y), r: 2.6, fill: stroke }, svg);
        if (banded.length === 1 && Number.isFinite(p.lo)) {
          node("line", { x1: sx(p.x), x2: sx(p.x), y1: sy(p.lo), y2: sy(p.hi), stroke }, svg);
        }
      }
      const title = node("title", {}, polyline);
      title.textContent = s.label;
    });
    if (options.legend !== false && series.length > 1) legend(container, series);
    return svg;
  }

  /* Vertical bars in [0, yMax], one colour per class, the highlighted one solid.
     options: values, labels, highlight (index), width, height. */
  function bars(container, options) {
    const values = options.values || [];
    const width = options.width || 220, height = options.height || 110;
    const margin = { top: 14, right: 4, bottom: 18, left: 4 };
    const yMax = options.yMax || 1;
    container.replaceChildren();
    const svg = node("svg", { class: "chart bar-chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
    container.appendChild(svg);
    const plotW = width - margin.left - margin.right, plotH = height - margin.top - margin.bottom;
    const slot = plotW / Math.max(values.length, 1);
    node("line", { x1: margin.left, x2: width - margin.right, y1: margin.top + plotH, y2: margin.top + plotH,
      stroke: "#9aa4b2" }, svg);
    values.forEach((v, i) => {
      const h = Math.max(0, Math.min(1, v / yMax)) * plotH;
      const x = margin.left + i * slot + slot * 0.15;
      const chosen = i === options.highlight;
      const bar = node("rect", { x, y: margin.top + plotH - h, width: slot * 0.7, height: h, rx: 2,
        fill: color(i), "fill-opacity": chosen ? 1 : 0.35, class: chosen ? "bar predicted" : "bar" }, svg);
      bar.dataset.value = String(v);
      node("title", {}, bar).textContent = `${(options.labels || [])[i] || i + 1}: ${(v * 100).toFixed(1)}%`;
      node("text", { x: x + slot * 0.35, y: height - 5, "text-anchor": "middle" }, svg)
        .textContent = (options.labels || [])[i] || String(i + 1);
      if (chosen || v >= 0.2) {
        node("text", { x: x + slot * 0.35, y: margin.top + plotH - h - 3, "text-anchor": "middle",
          class: "bar-value" }, svg).textContent = Math.round(v * 100) + "%";
      }
    });
    return svg;
  }

  return { line, bars, color, PALETTE };
})();
