"""Finite-difference proof of the second-order meta-gradient, for tests and ``python MAML.py``.

With ReLU the inner gradient jumps where a unit changes sign, so finite differences of the MAML
objective diverge; the check therefore uses the same network with a smooth activation (tanh),
float64, and compares the analytic directional derivative of the meta-objective along a random
direction of every meta-parameter (θ, learned inner rates, per-step batch norm) with a central
difference. Max-pooling is piecewise linear: the check is valid as long as no window's maximum
changes place within the finite-difference step, which random inputs make all but certain
(tests/test_nets_pool.py verifies it for the pool network's check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import paddle

from metalearn.data.tasks import Task
from metalearn.kernels import ops
from metalearn.learning.inner_rules import RATE_PREFIX
from metalearn.learning.learner import MetaLearner, initial_arrays, make_parameters
from metalearn.nets.builtin import MLP, ConvNet, PoolConvNet

T = TypeVar("T")


def tiny_problem(kind: str, seed: int = 0, bn_steps: int = 0):
    """A small tanh network and one task for it, both float64.

    ``pool`` is the MiniImagenet network on 18×18×3 images (18 → 9 → 4 → 2 → 1: both an odd size
    whose last row is dropped and an exact halving) with 4 filters.
    """
    rng = np.random.default_rng(seed)
    if kind in ("conv", "pool"):
        if kind == "conv":
            net = ConvNet(n_way=3, hidden=4, activation="tanh", bn_steps=bn_steps)
            shape = (1, 28, 28)
        else:
            net = PoolConvNet(
                n_way=3, image_size=18, filters=4, activation="tanh", bn_steps=bn_steps
            )
            shape = (3, 18, 18)
        labels = np.arange(3).repeat(2)
        task = Task(rng.random((6, *shape)), labels, rng.random((6, *shape)), labels)
    else:
        net = MLP(sizes=(1, 8, 8, 1), activation="tanh")
        x = rng.uniform(-5, 5, (10, 1))
        task = Task(x[:5], np.sin(x[:5]), x[5:], np.sin(x[5:]))
    return net, task


def tiny_arrays(net, inner_lr: float, steps: int, rule: str, adapt: str, seed: int) -> dict:
    """float64 meta-parameters; learned rates and per-step rows spread around their initial
    values, so that a check cannot pass by their symmetry."""
    config = {"seed": seed, "glob_base_lr": inner_lr, "glob_update_step": steps}
    arrays = initial_arrays(net, {**config, "inner_rule": rule, "adapt": adapt}, dtype="float64")
    rng = np.random.default_rng(seed + 2)
    for name in arrays:
        if name.startswith(RATE_PREFIX) or name in net.per_step_names():
            arrays[name] = arrays[name] * (1 + 0.3 * rng.uniform(-1, 1, arrays[name].shape))
    return arrays


def meta_gradient_error(
    kind: str = "conv",
    steps: int = 1,
    inner_lr: float = 0.5,
    eps: float = 1e-5,
    seed: int = 0,
    rule: str = "sgd",
    adapt: str = "all",
    per_step_bn: bool = False,
    multi_step_loss_for: int = 0,
    iteration: int | None = None,
    stacked_tasks: int = 1,
) -> float:
    """Relative error |analytic − finite difference| / |finite difference| of the meta-gradient
    of one task's meta-objective (at ``iteration`` of the schedules; None: after them), or of the
    summed meta-objective of ``stacked_tasks`` tasks computed as one stacked chunk (grouped
    convolutions: the path train.py takes with the oneDNN kernels). Max-pooling: see
    :func:`central_difference`.
    """
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        bn_steps = steps + 1 if per_step_bn else 0
        net = tiny_problem(kind, seed, bn_steps)[0]
        tasks = [tiny_problem(kind, seed + i, bn_steps)[1] for i in range(stacked_tasks)]
        arrays = tiny_arrays(net, inner_lr, steps, rule, adapt, seed)
        rng = np.random.default_rng(seed + 1)
        direction = {k: rng.standard_normal(v.shape) for k, v in arrays.items()}

        def learner(values: dict[str, np.ndarray]) -> MetaLearner:
            options = {"rule": rule, "adapt": adapt, "multi_step_loss_for": multi_step_loss_for}
            options["task_chunk"] = stacked_tasks
            return MetaLearner(net, make_parameters(values), "maml", inner_lr, steps, **options)

        def meta_loss(values: dict[str, np.ndarray]) -> float:
            stats = learner(values).batch_direction(tasks, iteration=iteration)[1]
            return sum(s.loss for s in stats)

        (grads, _), indices = with_pool_indices(
            lambda: learner(arrays).batch_direction(tasks, iteration=iteration)
        )
        analytic = sum(float((grads[k].numpy() * direction[k]).sum()) for k in arrays)
        numeric = central_difference(meta_loss, arrays, direction, eps, indices)
        return abs(analytic - numeric) / abs(numeric)
    finally:
        paddle.set_default_dtype(previous)


def with_pool_indices(compute: Callable[[], T]) -> tuple[T, list[np.ndarray]]:
    """``compute()`` and the argmax indices of every max-pool it ran."""
    with ops.recording_pool_indices() as indices:
        return compute(), indices


def central_difference(
    meta_loss: Callable[[dict[str, np.ndarray]], float],
    arrays: dict[str, np.ndarray],
    direction: dict[str, np.ndarray],
    eps: float,
    indices: list[np.ndarray],
) -> float:
    """(L(θ + εd) − L(θ − εd)) / 2ε for the directions ``direction`` (name -> array; names
    missing from it stay put), where ``indices`` are the max-pool argmaxes at θ.

    If a max-pool window's argmax differs at θ ± εd from θ, the step is divided by 10 (at most
    three times): the difference would cross a kink of the piecewise-linear pooling.
    """

    def shifted(step: float) -> dict[str, np.ndarray]:
        return {k: v + step * direction[k] if k in direction else v for k, v in arrays.items()}

    for _ in range(4):
        plus, plus_indices = with_pool_indices(lambda: meta_loss(shifted(eps)))  # noqa: B023
        minus, minus_indices = with_pool_indices(lambda: meta_loss(shifted(-eps)))  # noqa: B023
        if _same(indices, plus_indices) and _same(indices, minus_indices):
            return (plus - minus) / (2 * eps)
        eps /= 10
    raise RuntimeError("max-pool argmax changes within every finite-difference step tried")


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
