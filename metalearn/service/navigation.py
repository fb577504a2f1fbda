"""The 2D-navigation playground: a goal clicked on the plane, trajectories of a meta-learned
policy before and after each policy-gradient step it takes towards that goal.

A run is loaded like ``evaluate.py`` loads it (training/evaluation.py's ``load_trained``: its
flags rebuild the policy, every array's shape is checked before it is read); only completed
nav2d runs with a best.npz are offered. The work runs on the playground's one worker thread
(:class:`~metalearn.service.playground.PlaygroundEngine`), so a busy server answers 503 with
Retry-After like ``/api/adapt``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import numpy as np

from metalearn.errors import UserError
from metalearn.rl.settings import NAV2D
from metalearn.runs.checkpoint import read_checkpoint_meta
from metalearn.service.runs import list_runs

SHOWN_PATHS = 10  # trajectories drawn per step (all of them count in the average return)
MAX_CHECKPOINT_BYTES = 100 * 1024 * 1024


def navigation_runs(work_dir: Path) -> dict:
    """Completed nav2d runs with a best.npz (not the oracle: it is told the goal), newest last;
    the default is the best tested, else the newest."""
    runs = []
    for run in list_runs(work_dir):
        config = run["config"]
        best = work_dir / run["name"] / "best.npz"
        if run["status"] != "complete" or run.get("dataset") != NAV2D or not best.is_file():
            continue
        if config.get("oracle"):
            continue
        test = run["test"]
        runs.append(
            {
                "name": run["name"],
                "algo": run.get("algo"),
                "outer": config.get("outer"),
                "trajectories": config.get("k_spt"),
                "inner_lr": config.get("glob_base_lr"),
                "test_return": test["mean"][-1] if test and test["mean"] else None,
            }
        )
    tested = [r for r in runs if r["test_return"] is not None]
    default = max(tested, key=lambda r: r["test_return"]) if tested else (runs or [None])[-1]
    return {"runs": runs, "default": default["name"] if default else None}


class NavigationRuns:
    """Loaded nav2d learners by checkpoint (path, modification time); used on the worker only."""

    def __init__(self, size: int = 4):
        self._size = size
        self._cache: OrderedDict[tuple, object] = OrderedDict()

    def learner(self, best: Path):
        key = (str(best), best.stat().st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = load_navigation_run(best)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]


def load_navigation_run(best: Path):
    """The learner of a nav2d run's best.npz (refused in one line for anything else)."""
    from metalearn.training.evaluation import load_trained  # Paddle only on the worker

    if best.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{best} is larger than {MAX_CHECKPOINT_BYTES} bytes")
    config = read_checkpoint_meta(best).get("config")
    if not isinstance(config, dict) or config.get("dataset") != NAV2D or config.get("oracle"):
        raise UserError(f"{best.parent.name} is not a 2D-navigation run that adapts")
    return load_trained(best, {"data_dir": ".", "use_gpu": False}, ("test",))[1]


def navigate(learner, goal: tuple[float, float], steps: int, trajectories: int, seed: int) -> dict:
    """Trajectories and average return after 0..steps policy-gradient steps towards ``goal``."""
    from metalearn.rl.learner import GoalTask
    from metalearn.rl.sampler import paths

    settings = learner.settings
    learner.settings = dataclasses.replace(settings, support_trajectories=trajectories)
    try:
        per_step = learner.adapted_trajectories(GoalTask(np.asarray(goal, float), seed), steps)
    finally:
        learner.settings = settings
    return {
        "goal": list(goal),
        "steps": steps,
        "trajectories": trajectories,
        "inner_lr": learner.rule.lr,
        "per_step": [
            {
                "return": float(episodes.task_returns()[0]),
                "paths": [np.round(p, 4).tolist() for p in paths(episodes, SHOWN_PATHS)],
            }
            for episodes in per_step
        ],
    }
