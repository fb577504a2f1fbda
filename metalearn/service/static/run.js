/* One run's page: flags, live progress (server-sent events), curves, validations, tests, and the
   actions evaluate / cancel / resume / delete. */
"use strict";

const NAME = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
const REFETCH_MS = 1500; // at most one history request this often while a run is live
const ACTIVE = new Set(["training", "testing", "queued", "starting", "running"]);

const page = document.getElementById("run-page");
const $ = (id) => document.getElementById(id);
const ui = {
  name: $("run-name"), status: $("run-status"), message: $("page-message"), note: $("run-note"), stats: $("stats"),
  progress: $("progress"), liveHint: $("live-hint"),
  evaluate: $("evaluate"), evalTasks: $("eval-tasks"), cancel: $("cancel"), resume: $("resume"), remove: $("delete"),
  loss: $("loss-chart"), query: $("query-chart"), validation: $("validation-chart"), validationCount: $("validation-count"), validationTable: $("validation-table"),
  test: $("test-chart"), testTable: $("test-table"), flags: $("flags"), commands: $("commands"), record: $("record"),
  output: $("output"), jobLabel: $("job-label"),
  confirm: $("confirm"), confirmText: $("confirm-text"), confirmYes: $("confirm-yes"), confirmNo: $("confirm-no"),
};

const state = { run: null, progress: null, job: null, source: null, lastFetch: 0, fetchTimer: null, busy: false };

document.title = `${NAME} · MAML`;
ui.name.textContent = NAME;

/* -- rendering ---------------------------------------------------------------------------------- */
function stat(label, value, key) {
  return el("div", { class: "stat", dataset: { stat: key } }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function currentStatus() {
  if (state.progress && state.progress.status) return state.progress.status;
  return state.run ? state.run.status : "-";
}

function renderStats() {
  const run = state.run || {};
  const p = state.progress || {};
  const metric = run.metric_info ? run.metric_info.label : run.metric || p.metric || "score";
  const iteration = p.iteration ?? run.completed_iterations ?? 0;
  const planned = p.planned ?? run.planned_iterations;
  const lastLog = (run.log || [])[run.log ? run.log.length - 1 : 0];
  const perStep = p.query_per_step || (lastLog ? lastLog.query_per_step : null);
  const loss = p.loss ?? (lastLog ? lastLog.loss : null);
  const status = currentStatus();
  ui.status.replaceChildren(statusPill(status));
  page.dataset.status = status;
  ui.stats.replaceChildren(
    stat("iteration", `${iteration}/${planned ?? "?"}`, "iteration"),
    stat("ETA", status === "training" ? (p.eta_seconds === null || p.eta_seconds === undefined ? "estimating…" : Fmt.duration(p.eta_seconds)) : "-", "eta"),
    stat("last loss", Fmt.num(loss), "loss"),
    stat(`last query ${metric}`, perStep && perStep.length ? Fmt.num(perStep[perStep.length - 1]) : "-", "accuracy"),
    stat("best validation", run.best_score === null || run.best_score === undefined ? "-" : `${Fmt.num(run.best_score)} @${run.best_iteration}`, "best"),
    stat("latest test", Fmt.test((run.evaluations || [])[(run.evaluations || []).length - 1] || run.test), "test"),
    stat("elapsed", Fmt.duration(run.elapsed_seconds), "elapsed"));
  ui.progress.hidden = !(status === "training" && planned);
  if (planned) ui.progress.firstChild.style.width = `${Math.min(100, (100 * iteration) / planned).toFixed(1)}%`;
  // what the record says about how it ended: a failure, or where an interrupted run can resume
  const ended = status === "failed" || status === "interrupted";
  showMessage(ui.note, status === "failed" ? "error" : "busy", ended && run.error ? run.error : "");
  updateButtons();
}

function stepSeries(entries, key) {
  const steps = Math.max(0, ...entries.map((e) => e[key].length));
  return Array.from({ length: steps }, (_, s) => ({
    label: `step ${s}`,
    color: Charts.color(s),
    points: entries.filter((e) => e[key].length > s).map((e) => ({ x: e.iteration, y: e[key][s] })),
  }));
}

function renderCharts() {
  const run = state.run;
  const metric = run.metric_info ? run.metric_info.label : run.metric || "score";
  for (const node of document.querySelectorAll(".metric-name")) node.textContent = metric;
  const log = run.log || [];
  Charts.line(ui.loss, {
    series: [{ label: "meta-loss", points: log.filter((e) => e.loss !== null).map((e) => ({ x: e.iteration, y: e.loss })) }],
    xLabel: "iteration", xInteger: true, yLabel: "loss", empty: "no log points yet",
  });
  Charts.line(ui.query, { series: stepSeries(log, "query_per_step"), xLabel: "iteration", xInteger: true, yLabel: metric, empty: "no log points yet" });
  const validation = run.validation || [];
  ui.validationCount.textContent = validation.length ? `(${validation.length}, ${metric} per inner step)` : "";
  Charts.line(ui.validation, { series: stepSeries(validation, "per_step"), xLabel: "iteration", xInteger: true, yLabel: metric, empty: "no validation yet" });
  renderValidationTable(validation);
  const evaluations = run.evaluations || [];
  Charts.line(ui.test, {
    series: evaluations.map((e, i) => ({
      label: `${Fmt.time(e.created_at)} (${e.tasks} tasks)`,
      color: Charts.color(i),
      points: e.mean.map((m, s) => ({ x: s, y: m, lo: m - e.ci95[s], hi: m + e.ci95[s] })),
    })),
    xLabel: "inner step", yLabel: `test ${metric}`, xInteger: true, empty: "not tested yet — press Evaluate",
  });
  const steps = Math.max(0, ...evaluations.map((e) => e.mean.length));
  ui.testTable.replaceChildren();
  if (evaluations.length) {
    ui.testTable.append(
      el("thead", {}, el("tr", {}, el("th", {}, "tested"), el("th", { class: "num" }, "tasks"), el("th", { class: "num" }, "seed"),
        ...Array.from({ length: steps }, (_, s) => el("th", { class: "num" }, `step ${s}`)))),
      el("tbody", {}, ...evaluations.map((e) => el("tr", {},
        el("td", {}, Fmt.time(e.created_at)), el("td", { class: "num" }, e.tasks), el("td", { class: "num" }, e.seed),
        ...Array.from({ length: steps }, (_, s) => el("td", { class: "num" },
          s < e.mean.length ? `${e.mean[s].toFixed(4)} ± ${e.ci95[s].toFixed(4)}` : "-"))))));
  }
}

/* The validations, newest first, one column per inner step. */
function renderValidationTable(validation) {
  const steps = Math.max(0, ...validation.map((v) => v.per_step.length));
  ui.validationTable.replaceChildren();
  if (!validation.length) return;
  ui.validationTable.append(
    el("thead", {}, el("tr", {}, el("th", { class: "num" }, "iteration"),
      ...Array.from({ length: steps }, (_, s) => el("th", { class: "num" }, `step ${s}`)))),
    el("tbody", {}, ...validation.slice().reverse().map((v) => el("tr", {},
      el("td", { class: "num" }, v.iteration),
      ...Array.from({ length: steps }, (_, s) => el("td", { class: "num" }, Fmt.num(v.per_step[s])))))));
}

function renderDetails() {
  const run = state.run;
  const config = run.config || {};
  ui.flags.replaceChildren(...Object.keys(config).map((key) =>
    el("div", {}, el("span", { class: "k" }, `--${key}`), el("span", { class: "v" }, JSON.stringify(config[key])))));
  ui.commands.replaceChildren(...(run.commands || []).map((command, i) => {
    const argv = command.argv || [];
    return el("div", {}, el("div", { class: "muted small-text" }, `${i ? "resumed" : "command"} · ${Fmt.time(command.at)}`),
      el("div", { class: "command", title: `in ${command.cwd || "?"}: ${argv.join(" ")}` }, Fmt.command(argv)));
  }));
  const fields = [
    ["dataset", `${run.dataset || "-"} ${run.dataset ? Fmt.shape(run) : ""}`],
    ["algo", run.algo || "-"], ["metric", run.metric || "-"],
    ["started", Fmt.time(run.started_at)], ["updated", Fmt.time(run.updated_at)], ["ended", Fmt.time(run.ended_at)],
    ["paddle", `${run.paddle_version || "-"} on ${run.device || "-"}`], ["git commit", (run.git_commit || "-").slice(0, 12)],
    ["checkpoints", [run.has_best ? "best.npz" : null, run.has_last ? "last.npz" : null].filter(Boolean).join(", ") || "-"],
  ];
  ui.record.replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function updateButtons() {
  const run = state.run;
  const status = currentStatus();
  const job = state.job || (run && run.job);
  const active = ACTIVE.has(status) || (job && (job.status === "running" || job.status === "queued"));
  ui.cancel.disabled = state.busy || !active;
  ui.evaluate.disabled = state.busy || active || !run || !run.has_best;
  ui.resume.disabled = state.busy || active || !run || !run.has_last || status !== "interrupted";
  ui.remove.disabled = state.busy || active || !run;
}

/* -- data --------------------------------------------------------------------------------------- */
async function fetchRun() {
  state.lastFetch = Date.now();
  try {
    state.run = await Api.get(`/api/runs/${encodeURIComponent(NAME)}`);
    state.job = state.run.job || state.job;
    page.dataset.state = "ready";
    page.dataset.logPoints = String((state.run.log || []).length);
    renderStats();
    renderCharts();
    renderDetails();
    if (ui.message.dataset.kind === "load") {
      ui.message.dataset.kind = "";
      showMessage(ui.message, "", "");
    }
  } catch (error) {
    const starting = error.status === 404 && state.progress && state.progress.job; // no record yet
    if (error.status === 404 && !starting) {
      page.dataset.state = "missing";
      showMessage(ui.message, "error", `There is no run named ${NAME}.`);
      ui.message.append(" ", el("a", { href: "/runs" }, "Back to the runs."));
      ui.message.dataset.kind = "load";
    } else if (!starting) {
      showMessage(ui.message, "error", `Could not load the run: ${error.message}`);
      ui.message.dataset.kind = "load";
    }
  }
  fetchOutput();
}

/* The history changes only when progress does; fetch it at most every REFETCH_MS. */
function scheduleFetch() {
  clearTimeout(state.fetchTimer);
  const wait = Math.max(0, state.lastFetch + REFETCH_MS - Date.now());
  state.fetchTimer = setTimeout(fetchRun, wait);
}

async function fetchOutput() {
  try {
    const jobs = (await Api.get("/api/jobs")).filter((j) => j.run === NAME);
    const job = jobs[jobs.length - 1];
    if (!job) return;
    ui.jobLabel.textContent = `(${job.kind}, ${job.status})`;
    ui.output.textContent = (job.output || []).join("\n") || "-";
    ui.output.scrollTop = ui.output.scrollHeight;
  } catch (_) {
    /* the output is a convenience; the page works without it */
  }
}

function follow() {
  if (state.source) state.source.close();
  const source = Api.events(`/api/runs/${encodeURIComponent(NAME)}/events`);
  state.source = source;
  ui.liveHint.textContent = "connecting…";
  source.addEventListener("progress", (event) => {
    const previous = state.progress;
    state.progress = JSON.parse(event.data);
    state.job = state.progress.job || state.job;
    ui.liveHint.textContent = `live · ${new Date().toLocaleTimeString()}`;
    renderStats();
    if (!previous || previous.iteration !== state.progress.iteration || previous.status !== state.progress.status
        || previous.validation_score !== state.progress.validation_score) scheduleFetch();
  });
  source.addEventListener("end", (event) => {
    source.close();
    state.source = null;
    const end = JSON.parse(event.data);
    state.progress = { ...(state.progress || {}), status: end.status };
    state.job = null;
    ui.liveHint.textContent = `finished: ${end.status}`;
    if (ui.message.classList.contains("info")) showMessage(ui.message, "info", `The job has ended; the run is ${end.status}.`);
    fetchRun();
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) ui.liveHint.textContent = "not live (reload to reconnect)";
    else ui.liveHint.textContent = "reconnecting…";
  };
}

/* -- actions ------------------------------------------------------------------------------------ */
async function act(button, verb, call) {
  state.busy = true;
  updateButtons();
  try {
    const answer = await call();
    showMessage(ui.message, "info", verb);
    state.job = answer && answer.job ? answer.job : state.job;
    state.progress = null;
    await fetchRun();
    follow();
  } catch (error) {
    showMessage(ui.message, "error", `${button.textContent} failed: ${error.message}`);
  } finally {
    state.busy = false;
    updateButtons();
  }
}

ui.evaluate.addEventListener("click", () => {
  const tasks = Number(ui.evalTasks.value);
  act(ui.evaluate, "Evaluation queued: it tests best.npz on fixed, seeded test tasks.",
    () => Api.post(`/api/runs/${encodeURIComponent(NAME)}/evaluate`, Number.isInteger(tasks) && tasks > 0 ? { tasks } : {}));
});
ui.cancel.addEventListener("click", () => act(ui.cancel, "Cancelling: the run stops like Ctrl-C and keeps last.npz, so it can be resumed.",
  () => Api.post(`/api/runs/${encodeURIComponent(NAME)}/cancel`)));
ui.resume.addEventListener("click", () => act(ui.resume, "Resume queued: training continues from last.npz.",
  () => Api.post(`/api/runs/${encodeURIComponent(NAME)}/resume`)));

/* Delete asks first, in the page (a <dialog>), then returns to the runs list. */
ui.remove.addEventListener("click", () => {
  const run = state.run;
  ui.confirmText.textContent = `This removes the record of ${NAME} (${run.status}, ${Fmt.iterations(run)} iterations) and its history. ` +
    "The run folder on disk is kept.";
  ui.confirm.showModal();
});
ui.confirmNo.addEventListener("click", () => ui.confirm.close());
ui.confirmYes.addEventListener("click", async () => {
  ui.confirm.close();
  state.busy = true;
  updateButtons();
  try {
    await Api.del(`/api/runs/${encodeURIComponent(NAME)}`);
    location.href = "/runs";
  } catch (error) {
    showMessage(ui.message, "error", `Delete failed: ${error.message}`);
    state.busy = false;
    updateButtons();
  }
});

fetchRun();
follow();
