"""What train.py and evaluate.py need for a reinforcement-learning dataset: the environment, the
policy (the run's "network"), the task sampler per split and the learner."""

from __future__ import annotations

from metalearn.data.tasks import task_rng
from metalearn.rl.envs import Nav2D
from metalearn.rl.learner import GoalTask, PolicyGradientLearner
from metalearn.rl.policy import GaussianPolicy
from metalearn.rl.settings import NAV2D


class GoalTasks:
    """Tasks of an environment: goal and trajectory seed drawn from (seed, split, iteration,
    index), so a task does not depend on which process samples it or whether the run resumed."""

    def __init__(self, env):
        self.env = env

    def sample(self, seed: int, split: str, iteration: int, index: int) -> GoalTask:
        rng = task_rng(seed, split, iteration, index)
        goal = self.env.sample_goal(rng)
        return GoalTask(goal, int(rng.integers(2**63)))


def make_env(config: dict):
    """The environment of ``config['dataset']`` (the oracle's observations include the goal)."""
    oracle = bool(config.get("oracle"))
    if config["dataset"] == NAV2D:
        return Nav2D(oracle=oracle, normalized_actions=bool(config.get("normalized_actions")))
    from metalearn.rl.half_cheetah import HalfCheetah  # gymnasium and MuJoCo only when needed

    return HalfCheetah(config["dataset"], oracle=oracle)


def build(config: dict, splits: tuple[str, ...]):
    """(policy, samplers per split, learner factory (policy, params, config, steps) → learner)."""
    env = make_env(config)
    policy = GaussianPolicy(env.obs_dim, env.act_dim)
    sampler = GoalTasks(env)

    def learner(net, params, run_config: dict, steps: int) -> PolicyGradientLearner:
        return PolicyGradientLearner.from_config(net, params, run_config, env)

    return policy, {split: sampler for split in splits}, learner
