/* The few-shot playground: draw (Omniglot runs) or upload (image-folder runs) an N-way K-shot
   task, let the server run the inner loop of a trained run, and show each query's class
   probabilities after every step. */
"use strict";

const SIZE = 105; // Omniglot's drawing resolution; the server resizes to 28x28 like the packer
const STROKE_WIDTH = 4.5; // close to the pen of Omniglot's drawings at 105 px
const QUERY_CELLS = 5;
const AUTO_ADAPT_DELAY_MS = 450;
const UPLOAD_TYPES = ["image/png", "image/jpeg"]; // what /api/adapt decodes

const page = document.getElementById("playground");
const ui = {
  message: document.getElementById("page-message"),
  pageHint: document.getElementById("page-hint"),
  queryHint: document.getElementById("query-hint"),
  noRuns: document.getElementById("no-runs"),
  controls: document.getElementById("controls"),
  workspace: document.getElementById("workspace"),
  runSelect: document.getElementById("run-select"),
  runInfo: document.getElementById("run-info"),
  steps: document.getElementById("steps"),
  stepsValue: document.getElementById("steps-value"),
  adapt: document.getElementById("adapt"),
  randomTask: document.getElementById("random-task"),
  clearAll: document.getElementById("clear-all"),
  status: document.getElementById("adapt-status"),
  support: document.getElementById("support"),
  supportHint: document.getElementById("support-hint"),
  queries: document.getElementById("queries"),
  viewStep: document.getElementById("view-step"),
  viewStepValue: document.getElementById("view-step-value"),
};

const state = {
  runs: [],
  limits: {},
  run: null, // the selected playground run
  supportCells: [], // [class][shot] -> Cell
  queryCells: [],
  result: null, // the last adapt answer
  adaptCount: 0,
  sequence: 0, // newer requests win; older answers are dropped
  timer: null,
  controller: null,
};

/* -- one drawing cell (Omniglot runs) ----------------------------------------------------------------------- */
class DrawCell {
  constructor(role, label, onChange) {
    this.role = role;
    this.onChange = onChange;
    this.strokes = []; // each stroke: [[x, y], ...] in 105-px canvas units
    this.base = null; // a 28x28 array (ink = 1) from "Random task", drawn under the strokes
    this.trueLabel = null; // the class of a random-task drawing, while it is unchanged
    this.current = null;
    this.canvas = el("canvas", { width: SIZE, height: SIZE, class: "draw", "aria-label": `${label}: draw here` });
    this.preview = el("canvas", { width: 28, height: 28, class: "preview", title: "the 28×28 image the model sees" });
    this.context = this.canvas.getContext("2d");
    this.undoButton = el("button", { type: "button", class: "small", onclick: () => this.undo() }, "Undo");
    this.clearButton = el("button", { type: "button", class: "small", onclick: () => this.clear() }, "Clear");
    this.element = el("div", { class: `cell ${role}`, dataset: { filled: "false" } },
      el("div", { class: "draw-wrap" }, this.canvas),
      el("div", { class: "cell-side" },
        el("div", { class: "preview-wrap" }, this.preview, el("span", { class: "preview-label" }, "28×28")),
        el("div", { class: "cell-tools" }, this.undoButton, this.clearButton)));
    this.listen();
    this.redraw();
  }

  get filled() {
    return this.strokes.length > 0 || this.base !== null;
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [((event.clientX - rect.left) / rect.width) * SIZE, ((event.clientY - rect.top) / rect.height) * SIZE];
  }

  listen() {
    const canvas = this.canvas;
    canvas.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 && event.pointerType === "mouse") return;
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      this.current = [this.point(event)];
      this.paintStroke(this.current);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!this.current) return;
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
      for (const e of events.length ? events : [event]) {
        const last = this.current[this.current.length - 1];
        const next = this.point(e);
        this.current.push(next);
        this.paintSegment(last, next);
      }
    });
    const finish = () => {
      if (!this.current) return;
      this.strokes.push(this.current);
      this.current = null;
      this.trueLabel = null;
      this.changed();
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    canvas.addEventListener("lostpointercapture", finish);
  }

  setPen() {
    const c = this.context;
    c.strokeStyle = "#000";
    c.fillStyle = "#000";
    c.lineWidth = STROKE_WIDTH;
    c.lineCap = "round";
    c.lineJoin = "round";
  }

  paintSegment(from, to) {
    this.setPen();
    this.context.beginPath();
    this.context.moveTo(from[0], from[1]);
    this.context.lineTo(to[0], to[1]);
    this.context.stroke();
  }

  paintStroke(stroke) {
    const c = this.context;
    this.setPen();
    if (stroke.length === 1) {
      c.beginPath();
      c.arc(stroke[0][0], stroke[0][1], STROKE_WIDTH / 2, 0, 2 * Math.PI);
      c.fill();
      return;
    }
    c.beginPath();
    c.moveTo(stroke[0][0], stroke[0][1]);
    for (const [x, y] of stroke.slice(1)) c.lineTo(x, y);
    c.stroke();
  }

  redraw() {
    const c = this.context;
    c.fillStyle = "#fff";
    c.fillRect(0, 0, SIZE, SIZE);
    if (this.base) {
      const small = document.createElement("canvas");
      small.width = small.height = 28;
      paintArray(small, this.base);
      c.imageSmoothingEnabled = true;
      c.imageSmoothingQuality = "high";
      c.drawImage(small, 0, 0, SIZE, SIZE);
    }
    for (const stroke of this.strokes) this.paintStroke(stroke);
  }

  undo() {
    if (this.strokes.length) this.strokes.pop();
    else this.base = null;
    this.redraw();
    this.changed();
  }

  clear(quiet) {
    this.strokes = [];
    this.base = null;
    this.trueLabel = null;
    this.current = null;
    this.redraw();
    this.setPreview(null);
    if (!quiet) this.changed();
  }

  setImage(array, label) {
    this.strokes = [];
    this.base = array;
    this.trueLabel = label;
    this.redraw();
    this.setPreview(null);
    this.refresh();
  }

  setPreview(array) {
    const wrap = this.preview.parentElement;
    if (array) paintArray(this.preview, array);
    else this.preview.getContext("2d").clearRect(0, 0, 28, 28);
    wrap.classList.toggle("stale", !array);
  }

  refresh() {
    this.element.dataset.filled = String(this.filled);
    this.undoButton.disabled = !this.filled;
    this.clearButton.disabled = !this.filled;
  }

  changed() {
    this.refresh();
    this.preview.parentElement.classList.add("stale");
    this.onChange(this);
  }

  /* What the server gets: the untouched 28x28 array of a random-task drawing, else the PNG. */
  payload() {
    if (this.base && !this.strokes.length) return this.base;
    return this.canvas.toDataURL("image/png");
  }
}

/* Draw a 28x28 array with ink = 1 as black on white. */
function paintArray(canvas, array) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(28, 28);
  for (let r = 0; r < 28; r++) {
    for (let c = 0; c < 28; c++) {
      const v = Math.round(255 * (1 - Math.max(0, Math.min(1, array[r][c]))));
      const i = 4 * (r * 28 + c);
      image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
      image.data[i + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

/* -- one upload cell (image-folder runs) ------------------------------------------------------- */
class UploadCell {
  constructor(role, label, onChange, run) {
    this.role = role;
    this.onChange = onChange;
    this.image = null; // the data URL sent: the file's own bytes, or a packed test image
    this.trueLabel = null; // the class of a random-task image, while it is unchanged
    this.input = el("input", { type: "file", accept: UPLOAD_TYPES.join(","), class: "file",
      "aria-label": `${label}: choose an image`, title: "drop an image here or click to choose one" });
    this.shown = el("img", { class: "upload", alt: "" });
    this.hint = el("span", { class: "drop-hint" }, "drop an image", el("br"), "or click");
    this.zone = el("label", { class: "drop" }, this.shown, this.hint, this.input);
    const side = `${run.image_size}×${run.image_size}`;
    this.preview = el("img", { class: "preview", alt: "", title: `the ${side} image the model sees` });
    this.clearButton = el("button", { type: "button", class: "small", onclick: () => this.clear() }, "Clear");
    this.element = el("div", { class: `cell upload-cell ${role}`, dataset: { filled: "false" } },
      el("div", { class: "draw-wrap" }, this.zone),
      el("div", { class: "cell-side" },
        el("div", { class: "preview-wrap stale" }, this.preview,
          el("span", { class: "preview-label" }, run.channels === 3 ? `${side} RGB` : side)),
        el("div", { class: "cell-tools" }, this.clearButton)));
    this.listen();
    this.refresh();
  }

  get filled() {
    return this.image !== null;
  }

  listen() {
    this.input.addEventListener("change", () => {
      if (this.input.files.length) this.take(this.input.files[0]);
      this.input.value = ""; // choosing the same file again still counts
    });
    this.zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      this.zone.classList.add("over");
    });
    this.zone.addEventListener("dragleave", () => this.zone.classList.remove("over"));
    this.zone.addEventListener("drop", (event) => {
      event.preventDefault();
      this.zone.classList.remove("over");
      const files = event.dataTransfer ? event.dataTransfer.files : [];
      if (files.length) this.take(files[0]);
    });
  }

  /* A file from the picker or a drop: PNG or JPEG within the server's limit, sent as it is. */
  take(file) {
    const limit = state.limits.max_upload_bytes;
    if (!UPLOAD_TYPES.includes(file.type)) {
      this.refuse(`${file.name}: not a PNG or JPEG image`);
      return;
    }
    if (limit && file.size > limit) {
      this.refuse(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB, more than the ${(limit / 1048576).toFixed(0)} MB the server takes`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      this.show(reader.result, null);
      this.changed();
    };
    reader.onerror = () => this.refuse(`${file.name}: cannot be read`);
    reader.readAsDataURL(file);
  }

  refuse(text) {
    this.element.dataset.error = text;
    setStatus("error", text);
  }

  show(image, label) {
    this.image = image;
    this.trueLabel = label;
    delete this.element.dataset.error;
    if (image) this.shown.src = image;
    else this.shown.removeAttribute("src");
    this.setPreview(null);
  }

  clear(quiet) {
    this.show(null, null);
    this.refresh();
    if (!quiet) this.changed();
  }

  setImage(image, label) {
    this.show(image, label);
    this.refresh();
  }

  setPreview(image) {
    if (image) this.preview.src = image;
    else this.preview.removeAttribute("src");
    this.preview.parentElement.classList.toggle("stale", !image);
  }

  refresh() {
    this.element.dataset.filled = String(this.filled);
    this.clearButton.disabled = !this.filled;
  }

  changed() {
    this.refresh();
    this.onChange(this);
  }

  payload() {
    return this.image;
  }
}

function makeCell(run, role, label) {
  return run.input === "upload" ? new UploadCell(role, label, cellChanged, run) : new DrawCell(role, label, cellChanged);
}

/* -- the task grid ------------------------------------------------------------------------------ */
function buildGrid(run) {
  state.result = null;
  ui.support.replaceChildren();
  ui.queries.replaceChildren();
  state.supportCells = [];
  for (let label = 0; label < run.n_way; label++) {
    const row = [];
    const rowElement = el("div", { class: "support-row", dataset: { class: String(label) } },
      el("div", { class: "class-label" }, el("span", { class: "swatch", style: `background:${Charts.color(label)}` }),
        `class ${label + 1}`));
    const cells = el("div", { class: "support-cells" });
    for (let shot = 0; shot < run.k_spt; shot++) {
      const cell = makeCell(run, "support", `class ${label + 1}, example ${shot + 1}`);
      cell.element.dataset.class = String(label);
      cell.element.dataset.shot = String(shot);
      row.push(cell);
      cells.appendChild(cell.element);
    }
    rowElement.appendChild(cells);
    ui.support.appendChild(rowElement);
    state.supportCells.push(row);
  }
  state.queryCells = [];
  for (let index = 0; index < QUERY_CELLS; index++) {
    const cell = makeCell(run, "query", `query ${index + 1}`);
    cell.element.dataset.query = String(index);
    cell.result = el("div", { class: "query-result", dataset: { query: String(index) } });
    const item = el("div", { class: "query-item" },
      el("div", { class: "query-title" }, `query ${index + 1}`), cell.element, cell.result);
    ui.queries.appendChild(item);
    state.queryCells.push(cell);
    renderQuery(cell, null);
  }
  // several shots per class make the support rows wide: stack the queries below them
  document.getElementById("workspace").classList.toggle("stacked", run.k_spt >= 3);
  const what = run.input === "upload" ? "image" : "drawing";
  ui.supportHint.textContent = run.k_spt === 1 ? `one ${what} per class` : `${run.k_spt} ${what}s per class`;
  ui.queryHint.textContent = run.input === "upload" ? "upload images of any of the classes" : "draw any of the classes";
  ui.pageHint.textContent = run.input === "upload"
    ? "Upload one image of each new class, then queries. The model adapts in a few gradient steps."
    : "Draw one example of each new character, then a query. The model adapts in a few gradient steps.";
  updateButtons();
}

function allSupport() {
  return state.supportCells.flat();
}

function ready() {
  return allSupport().every((c) => c.filled) && state.queryCells.some((c) => c.filled);
}

function updateButtons() {
  const anything = allSupport().concat(state.queryCells).some((c) => c.filled);
  ui.clearAll.disabled = !anything;
  ui.adapt.disabled = !state.run || !ready();
}

function cellChanged(cell) {
  if (cell.role === "query" && !cell.filled) {
    cell.answer = null;
    renderQuery(cell, null);
  }
  updateButtons();
  scheduleAdapt();
}

/* Adapt automatically (debounced) once the task is complete, like the Reptile demo. */
function scheduleAdapt() {
  clearTimeout(state.timer);
  if (!ready()) {
    setStatus("", missingText());
    return;
  }
  state.timer = setTimeout(adapt, AUTO_ADAPT_DELAY_MS);
}

function missingText() {
  const verb = state.run && state.run.input === "upload" ? "Upload" : "Draw";
  const empty = allSupport().filter((c) => !c.filled).length;
  if (empty) return `${verb} ${empty} more support ${empty === 1 ? "example" : "examples"} to adapt.`;
  if (!state.queryCells.some((c) => c.filled)) return `${verb} a query to adapt.`;
  return "";
}

function setStatus(kind, text) {
  ui.status.className = `adapt-status ${kind || "muted"}`;
  ui.status.textContent = text;
}

/* -- adapting ----------------------------------------------------------------------------------- */
async function adapt() {
  clearTimeout(state.timer);
  if (!state.run || !ready()) {
    setStatus("", missingText());
    return;
  }
  const sequence = ++state.sequence;
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  const support = [];
  state.supportCells.forEach((row, label) => row.forEach((cell) => support.push({ image: cell.payload(), label })));
  const queries = state.queryCells.filter((c) => c.filled);
  const body = { run: state.run.name, support, query: queries.map((c) => c.payload()), steps: Number(ui.steps.value) };
  page.dataset.state = "adapting";
  setStatus("working", `Adapting ${body.steps} ${body.steps === 1 ? "step" : "steps"}…`);
  try {
    const answer = await Api.post("/api/adapt", body, {
      signal: state.controller.signal,
      onBusy: (ms) => setStatus("busy", `The server is busy; trying again in ${Math.round(ms / 1000)} s…`),
    });
    if (sequence !== state.sequence) return;
    showResult(answer, queries);
    setStatus("done", `Adapted ${answer.steps} ${answer.steps === 1 ? "step" : "steps"} with inner lr ${answer.inner_lr}.`);
    page.dataset.state = "done";
    state.adaptCount += 1;
    page.dataset.adaptCount = String(state.adaptCount);
  } catch (error) {
    if (error.name === "AbortError" || sequence !== state.sequence) return;
    page.dataset.state = "error";
    const busy = error.status === 503 || error.status === 429;
    setStatus(busy ? "busy" : "error", busy ? `Busy: ${error.message}. Try again in a moment.` : `Could not adapt: ${error.message}`);
  }
}

function showResult(answer, queries) {
  state.result = answer;
  allSupport().forEach((cell, i) => cell.setPreview(answer.inputs.support[i]));
  for (const cell of state.queryCells) cell.answer = null;
  queries.forEach((cell, i) => {
    cell.setPreview(answer.inputs.query[i]);
    cell.answer = { probabilities: answer.probabilities[i], predictions: answer.predictions[i] };
  });
  ui.viewStep.max = String(answer.steps);
  ui.viewStep.value = String(answer.steps);
  ui.viewStep.disabled = answer.steps === 0;
  renderQueries();
}

function renderQueries() {
  const step = Number(ui.viewStep.value);
  ui.viewStepValue.textContent = state.result ? `${step} of ${state.result.steps}` : "-";
  for (const cell of state.queryCells) renderQuery(cell, cell.answer, step);
}

function classLabels() {
  return Array.from({ length: state.run ? state.run.n_way : 0 }, (_, i) => String(i + 1));
}

/* A query's verdict: bars for the chosen step, and every class's probability over the steps. */
function renderQuery(cell, answer, step) {
  const box = cell.result;
  box.replaceChildren();
  if (!answer) {
    delete box.dataset.probabilities;
    box.dataset.state = cell.filled ? "stale" : "empty";
    const empty = cell instanceof UploadCell ? "upload an image to classify" : "draw here to classify";
    box.appendChild(el("p", { class: "muted placeholder" }, cell.filled ? "waiting for adaptation" : empty));
    return;
  }
  const probabilities = answer.probabilities[step];
  const predicted = answer.predictions[step];
  box.dataset.state = "ready";
  box.dataset.probabilities = JSON.stringify(answer.probabilities);
  box.dataset.step = String(step);
  box.dataset.prediction = String(predicted);
  const verdict = el("div", { class: "verdict" },
    el("span", { class: "swatch", style: `background:${Charts.color(predicted)}` }),
    el("strong", {}, `class ${predicted + 1}`), ` ${(probabilities[predicted] * 100).toFixed(1)}%`);
  if (cell.trueLabel !== null && cell.trueLabel !== undefined) {
    const right = cell.trueLabel === predicted;
    verdict.appendChild(el("span", { class: right ? "right" : "wrong" },
      right ? " ✓ correct" : ` ✗ truth: class ${cell.trueLabel + 1}`));
  }
  const barBox = el("div", { class: "bars" });
  Charts.bars(barBox, { values: probabilities, labels: classLabels(), highlight: predicted, width: 230, height: 96 });
  const lineBox = el("div", { class: "steps-chart" });
  const series = classLabels().map((label, c) => ({
    label: `class ${label}`,
    color: Charts.color(c),
    points: answer.probabilities.map((p, s) => ({ x: s, y: p[c] })),
  }));
  Charts.line(lineBox, { series, yDomain: [0, 1], width: 230, height: 96, legend: false, xInteger: true });
  box.append(verdict,
    el("div", { class: "charts" },
      el("figure", {}, barBox, el("figcaption", {}, `after step ${step}`)),
      el("figure", {}, lineBox, el("figcaption", {}, "over steps 0…" + (answer.probabilities.length - 1)))));
}

/* -- random task, run choice -------------------------------------------------------------------- */
async function randomTask() {
  if (!state.run) return;
  ui.randomTask.disabled = true;
  setStatus("working", "Fetching a random task from the test split…");
  try {
    const task = await Api.get(`/api/playground/random_task?run=${encodeURIComponent(state.run.name)}`);
    const shots = state.supportCells.map(() => 0);
    for (const cell of allSupport().concat(state.queryCells)) cell.clear(true);
    for (const item of task.support) {
      const cell = state.supportCells[item.label][shots[item.label]++];
      if (cell) cell.setImage(item.image, item.label);
    }
    task.query.slice(0, state.queryCells.length).forEach((item, i) => state.queryCells[i].setImage(item.image, item.label));
    updateButtons();
    setStatus("", `A task of unseen ${state.run.input === "upload" ? "classes" : "characters"} from the test split.`);
    await adapt();
  } catch (error) {
    setStatus("error", `Could not fetch a random task: ${error.message}`);
  } finally {
    ui.randomTask.disabled = false;
  }
}

function describeRun(run) {
  const test = run.test_accuracy === null || run.test_accuracy === undefined ? "not tested" : Fmt.pct(run.test_accuracy);
  const images = run.input === "upload"
    ? `${run.data}, ${run.channels === 3 ? "RGB" : "gray"} ${run.image_size}×${run.image_size}`
    : "Omniglot drawings";
  const pairs = [
    ["run", el("a", { href: `/runs/${encodeURIComponent(run.name)}` }, run.name)],
    ["task", `${run.n_way}-way ${run.k_spt}-shot`],
    ["images", images],
    ["algorithm", run.algo || "-"],
    ["inner lr", String(run.inner_lr)],
    ["test accuracy", test],
  ];
  ui.runInfo.replaceChildren(...pairs.map(([label, value]) => el("div", {}, el("dt", {}, label), el("dd", {}, value))));
}

function selectRun(name) {
  const run = state.runs.find((r) => r.name === name);
  if (!run) return;
  const previous = state.run;
  const sameShape = previous && ["n_way", "k_spt", "input", "data", "image_size", "channels"].every((key) => previous[key] === run[key]);
  state.run = run;
  describeRun(run);
  ui.randomTask.disabled = Boolean(run.problem);
  if (run.problem) {
    buildGrid(run);
    setStatus("error", `This run cannot be used here: ${run.problem}`);
    ui.adapt.disabled = true;
  } else if (sameShape) {
    updateButtons();
    scheduleAdapt();
  } else {
    buildGrid(run);
    const verb = run.input === "upload" ? "Upload an image of" : "Draw";
    setStatus("", `${verb} each class in the support set and at least one query, or press Random task.`);
  }
}

async function load() {
  try {
    const data = await Api.get("/api/playground/runs");
    state.runs = data.runs || [];
    state.limits = data.limits || {};
    if (!state.runs.length) {
      ui.noRuns.hidden = false;
      page.dataset.state = "no-runs";
      return;
    }
    ui.runSelect.replaceChildren(...state.runs.map((run) => el("option", { value: run.name },
      `${run.name} — ${run.input === "upload" ? `${run.data}, ` : ""}${run.n_way}-way ${run.k_spt}-shot${run.test_accuracy === null || run.test_accuracy === undefined ? "" : `, test ${Fmt.pct(run.test_accuracy)}`}`)));
    const chosen = data.default && state.runs.some((r) => r.name === data.default) ? data.default : state.runs[0].name;
    ui.runSelect.value = chosen;
    ui.controls.hidden = false;
    ui.workspace.hidden = false;
    selectRun(chosen);
    page.dataset.state = "ready";
  } catch (error) {
    showMessage(ui.message, "error", `Could not load the trained runs: ${error.message}`);
    page.dataset.state = "error";
  }
}

ui.runSelect.addEventListener("change", () => selectRun(ui.runSelect.value));
ui.steps.addEventListener("input", () => { ui.stepsValue.textContent = ui.steps.value; });
ui.steps.addEventListener("change", scheduleAdapt);
ui.adapt.addEventListener("click", adapt);
ui.randomTask.addEventListener("click", randomTask);
ui.clearAll.addEventListener("click", () => {
  for (const cell of allSupport().concat(state.queryCells)) cell.clear(true);
  for (const cell of state.queryCells) cell.answer = null;
  state.result = null;
  state.sequence++;
  ui.viewStep.disabled = true;
  renderQueries();
  updateButtons();
  page.dataset.state = "ready";
  setStatus("", missingText());
});
ui.viewStep.addEventListener("input", renderQueries);
load();
