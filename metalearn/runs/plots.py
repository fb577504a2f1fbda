"""PNG figures of runs, evaluations and tasks (matplotlib's Agg canvas: no display, no pyplot).

Every figure is written atomically (``fileio.atomic_path``), so a reader never sees half a PNG.

* :func:`training_curves`: query metric per inner step, validation metric and meta-loss vs iteration.
* :func:`compare_curves`: several runs' curves overlaid.
* :func:`steps_curve`: metric vs number of inner steps with 95% bands (paper Figure 3 style).
* :func:`minutes_curve`: metric vs training minutes, runs of one time budget overlaid.
* :func:`sinusoid_fits`: true function, support points and predictions per task (Figure 2 style).
* :func:`task_preview`: the support and query images of one N-way K-shot task, by class.
* :func:`adaptation_steps`: a task's support set, then queries and their predictions per step.
* :func:`navigation_trajectories`: 2D navigation paths per goal before and after adaptation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metalearn.fileio import atomic_path
from metalearn.metrics import metric_named

PREDICTION_COLORS = ("tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:brown", "tab:cyan")


def _label(metric: str) -> str:
    known = metric_named(metric)
    return metric if known is None else known.label


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def _empty(axis: Any, text: str = "no data yet") -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)


def _steps(count: int) -> str:
    return f"after {count} step{'' if count == 1 else 's'}"


def _final(values: Sequence[Sequence[float]]) -> list[float]:
    return [float(v[-1]) if len(v) else float("nan") for v in values]


def training_curves(
    path: str | os.PathLike[str],
    log: Sequence[Mapping],
    validation: Sequence[Mapping],
    metric: str,
    title: str | None = None,
) -> Path:
    """Three panels: training-query metric after each inner step, validation metric, meta-loss.

    ``log``/``validation`` are the trainer's history entries (``iteration``, ``loss``,
    ``query_per_step`` / ``iteration``, ``per_step``).
    """
    figure, axes = _figure(1, 3, (15, 4.2))
    query, val, loss = axes[0]
    label = _label(metric)
    if log:
        iterations = [e["iteration"] for e in log]
        per_step = np.array([e["query_per_step"] for e in log], dtype=float)
        steps = per_step.shape[1] if per_step.ndim == 2 else 0
        for step in range(steps):
            query.plot(iterations, per_step[:, step], marker=".", label=_steps(step))
        if steps:
            query.legend(fontsize="small")
        loss.plot(iterations, [e["loss"] for e in log], marker=".", color="tab:red")
    else:
        _empty(query)
        _empty(loss)
    query.set(title=f"training query {label} per inner step", xlabel="iteration", ylabel=label)
    loss.set(title="meta-loss", xlabel="iteration", ylabel="loss")
    if validation:
        iterations = [e["iteration"] for e in validation]
        first = [float(e["per_step"][0]) for e in validation]
        val.plot(iterations, first, marker=".", linestyle="--", label="before adapting")
        val.plot(iterations, _final([e["per_step"] for e in validation]), marker="o")
        val.lines[-1].set_label(_steps(len(validation[-1]["per_step"]) - 1))
        val.legend(fontsize="small")
    else:
        _empty(val)
    known = metric_named(metric)
    better = f" ({known.direction} is better)" if known else ""
    val.set(title=f"validation {label}{better}", xlabel="iteration", ylabel=label)
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def compare_curves(
    path: str | os.PathLike[str],
    runs: Mapping[str, Mapping],
    metric: str,
) -> Path:
    """Overlay runs: validation metric, training-query metric (last inner step), meta-loss.

    ``runs`` maps a run name to a dict with its ``log`` and ``validation`` history.
    """
    figure, axes = _figure(1, 3, (15, 4.2))
    val, query, loss = axes[0]
    label = _label(metric)
    for index, (name, run) in enumerate(runs.items()):
        color = f"C{index % 10}"
        log, validation = run.get("log", []), run.get("validation", [])
        if validation:
            val.plot(
                [e["iteration"] for e in validation],
                _final([e["per_step"] for e in validation]),
                marker="o",
                color=color,
                label=name,
            )
        if log:
            iterations = [e["iteration"] for e in log]
            query.plot(
                iterations,
                _final([e["query_per_step"] for e in log]),
                marker=".",
                color=color,
                label=name,
            )
            loss.plot(iterations, [e["loss"] for e in log], marker=".", color=color, label=name)
    for axis, heading, ylabel in (
        (val, f"validation {label} (after the last inner step)", label),
        (query, f"training query {label} (after the last inner step)", label),
        (loss, "meta-loss", "loss"),
    ):
        axis.set(title=heading, xlabel="iteration", ylabel=ylabel)
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
        if axis.lines:
            axis.legend(fontsize="small")
        else:
            _empty(axis)
    return _save(figure, path)


def steps_curve(
    path: str | os.PathLike[str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    title: str | None = None,
    reference: Mapping[str, Sequence[float]] | None = None,
    reference_name: str = "paper",
) -> Path:
    """Metric vs number of inner steps: one line per label, shaded ± its 95% half-width.

    ``reference`` (published values, no interval) is drawn dashed with hollow markers, each in
    the colour of the series whose label starts with its key ("MAML" → "MAML (ours)"), so that
    ours and the published curve of one method read as a pair."""
    figure, axes = _figure(1, 1, (6.4, 4.4))
    axis = axes[0, 0]
    colors = {}
    for index, (label, (mean, ci)) in enumerate(series.items()):
        mean, ci = np.asarray(mean, dtype=float), np.asarray(ci, dtype=float)
        steps = np.arange(len(mean))
        colors[label] = color = f"C{index % 10}"
        axis.plot(steps, mean, marker="o", color=color, label=label)
        axis.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.25, linewidth=0)
    for index, (method, values) in enumerate((reference or {}).items()):
        paired = [c for label, c in colors.items() if label.lower().startswith(method.lower())]
        color = paired[0] if paired else f"C{(len(series) + index) % 10}"
        axis.plot(
            np.arange(len(values)),
            values,
            linestyle="--",
            marker="o",
            markerfacecolor="none",
            color=color,
            label=f"{method} ({reference_name})",
        )
    if series or reference:
        axis.legend(fontsize="small")
        axis.xaxis.get_major_locator().set_params(integer=True)
    else:
        _empty(axis)
    axis.set(xlabel="inner gradient steps", ylabel=_label(ylabel), title=title or "")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def minutes_curve(
    path: str | os.PathLike[str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Metric vs training minutes, one line per label: runs of one time budget side by side,
    where iterations would hide how fast each side is."""
    figure, axes = _figure(1, 1, (7.2, 4.6))
    axis = axes[0, 0]
    for index, (label, (minutes, values)) in enumerate(series.items()):
        axis.plot(minutes, values, marker="o", markersize=3, color=f"C{index % 10}", label=label)
    if series:
        axis.legend(fontsize="small")
    else:
        _empty(axis)
    axis.set(xlabel="training minutes", ylabel=_label(ylabel), title=title or "")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def sinusoid_fits(
    path: str | os.PathLike[str], curves: Sequence[Mapping], title: str | None = None
) -> Path:
    """One panel per task: the true sine, the K support points, and each prediction curve.

    Each dict has ``x_grid``, ``y_true``, ``x_support``, ``y_support`` and
    ``predictions: {label: y_grid}`` (e.g. "pre-update", "1 step", "10 steps").
    """
    count = max(len(curves), 1)
    figure, axes = _figure(1, count, (4.5 * count, 3.8))
    for axis, curve in zip(axes[0], curves):
        x = np.ravel(curve["x_grid"])
        axis.plot(x, np.ravel(curve["y_true"]), color="tab:red", linewidth=2, label="ground truth")
        for index, (label, y) in enumerate(curve.get("predictions", {}).items()):
            axis.plot(
                x,
                np.ravel(y),
                linestyle="--",
                color=PREDICTION_COLORS[index % len(PREDICTION_COLORS)],
                label=label,
            )
        axis.scatter(
            np.ravel(curve["x_support"]),
            np.ravel(curve["y_support"]),
            marker="^",
            color="black",
            zorder=3,
            label="support points",
        )
        axis.set(xlabel="x", ylabel="y")
        axis.grid(alpha=0.3)
    if curves:
        axes[0, 0].legend(fontsize="small")
    else:
        _empty(axes[0, 0], "no tasks")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def task_preview(
    path: str | os.PathLike[str],
    x_support: np.ndarray,
    y_support: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    title: str | None = None,
    ink: bool = True,
) -> Path:
    """A grid with one row per class: its support images, then its query images.

    Images are [C, H, W] in [0, 1]: RGB is drawn as it is; one channel is ink (Omniglot's
    1 = stroke, drawn dark) when ``ink``, else intensity (1 = white, image folders).
    """
    classes = sorted({int(c) for c in np.concatenate([np.ravel(y_support), np.ravel(y_query)])})
    support = {c: x_support[np.ravel(y_support) == c] for c in classes}
    query = {c: x_query[np.ravel(y_query) == c] for c in classes}
    k_spt = max(len(v) for v in support.values())
    k_query = max(len(v) for v in query.values())
    columns = k_spt + k_query
    figure, axes = _figure(
        len(classes), columns, (max(1.1 * columns, 4.0), 1.2 * len(classes) + 0.6)
    )
    for row, c in enumerate(classes):
        images = [*support[c], *([None] * (k_spt - len(support[c]))), *query[c]]
        for col in range(columns):
            axis = axes[row, col]
            axis.set_xticks([])
            axis.set_yticks([])
            image = images[col] if col < len(images) else None
            if image is None:
                axis.set_axis_off()
                continue
            _show(axis, image, ink)
            for spine in axis.spines.values():
                spine.set_color("tab:blue" if col < k_spt else "tab:orange")
                spine.set_linewidth(2)
            if row == 0:
                kind = "support" if col < k_spt else "query"
                index = col if col < k_spt else col - k_spt
                axis.set_title(f"{kind} {index + 1}", fontsize="small")
            if col == 0:
                axis.set_ylabel(f"class {c}", fontsize="small")
    figure.suptitle(
        title or f"{len(classes)}-way {k_spt}-shot task\nsupport (blue) and query (orange)",
        fontsize="medium",
    )
    return _save(figure, path)


def _show(axis: Any, image: np.ndarray, ink: bool) -> None:
    if image.ndim == 3 and image.shape[0] == 3:
        axis.imshow(np.clip(image.transpose(1, 2, 0), 0.0, 1.0))
    else:
        axis.imshow(np.squeeze(image), cmap="gray_r" if ink else "gray", vmin=0.0, vmax=1.0)


def _image_axis(axis: Any, image: np.ndarray, title: str, color: str) -> None:
    _show(axis, image, ink=True)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize="small")
    for spine in axis.spines.values():
        spine.set_color(color)
        spine.set_linewidth(2)


def adaptation_steps(
    path: str | os.PathLike[str],
    x_support: np.ndarray,
    y_support: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    probabilities: Sequence[np.ndarray],
    title: str | None = None,
) -> Path:
    """What adapting to one task does: the support images in the first row, then one row per
    query image with its class probabilities after 0, 1, … inner steps (``probabilities[s]`` is
    ``[queries, n_way]``). The predicted class's bar and heading are green if right, red if wrong.
    """
    steps = len(probabilities)
    n_way = probabilities[0].shape[1] if steps else 0
    columns = max(len(x_support), steps + 1)
    figure, axes = _figure(
        1 + len(x_query), columns, (max(1.6 * columns, 5.0), 1.5 * (1 + len(x_query)) + 0.6)
    )
    for axis in axes.ravel():
        axis.set_axis_off()
    for col, (image, label) in enumerate(zip(x_support, np.ravel(y_support))):
        axes[0, col].set_axis_on()
        _image_axis(axes[0, col], image, f"support: class {int(label)}", "tab:blue")
    for row, (image, label) in enumerate(zip(x_query, np.ravel(y_query)), start=1):
        axes[row, 0].set_axis_on()
        _image_axis(axes[row, 0], image, f"query: class {int(label)}", "tab:orange")
        for step in range(steps):
            axis = axes[row, step + 1]
            axis.set_axis_on()
            chances = np.asarray(probabilities[step][row - 1], dtype=float)
            guess = int(chances.argmax())
            color = "tab:green" if guess == int(label) else "tab:red"
            bars = ["lightgray"] * n_way
            bars[guess] = color
            axis.bar(np.arange(n_way), chances, color=bars)
            axis.set_ylim(0.0, 1.0)
            axis.set_xticks(np.arange(n_way))
            axis.tick_params(labelsize="x-small")
            axis.set_title(
                f"{step} step{'' if step == 1 else 's'}: {guess} ({chances[guess]:.0%})",
                fontsize="small",
                color=color,
            )
    figure.suptitle(
        title or "support set (top); each query's class probabilities after each inner step",
        fontsize="medium",
    )
    return _save(figure, path)


def navigation_trajectories(
    path: str | os.PathLike[str],
    panels: Sequence[Mapping],
    title: str | None = None,
) -> Path:
    """One panel per goal: the agent's paths after each number of inner steps, and the goal.

    Each dict has ``goal`` (x, y) and ``paths: {label: [array [steps, 2], ...]}`` (e.g.
    "pre-update", "1 step"): the positions each trajectory visited, from its start.
    """
    count = max(len(panels), 1)
    figure, axes = _figure(1, count, (3.6 * count, 3.8))
    for axis, panel in zip(axes[0], panels):
        for index, (label, paths) in enumerate(panel["paths"].items()):
            color = "tab:gray" if index == 0 else PREDICTION_COLORS[(index - 1) % 6]
            for number, points in enumerate(paths):
                line = np.asarray(points, dtype=float)
                axis.plot(
                    line[:, 0],
                    line[:, 1],
                    color=color,
                    alpha=0.8,
                    linewidth=1,
                    label=label if number == 0 else None,
                )
        axis.plot(*panel["goal"], marker="*", markersize=14, color="tab:red", label="goal")
        axis.plot(0, 0, marker="o", color="black", markersize=4)
        axis.set(xlim=(-0.6, 0.6), ylim=(-0.6, 0.6), aspect="equal")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small", loc="lower left")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
