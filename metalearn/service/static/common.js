/* What every page shares: JSON requests with plain-word errors, the busy retry, formatting. */
"use strict";

class ApiError extends Error {
  constructor(message, status, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

const Api = (() => {
  function headers(extra) {
    return { Accept: "application/json", ...(extra || {}) };
  }

  /* One line that says what is wrong, from FastAPI's {"detail": ...} in any of its shapes. */
  function describe(status, body) {
    const detail = body && body.detail !== undefined ? body.detail : body;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail.map((d) => {
        if (typeof d === "string") return d;
        const where = d.field || (d.loc || []).filter((p) => p !== "body").join(".");
        const text = d.message || d.msg || "invalid";
        return where ? `${where}: ${text}` : text;
      }).join("; ");
    }
    if (detail && typeof detail === "object" && detail.message) return detail.message;
    const words = { 401: "not authorised (token missing or wrong)", 404: "not found",
      413: "the request is too large", 422: "the request was refused",
      429: "the server is busy", 503: "the server is busy", 500: "the server failed" };
    return words[status] || `the server answered ${status}`;
  }

  function retryDelay(response) {
    const seconds = Number(response.headers.get("Retry-After"));
    return Math.min(Number.isFinite(seconds) && seconds > 0 ? seconds : 1, 30) * 1000;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /* fetch JSON; on 429/503 wait Retry-After and try once more (onBusy is told how long). */
  async function request(method, path, body, options) {
    const opts = options || {};
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    if (opts.signal) init.signal = opts.signal;
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await fetch(path, init);
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new ApiError("cannot reach the server (is serve.py running?)", 0, null);
      }
      if ((response.status === 503 || response.status === 429) && attempt === 0 && opts.retryBusy !== false) {
        const delay = retryDelay(response);
        if (opts.onBusy) opts.onBusy(delay);
        await sleep(delay);
        continue;
      }
      const text = await response.text();
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
      if (!response.ok) throw new ApiError(describe(response.status, data), response.status, data);
      return data;
    }
  }

  /* Server-sent events; with --token the server's cookie authorises it like every fetch. */
  function events(path) {
    return new EventSource(path);
  }

  return {
    get: (path, options) => request("GET", path, undefined, options),
    post: (path, body, options) => request("POST", path, body === undefined ? {} : body, options),
    del: (path, options) => request("DELETE", path, undefined, options),
    events,
    describe,
  };
})();

const Fmt = {
  num(value, digits = 4) {
    return value === null || value === undefined || !Number.isFinite(+value) ? "-" : (+value).toFixed(digits);
  },
  pct(value, digits = 1) {
    return value === null || value === undefined ? "-" : `${(value * 100).toFixed(digits)}%`;
  },
  shape(run) {
    if (run.n_way === undefined || run.n_way === null) return "-";
    return run.dataset === "sinusoid" ? `K=${run.k_spt}` : `${run.n_way}w/${run.k_spt}s`;
  },
  iterations(run) {
    if (run.planned_iterations === undefined) return "-";
    return `${run.completed_iterations || 0}/${run.planned_iterations || "?"}`;
  },
  metric(run) {
    return run.metric_info ? run.metric_info.key : run.metric || "?";
  },
  best(run) {
    return run.best_score === null || run.best_score === undefined
      ? "-" : `${(+run.best_score).toFixed(4)} @${run.best_iteration}`;
  },
  test(evaluation) {
    if (!evaluation || !evaluation.mean || !evaluation.mean.length) return "-";
    const last = evaluation.mean.length - 1;
    return `${evaluation.mean[last].toFixed(4)} ± ${evaluation.ci95[last].toFixed(4)}`;
  },
  duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(+seconds)) return "-";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  },
  /* A command line as a person would type it: "python train.py --flag value ...". */
  command(argv) {
    const words = (argv || []).slice();
    const base = (word) => word.split(/[\\/]/).pop();
    if (words.length > 1 && /python[0-9.]*(\.exe)?$/.test(base(words[0])) && words[1].endsWith(".py")) words.shift();
    if (words.length && words[0].endsWith(".py")) return ["python", base(words[0]), ...words.slice(1)].join(" ");
    return words.join(" ");
  },
  time(iso) {
    if (!iso) return "-";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  },
};

/* Tiny DOM helper: el("td", {class: "num"}, "text", child...). */
function el(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

function showMessage(box, kind, text) {
  box.className = `message ${kind}`;
  box.textContent = text || "";
}

function statusPill(status) {
  return el("span", { class: `status ${status || ""}`, dataset: { status: status || "" } }, status || "-");
}
