"""Environments, each vectorised over every trajectory of every task of a call.

An environment steps a whole batch at once: observations [tasks, trajectories, obs_dim],
actions [tasks, trajectories, act_dim], rewards and ends [tasks, trajectories]. A task is its
goal, a small float array; ``oracle`` environments append it to every observation (the paper's
oracle baseline, which is told the task instead of adapting to it).

* :class:`Nav2D`: the paper's 2D navigation (its code's point_env_randgoal): a point starts at
  the origin, the action is its velocity clipped to ±0.1 per axis, the reward is minus the
  distance to the goal after the move, and an episode ends once the point is within 0.01 of the
  goal on both axes. With ``normalized_actions`` the policy acts in [−1, 1] units, scaled to
  the velocity bounds (the paper's code wraps the environment in rllab's ``normalize``). Pure
  numpy, no loop over trajectories.
* :class:`HalfCheetah` (half_cheetah.py): gymnasium's MuJoCo half-cheetah with a goal velocity
  or direction.
"""

from __future__ import annotations

import numpy as np

from metalearn.rl.settings import NAV2D


class Nav2D:
    """2D navigation to a goal drawn uniformly from [−0.5, 0.5]²."""

    name = NAV2D
    goal_dim = 2
    act_dim = 2
    goal_low, goal_high = -0.5, 0.5
    max_speed = 0.1
    reach = 0.01

    def __init__(self, oracle: bool = False, normalized_actions: bool = False):
        self.oracle = oracle
        # rllab's normalize maps a ∈ [−1, 1] onto [−max_speed, max_speed] and clips there: a
        # unit-σ policy then explores at the velocity's scale instead of mostly at its clip.
        self.action_scale = self.max_speed if normalized_actions else 1.0
        self.obs_dim = 2 + (self.goal_dim if oracle else 0)
        self._position = np.zeros((0, 0, 2))
        self._goals = np.zeros((0, 1, 2))

    def sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.goal_low, self.goal_high, size=self.goal_dim)

    def reset(self, goals: np.ndarray, count: int, seeds: np.ndarray) -> np.ndarray:
        """Start ``count`` trajectories per goal (``seeds`` are unused: the start is fixed)."""
        self._goals = np.asarray(goals, dtype=np.float64)[:, None, :]
        self._position = np.zeros((len(goals), count, 2))
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move by the (scaled, then) clipped actions; rewards −‖position − goal‖ and which
        episodes ended."""
        velocity = np.clip(self.action_scale * actions, -self.max_speed, self.max_speed)
        self._position = self._position + velocity
        offset = self._position - self._goals
        reward = -np.sqrt((offset**2).sum(axis=-1))
        done = (np.abs(offset) < self.reach).all(axis=-1)
        return self._observe(), reward, done

    def _observe(self) -> np.ndarray:
        if not self.oracle:
            return self._position.copy()
        goals = np.broadcast_to(self._goals, self._position.shape)
        return np.concatenate([self._position, goals], axis=-1)

    def close(self) -> None:
        """Nothing to release."""
