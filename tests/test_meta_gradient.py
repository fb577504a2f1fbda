"""The meta-gradients are the mathematics they claim to be."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import Task
from metalearn.learning.gradcheck import meta_gradient_error, tiny_problem
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import MLP, ConvNet


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_second_order_meta_gradient_matches_finite_differences(kind: str, steps: int) -> None:
    assert meta_gradient_error(kind, steps) < 1e-4


def test_finite_difference_check_detects_a_first_order_gradient() -> None:
    """The check has teeth: FOMAML's direction is not the derivative of the MAML objective."""
    paddle.set_default_dtype("float64")
    try:
        net, task = tiny_problem("conv")
        arrays = net.init_params(0, dtype="float64")
        maml = MetaLearner(net, make_parameters(arrays), "maml", 0.5, 1).task_direction(task)[0]
        fomaml = MetaLearner(net, make_parameters(arrays), "fomaml", 0.5, 1).task_direction(task)[0]
    finally:
        paddle.set_default_dtype("float32")
    diff = sum(float(((maml[k] - fomaml[k]) ** 2).sum()) for k in arrays)
    norm = sum(float((maml[k] ** 2).sum()) for k in arrays)
    assert diff / norm > 1e-4


def omniglot_like_task(seed: int = 0, n_way: int = 5) -> Task:
    rng = np.random.default_rng(seed)
    labels = np.arange(n_way).repeat(2)
    images = (rng.random((2 * n_way, 1, 28, 28)) < 0.1).astype("float32")
    return Task(images[::2].copy(), labels[::2].copy(), images, labels)


def plain_sgd(net, arrays: dict, task: Task, lr: float, steps: int) -> dict:
    """Independently of the learner: ``steps`` plain SGD steps on the support loss (leaves)."""
    weights = {k: paddle.to_tensor(v, stop_gradient=False) for k, v in arrays.items()}
    x_s, y_s = paddle.to_tensor(task.x_support), paddle.to_tensor(task.y_support)
    for _ in range(steps):
        grads = paddle.grad(net.loss(net.forward(x_s, weights), y_s), list(weights.values()))
        weights = {
            k: paddle.to_tensor((w - lr * g).numpy(), stop_gradient=False)
            for (k, w), g in zip(weights.items(), grads)
        }
    return weights


def test_fomaml_direction_is_query_gradient_at_detached_adapted_weights() -> None:
    net, task = ConvNet(n_way=5), omniglot_like_task()
    arrays = net.init_params(3)
    direction, _ = MetaLearner(net, make_parameters(arrays), "fomaml", 0.4, 2).task_direction(task)
    # Independently: two plain SGD steps on the support loss, then the query gradient there.
    weights = plain_sgd(net, arrays, task, 0.4, 2)
    query_loss = net.loss(
        net.forward(paddle.to_tensor(task.x_query), weights), paddle.to_tensor(task.y_query)
    )
    expected = dict(zip(weights, paddle.grad(query_loss, list(weights.values()))))
    for name in arrays:
        np.testing.assert_allclose(
            direction[name].numpy(), expected[name].numpy(), rtol=1e-4, atol=1e-6
        )


def test_reptile_update_follows_its_formula() -> None:
    net = ConvNet(n_way=5)
    arrays = net.init_params(1)
    tasks = [omniglot_like_task(seed) for seed in range(3)]
    epsilon, params = 0.5, make_parameters(arrays)
    learner = MetaLearner(net, params, "reptile", 0.4, 3)
    adapted = [
        {k: v.numpy() for k, v in plain_sgd(net, arrays, task, 0.4, 3).items()} for task in tasks
    ]
    total, _ = learner.batch_direction(tasks)
    optimizer = learner.make_optimizer()
    optimizer.set_lr(epsilon)
    optimizer.step({k: v * (1 / len(tasks)) for k, v in total.items()})
    for name, phi in arrays.items():
        mean_adapted = np.mean([a[name] for a in adapted], axis=0)
        np.testing.assert_allclose(
            params[name].numpy(), phi + epsilon * (mean_adapted - phi), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
def test_every_parameter_receives_a_nonzero_update(algo: str) -> None:
    net = ConvNet(n_way=5)
    learner = MetaLearner(net, make_parameters(net.init_params(2)), algo, 0.4, 1)
    direction, stats = learner.task_direction(omniglot_like_task(), track_steps=True)
    assert set(direction) == set(learner.params)
    for name, value in direction.items():
        assert float(paddle.abs(value).max()) > 0, name
    assert len(stats.metric_per_step) == 2


def test_maml_differs_from_fomaml_on_the_real_network() -> None:
    net, task = ConvNet(n_way=5), omniglot_like_task()
    arrays = net.init_params(4)
    maml = MetaLearner(net, make_parameters(arrays), "maml", 0.4, 1).task_direction(task)[0]
    fomaml = MetaLearner(net, make_parameters(arrays), "fomaml", 0.4, 1).task_direction(task)[0]
    first_conv = "conv0.weight"
    assert not np.allclose(maml[first_conv].numpy(), fomaml[first_conv].numpy(), rtol=1e-3)


def test_a_process_without_tasks_evaluates_to_an_empty_table() -> None:
    """With more processes than validation tasks some get none; their rows must still stack."""
    net = ConvNet(n_way=5)
    learner = MetaLearner(net, make_parameters(net.init_params(0)), "maml", 0.4, 1)
    assert learner.evaluate([], 3).shape == (0, 4)
    assert learner.evaluate([omniglot_like_task()], 3).shape == (1, 4)
    mlp = MLP()
    stacked = MetaLearner(mlp, make_parameters(mlp.init_params(0)), "maml", 0.01, 1)
    assert stacked.evaluate([], 3).shape == (0, 4)
    assert stacked.batch_direction([]) == ({}, [])
