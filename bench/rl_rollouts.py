"""Rollout speed of the RL environments: environment steps per second, alone and with the policy.

    python bench/rl_rollouts.py [--repeats 3] [--envs nav2d cheetah_vel]

For each environment a meta-batch's worth of trajectories (tasks × trajectories, the defaults of
train.py) is rolled out for the dataset's horizon: "env only" steps the vectorised environment
with random actions; "rollout" is the sampler's code path (metalearn/rl/sampler.py: the Gaussian
MLP policy in Paddle, no graph, one call per time step for every trajectory of every task).
Prints one markdown row per environment and mode: the median over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The package (and Paddle) is imported in the functions: half-cheetah's environment workers are
# spawned processes that import this script, and need neither.


def env_only(env, tasks: int, count: int, horizon: int, rng: np.random.Generator) -> float:
    goals = np.stack([env.sample_goal(rng) for _ in range(tasks)])
    env.reset(goals, count, rng.integers(2**31, size=(tasks, count)))
    started = time.perf_counter()
    for _ in range(horizon):
        env.step(rng.uniform(-1, 1, (tasks, count, env.act_dim)))
    return tasks * count * horizon / (time.perf_counter() - started)


def with_policy(env, tasks: int, count: int, horizon: int, rng: np.random.Generator) -> float:
    from metalearn.learning.learner import make_parameters
    from metalearn.rl.policy import GaussianPolicy
    from metalearn.rl.sampler import rollout

    policy = GaussianPolicy(env.obs_dim, env.act_dim)
    params = make_parameters(policy.init_params(0))
    weights = {k: w.expand([tasks, *w.shape]) for k, w in params.items()}
    goals = np.stack([env.sample_goal(rng) for _ in range(tasks)])
    seeds = [[int(rng.integers(2**31)), 0] for _ in range(tasks)]
    started = time.perf_counter()
    episodes = rollout(env, policy, weights, goals, seeds, count, horizon)
    steps = tasks * count * horizon
    assert episodes.rewards.shape == (tasks, horizon, count)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--envs", nargs="+", default=["nav2d", "cheetah_vel"])
    args = parser.parse_args()
    from metalearn.rl.problem import make_env
    from metalearn.training.config import resolve_defaults

    rng = np.random.default_rng(0)
    print("| environment | tasks × trajectories × horizon | mode | env steps / s |")
    print("| --- | --- | --- | --- |")
    for name in args.envs:
        config = resolve_defaults({"dataset": name})
        env = make_env(config)
        shape = (config["task_num"], config["k_spt"], config["horizon"])
        try:
            for mode, measure in (("env only", env_only), ("rollout (policy + env)", with_policy)):
                measure(env, *shape, rng)  # warm-up (workers start, kernels load)
                rates = [measure(env, *shape, rng) for _ in range(args.repeats)]
                label = " × ".join(map(str, shape))
                print(f"| {name} | {label} | {mode} | {statistics.median(rates):,.0f} |")
        finally:
            env.close()


if __name__ == "__main__":
    main()
