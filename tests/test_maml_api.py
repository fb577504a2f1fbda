"""metalearn.MAML, the library API: a user's Layer meta-trains with a Paddle optimiser; first
order, Reptile and second order give their definitions' directions; a named subset adapts alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from user_models import OmniglotNet

import metalearn
from metalearn.data.tasks import Task
from metalearn.kernels import onednn
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.layer_net import LayerNet


@pytest.fixture(autouse=True)
def native_kernels_afterwards():
    """metalearn.MAML installs the oneDNN kernels (as train.py does); other modules expect
    Paddle's until they ask."""
    yield
    onednn.use_kernels("native")


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


def sine_task(rng: np.random.Generator) -> list[paddle.Tensor]:
    amplitude, phase = rng.uniform(0.5, 2), rng.uniform(0, np.pi)
    x = rng.uniform(-3, 3, (20, 1)).astype("float32")
    y = (amplitude * np.sin(x + phase)).astype("float32")
    return [paddle.to_tensor(v) for v in (x[:10], y[:10], x[10:], y[10:])]


def test_a_user_layer_meta_trains_with_a_paddle_optimizer_and_its_query_loss_drops() -> None:
    paddle.seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))  # fmt: skip
    maml = metalearn.MAML(model, inner_lr=0.05, steps=1, loss="mse")
    opt = paddle.optimizer.Adam(learning_rate=0.01, parameters=maml.parameters())
    held_out = [sine_task(np.random.default_rng(1000 + i)) for i in range(8)]

    def query_loss() -> float:
        return np.mean([float(maml.adapt(xs, ys).loss(xq, yq)) for xs, ys, xq, yq in held_out])

    before, weight = query_loss(), model[0].weight.numpy().copy()
    rng = np.random.default_rng(0)
    for _ in range(60):
        for _ in range(4):
            xs, ys, xq, yq = sine_task(rng)
            (maml.clone().adapt(xs, ys).loss(xq, yq) / 4).backward()
        opt.step()
        opt.clear_grad()
    assert not np.array_equal(model[0].weight.numpy(), weight)  # the model itself was stepped
    assert query_loss() < 0.5 * before


def image_task(seed: int = 0, dtype: str = "float64"):
    rng = np.random.default_rng(seed)
    x_s, x_q = rng.random((3, 1, 28, 28)), rng.random((6, 1, 28, 28))
    labels = np.arange(3)
    return [paddle.to_tensor(v) for v in (x_s.astype(dtype), labels, x_q.astype(dtype),
                                           labels.repeat(2))]  # fmt: skip


def meta_gradient(maml: metalearn.MAML, task) -> dict[str, np.ndarray]:
    """What ``learner.loss(...).backward()`` leaves in the meta-parameters' .grad."""
    x_s, y_s, x_q, y_q = task
    maml.clone().adapt(x_s, y_s).loss(x_q, y_q).backward()
    grads = {name: p.grad.numpy().copy() for name, p in maml.learner.params.items()}
    for parameter in maml.parameters():
        parameter.clear_gradient()
    return grads


def test_second_order_backward_equals_the_learners_direction(float64) -> None:
    model = OmniglotNet(3, hidden=4)
    maml = metalearn.MAML(model, inner_lr=0.3, steps=2)
    grads = meta_gradient(maml, image_task())
    net = LayerNet(model)
    learner = MetaLearner(net, make_parameters(net.init_params(0, "float64")), "maml", 0.3, 2)
    direction, _ = learner.task_direction(Task(*(t.numpy() for t in image_task())))
    for name, value in direction.items():
        np.testing.assert_allclose(grads[name], value.numpy(), rtol=1e-10, atol=1e-13)


def test_first_order_is_the_query_gradient_at_the_adapted_weights(float64) -> None:
    """FOMAML: ∇θ' L_q(θ') at θ' = θ_K, as if θ_K did not depend on θ."""
    model = OmniglotNet(3, hidden=4)
    maml = metalearn.MAML(model, inner_lr=0.3, steps=2, order="first")
    x_s, y_s, x_q, y_q = image_task()
    grads = meta_gradient(maml, (x_s, y_s, x_q, y_q))
    adapted = maml.adapt(x_s, y_s).weights
    leaves = {name: paddle.to_tensor(w.numpy(), stop_gradient=False) for name, w in adapted.items()}
    loss = maml.net.loss(maml.net.forward(x_q, leaves), y_q)
    expected = paddle.grad(loss, list(leaves.values()))
    for name, value in zip(leaves, expected):
        np.testing.assert_allclose(grads[name], value.numpy(), rtol=1e-10, atol=1e-13)


def test_reptile_gradient_is_theta_minus_the_adapted_weights(float64) -> None:
    model = OmniglotNet(3, hidden=4)
    maml = metalearn.MAML(model, inner_lr=0.3, steps=3, order="reptile")
    x_s, y_s, x_q, y_q = image_task()
    learner = maml.clone().adapt(x_s, y_s)
    loss = learner.loss(x_q, y_q)
    with paddle.no_grad():
        query = maml.net.loss(learner(x_q), y_q)
    np.testing.assert_allclose(float(loss), float(query), rtol=1e-12)  # the value: query loss
    loss.backward()
    for name, parameter in maml.learner.params.items():
        expected = parameter.numpy() - learner.weights[name].numpy()
        np.testing.assert_allclose(parameter.grad.numpy(), expected, rtol=1e-12, atol=1e-15)
        assert np.abs(expected).max() > 0


def test_a_named_subset_adapts_alone(float64) -> None:
    model = OmniglotNet(3, hidden=4)
    names = ["body.0.weight", "head.bias"]
    for adapt, changed in ((names, names), ("head", ["head.weight", "head.bias"])):
        maml = metalearn.MAML(model, inner_lr=0.3, steps=2, adapt=adapt)
        x_s, y_s, *_ = image_task()
        adapted = maml.adapt(x_s, y_s).weights
        moved = [n for n, p in maml.learner.params.items()
                 if not np.array_equal(adapted[n].numpy(), p.numpy())]  # fmt: skip
        assert moved == changed
        assert all(np.abs(g).max() > 0 for g in meta_gradient(maml, image_task()).values())


def test_learned_rates_are_parameters_of_the_optimizer(float64) -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    maml = metalearn.MAML(model, inner_lr=0.1, rule="lslr", steps=2)
    names = list(maml.learner.params)
    assert names[:4] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert names[4:] == ["lr:0.weight", "lr:0.bias", "lr:2.weight", "lr:2.bias"]
    x, y = paddle.rand([4, 2]), paddle.to_tensor([0, 1, 0, 1])
    maml.clone().adapt(x, y).loss(x, y).backward()
    assert all(p.grad is not None for p in maml.parameters())
    with pytest.raises(ValueError, match="Reptile"):
        metalearn.MAML(model, inner_lr=0.1, rule="lslr", order="reptile")


def test_importing_metalearn_does_not_load_paddle() -> None:
    """Entry points import metalearn.runtime before Paddle may load (PEP 562 exports)."""
    code = "import sys, metalearn, metalearn.runtime; print('paddle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert metalearn.MAML.__module__ == "metalearn.learning.api"
