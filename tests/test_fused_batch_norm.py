"""The fused batch-norm operator of the oneDNN fast path computes the elementwise composition's
function: values, first and second derivatives, and whole meta-gradients (ANIL, MAML++'s
per-step batch norm, stacked tasks), against the float64 composition as the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import paddle
import pytest

from metalearn import fastconv, kernels, ops
from metalearn.algorithms import MetaLearner, initial_arrays, make_parameters
from metalearn.nets import ConvNet, PoolConvNet
from metalearn.tasks import Task


@pytest.fixture(scope="module")
def fast():
    if fastconv.load_kernels() is None:
        pytest.skip("the oneDNN kernels could not be built here")
    fastconv.use_kernels("fast")
    yield
    fastconv.use_kernels("native")


def sparse_binary(rng: np.random.Generator, shape) -> np.ndarray:
    """Mostly-zero binary values, like Omniglot strokes: the case where E[x²] − E[x]² cancels."""
    return (rng.random(shape) < 0.15).astype("float64")


def batch_norm_derivatives(x, scale, shift, weights, direction, dtype: str):
    """Batch norm, the gradients of a smooth loss of it, and the gradients of a functional of
    those gradients (what second-order MAML differentiates), as float64 arrays."""
    x, scale, shift = (
        paddle.to_tensor(a.astype(dtype), stop_gradient=False) for a in (x, scale, shift)
    )
    y = ops.batch_norm(x, scale, shift, 1e-3)
    loss = (paddle.tanh(y) * paddle.to_tensor(weights.astype(dtype))).sum()
    gx, gscale, gshift = paddle.grad(loss, [x, scale, shift], create_graph=True)
    second = (
        (gx * paddle.to_tensor(direction.astype(dtype))).sum()
        + (gscale * gscale).sum()
        + (gshift * paddle.linspace(-1, 1, gshift.shape[0], dtype=dtype)).sum()
    )
    hx, hscale, hshift = paddle.grad(second, [x, scale, shift])
    return [t.numpy().astype("float64") for t in (y, gx, gscale, gshift, hx, hscale, hshift)]


@pytest.mark.parametrize("shape", [[5, 3 * 4, 14, 14], [15, 2 * 8, 7, 7], [4, 6, 2, 2]])
def test_fused_batch_norm_equals_the_composition(fast, shape) -> None:
    """Stacked [N, T·C, H, W] shapes, sparse binary inputs (shifted), a constant channel."""
    rng = np.random.default_rng(sum(shape))
    x = sparse_binary(rng, shape) * 3.0 + 0.5
    x[:, 1] = 0.7  # zero variance: x̂ = 0, rstd = 1/sqrt(eps)
    channels = shape[1]
    scale, shift = rng.uniform(0.5, 1.5, channels), rng.normal(size=channels)
    weights, direction = rng.normal(size=shape), rng.normal(size=shape)
    x32 = paddle.to_tensor(x.astype("float32"))
    assert kernels.active().fuses_batch_norm(x32), "float32 CPU must take the fused operator"
    fused = batch_norm_derivatives(x, scale, shift, weights, direction, "float32")
    reference = batch_norm_derivatives(x, scale, shift, weights, direction, "float64")
    names = ("y", "dx", "dscale", "dshift", "d2x", "d2scale", "d2shift")
    for name, got, want in zip(names, fused, reference):
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < 2e-5, f"{name}: relative error {error:.2e}"


def binary_tasks(count: int, shape, n_way: int = 3, seed: int = 0) -> list[Task]:
    """float64 tasks of sparse binary images, 1 support and 2 query images per class."""
    rng = np.random.default_rng(seed)
    support, query = np.arange(n_way), np.arange(n_way).repeat(2)
    return [
        Task(
            sparse_binary(rng, (n_way, *shape)),
            support,
            sparse_binary(rng, (2 * n_way, *shape)),
            query,
        )
        for _ in range(count)
    ]


def meta_direction(net, config: dict, options: dict, tasks, dtype: str) -> np.ndarray:
    """One meta-batch's direction (stacked in chunks of 2), all parameters concatenated."""
    steps = config["glob_update_step"]
    arrays = initial_arrays(net, config, dtype=dtype)
    learner = MetaLearner(
        net, make_parameters(arrays), "maml", config["glob_base_lr"], steps, task_chunk=2, **options
    )
    if dtype == "float32":
        tasks = [
            dataclasses.replace(
                t, x_support=t.x_support.astype(dtype), x_query=t.x_query.astype(dtype)
            )
            for t in tasks
        ]
    direction, _ = learner.batch_direction(tasks, iteration=4)
    return np.concatenate(
        [direction[k].numpy().astype("float64").ravel() for k in sorted(direction)]
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"rule": "lslr", "per_step_bn": True, "multi_step_loss_for": 10}, {"adapt": "head"}],
    ids=["maml", "maml++", "anil"],
)
def test_fused_meta_gradient_matches_float64(fast, options) -> None:
    """Second-order MAML through the fused operator (float32) against the float64 composition:
    3 stacked tasks in chunks of 2, 3 inner steps; ANIL (``paddle.grad`` over the head only) and
    MAML++ (per-step batch norm, whose blocks keep the composition: Paddle would prune the fused
    operator's scale and shift in the inner loop's ``paddle.grad``)."""
    steps = 3
    net = ConvNet(n_way=3, hidden=8, bn_steps=steps if options.get("per_step_bn") else 0)
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": steps}
    config = {**config, "inner_rule": options.get("rule", "sgd"), "adapt": options.get("adapt")}
    learner_options = {k: v for k, v in options.items() if k != "per_step_bn"}
    tasks = binary_tasks(3, (1, 28, 28))
    fused = meta_direction(net, config, learner_options, tasks, "float32")
    paddle.set_default_dtype("float64")
    try:
        reference = meta_direction(net, config, learner_options, tasks, "float64")
    finally:
        paddle.set_default_dtype("float32")
    error = np.linalg.norm(fused - reference) / np.linalg.norm(reference)
    assert error < 1e-4, f"relative error {error:.2e}"


def test_fused_pool_network_meta_gradient_matches_float64(fast) -> None:
    net = PoolConvNet(n_way=3, image_size=18, filters=4)
    config = {"seed": 0, "glob_base_lr": 0.1, "glob_update_step": 2}
    tasks = binary_tasks(3, (3, 18, 18))
    fused = meta_direction(net, config, {}, tasks, "float32")
    paddle.set_default_dtype("float64")
    try:
        reference = meta_direction(net, config, {}, tasks, "float64")
    finally:
        paddle.set_default_dtype("float32")
    error = np.linalg.norm(fused - reference) / np.linalg.norm(reference)
    assert error < 1e-4, f"relative error {error:.2e}"
