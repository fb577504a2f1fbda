"""The steps of main.ipynb that are more than one call of the package.

The notebook runs in a Jupyter kernel, which stays alive between cells and across re-runs: so
nothing here re-executes the process (no :func:`metalearn.runtime.tune_allocator`), and
re-running a cell reuses what an earlier run of it produced instead of failing on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metalearn.data import omniglot
from metalearn.errors import UserError
from metalearn.runs import plots
from metalearn.training.evaluation import load_trained
from metalearn.training.trainer import train


def is_packed(data_dir: str | os.PathLike[str]) -> bool:
    """Whether ``data_dir`` holds the three packed splits and their manifest (make_data.py's output)."""
    names = [*(omniglot.npy_name(split) for split in omniglot.SPLITS), omniglot.MANIFEST_NAME]
    return all((Path(data_dir) / name).is_file() for name in names)


def train_once(flags: dict) -> Path:
    """Train as train.py does (``flags`` must name ``work_dir`` and ``run_name``) and return the
    run folder; if that folder already holds a trained model, reuse it instead of failing."""
    run_dir = Path(flags["work_dir"]) / flags["run_name"]
    if (run_dir / "best.npz").is_file():
        print(f"{run_dir} is already trained: reusing it (choose another run name to train anew)")
        return run_dir
    train(flags)
    return run_dir


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits along the last axis (shifted by the max: no overflow)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def show_adaptation(
    checkpoint_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    png: str | os.PathLike[str],
    task_index: int = 0,
    seed: int = 0,
    use_gpu: bool = False,
) -> list[float]:
    """Adapt a trained Omniglot model to test task ``task_index`` (one of evaluate.py's tasks for
    ``seed``) and draw :func:`metalearn.runs.plots.adaptation_steps` for one query per class.

    Batch norm uses the batch's statistics, so predictions are made on the whole query set, as in
    evaluation. Returns the query accuracy of this task after 0, 1, … inner steps.
    """
    overrides = {"data_dir": str(data_dir), "use_gpu": use_gpu}
    problem, learner, config = load_trained(checkpoint_path, overrides)
    if config["dataset"] != "omniglot":
        raise UserError(f"{checkpoint_path} is not an Omniglot model")
    steps = config["glob_update_step_test"]
    task = problem.samplers["test"].sample(seed, "test", 0, task_index)
    logits = learner.predict_after_steps(task, task.x_query, list(range(steps + 1)))
    probabilities = [softmax(logits[step]) for step in range(steps + 1)]
    shown = [int(np.flatnonzero(task.y_query == label)[0]) for label in np.unique(task.y_query)]
    plots.adaptation_steps(
        png,
        task.x_support,
        task.y_support,
        task.x_query[shown],
        task.y_query[shown],
        [p[shown] for p in probabilities],
        title=f"test task {task_index}: support set (top), then one query per class with its "
        "class probabilities after each inner step",
    )
    return [float((p.argmax(axis=1) == task.y_query).mean()) for p in probabilities]
