/* The runs page: every record with live status, comparison of selected runs, the training form
   built from train.py's flags, and the job queue. */
"use strict";

const POLL_MS = 2000;
const SERVER_ONLY_FLAGS = new Set(["resume", "work_dir", "data_dir"]); // the server sets these

const page = document.getElementById("runs-page");
const ui = {
  message: document.getElementById("page-message"),
  body: document.getElementById("runs-body"),
  count: document.getElementById("run-count"),
  noRuns: document.getElementById("no-runs"),
  selectAll: document.getElementById("select-all"),
  compare: document.getElementById("compare"),
  comparePanel: document.getElementById("compare-panel"),
  compareNames: document.getElementById("compare-names"),
  compareValidation: document.getElementById("compare-validation"),
  compareTest: document.getElementById("compare-test"),
  compareTable: document.getElementById("compare-table"),
  form: document.getElementById("train-form"),
  formError: document.getElementById("form-error"),
  fields: document.getElementById("flag-fields"),
  formStatus: document.getElementById("form-status"),
  start: document.getElementById("start"),
  reset: document.getElementById("reset-form"),
  jobs: document.getElementById("jobs"),
  jobSummary: document.getElementById("job-summary"),
  liveHint: document.getElementById("live-hint"),
};

const state = { runs: [], jobs: [], rows: new Map(), selected: new Set(), flags: [], inputs: new Map() };

/* -- the runs table ----------------------------------------------------------------------------- */
function cellsOf(run) {
  const columns = run.columns || {};
  const progress = run.planned_iterations ? Math.min(1, (run.completed_iterations || 0) / run.planned_iterations) : 0;
  const status = el("td", { class: "status-cell" }, statusPill(run.status));
  if (run.error) status.appendChild(el("span", { class: "error-text", title: run.error }, run.error));
  const iterations = el("td", { class: "num" }, columns.iterations || Fmt.iterations(run));
  if (run.status === "training") {
    iterations.appendChild(el("span", { class: "progress mini-progress" }, el("span", { style: `width:${(progress * 100).toFixed(1)}%` })));
  }
  return [
    el("td", { class: "name" }, el("a", { href: `/runs/${encodeURIComponent(run.name)}` }, run.name)),
    el("td", {}, columns.algo || run.algo || "-"),
    el("td", {}, columns["n_way/k_spt"] || Fmt.shape(run)),
    status,
    iterations,
    el("td", {}, columns.metric || Fmt.metric(run)),
    el("td", { class: "num" }, columns["best val"] || Fmt.best(run)),
    el("td", { class: "num" }, columns.test || Fmt.test(run.test)),
    el("td", { class: "muted", title: run.updated_at || "" }, Fmt.time(run.updated_at || run.started_at)),
  ];
}

function rowFor(name) {
  let row = state.rows.get(name);
  if (row) return row;
  const box = el("input", { type: "checkbox", "aria-label": `select ${name}` });
  box.addEventListener("change", () => {
    if (box.checked) state.selected.add(name);
    else state.selected.delete(name);
    updateSelection();
  });
  row = el("tr", { dataset: { run: name } }, el("td", { class: "check" }, box));
  row.checkbox = box;
  state.rows.set(name, row);
  return row;
}

function renderRuns() {
  const names = new Set(state.runs.map((r) => r.name));
  for (const [name, row] of state.rows) {
    if (!names.has(name)) {
      row.remove();
      state.rows.delete(name);
      state.selected.delete(name);
    }
  }
  // newest first: what was just started is on top
  const ordered = state.runs.slice().reverse();
  ordered.forEach((run, index) => {
    const row = rowFor(run.name);
    row.dataset.status = run.status;
    row.replaceChildren(row.firstChild, ...cellsOf(run));
    row.checkbox.checked = state.selected.has(run.name);
    row.classList.toggle("selected", state.selected.has(run.name));
    if (ui.body.children[index] !== row) ui.body.insertBefore(row, ui.body.children[index] || null);
  });
  ui.noRuns.hidden = state.runs.length > 0;
  ui.count.textContent = state.runs.length ? `${state.runs.length}` : "";
  updateSelection();
}

function updateSelection() {
  for (const [name, row] of state.rows) row.classList.toggle("selected", state.selected.has(name));
  ui.compare.disabled = state.selected.size < 2;
  ui.compare.textContent = state.selected.size >= 2 ? `Compare ${state.selected.size}` : "Compare";
  ui.selectAll.checked = state.runs.length > 0 && state.selected.size === state.runs.length;
}

ui.selectAll.addEventListener("change", () => {
  state.selected = new Set(ui.selectAll.checked ? state.runs.map((r) => r.name) : []);
  for (const [name, row] of state.rows) row.checkbox.checked = state.selected.has(name);
  updateSelection();
});

/* -- comparison --------------------------------------------------------------------------------- */
async function compare() {
  const names = state.runs.map((r) => r.name).filter((n) => state.selected.has(n));
  ui.comparePanel.hidden = false;
  ui.compareNames.textContent = names.join(" · ");
  ui.compareValidation.replaceChildren(el("p", { class: "muted" }, "loading…"));
  ui.compareTest.replaceChildren();
  try {
    const runs = await Promise.all(names.map((n) => Api.get(`/api/runs/${encodeURIComponent(n)}`)));
    const metric = [...new Set(runs.map((r) => r.metric || "metric"))].join(" / ");
    Charts.line(ui.compareValidation, {
      series: runs.map((run, i) => ({
        label: run.name, color: Charts.color(i),
        points: (run.validation || []).map((v) => ({ x: v.iteration, y: v.per_step[v.per_step.length - 1] })),
      })),
      xLabel: "iteration", xInteger: true, yLabel: `validation ${metric}`, empty: "no validations yet",
    });
    Charts.line(ui.compareTest, {
      series: runs.map((run, i) => {
        const latest = (run.evaluations || [])[run.evaluations.length - 1];
        return {
          label: run.name, color: Charts.color(i),
          points: latest ? latest.mean.map((m, s) => ({ x: s, y: m, lo: m - latest.ci95[s], hi: m + latest.ci95[s] })) : [],
        };
      }),
      xLabel: "inner step", yLabel: `test ${metric}`, xInteger: true, empty: "none of these runs is tested yet",
    });
    compareTable(runs);
    ui.comparePanel.scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (error) {
    ui.compareValidation.replaceChildren(el("p", { class: "message error" }, `Could not compare: ${error.message}`));
  }
}

/* The flags that differ between the compared runs, like `runs.py compare`. */
function compareTable(runs) {
  const ignore = new Set(["run_name", "resume", "work_dir", "data_dir"]);
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r.config || {})))].sort();
  const rows = [
    ["status", (r) => r.status], ["iterations", Fmt.iterations], ["best val", Fmt.best],
    ["test (last step)", (r) => Fmt.test((r.evaluations || [])[r.evaluations.length - 1])],
  ].map(([label, get]) => [label, ...runs.map(get)]);
  for (const key of keys) {
    const values = runs.map((r) => JSON.stringify((r.config || {})[key]));
    if (!ignore.has(key) && new Set(values).size > 1) rows.push([`--${key}`, ...values]);
  }
  ui.compareTable.replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, ""), ...runs.map((r, i) => el("th", {},
      el("span", { class: "swatch", style: `background:${Charts.color(i)};margin-right:0.3rem` }), r.name)))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c, i) => el("td", { class: i ? "mono" : "muted" }, c))))));
}

ui.compare.addEventListener("click", compare);
document.getElementById("compare-close").addEventListener("click", () => { ui.comparePanel.hidden = true; });

/* -- jobs --------------------------------------------------------------------------------------- */
function renderJobs() {
  const jobs = state.jobs.slice().reverse();
  const active = jobs.filter((j) => j.status === "running" || j.status === "queued");
  ui.jobSummary.textContent = active.length ? `${active.length} active` : "";
  if (!jobs.length) {
    ui.jobs.replaceChildren(el("p", { class: "muted" }, "No jobs yet. Trainings and evaluations started here are queued and run one at a time."));
    return;
  }
  ui.jobs.replaceChildren(...jobs.map((job) => {
    const progress = job.progress || {};
    const head = el("div", { class: "job-head" },
      statusPill(job.status),
      el("strong", {}, job.kind),
      el("a", { href: `/runs/${encodeURIComponent(job.run)}` }, job.run),
      job.previous_server ? el("span", { class: "muted" }, "(previous server)") : null,
      el("span", { class: "spacer" }),
      progress.iteration !== undefined && progress.iteration !== null
        ? el("span", { class: "muted" }, `it ${progress.iteration}/${progress.planned || "?"}${progress.eta_seconds ? `, ETA ${Fmt.duration(progress.eta_seconds)}` : ""}`)
        : null,
      job.status === "running" || job.status === "queued"
        ? el("button", { type: "button", class: "small danger", onclick: () => cancel(job.run) }, "Cancel") : null);
    const box = el("div", { class: "job", dataset: { job: String(job.id), status: job.status } }, head,
      el("code", { title: (job.argv || []).join(" ") }, (job.argv || []).join(" ")));
    if (job.status === "running" && progress.planned) {
      box.appendChild(el("div", { class: "progress" }, el("span", { style: `width:${Math.min(100, 100 * (progress.iteration || 0) / progress.planned).toFixed(1)}%` })));
    }
    if (job.error) box.appendChild(el("div", { class: "job-error" }, job.error));
    return box;
  }));
}

async function cancel(name) {
  try {
    await Api.post(`/api/runs/${encodeURIComponent(name)}/cancel`);
    showMessage(ui.message, "info", `Cancelling ${name}: it stops like Ctrl-C and keeps last.npz, so it can be resumed.`);
    refresh();
  } catch (error) {
    showMessage(ui.message, "error", `Could not cancel ${name}: ${error.message}`);
  }
}

/* -- live refresh ------------------------------------------------------------------------------- */
let polling = false;
async function refresh() {
  if (polling) return;
  polling = true;
  try {
    const [runs, jobs] = await Promise.all([Api.get("/api/runs"), Api.get("/api/jobs")]);
    state.runs = runs;
    state.jobs = jobs;
    renderRuns();
    renderJobs();
    page.dataset.state = "ready";
    ui.liveHint.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    if (ui.message.classList.contains("stale")) showMessage(ui.message, "", "");
  } catch (error) {
    showMessage(ui.message, "error stale", `Cannot refresh: ${error.message}`);
    ui.liveHint.textContent = "offline";
  } finally {
    polling = false;
  }
}

/* -- the training form -------------------------------------------------------------------------- */
function defaultFor(flag) {
  const dataset = state.inputs.has("dataset") ? state.inputs.get("dataset").value : "omniglot";
  return flag.defaults && dataset in flag.defaults ? flag.defaults[dataset] : flag.default;
}

function inputFor(flag) {
  const id = `flag-${flag.name}`;
  let input;
  if (flag.type === "bool") {
    input = el("input", { type: "checkbox", id, name: flag.name });
  } else if (flag.choices && flag.choices.length) {
    input = el("select", { id, name: flag.name }, ...flag.choices.map((c) => el("option", { value: String(c) }, String(c))));
  } else if (flag.type === "int" || flag.type === "float") {
    input = el("input", { type: "number", id, name: flag.name, step: flag.type === "int" ? "1" : "any", inputmode: flag.type === "int" ? "numeric" : "decimal" });
  } else {
    input = el("input", { type: "text", id, name: flag.name, autocomplete: "off", spellcheck: "false" });
  }
  input.addEventListener("input", () => markChanged(flag));
  input.addEventListener("change", () => markChanged(flag));
  return input;
}

function setToDefault(flag) {
  const input = state.inputs.get(flag.name);
  const value = defaultFor(flag);
  if (flag.type === "bool") input.checked = Boolean(value);
  else if (value === null || value === undefined || (input.type === "number" && !Number.isFinite(Number(value)))) {
    input.value = "";
    input.placeholder = value === null || value === undefined ? "auto" : `= ${value}`;
  } else {
    input.value = String(value);
    input.placeholder = "";
  }
  markChanged(flag);
}

function currentValue(flag) {
  const input = state.inputs.get(flag.name);
  return flag.type === "bool" ? input.checked : input.value.trim();
}

function isChanged(flag) {
  const value = currentValue(flag), fallback = defaultFor(flag);
  if (flag.type === "bool") return value !== Boolean(fallback);
  if (value === "") return false;
  if (fallback === null || fallback === undefined) return true;
  return flag.type === "int" || flag.type === "float" ? Number(value) !== Number(fallback) : value !== String(fallback);
}

function markChanged(flag) {
  const field = state.inputs.get(flag.name).closest(".field");
  field.classList.toggle("changed", isChanged(flag));
  field.classList.remove("invalid");
  field.querySelector(".field-error").textContent = "";
  if (flag.name === "dataset") {
    for (const other of state.flags) if (other.name !== "dataset" && !isChangedKeep(other)) setToDefault(other);
  }
}

/* A field keeps the user's own value when the dataset changes; untouched ones follow its defaults. */
function isChangedKeep(flag) {
  return state.inputs.get(flag.name).dataset.touched === "true";
}

function buildForm(flags) {
  state.flags = flags.filter((f) => !SERVER_ONLY_FLAGS.has(f.name));
  ui.fields.replaceChildren(...state.flags.map((flag) => {
    const input = inputFor(flag);
    input.addEventListener("input", () => { input.dataset.touched = "true"; });
    state.inputs.set(flag.name, input);
    const label = el("label", { for: input.id, title: flag.help || "" }, flag.name);
    const error = el("div", { class: "field-error", id: `error-${flag.name}`, "aria-live": "polite" });
    const field = flag.type === "bool"
      ? el("div", { class: "field bool", dataset: { flag: flag.name } }, input, label, error)
      : el("div", { class: "field", dataset: { flag: flag.name } }, label, input, error);
    input.title = flag.help || "";
    return field;
  }));
  for (const flag of state.flags) setToDefault(flag);
}

/* Only what the user set: the server fills in the rest exactly as train.py would. */
function formBody() {
  const body = {};
  for (const flag of state.flags) {
    if (!isChanged(flag)) continue;
    const value = currentValue(flag);
    if (flag.type === "bool") body[flag.name] = value;
    else if (flag.type === "int" || flag.type === "float") body[flag.name] = value === "" ? null : Number(value);
    else body[flag.name] = value;
  }
  return body;
}

function clearErrors() {
  showMessage(ui.formError, "error", "");
  for (const field of ui.fields.querySelectorAll(".field")) {
    field.classList.remove("invalid");
    field.querySelector(".field-error").textContent = "";
  }
}

function showErrors(error) {
  const details = error.detail && Array.isArray(error.detail.detail) ? error.detail.detail : [];
  const general = [];
  for (const item of details) {
    const name = item.field || (item.loc || []).filter((p) => p !== "body").join(".");
    const input = state.inputs.get(name);
    const text = item.message || item.msg || "invalid";
    if (input) {
      const field = input.closest(".field");
      field.classList.add("invalid");
      const box = field.querySelector(".field-error");
      box.textContent = box.textContent ? `${box.textContent}; ${text}` : text;
    } else {
      general.push(name ? `${name}: ${text}` : text);
    }
  }
  if (general.length || !details.length) showMessage(ui.formError, "error", general.join("; ") || error.message);
  const first = ui.fields.querySelector(".field.invalid input, .field.invalid select");
  if (first) first.focus();
}

ui.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  ui.start.disabled = true;
  ui.formStatus.textContent = "starting…";
  try {
    const answer = await Api.post("/api/runs", formBody());
    ui.formStatus.replaceChildren("Queued ", el("a", { href: `/runs/${encodeURIComponent(answer.name)}` }, answer.name), ".");
    const nameInput = state.inputs.get("run_name");
    if (nameInput) {
      nameInput.value = "";
      nameInput.dataset.touched = "";
      markChanged(state.flags.find((f) => f.name === "run_name"));
    }
    await refresh();
  } catch (error) {
    ui.formStatus.textContent = "";
    showErrors(error);
  } finally {
    ui.start.disabled = false;
  }
});

ui.reset.addEventListener("click", () => {
  clearErrors();
  for (const flag of state.flags) {
    state.inputs.get(flag.name).dataset.touched = "";
  }
  const dataset = state.flags.find((f) => f.name === "dataset");
  if (dataset) setToDefault(dataset);
  for (const flag of state.flags) setToDefault(flag);
});

async function loadFlags() {
  try {
    const data = await Api.get("/api/flags");
    buildForm(data.flags || []);
  } catch (error) {
    showMessage(ui.formError, "error", `Could not load train.py's flags: ${error.message}`);
  }
}

loadFlags();
refresh();
setInterval(refresh, POLL_MS);
