"""Finite-difference proof of the second-order meta-gradient, for tests and ``python MAML.py``.

With ReLU the inner gradient jumps where a unit changes sign, so finite differences of the MAML
objective diverge; the check therefore uses the same network with a smooth activation (tanh),
float64, and compares the analytic directional derivative of L_query(θ_K(θ)) along a random
direction with a central difference.
"""

from __future__ import annotations

import numpy as np
import paddle

from metalearn.algorithms import MetaLearner, make_parameters
from metalearn.nets import MLP, ConvNet
from metalearn.tasks import Task


def tiny_problem(kind: str, seed: int = 0):
    """A small tanh network and one task for it, both float64."""
    rng = np.random.default_rng(seed)
    if kind == "conv":
        net = ConvNet(n_way=3, hidden=4, activation="tanh")
        labels = np.arange(3).repeat(2)
        task = Task(rng.random((6, 1, 28, 28)), labels, rng.random((6, 1, 28, 28)), labels)
    else:
        net = MLP(sizes=(1, 8, 8, 1), activation="tanh")
        x = rng.uniform(-5, 5, (10, 1))
        task = Task(x[:5], np.sin(x[:5]), x[5:], np.sin(x[5:]))
    return net, task


def meta_gradient_error(
    kind: str = "conv", steps: int = 1, inner_lr: float = 0.5, eps: float = 1e-5, seed: int = 0
) -> float:
    """Relative error |analytic − finite difference| / |finite difference| of the MAML gradient."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        net, task = tiny_problem(kind, seed)
        arrays = net.init_params(seed, dtype="float64")
        rng = np.random.default_rng(seed + 1)
        direction = {k: rng.standard_normal(v.shape) for k, v in arrays.items()}

        def meta_loss(values: dict[str, np.ndarray]) -> float:
            learner = MetaLearner(net, make_parameters(values), "maml", inner_lr, steps)
            return learner.task_direction(task)[1].loss

        learner = MetaLearner(net, make_parameters(arrays), "maml", inner_lr, steps)
        grads, _ = learner.task_direction(task)
        analytic = sum(float((grads[k].numpy() * direction[k]).sum()) for k in arrays)
        plus = meta_loss({k: v + eps * direction[k] for k, v in arrays.items()})
        minus = meta_loss({k: v - eps * direction[k] for k, v in arrays.items()})
        numeric = (plus - minus) / (2 * eps)
        return abs(analytic - numeric) / abs(numeric)
    finally:
        paddle.set_default_dtype(previous)
