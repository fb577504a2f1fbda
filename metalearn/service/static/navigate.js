/* 2D navigation: click a goal; the server adapts the run's policy and returns the paths after
   each policy-gradient step, drawn in the plane with y pointing up. */
"use strict";

const COLORS = ["#8a94a6", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b"];
const SVG = "http://www.w3.org/2000/svg";
const page = document.getElementById("navigate-page");
const plane = document.getElementById("plane");
const message = document.getElementById("page-message");
const runSelect = document.getElementById("run-select");
const steps = document.getElementById("steps");
const trajectories = document.getElementById("trajectories");
let pending = null;

function svg(tag, attrs) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, value);
  return element;
}

function say(text, kind) {
  message.textContent = text || "";
  message.className = `message ${kind || "info"}`;
}

function stepLabel(k) {
  return k === 0 ? "pre-update" : `${k} step${k > 1 ? "s" : ""}`;
}

/* The plane: the task area [-0.5, 0.5]², the axes, the start; y is flipped to point up. */
function drawPlane(goal) {
  plane.replaceChildren(
    svg("rect", { class: "task-area", x: -0.5, y: -0.5, width: 1, height: 1 }),
    svg("line", { class: "axis", x1: -0.6, y1: 0, x2: 0.6, y2: 0 }),
    svg("line", { class: "axis", x1: 0, y1: -0.6, x2: 0, y2: 0.6 }),
    svg("circle", { class: "start", cx: 0, cy: 0, r: 0.012 }),
  );
  if (goal) plane.append(svg("circle", { class: "goal", cx: goal[0], cy: -goal[1], r: 0.02 }));
}

function drawResult(result) {
  drawPlane(result.goal);
  const legend = document.getElementById("legend");
  const body = document.querySelector("#returns tbody");
  legend.replaceChildren();
  body.replaceChildren();
  result.per_step.forEach((step, k) => {
    const color = COLORS[k % COLORS.length];
    const group = svg("g", { class: "step", "data-step": k });
    for (const path of step.paths) {
      const points = path.map(([x, y]) => `${x},${-y}`).join(" ");
      group.append(svg("polyline", { class: "path", points, stroke: color }));
    }
    plane.append(group);
    legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${color}` }), stepLabel(k)));
    body.append(el("tr", { dataset: { step: k } },
      el("td", {}, stepLabel(k)),
      el("td", { class: "num" }, step.return.toFixed(2)),
      el("td", {}, `${step.paths.length} of ${result.trajectories}`)));
  });
  plane.append(plane.querySelector(".goal"));  // the goal on top of the paths
  document.getElementById("goal-text").textContent =
    `goal (${result.goal[0].toFixed(2)}, ${result.goal[1].toFixed(2)}), α = ${result.inner_lr}`;
  page.dataset.resultCount = String(Number(page.dataset.resultCount) + 1);
}

async function adapt(goal) {
  if (pending) pending.abort();
  pending = new AbortController();
  drawPlane(goal);
  say("Sampling and adapting…", "info");
  page.dataset.state = "adapting";
  try {
    const result = await Api.post("/api/navigate", {
      run: runSelect.value, goal, steps: Number(steps.value), trajectories: Number(trajectories.value),
    }, { signal: pending.signal, onBusy: (ms) => say(`The server is busy; retrying in ${ms / 1000} s…`, "busy") });
    drawResult(result);
    say("", "info");
  } catch (error) {
    if (error.name !== "AbortError") say(error.message, "error");
  } finally {
    page.dataset.state = "ready";
  }
}

plane.addEventListener("click", (event) => {
  const point = plane.createSVGPoint();
  point.x = event.clientX;
  point.y = event.clientY;
  const local = point.matrixTransform(plane.getScreenCTM().inverse());
  adapt([Math.round(local.x * 1000) / 1000, Math.round(-local.y * 1000) / 1000]);
});
steps.addEventListener("input", () => { document.getElementById("steps-value").textContent = steps.value; });

async function start() {
  try {
    const { runs, default: chosen } = await Api.get("/api/navigate/runs");
    if (!runs.length) {
      document.getElementById("no-runs").hidden = false;
      page.dataset.state = "empty";
      return;
    }
    for (const run of runs) {
      const tested = run.test_return === null ? "" : `, test return ${run.test_return.toFixed(1)}`;
      runSelect.append(el("option", { value: run.name }, `${run.name} (${run.algo}${tested})`));
    }
    runSelect.value = chosen;
    document.getElementById("controls").hidden = false;
    document.getElementById("work").hidden = false;
    drawPlane(null);
    page.dataset.state = "ready";
  } catch (error) {
    say(error.message, "error");
  }
}

start();
