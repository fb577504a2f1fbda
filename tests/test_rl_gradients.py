"""Proofs of MAML-RL's derivatives on fixed, stored trajectories (float64).

With D_0 … D_{K−1} and D_q fixed, the meta-objective S(θ) = Σ_t surrogate_t(θ_K(θ)) is a
deterministic function of θ, so its gradient (second order through every policy-gradient inner
step) can be checked against central finite differences — on a tanh policy, since ReLU makes
finite differences of a gradient step diverge — and against an independent computation written
with plain Paddle ops, one task at a time (which holds for ReLU too). TRPO's Fisher-vector product
(Jᵀ F J, built from second derivatives only) is checked against finite differences of the
gradient of the mean KL taken through the inner update.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.learning.learner import make_parameters
from metalearn.learning.variants import Order
from metalearn.rl.envs import Nav2D
from metalearn.rl.learner import GoalTask, PolicyGradientLearner, Settings
from metalearn.rl.policy import GaussianPolicy


@pytest.fixture(autouse=True)
def float64():
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype(previous)


def tiny_learner(steps: int, activation: str = "tanh", first_order: bool = False, seed: int = 0):
    policy = GaussianPolicy(2, 2, hidden=(8, 8), activation=activation, init_log_std=-0.5)
    arrays = policy.init_params(seed, "float64")
    rng = np.random.default_rng(seed + 1)
    arrays = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in arrays.items()}  # biases ≠ 0
    settings = Settings(
        horizon=6, support_trajectories=3, query_trajectories=4, first_order=first_order
    )
    learner = PolicyGradientLearner(policy, make_parameters(arrays), Nav2D(), 0.3, steps, settings)
    tasks = [GoalTask(rng.uniform(-0.5, 0.5, 2), 10 + index) for index in range(3)]
    return learner, tasks


def set_theta(learner, values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        learner.params[name].set_value(value)


def objective(learner, problem, values) -> float:
    """S at θ = ``values`` on the stored trajectories (no graph)."""
    set_theta(learner, values)
    final = learner.replay(len(problem.old_log_prob), problem.adaptation.support)
    with paddle.no_grad():
        return float(learner.surrogate(final, problem.query, problem.old_log_prob).sum())


def analytic_gradient(learner, problem, order) -> dict[str, np.ndarray]:
    final = learner.replay(len(problem.old_log_prob), problem.adaptation.support, order)
    loss = learner.surrogate(final, problem.query, problem.old_log_prob).sum()
    grads = paddle.grad(loss, [learner.params[k] for k in learner.theta])
    return {k: g.numpy() for k, g in zip(learner.theta, grads)}


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_finite_differences(steps) -> None:
    learner, tasks = tiny_learner(steps)
    problem = learner.meta_problem(tasks, Order.SECOND)
    theta = {k: learner.params[k].numpy().copy() for k in learner.theta}
    grads = analytic_gradient(learner, problem, Order.SECOND)
    # the gradient meta_update takes is the same one (built while sampling, not replayed)
    loss = learner.surrogate(problem.adaptation.weights[-1], problem.query, problem.old_log_prob)
    direct = paddle.grad(loss.sum(), [learner.params[k] for k in learner.theta])
    for name, value in zip(learner.theta, direct):
        np.testing.assert_allclose(value.numpy(), grads[name], rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(5)
    direction = {k: rng.standard_normal(v.shape) for k, v in theta.items()}
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in theta)
    eps = 1e-5
    plus = objective(learner, problem, {k: v + eps * direction[k] for k, v in theta.items()})
    minus = objective(learner, problem, {k: v - eps * direction[k] for k, v in theta.items()})
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)
    # and the first-order gradient is really different (the check can tell orders apart)
    first = analytic_gradient(learner, problem, Order.FIRST)
    assert abs(sum(float((first[k] * direction[k]).sum()) for k in theta) - numeric) > 1e-4


def independent_gradient(learner, problem, steps: int, activation: str) -> dict[str, np.ndarray]:
    """The same S(θ) with plain Paddle ops, task by task, no stacking and no policy class."""
    act = paddle.tanh if activation == "tanh" else paddle.nn.functional.relu
    theta = {k: learner.params[k] for k in learner.theta}

    def log_prob(weights, obs, actions):
        h = act(paddle.matmul(obs, weights["fc0.weight"]) + weights["fc0.bias"])
        h = act(paddle.matmul(h, weights["fc1.weight"]) + weights["fc1.bias"])
        mean = paddle.matmul(h, weights["fc2.weight"]) + weights["fc2.bias"]
        log_std = weights["log_std"]
        z = (actions - mean) / paddle.exp(log_std)
        return (-0.5 * z * z - log_std - 0.5 * np.log(2 * np.pi)).sum(axis=-1)

    total = 0
    for t in range(len(problem.old_log_prob)):
        weights = dict(theta)
        for step in range(steps):
            data = problem.adaptation.support[step]
            lp = log_prob(weights, data.obs[t], data.actions[t])
            inner = -(lp * data.advantages[t] * data.weight[t]).sum()
            names = list(weights)
            grads = paddle.grad(inner, [weights[k] for k in names], create_graph=True)
            weights = {k: weights[k] - 0.3 * g for k, g in zip(names, grads)}
        q = problem.query
        ratio = paddle.exp(log_prob(weights, q.obs[t], q.actions[t]) - problem.old_log_prob[t])
        total = total - (ratio * q.advantages[t] * q.weight[t]).sum()
    grads = paddle.grad(total, list(theta.values()))
    return {k: g.numpy() for k, g in zip(theta, grads)}


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_an_independent_computation(steps, activation) -> None:
    learner, tasks = tiny_learner(steps, activation)
    problem = learner.meta_problem(tasks, Order.SECOND)
    ours = analytic_gradient(learner, problem, Order.SECOND)
    theirs = independent_gradient(learner, problem, steps, activation)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-12, err_msg=name)


def kl_gradient(learner, problem, values, frozen: dict | None) -> np.ndarray:
    """∇θ of the mean KL(π_{θ_K(θ_old)} ‖ π_{θ_K(θ)}) over tasks, taken through the inner loop;
    with ``frozen`` steps θ_K(θ) = θ + frozen, the first-order inner loop's shape (J = I)."""
    count = len(problem.old_log_prob)
    set_theta(learner, values)
    if frozen is not None:
        final = {k: learner.params[k] + paddle.to_tensor(frozen[k]) for k in frozen}
    else:
        final = learner.replay(count, problem.adaptation.support, Order.SECOND)
    kl = learner.kl(final, problem.query, problem.old).sum() / count
    grads = paddle.grad(kl, [learner.params[k] for k in learner.theta])
    return np.concatenate([g.numpy().ravel() for g in grads])


@pytest.mark.parametrize(("steps", "first_order"), [(1, False), (2, False), (1, True)])
def test_fisher_vector_product_equals_finite_differences_of_the_kl_gradient(
    steps, first_order
) -> None:
    learner, tasks = tiny_learner(steps, first_order=first_order)
    problem = learner.meta_problem(tasks, Order.FIRST if first_order else Order.SECOND)
    theta = {k: learner.params[k].numpy().copy() for k in learner.theta}
    final = problem.adaptation.weights[-1]
    frozen = {k: final[k].numpy() - theta[k] for k in theta} if first_order else None
    assert np.abs(kl_gradient(learner, problem, theta, frozen)).max() < 1e-12  # KL's minimum
    product = learner.fisher_product(problem, lambda tensors: tensors, len(tasks))
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(sum(v.size for v in theta.values()))
    pieces, start = {}, 0
    for name, value in theta.items():
        pieces[name] = vector[start : start + value.size].reshape(value.shape)
        start += value.size
    eps = 1e-5
    shifted = [{k: v + sign * eps * pieces[k] for k, v in theta.items()} for sign in (1, -1)]
    plus, minus = (kl_gradient(learner, problem, point, frozen) for point in shifted)
    numeric = (plus - minus) / (2 * eps)
    set_theta(learner, theta)
    analytic = product(vector)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-6 * np.abs(numeric).max())
    assert vector @ analytic > 0  # positive definite along v
