"""The paper's Figure 5 from our runs: return after 0..3 policy-gradient steps on the same fixed
test tasks for MAML, the baselines, and a randomly initialised policy.

    python bench/rl_compare.py --dataset nav2d --run "MAML (ours)=work/RUN" \
        --run pretrained=work/RUN2 --run oracle=work/RUN3 --out docs/img/nav2d_returns.png

Every run's best.npz adapts with its own flags (α, trajectories per step unless
``--trajectories``) on the test tasks of
``--seed`` (goals and trajectory seeds are the same for every run, so the comparison is paired);
"random" is a freshly initialised policy (seed 0) adapted with the first run's settings. Prints a
markdown table (mean ± 95% CI per step) and draws the curves with 95% bands, beside the paper's
values for the dataset (the results its Figures 4 and 5 were drawn from,
bench/paper_rl_returns.json; dashed, and in the table) unless ``--no-paper``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The package (and Paddle) is imported inside main(): half-cheetah's environment workers are
# spawned processes that import this script, and need neither.


PAPER_VALUES = Path(__file__).resolve().parent / "paper_rl_returns.json"


def paper_returns(dataset: str) -> dict[str, tuple[list[float], list[float]]]:
    """The paper's (mean, 95% half-width) of the average return after 0..3 steps per method for
    ``dataset`` over its 40 test tasks ({} if it has none)."""
    returns = json.loads(PAPER_VALUES.read_text()).get(dataset, {}).get("returns", {})
    return {method: (value["mean"], value["ci95"]) for method, value in returns.items()}


def returns_of(learner, sampler, tasks: int, seed: int, steps: int) -> np.ndarray:
    chosen = [sampler.sample(seed, "test", 0, index) for index in range(tasks)]
    return learner.evaluate(chosen, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="nav2d")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=RUN_DIR")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trajectories",
        type=int,
        help="trajectories per task and step at test time (default: each run's own; the paper's "
        "2D-navigation test used 40)",
    )
    parser.add_argument(
        "--later_steps_lr",
        type=float,
        help="step size after the first step (default: each run's own; the paper's 2D-navigation "
        "test used half the first step's)",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-paper", action="store_true", help="leave the paper's values out")
    args = parser.parse_args()
    from metalearn.learning.learner import initial_arrays, make_parameters
    from metalearn.runs import plots
    from metalearn.training.config import resolve_defaults
    from metalearn.training.evaluation import load_trained, summarise
    from metalearn.training.problems import build_problem

    # the test's own settings where given (None: each run's), the same for every policy
    test_flags = {"k_spt": args.trajectories, "k_query": args.trajectories}
    test_flags["later_steps_lr"] = args.later_steps_lr
    series, first_config = {}, None
    for item in args.run:
        label, run_dir = item.split("=", 1)
        overrides = {"data_dir": ".", "use_gpu": False, "glob_update_step_test": args.steps}
        overrides |= test_flags
        problem, learner, config = load_trained(Path(run_dir) / "best.npz", overrides)
        first_config = first_config or config
        per_task = returns_of(learner, problem.samplers["test"], args.tasks, args.seed, args.steps)
        series[label] = summarise(per_task)
    config = {**(first_config or resolve_defaults({"dataset": args.dataset})), "oracle": False}
    config |= {k: v for k, v in test_flags.items() if v is not None}
    problem = build_problem(config, ("test",))
    params = make_parameters(initial_arrays(problem.net, config, seed=0))
    random = problem.learner(problem.net, params, config, args.steps)
    series["random"] = summarise(
        returns_of(random, problem.samplers["test"], args.tasks, args.seed, args.steps)
    )
    print(f"| method | {' | '.join(f'{k} steps' for k in range(args.steps + 1))} |")
    print(f"| --- |{' --- |' * (args.steps + 1)}")
    for label, (mean, ci) in series.items():
        cells = " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in zip(mean, ci))
        print(f"| {label} | {cells} |")
    paper = {} if args.no_paper else paper_returns(args.dataset)
    for method, (mean, ci) in paper.items():
        cells = " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in zip(mean[: args.steps + 1], ci))
        print(f"| {method} (paper) | {cells} |")
    title = f"{args.dataset}: {args.tasks} test tasks, mean ± 95% CI"
    reference = {method: mean[: args.steps + 1] for method, (mean, _) in paper.items()}
    plots.steps_curve(args.out, series, "return", title=title, reference=reference)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
