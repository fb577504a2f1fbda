"""bench/budget.py's time-budget run trained by the PyTorch reference, and both curves on one figure.

    python bench/budget_torch.py [--minutes 30] [--k_query 5] [--variant loop|vmap] [--data_dir .]
                                 [--out work/budget_torch_VARIANT.json] [--threads N]
    python bench/budget_torch.py --plot OURS_RUN_DIR TORCH_JSON [TORCH_JSON ...]
                                 [-o docs/img/budget_vs_torch.png]

Training: bench/budget.py's RECIPE goes through train.py's own parser and defaults, so the
configuration, the task samplers (training tasks keyed by iteration, the fixed validation tasks,
the test tasks of evaluate.py), and the initial weights are train.py's; the training step is
bench/speed.py's PyTorch reference (``loop``: eager autograd task by task; ``vmap``:
``torch.func``) with Adam at the same meta learning rate. The clock is train.py's
``--max_minutes`` clock: wall time, validation included, stopping when one more iteration and the
final validation would not fit; train.py records it as ``elapsed`` with each validation. Validation
(every ``--val_every`` iterations and at the last one, after ``--glob_update_step_test`` steps)
keeps the best weights, which are tested on evaluate.py's test tasks. The JSON holds the curve
(minutes, iteration, validation accuracy), the test result and the settings.

Plot: validation accuracy against those minutes, our run (its record in the work folder's
runs.sqlite) beside each PyTorch JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budget import RECIPE, TEST_TASKS
from speed import Config, Reference, VmapReference, torch  # tunes the allocator, then loads Paddle

from metalearn.errors import UserError, run_cli
from metalearn.fileio import write_json
from metalearn.learning.learner import initial_arrays
from metalearn.learning.variants import make_variant
from metalearn.metrics import ACCURACY
from metalearn.runs import plots
from metalearn.runs.records import RunRecords
from metalearn.training.config import resolve_defaults, train_parser, validate_config
from metalearn.training.evaluation import summarise
from metalearn.training.problems import Problem, build_problem
from metalearn.training.trainer import budget_spent

VARIANTS = {"loop": Reference, "vmap": VmapReference}
MAX_JSON_BYTES = 1 << 20  # a genuine result is a few kB

SETTINGS = (
    *("n_way", "k_spt", "k_query", "task_num", "glob_update_step", "glob_base_lr"),
    *("glob_meta_lr", "glob_update_step_test", "augment", "val_every", "val_tasks"),
    *("cosine_meta_lr", "cosine_meta_lr_epochs", "min_meta_lr", "max_minutes", "seed"),
)
"""What of train.py's configuration the JSON repeats (the recipe's flags and their defaults)."""


def recipe_config(minutes: float, k_query: int | None, data_dir: str) -> dict:
    """train.py's resolved configuration of bench/budget.py's run."""
    # Our network serves for its initial weights only: Paddle's own kernels, no oneDNN build.
    flags = [*RECIPE, "--max_minutes", f"{minutes:g}", *("--data_dir", data_dir)]
    flags += ["--kernels", "native"]
    if k_query is not None:
        flags += ["--k_query", str(k_query)]
    config = resolve_defaults(vars(train_parser().parse_args(flags)))
    validate_config(config)
    return config


def make_reference(config: dict, arrays: dict[str, np.ndarray], variant: str) -> Reference:
    """bench/speed.py's reference of ``variant`` training with ``config``'s inner and outer steps."""
    settings = Config(
        "budget",
        n_way=config["n_way"],
        steps=config["glob_update_step"],
        batch=config["task_num"],
        inner_lr=config["glob_base_lr"],
        meta_lr=config["glob_meta_lr"],
    )
    return VARIANTS[variant](settings, arrays)


def train_within_budget(
    reference: Reference, problem: Problem, config: dict
) -> tuple[list[dict], dict]:
    """Train within ``max_minutes`` of wall time by train.py's stopping rule, validating as
    train.py does; returns the curve and the best weights."""
    seed, steps, budget = config["seed"], config["glob_update_step_test"], config["max_minutes"]
    train_tasks = problem.samplers["train"]
    validation = [
        problem.samplers["val"].sample(seed, "val", 0, i) for i in range(config["val_tasks"])
    ]
    schedule = make_variant(config["algo"], config)  # the meta learning rate of each iteration
    curve, best, iteration, validation_seconds = [], {}, 0, 0.0
    loop_started = time.perf_counter()
    while iteration < config["epochs"]:
        iteration += 1
        step_started = time.perf_counter()
        for group in reference.optimizer.param_groups:
            group["lr"] = schedule.learning_rate(iteration)
        reference.step(
            [train_tasks.sample(seed, "train", iteration, i) for i in range(config["task_num"])]
        )
        now = time.perf_counter()
        clock = now - loop_started
        out_of_time = budget_spent(clock, now - step_started, validation_seconds, budget)
        if iteration % config["val_every"] == 0 or out_of_time or iteration == config["epochs"]:
            validation_started = time.perf_counter()
            per_step = reference.evaluate(validation, steps).mean(axis=0)
            point = {
                "minutes": round(clock / 60, 4),
                "iteration": iteration,
                "accuracy": float(per_step[-1]),
                "per_step": per_step.round(4).tolist(),
            }
            better = ACCURACY.better(point["accuracy"], best.get("accuracy"))
            if better:
                best = {
                    "iteration": iteration,
                    "accuracy": point["accuracy"],
                    "weights": {k: w.detach().clone() for k, w in reference.params.items()},
                }
            curve.append(point)
            validation_seconds = time.perf_counter() - validation_started
            print(
                f"validation at it {iteration} ({point['minutes']:.2f} min): accuracy "
                f"{ACCURACY.format(point['accuracy'])}{' (best so far)' if better else ''}",
                flush=True,
            )
        if out_of_time:
            break
    return curve, best


def score_on_test_tasks(
    reference: Reference, problem: Problem, config: dict, weights: dict, tasks: int
) -> dict:
    """``weights`` on evaluate.py's first ``tasks`` test tasks: mean and 95% CI per inner step."""
    with torch.no_grad():
        for name, value in weights.items():
            reference.params[name].copy_(value)
    steps = config["glob_update_step_test"]
    sampler = problem.samplers["test"]
    per_task = reference.evaluate(
        [sampler.sample(config["seed"], "test", 0, i) for i in range(tasks)], steps
    )
    mean, ci95 = summarise(per_task)
    for step, (m, c) in enumerate(zip(mean, ci95)):
        print(f"step {step}: accuracy {ACCURACY.format(m)} ± {ACCURACY.format(c)}")
    return {
        "tasks": tasks,
        "seed": config["seed"],
        "steps": steps,
        "acc_mean": mean.tolist(),
        "acc_ci95": ci95.tolist(),
    }


def run(args: argparse.Namespace) -> None:
    if torch is None:
        raise UserError("torch is not installed (pip install -r requirements-bench.txt)")
    torch.set_num_threads(args.threads)
    config = recipe_config(args.minutes, args.k_query, args.data_dir)
    problem = build_problem(config, ("train", "val", "test"))
    reference = make_reference(config, initial_arrays(problem.net, config), args.variant)
    started = time.perf_counter()
    curve, best = train_within_budget(reference, problem, config)
    wall_seconds = time.perf_counter() - started
    result = {
        "framework": f"PyTorch {torch.__version__} ({args.variant}, {args.threads} threads)",
        "variant": args.variant,
        "settings": {key: config[key] for key in SETTINGS},
        "curve": curve,
        "iterations": curve[-1]["iteration"],
        "best": {"iteration": best["iteration"], "accuracy": best["accuracy"]},
        "test": score_on_test_tasks(reference, problem, config, best["weights"], args.test_tasks),
        "training_wall_seconds": round(wall_seconds, 1),
    }
    out = args.out or f"work/budget_torch_{args.variant}.json"
    write_json(out, result)
    print(f"results written to {out}")


# -- the figure ------------------------------------------------------------------------------------
def ours_series(run_dir: Path) -> tuple[str, tuple[list[float], list[float]], dict]:
    """Our run's label, (minutes, validation accuracy) from its record, and its configuration."""
    run = RunRecords(run_dir.parent, create=False).get_run(run_dir.name)
    points = run["validation"]
    if not points or any(point["elapsed"] is None for point in points):
        raise UserError(f"the record of {run_dir} holds no validation with its training time")
    tested = [e for e in run["evaluations"] if e["status"] == "complete"]
    test = f", test {_percent(tested[-1]['mean'], tested[-1]['ci95'])}" if tested else ""
    label = f"ours (Paddle {run['paddle_version']}): {run['completed_iterations']} it{test}"
    minutes = [point["elapsed"] / 60 for point in points]
    return label, (minutes, [point["per_step"][-1] for point in points]), run["config"]


def torch_series(path: Path) -> tuple[str, tuple[list[float], list[float]], dict]:
    """A result JSON's label, (minutes, validation accuracy) and settings."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{path} is larger than a result of this script")
        result = json.loads(path.read_text(encoding="utf-8"))
        minutes = [float(point["minutes"]) for point in result["curve"]]
        accuracy = [float(point["accuracy"]) for point in result["curve"]]
        test = _percent(result["test"]["acc_mean"], result["test"]["acc_ci95"])
        label = f"{result['framework']}: {int(result['iterations'])} it, test {test}"
        settings = dict(result["settings"])
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror})") from None
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        raise UserError(f"{path} is not a result of bench/budget_torch.py") from None
    return label, (minutes, accuracy), settings


def _percent(mean: list[float], ci95: list[float]) -> str:
    return f"{100 * mean[-1]:.2f}% ± {100 * ci95[-1]:.2f}%"


def plot(paths: list[str], out: str) -> None:
    """Validation accuracy against minutes: our run (``paths[0]``) beside each PyTorch JSON."""
    label, curve, ours = ours_series(Path(paths[0]))
    series = {label: curve}
    for path in paths[1:]:
        label, curve, settings = torch_series(Path(path))
        series[label] = curve
        differing = [key for key in settings if key in ours and ours[key] != settings[key]]
        if differing:
            print(
                f"warning: {path} differs from our run in {', '.join(differing)}", file=sys.stderr
            )
    title = (
        f"{ours['n_way']}-way {ours['k_spt']}-shot: validation accuracy "
        f"({ours['val_tasks']} tasks, {ours['glob_update_step_test']} steps) against training time"
    )
    plots.minutes_curve(out, series, ACCURACY.name, title=title)
    print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (default 30)")
    parser.add_argument("--k_query", type=int, help="query images per class (the recipe's: 5)")
    parser.add_argument("--variant", choices=VARIANTS, default="loop")
    parser.add_argument("--data_dir", default=".", help="the packed Omniglot (default .)")
    parser.add_argument("--out", help="result JSON (default work/budget_torch_VARIANT.json)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads (default: all)"
    )
    parser.add_argument(
        "--test_tasks", type=int, default=TEST_TASKS, help=f"test tasks (default {TEST_TASKS})"
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="PATH",
        help="OURS_RUN_DIR TORCH_JSON [TORCH_JSON ...]: draw the curves instead of training",
    )
    parser.add_argument("-o", "--output", default="docs/img/budget_vs_torch.png", help="the figure")
    args = parser.parse_args()
    if args.plot is not None:
        if len(args.plot) < 2:
            raise UserError("--plot needs our run folder and at least one PyTorch result JSON")
        plot(args.plot, args.output)
        return
    for name in ("minutes", "threads", "test_tasks"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive")
    run(args)


if __name__ == "__main__":
    run_cli(main)
