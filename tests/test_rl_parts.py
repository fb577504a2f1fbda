"""The pieces of MAML-RL against hand-computed values and numpy: 2D navigation's dynamics and
rewards, rollouts' masks, the linear baseline's least squares, returns and GAE, conjugate
gradient and TRPO's line search."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.learning.inner_rules import make_rule
from metalearn.learning.learner import make_parameters
from metalearn.rl import baseline, returns
from metalearn.rl.envs import Nav2D
from metalearn.rl.policy import GaussianPolicy
from metalearn.rl.sampler import rollout
from metalearn.rl.trpo import TRPO, conjugate_gradient


def test_nav2d_moves_by_clipped_velocities_and_rewards_minus_the_distance() -> None:
    env = Nav2D()
    goals = np.array([[0.25, -0.1]])
    assert np.array_equal(env.reset(goals, 1, np.zeros((1, 1))), np.zeros((1, 1, 2)))
    obs, reward, done = env.step(np.array([[[0.05, 0.2]]]))  # y clipped to 0.1
    np.testing.assert_allclose(obs, [[[0.05, 0.1]]])
    np.testing.assert_allclose(reward, [[-np.sqrt(0.2**2 + 0.2**2)]])
    assert not done.any()
    obs, reward, done = env.step(np.array([[[0.5, -0.5]]]))  # both clipped
    np.testing.assert_allclose(obs, [[[0.15, 0.0]]])
    np.testing.assert_allclose(reward, [[-np.sqrt(0.1**2 + 0.1**2)]])
    obs, reward, done = env.step(np.array([[[0.1, -0.1]]]))
    np.testing.assert_allclose(obs, [[[0.25, -0.1]]], atol=1e-15)
    np.testing.assert_allclose(reward, [[0.0]], atol=1e-15)
    assert done.all()  # within 0.01 of the goal on both axes


def test_nav2d_normalized_actions_scale_the_unit_box_onto_the_velocity_bounds() -> None:
    """rllab's normalize, as the paper's code uses it: a ∈ [−1, 1] → 0.1·a, clipped there."""
    env = Nav2D(normalized_actions=True)
    env.reset(np.array([[0.3, 0.3]]), 2, np.zeros((1, 2)))
    obs, reward, _ = env.step(np.array([[[0.5, -1.0], [3.0, -0.2]]]))
    np.testing.assert_allclose(obs, [[[0.05, -0.1], [0.1, -0.02]]])
    np.testing.assert_allclose(reward, [[-np.sqrt(0.25**2 + 0.4**2), -np.sqrt(0.2**2 + 0.32**2)]])


def test_a_later_steps_rate_applies_from_the_second_inner_step_on() -> None:
    """The paper's 2D-navigation test: step α first, then ``later_lr`` (its code halved it)."""
    weight, grad = paddle.to_tensor(1.0), paddle.to_tensor(2.0)
    rule = make_rule("sgd", 0.5, later_lr=0.25)
    assert [float(rule.update("w", weight, grad, step, {})) for step in (0, 1, 2)] == [
        0.0,
        0.5,
        0.5,
    ]
    assert float(make_rule("sgd", 0.5).update("w", weight, grad, 1, {})) == 0.0
    with pytest.raises(ValueError, match="learns its rates"):
        make_rule("lslr", 0.5, later_lr=0.25)


def test_nav2d_oracle_observes_the_goal_and_batches_tasks_and_trajectories() -> None:
    env = Nav2D(oracle=True)
    goals = np.array([[0.1, 0.2], [-0.3, 0.4]])
    obs = env.reset(goals, 3, np.zeros((2, 3)))
    assert obs.shape == (2, 3, 4)
    np.testing.assert_allclose(obs[1, 2], [0, 0, -0.3, 0.4])
    actions = np.zeros((2, 3, 2))
    actions[1, 2] = [-0.1, 0.1]
    obs, reward, _ = env.step(actions)
    np.testing.assert_allclose(obs[1, 2], [-0.1, 0.1, -0.3, 0.4])
    np.testing.assert_allclose(reward[0, 0], -np.sqrt(0.05))
    np.testing.assert_allclose(reward[1, 2], -np.sqrt(0.2**2 + 0.3**2))


def test_a_rollout_stops_counting_an_episode_once_it_reaches_the_goal() -> None:
    """A policy whose mean is the constant (0.1, 0) and σ ≈ 0 walks along x: the goal
    (0.3, 0.005) is reached at the third step, which counts; later steps are masked."""
    policy = GaussianPolicy(2, 2, hidden=(4, 4))
    arrays = {k: np.zeros_like(v, dtype=np.float64) for k, v in policy.init_params(0).items()}
    arrays["fc2.bias"] = np.array([0.1, 0.0])
    arrays["log_std"] = np.full(2, -40.0)
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        weights = {k: v.unsqueeze(0) for k, v in make_parameters(arrays).items()}
        episodes = rollout(Nav2D(), policy, weights, np.array([[0.3, 0.005]]), [[1, 0]], 2, 6)
    finally:
        paddle.set_default_dtype(previous)
    np.testing.assert_array_equal(episodes.mask[0, :, 0], [1, 1, 1, 0, 0, 0])
    expected = [-np.hypot(0.2, 0.005), -np.hypot(0.1, 0.005), -0.005]
    np.testing.assert_allclose(episodes.rewards[0, :3, 1], expected, atol=1e-12)
    assert not episodes.rewards[0, 3:].any()
    np.testing.assert_allclose(episodes.task_returns(), [sum(expected)], atol=1e-12)
    np.testing.assert_allclose(episodes.observations[0, 2, 0], [0.2, 0.0], atol=1e-12)


def test_the_baseline_fit_is_numpy_least_squares_per_task() -> None:
    """The ridge fit (XᵀX + cI)w = Xᵀy is the least-squares solution of [X; √c·I] w ≈ [y; 0]."""
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((3, 7, 5, 2))
    mask = np.ones((3, 7, 5))
    mask[1, 4:, 2] = 0  # an episode that ended early
    target = rng.standard_normal((3, 7, 5)) * mask
    values = baseline.fit_values(obs, target, mask)
    phi = baseline.features(obs, mask)
    ridge = np.sqrt(baseline.REGULARISATION) * np.eye(phi.shape[-1])
    for task in range(3):
        design = np.vstack([phi[task], ridge])
        wanted = np.concatenate([target[task].ravel(), np.zeros(len(ridge))])
        weights = np.linalg.lstsq(design, wanted, rcond=None)[0]
        np.testing.assert_allclose(values[task].ravel(), phi[task] @ weights, atol=1e-8)
    plain = np.linalg.lstsq(phi[0], target[0].ravel(), rcond=None)[0]
    assert (
        np.abs(phi[0] @ plain - target[0].ravel()).sum()
        <= np.abs(values[0].ravel() - target[0].ravel()).sum() + 1e-9
    )  # the ridge fits no better than plain least squares
    assert not values[1, 4:, 2].any()  # nothing predicted where the episode is over


def test_returns_and_gae_by_hand() -> None:
    rewards = np.array([[[1.0], [2.0], [4.0]]])  # one task, 3 steps, 1 trajectory
    mask = np.ones_like(rewards)
    np.testing.assert_allclose(
        returns.discounted_returns(rewards, mask, 0.5)[0, :, 0], [1 + 1 + 1, 2 + 2, 4]
    )
    values = np.array([[[0.5], [1.0], [3.0]]])
    target = returns.discounted_returns(rewards, mask, 0.9)
    np.testing.assert_allclose(returns.gae(rewards, values, mask, 0.9, 1.0), target - values)
    deltas = [1 + 0.9 * 1.0 - 0.5, 2 + 0.9 * 3.0 - 1.0, 4 - 3.0]
    np.testing.assert_allclose(returns.gae(rewards, values, mask, 0.9, 0.0)[0, :, 0], deltas)
    mask[0, 2] = 0  # ended after step 1: its value no longer bootstraps step 1
    np.testing.assert_allclose(
        returns.gae(rewards * mask, values, mask, 0.9, 0.0)[0, :, 0],
        [1 + 0.9 * 1.0 - 0.5, 2 - 1.0, 0.0],
    )


def test_advantages_are_normalised_per_task_over_valid_steps() -> None:
    rng = np.random.default_rng(1)
    advantages = rng.standard_normal((2, 5, 3)) * 7 + 3
    mask = np.ones_like(advantages)
    mask[0, 3:] = 0
    out = returns.normalise_per_task(advantages, mask)
    for task in range(2):
        valid = out[task][mask[task] > 0]
        assert abs(valid.mean()) < 1e-12 and abs(valid.std() - 1) < 1e-6
    assert not out[0, 3:].any()


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system() -> None:
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((12, 12))
    matrix = basis @ basis.T + 0.5 * np.eye(12)
    b = rng.standard_normal(12)
    x = conjugate_gradient(lambda v: matrix @ v, b, iterations=40, tolerance=1e-24)
    np.testing.assert_allclose(x, np.linalg.solve(matrix, b), rtol=1e-8)
    few = conjugate_gradient(lambda v: matrix @ v, b, iterations=3)
    assert np.linalg.norm(matrix @ few - b) < np.linalg.norm(b)  # progress, not a solution


class Quadratic:
    """loss(θ) = gᵀθ + ½θᵀθ and KL(θ) = ½ θᵀFθ around θ_old = 0: what TRPO sees locally."""

    def __init__(self, kl_scale: float = 1.0):
        rng = np.random.default_rng(3)
        basis = rng.standard_normal((6, 6))
        self.fisher = kl_scale * (basis @ basis.T + np.eye(6))
        self.gradient = rng.standard_normal(6)
        self.theta = np.zeros(6)
        self.tried: list[float] = []

    def try_step(self, step: np.ndarray) -> tuple[float, float]:
        self.theta = -step
        kl = 0.5 * self.theta @ self.fisher @ self.theta
        self.tried.append(kl)
        return self.gradient @ self.theta + 0.5 * self.theta @ self.theta, kl


def test_trpo_takes_a_step_within_the_trust_region_that_lowers_the_loss() -> None:
    problem = Quadratic()
    report = TRPO(max_kl=0.01).step(
        problem.gradient, lambda v: problem.fisher @ v, problem.try_step, 0.0
    )
    assert report.fraction > 0 and report.loss < 0
    assert report.kl <= 0.01 and report.kl == pytest.approx(problem.tried[-1])
    # the full step reaches the trust region's edge of the quadratic model: ½ sᵀFs = δ
    step = TRPO(max_kl=0.01, cg_damping=0.0, cg_iterations=50).full_step(
        problem.gradient, lambda v: problem.fisher @ v
    )
    assert 0.5 * step @ problem.fisher @ step == pytest.approx(0.01, rel=1e-6)


def test_trpo_line_search_refuses_steps_beyond_the_kl_bound_and_restores_theta() -> None:
    problem = Quadratic()
    # the real KL is 50 times what the Fisher product says: every step of the search is too far
    report = TRPO(max_kl=0.01, line_search_steps=5).step(
        problem.gradient, lambda v: problem.fisher @ v / 50, problem.try_step, 0.0
    )
    assert report.fraction == 0.0
    assert len(problem.tried) == 6 and all(kl > 0.01 for kl in problem.tried[:-1])
    assert not problem.theta.any()  # put back where it was
