"""Half-cheetah with a goal velocity or direction (the paper's locomotion tasks) on gymnasium's
MuJoCo HalfCheetah-v5, stepped in worker processes so that rollouts use every core.

Rewards follow the paper's code (rllab's half_cheetah_env_rand and _direc): goal velocity
v* ~ U[0, 2]: −|v − v*| − 0.05·‖a‖²; goal direction d ∈ {−1, +1}: d·v − 0.05·‖a‖², where v is
the forward velocity gymnasium reports (``x_velocity``) and a the action clipped to [−1, 1].
Episodes never end early. Each worker holds a block of environments as one gymnasium ``Env``
whose observation is the block's observations with each environment's velocity as an extra
column, inside gymnasium's ``AsyncVectorEnv`` (shared memory, one process per block).

gymnasium and MuJoCo are optional (requirements-rl.txt); without them this module raises a
UserError saying how to install them.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np

from metalearn.errors import UserError
from metalearn.rl.settings import CHEETAH_DIR, CHEETAH_VEL

try:
    import gymnasium
    from gymnasium.spaces import Box
except ImportError:  # the optional requirements are missing
    gymnasium = None

ENV_ID = "HalfCheetah-v5"
OBS_DIM, ACT_DIM = 17, 6
CONTROL_COST = 0.05
WORKERS = 2


def require_mujoco() -> None:
    """Refuse in one line when gymnasium's MuJoCo environments cannot be made."""
    if gymnasium is None:
        raise UserError(
            "half-cheetah needs gymnasium and mujoco: pip install -r requirements-rl.txt"
        )
    try:
        import mujoco  # noqa: F401
    except ImportError:
        raise UserError("half-cheetah needs mujoco: pip install -r requirements-rl.txt") from None


def _quiet_model_deprecation(message: str) -> None:
    """MuJoCo 4 warns, once per environment made (and into ./MUJOCO_LOG.TXT), that gymnasium's
    half_cheetah.xml uses the deprecated ``settotalmass``; other warnings still show."""
    if "settotalmass" not in message:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


class _CheetahBlock(gymnasium.Env if gymnasium else object):
    """``count`` half-cheetahs stepped together in one process (a worker of the vector env);
    ``offset`` is where its block starts among all trajectories, to pick its seeds."""

    def __init__(self, count: int, offset: int):
        import mujoco

        mujoco.set_mju_user_warning(_quiet_model_deprecation)
        self.envs = [gymnasium.make(ENV_ID).unwrapped for _ in range(count)]
        self.offset = offset
        self.observation_space = Box(-np.inf, np.inf, (count, OBS_DIM + 1), np.float64)
        self.action_space = Box(-1.0, 1.0, (count, ACT_DIM), np.float64)

    def reset(self, *, seed=None, options=None):
        seeds = options["seeds"][self.offset : self.offset + len(self.envs)]
        rows = [env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds)]
        return np.column_stack([rows, np.zeros(len(rows))]), {}

    def step(self, actions):
        rows = []
        for env, action in zip(self.envs, actions):
            obs, _, _, _, info = env.step(action)
            rows.append(np.append(obs, info["x_velocity"]))
        return np.array(rows), 0.0, False, False, {}

    def close(self):
        for env in self.envs:
            env.close()


class HalfCheetah:
    """Goal-velocity (``cheetah_vel``) or goal-direction (``cheetah_dir``) half-cheetah tasks."""

    goal_dim = 1
    act_dim = ACT_DIM

    def __init__(self, dataset: str, oracle: bool = False, workers: int = WORKERS):
        require_mujoco()
        if dataset not in (CHEETAH_VEL, CHEETAH_DIR):
            raise ValueError(f"unknown half-cheetah task family {dataset!r}")
        self.name, self.oracle, self.workers = dataset, oracle, workers
        self.obs_dim = OBS_DIM + (self.goal_dim if oracle else 0)
        self._vector = None
        self._block = 0
        self._shape = (0, 0)
        self._goals = np.zeros((0, 1, 1))

    def sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        if self.name == CHEETAH_VEL:
            return rng.uniform(0.0, 2.0, size=1)
        return rng.choice([-1.0, 1.0], size=1)

    def _workers_for(self, total: int):
        """The vector env with blocks of ceil(total / workers) cheetahs (kept while it fits)."""
        block = math.ceil(total / self.workers)
        if self._vector is None or self._block != block:
            self.close()
            makers = [
                functools.partial(_CheetahBlock, block, worker * block)
                for worker in range(self.workers)
            ]
            self._vector = gymnasium.vector.AsyncVectorEnv(makers, context="spawn")
            self._block = block
        return self._vector

    def reset(self, goals: np.ndarray, count: int, seeds: np.ndarray) -> np.ndarray:
        tasks = len(goals)
        self._shape = (tasks, count)
        self._goals = np.asarray(goals, dtype=np.float64)[:, None, :]
        vector = self._workers_for(tasks * count)
        padded = np.zeros(self.workers * self._block, dtype=np.int64)
        padded[: tasks * count] = np.asarray(seeds).ravel()
        obs, _ = vector.reset(options={"seeds": padded})
        return self._observe(obs)[0]

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tasks, count = self._shape
        clipped = np.clip(actions, -1.0, 1.0)
        padded = np.zeros((self.workers * self._block, ACT_DIM))
        padded[: tasks * count] = clipped.reshape(-1, ACT_DIM)
        obs, _, _, _, _ = self._vector.step(padded.reshape(self.workers, self._block, ACT_DIM))
        observations, velocity = self._observe(obs)
        goal = self._goals[..., 0]
        progress = -np.abs(velocity - goal) if self.name == CHEETAH_VEL else goal * velocity
        reward = progress - CONTROL_COST * np.square(clipped).sum(axis=-1)
        return observations, reward, np.zeros((tasks, count), dtype=bool)

    def _observe(self, stacked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(observations [T, N, obs_dim], forward velocities [T, N]) from the workers' blocks."""
        tasks, count = self._shape
        rows = stacked.reshape(-1, OBS_DIM + 1)[: tasks * count].reshape(tasks, count, -1)
        obs, velocity = rows[..., :OBS_DIM], rows[..., OBS_DIM]
        if self.oracle:
            obs = np.concatenate([obs, np.broadcast_to(self._goals, (tasks, count, 1))], axis=-1)
        return obs, velocity

    def close(self) -> None:
        if self._vector is not None:
            self._vector.close()
            self._vector = None
