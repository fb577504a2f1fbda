"""Rollouts of the Gaussian policy in a vectorised environment, and their advantages.

Every trajectory of every task of a call advances together: one policy evaluation (the stacked
tasks' weights, Paddle, no graph) and one environment step per time step. The exploration noise
of each task comes from its own seed, so a task's trajectories do not depend on which other tasks
share the call, how tasks are spread over processes, or whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

from metalearn.rl import baseline, returns
from metalearn.rl.policy import LOG_STD, GaussianPolicy


@dataclass
class Episodes:
    """Trajectories of T tasks: arrays [T, H, N, ...] (time-major), ``mask`` 1 while running."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    mask: np.ndarray
    advantages: np.ndarray | None = None

    def task_returns(self) -> np.ndarray:
        """Average undiscounted return of each task's trajectories, [T]."""
        return (self.rewards * self.mask).sum(axis=1).mean(axis=-1)

    def flat(self, name: str, dtype: str) -> paddle.Tensor:
        """An array with the time and trajectory axes merged, [T, H·N, ...], as a tensor."""
        value = getattr(self, name)
        return paddle.to_tensor(value.reshape(value.shape[0], -1, *value.shape[3:]), dtype=dtype)


def rollout(
    env,
    policy: GaussianPolicy,
    weights: dict[str, paddle.Tensor],
    goals: np.ndarray,
    seeds: list[int],
    count: int,
    horizon: int,
) -> Episodes:
    """``count`` trajectories of ``horizon`` steps for each goal under the stacked ``weights``
    (a leading task axis); task t's noise and environment resets come from ``seeds[t]``."""
    tasks, act_dim = len(goals), policy.act_dim
    generators = [np.random.default_rng(seed) for seed in seeds]
    noise = np.stack([g.standard_normal((horizon, count, act_dim)) for g in generators])
    env_seeds = np.array([g.integers(2**31, size=count) for g in generators])
    dtype = weights[LOG_STD].dtype
    with paddle.no_grad():
        std = paddle.exp(weights[LOG_STD]).numpy().astype(np.float64)[:, None, :]
        obs = env.reset(goals, count, env_seeds)
        shape = (tasks, horizon, count)
        episodes = Episodes(
            np.zeros((*shape, obs.shape[-1])),
            np.zeros((*shape, act_dim)),
            np.zeros(shape),
            np.zeros(shape),
        )
        alive = np.ones((tasks, count), dtype=bool)
        for t in range(horizon):
            mean = policy.mlp.forward(paddle.to_tensor(obs, dtype=dtype), weights).numpy()
            action = mean.astype(np.float64) + std * noise[:, t]
            episodes.observations[:, t], episodes.actions[:, t] = obs, action
            episodes.mask[:, t] = alive
            obs, reward, done = env.step(action)
            episodes.rewards[:, t] = reward * alive
            alive &= ~done
            if not alive.any():
                break
    return episodes


def paths(episodes: Episodes, shown: int, task: int = 0) -> list[np.ndarray]:
    """The positions visited (the first two observation entries, from the start) by ``task``'s
    first ``shown`` trajectories, each up to its episode's last step."""
    lengths = episodes.mask[task].sum(axis=0).astype(int)
    positions = episodes.observations[task, ..., :2]
    return [positions[: lengths[n], n] for n in range(min(shown, len(lengths)))]


def add_advantages(episodes: Episodes, gamma: float, lam: float, normalise: bool = True) -> None:
    """GAE(γ, λ) advantages against each task's own linear feature baseline, normalised per
    task (λ = 1: discounted return minus baseline, REINFORCE's)."""
    mask = episodes.mask
    target = returns.discounted_returns(episodes.rewards, mask, gamma)
    values = baseline.fit_values(episodes.observations, target, mask)
    advantages = returns.gae(episodes.rewards, values, mask, gamma, lam)
    episodes.advantages = returns.normalise_per_task(advantages, mask) if normalise else advantages
