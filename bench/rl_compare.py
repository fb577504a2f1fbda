"""The paper's Figure 5 from our runs: return after 0..3 policy-gradient steps on the same fixed
test tasks for MAML, the baselines, and a randomly initialised policy.

    python bench/rl_compare.py --dataset nav2d --run "MAML (ours)=work/RUN" \
        --run pretrained=work/RUN2 --run oracle=work/RUN3 --out docs/img/nav2d_returns.png

Every run's best.npz adapts with its own flags (α, trajectories per step) on the test tasks of
``--seed`` (goals and trajectory seeds are the same for every run, so the comparison is paired);
"random" is a freshly initialised policy (seed 0) adapted with the first run's settings. Prints a
markdown table (mean ± 95% CI per step) and draws the curves with 95% bands, beside the paper's
values for the dataset (read off its Figures 4 and 5, bench/paper_rl_returns.json; dashed) unless
``--no-paper``.
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


def paper_returns(dataset: str) -> dict[str, list[float]]:
    """The paper's average return after 0..3 steps per method for ``dataset`` ({} if it has
    none), as read off its figures."""
    return json.loads(PAPER_VALUES.read_text()).get(dataset, {}).get("returns", {})


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
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-paper", action="store_true", help="leave the paper's values out")
    args = parser.parse_args()
    from metalearn.learning.learner import initial_arrays, make_parameters
    from metalearn.runs import plots
    from metalearn.training.config import resolve_defaults
    from metalearn.training.evaluation import load_trained, summarise
    from metalearn.training.problems import build_problem

    series, first_config = {}, None
    for item in args.run:
        label, run_dir = item.split("=", 1)
        overrides = {"data_dir": ".", "use_gpu": False, "glob_update_step_test": args.steps}
        problem, learner, config = load_trained(Path(run_dir) / "best.npz", overrides)
        first_config = first_config or config
        per_task = returns_of(learner, problem.samplers["test"], args.tasks, args.seed, args.steps)
        series[label] = summarise(per_task)
    config = {**(first_config or resolve_defaults({"dataset": args.dataset})), "oracle": False}
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
    for method, values in paper.items():
        print(f"| {method} (paper) | {' | '.join(f'{v:.1f}' for v in values[: args.steps + 1])} |")
    title = f"{args.dataset}: {args.tasks} test tasks, mean ± 95% CI"
    reference = {method: values[: args.steps + 1] for method, values in paper.items()}
    plots.steps_curve(args.out, series, "return", title=title, reference=reference)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
