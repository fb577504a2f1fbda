"""Half-cheetah goal velocity / direction on gymnasium's MuJoCo (skipped without mujoco)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="mujoco is not installed (pip install -r requirements-rl.txt)")
pytest.importorskip("gymnasium", reason="gymnasium is not installed (requirements-rl.txt)")

from metalearn.rl.half_cheetah import ACT_DIM, CONTROL_COST, OBS_DIM, HalfCheetah
from metalearn.training.trainer import train


@pytest.fixture
def cheetah_vel():
    env = HalfCheetah("cheetah_vel")
    yield env
    env.close()


def test_rewards_follow_the_goal_velocity_and_the_control_cost(cheetah_vel) -> None:
    """The reward is −|v − v*| − 0.05‖clip(a)‖², with v the forward velocity of the same
    simulation stepped by gymnasium directly."""
    import gymnasium
    import mujoco

    mujoco.set_mju_user_warning(lambda message: None)  # the model's deprecation, once per env
    goals = np.array([[0.5], [1.5]])
    seeds = np.array([[3, 4, 5], [6, 7, 8]])
    obs = cheetah_vel.reset(goals, 3, seeds)
    assert obs.shape == (2, 3, OBS_DIM)
    reference = gymnasium.make("HalfCheetah-v5").unwrapped
    start, _ = reference.reset(seed=7)  # task 1, trajectory 1
    np.testing.assert_allclose(obs[1, 1], start)
    actions = np.random.default_rng(0).uniform(-1.5, 1.5, (2, 3, ACT_DIM))
    obs, reward, done = cheetah_vel.step(actions)
    clipped = np.clip(actions[1, 1], -1, 1)
    expected_obs, _, _, _, info = reference.step(clipped)
    np.testing.assert_allclose(obs[1, 1], expected_obs)
    expected = -abs(info["x_velocity"] - 1.5) - CONTROL_COST * np.square(clipped).sum()
    np.testing.assert_allclose(reward[1, 1], expected)
    assert not done.any()


def test_direction_tasks_reward_the_signed_velocity_and_the_oracle_sees_the_goal() -> None:
    env = HalfCheetah("cheetah_dir", oracle=True)
    try:
        rng = np.random.default_rng(0)
        assert {float(env.sample_goal(rng)[0]) for _ in range(20)} == {-1.0, 1.0}
        goals = np.array([[1.0], [-1.0]])
        obs = env.reset(goals, 2, np.array([[1, 2], [1, 2]]))
        assert obs.shape == (2, 2, OBS_DIM + 1)
        np.testing.assert_array_equal(obs[..., -1], [[1, 1], [-1, -1]])
        _, reward, _ = env.step(np.zeros((2, 2, ACT_DIM)))
        # same seeds and actions in both tasks: opposite directions give opposite rewards
        np.testing.assert_allclose(reward[0], -reward[1])
    finally:
        env.close()


@pytest.mark.slow
def test_a_tiny_cheetah_run_trains_and_validates(tmp_path) -> None:
    state = train(
        {
            "dataset": "cheetah_vel",
            "task_num": 2,
            "k_spt": 2,
            "horizon": 20,
            "epochs": 2,
            "val_tasks": 2,
            "work_dir": str(tmp_path),
        }
    )
    assert state.iteration == 2 and len(state.validation[-1]["per_step"]) == 4
