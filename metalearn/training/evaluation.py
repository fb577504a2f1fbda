"""Honest evaluation: fixed seeded test tasks, the metric after every inner step, 95% intervals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from metalearn.data.omniglot import check_seed
from metalearn.data.tasks import task_rng
from metalearn.errors import UserError
from metalearn.fileio import write_json
from metalearn.learning.learner import MetaLearner, initial_arrays, make_parameters
from metalearn.metrics import MSE, RETURN, results_metric
from metalearn.rl.sampler import paths
from metalearn.rl.settings import NAV2D
from metalearn.runs.checkpoint import check_compatible, load_checkpoint, read_checkpoint_meta
from metalearn.runs.names import check_work_dir
from metalearn.runs.records import PLOT_TROUBLE, TestSession
from metalearn.training import distributed
from metalearn.training.config import (
    check_saved_config,
    read_run_config,
    resolve_defaults,
    validate_config,
)
from metalearn.training.device import select_device
from metalearn.training.problems import Problem, build_problem


def summarise(per_task: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% confidence half-width (1.96·std/√n, as the paper's code) per inner step."""
    return per_task.mean(axis=0), 1.96 * per_task.std(axis=0) / np.sqrt(len(per_task))


def find_run(
    work_dir: str | Path, dataset: str, n_way: int, k_spt: int, data: str | None = None
) -> Path:
    """The newest run folder with a best.npz whose config matches the dataset (for an image
    folder: the set's name) and task shape."""
    candidates = []
    for config_path in Path(work_dir).glob("*/config.json"):
        best = config_path.parent / "best.npz"
        try:
            config = read_run_config(config_path)
        except UserError:  # another run's damaged or foreign config.json is not ours to judge
            continue
        same = (
            config.get("dataset"),
            config.get("data"),
            config.get("n_way"),
            config.get("k_spt"),
        ) == (dataset, data, n_way, k_spt)
        if same and best.is_file():
            candidates.append((best.stat().st_mtime, config_path.parent))
    if not candidates:
        raise UserError(
            f"no trained {data or dataset} run with n_way={n_way}, k_spt={k_spt} in "
            f"{work_dir}/ (train one first, or pass --ckpt)"
        )
    return max(candidates)[1]


def _checkpoint_path(given: dict, request: dict) -> Path:
    if given.get("ckpt"):
        path = Path(given["ckpt"])
        return path / "best.npz" if path.is_dir() else path
    run_dir = find_run(
        request["work_dir"],
        request["dataset"],
        request["n_way"],
        request["k_spt"],
        request.get("data"),
    )
    return run_dir / "best.npz"


def evaluate(given: dict) -> dict:
    """Entry point for evaluate.py: test a run's best θ and write test_results.json beside it."""
    if given.get("tasks") is not None and given["tasks"] <= 0:
        raise UserError(f"--tasks must be a positive integer, got {given['tasks']}")
    check_seed(given["seed"])  # the test tasks' seed follows the same rule as training's
    request = resolve_defaults({k: v for k, v in given.items() if k not in ("tasks", "ckpt")})
    check_work_dir(request["work_dir"])
    path = _checkpoint_path(given, request)
    # Run record (metalearn/runs/records.py): an evaluation row, running meanwhile, then its results
    # (or why it failed); the run's own status is left alone. Only the first process records.
    session = TestSession(path, record=distributed.is_main())
    session.begin()
    try:
        results = _evaluate(given, request, path)
    except BaseException as error:
        session.fail(error)
        raise
    session.end(results)
    _plot_steps(path.parent / "test_steps.png", results)
    return results


def _plot_steps(png: Path, results: dict) -> None:
    from metalearn.runs import plots  # matplotlib only when needed

    metric = results_metric(results)
    key = metric.key
    if metric is RETURN:
        shape = f"{results['k_spt']} trajectories per inner step"
    elif metric is MSE:
        shape = f"K={results['k_spt']}"
    else:
        shape = f"{results['n_way']}-way {results['k_spt']}-shot"
    label = f"{results['tasks']} test tasks, mean ± 95% CI"
    try:
        plots.steps_curve(
            png,
            {label: (results[f"{key}_mean"], results[f"{key}_ci95"])},
            metric.name,
            title=f"{png.parent.name}: {shape}",
        )
    except PLOT_TROUBLE as error:  # a picture never fails an evaluation (a SIGTERM does)
        print(f"warning: could not draw {png} ({error})", file=sys.stderr)
        return
    print(f"plot written to {png}")


def trained_arrays(net, trained: dict, path: Path) -> dict[str, np.ndarray]:
    """θ and the learned inner rates that the run configured by ``trained`` saved in ``path``.

    The shapes come from ``net`` and are checked before any array is read, so a file cannot
    make us allocate more than the network needs; the file's architecture must equal ``net``'s.
    """
    fresh = initial_arrays(net, trained, seed=0)
    shapes = {k: v.shape for k, v in fresh.items()}
    checkpoint = load_checkpoint(path, shapes)
    check_compatible(checkpoint, net.config(), shapes)
    return {k: checkpoint.params[k] for k in fresh}


def load_trained(
    path: str | Path, overrides: dict, splits: tuple[str, ...] = ("test",)
) -> tuple[Problem, MetaLearner, dict]:
    """A checkpoint as (problem, learner, config): its network, θ and learned inner rates, with
    the run's own task shape and inner-loop settings unless ``overrides`` names them (None: the
    run's). ``overrides`` also gives ``data_dir`` and ``use_gpu``.

    Only the meta record is read first, so the network it names is built, and every array's
    shape checked, before any array is read (the file is hostile until then).
    """
    meta = read_checkpoint_meta(Path(path))
    trained = check_saved_config(meta.get("config"), f"checkpoint {path}", fill_defaults=True)
    config = {**trained, "data_dir": overrides["data_dir"], "use_gpu": overrides["use_gpu"]}
    keys = ("data", "n_way", "k_spt", "k_query", "glob_update_step_test", "glob_base_lr")
    keys += ("kernels", "task_chunk", "later_steps_lr")
    for key in keys:
        if overrides.get(key) is not None:
            config[key] = overrides[key]
    validate_config(config)
    select_device(bool(config["use_gpu"]))
    problem = build_problem(config, splits)
    params = make_parameters(trained_arrays(problem.net, trained, Path(path)))
    learner = problem.learner(problem.net, params, config, config["glob_update_step_test"])
    return problem, learner, config


def _evaluate(given: dict, request: dict, path: Path) -> dict:
    # given: only the flags the user typed (None otherwise); request: with the defaults resolved
    overrides = {**given, "data_dir": request["data_dir"], "use_gpu": request["use_gpu"]}
    problem, learner, config = load_trained(path, overrides)
    sampler, steps = problem.samplers["test"], config["glob_update_step_test"]
    distributed.init()
    shares = distributed.my_share(given["tasks"])
    tasks = [sampler.sample(given["seed"], "test", 0, index) for index in shares]
    mean, ci95 = summarise(distributed.gather_rows(learner.evaluate(tasks, steps)))
    metric = problem.net.metric
    key = metric.key
    results = {
        f"{key}_mean": mean.tolist(),
        f"{key}_ci95": ci95.tolist(),
        "tasks": given["tasks"],
        "steps": steps,
        "inner_lr": config["glob_base_lr"],
        "seed": given["seed"],
        "checkpoint": str(path),
        "n_way": config["n_way"],
        "k_spt": config["k_spt"],
        "k_query": config["k_query"],
    }
    if not distributed.is_main():
        return results
    for step, (m, c) in enumerate(zip(mean, ci95)):
        print(f"step {step}: {metric.name} {metric.format(m)} ± {metric.format(c)}")
    write_json(path.parent / "test_results.json", results)
    print(f"results written to {path.parent / 'test_results.json'}")
    if config["dataset"] == "sinusoid":
        _plot_sinusoid(path.parent, learner, sampler, given["seed"], steps)
    if config["dataset"] == NAV2D:
        _plot_navigation(path.parent, learner, sampler, given["seed"], steps)
    return results


def _plot_navigation(run_dir: Path, learner, sampler, seed: int, steps: int) -> None:
    """Paths of a few test tasks before and after each inner step (the paper's Figure 4)."""
    from metalearn.runs import plots  # matplotlib only when needed

    panels = []
    for index in range(4):
        task = sampler.sample(seed, "test", 0, index)
        per_step = learner.adapted_trajectories(task, steps)
        panels.append(
            {
                "goal": task.goal,
                "paths": {
                    _steps_label(step): paths(episodes, shown=4)
                    for step, episodes in enumerate(per_step)
                },
            }
        )
    png = run_dir / "trajectories.png"
    try:
        plots.navigation_trajectories(png, panels, title=run_dir.name)
    except PLOT_TROUBLE as error:  # a picture never fails an evaluation (a SIGTERM does)
        print(f"warning: could not draw {png} ({error})", file=sys.stderr)
        return
    print(f"trajectories written to {png}")


def _plot_sinusoid(run_dir: Path, learner: MetaLearner, sampler, seed: int, steps: int) -> None:
    """The paper's Figure 2 (fits before and after adaptation on a few test tasks) and Figure 3
    (MSE against inner steps, beside every other sinusoid run of the same K in this work_dir)."""
    from metalearn.runs import plots  # matplotlib only when needed

    x_grid = np.linspace(*sampler.x_range, 200, dtype=np.float32).reshape(-1, 1)
    shown = sorted({0, 1, steps})
    curves = []
    for index in range(3):
        amplitude, phase = sampler.sample_function(task_rng(seed, "test", 0, index))
        task = sampler.sample(seed, "test", 0, index)
        predictions = learner.predict_after_steps(task, x_grid, shown)
        curves.append(
            {
                "x_grid": x_grid.ravel(),
                "y_true": amplitude * np.sin(x_grid.ravel() - phase),
                "x_support": task.x_support.ravel(),
                "y_support": task.y_support.ravel(),
                "predictions": {_steps_label(k): y.ravel() for k, y in predictions.items()},
            }
        )
    series = {}
    for results_path in sorted(run_dir.parent.glob("*/test_results.json")):
        try:
            other = json.loads(results_path.read_text())
        except (OSError, ValueError, RecursionError):  # another run's damaged file: not drawn
            continue
        if isinstance(other, dict) and "mse_mean" in other and other.get("k_spt") == sampler.k_spt:
            series[results_path.parent.name] = (other["mse_mean"], other["mse_ci95"])
    try:
        plots.sinusoid_fits(run_dir / "sinusoid_fits.png", curves, title=run_dir.name)
        plots.steps_curve(
            run_dir / "sinusoid_steps.png",
            series,
            "query MSE",
            title=f"K={sampler.k_spt}: MSE after each inner step",
        )
    except PLOT_TROUBLE as error:  # a picture never fails an evaluation (a SIGTERM does)
        print(f"warning: could not draw the sinusoid figures ({error})", file=sys.stderr)
        return
    print(
        f"figures written to {run_dir / 'sinusoid_fits.png'} and {run_dir / 'sinusoid_steps.png'}"
    )


def _steps_label(steps: int) -> str:
    return "pre-update" if steps == 0 else f"{steps} step{'s' if steps > 1 else ''}"
