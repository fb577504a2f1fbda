"""The fused batch-norm operator of the oneDNN fast path computes the elementwise composition's
function: values, first and second derivatives, and whole meta-gradients (ANIL, MAML++'s
per-step batch norm, stacked tasks), against the float64 composition as the reference."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import Task
from metalearn.kernels import ops, registry
from metalearn.learning.learner import MetaLearner, initial_arrays, make_parameters
from metalearn.nets.builtin import ConvNet, PoolConvNet

HERE = Path(__file__).resolve().parent


def sparse_binary(rng: np.random.Generator, shape) -> np.ndarray:
    """Mostly-zero binary values, like Omniglot strokes: the case where E[x²] − E[x]² cancels."""
    return (rng.random(shape) < 0.15).astype("float64")


def batch_norm_derivatives(x, scale, shift, weights, direction, dtype: str, relu: bool = False):
    """Batch norm (then ReLU if ``relu``), the gradients of a smooth loss of it, and the
    gradients of a functional of those gradients (what second-order MAML differentiates), as
    float64 arrays. The loss has weights of its own, which dL/dy depends on, as a later layer's
    do in MAML: their second-order gradient sees the cotangent of dL/dy (where a ReLU masks it)."""
    x, scale, shift, weights = (
        paddle.to_tensor(a.astype(dtype), stop_gradient=False) for a in (x, scale, shift, weights)
    )
    y = ops.batch_norm(x, scale, shift, 1e-3, relu=relu)
    loss = (paddle.tanh(y) * weights).sum()
    gx, gscale, gshift = paddle.grad(loss, [x, scale, shift], create_graph=True)
    second = (
        (gx * paddle.to_tensor(direction.astype(dtype))).sum()
        + (gscale * gscale).sum()
        + (gshift * paddle.linspace(-1, 1, gshift.shape[0], dtype=dtype)).sum()
    )
    second_order = paddle.grad(second, [x, scale, shift, weights])
    return [t.numpy().astype("float64") for t in (y, gx, gscale, gshift, *second_order)]


def batch_norm_case(shape, dense: bool = False):
    """(x, scale, shift, weights, direction) for a [N, C, H, W] batch norm: sparse binary inputs
    (shifted; normal ones if ``dense``) with a constant channel, shifts of both signs so that a
    ReLU after it cuts part of every channel."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape) if dense else sparse_binary(rng, shape) * 3.0 + 0.5
    x[:, 1] = 0.7  # zero variance: x̂ = 0, rstd = 1/sqrt(eps)
    channels = shape[1]
    scale, shift = rng.uniform(0.5, 1.5, channels), rng.normal(size=channels)
    weights, direction = rng.normal(size=shape), rng.normal(size=shape)
    return x, scale, shift, weights, direction


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize(
    "shape", [[5, 3 * 4, 14, 14], [15, 2 * 8, 7, 7], [4, 6, 2, 2], [25, 64, 7, 7]]
)
def test_fused_batch_norm_equals_the_composition(fast, shape, relu) -> None:
    """Stacked [N, T·C, H, W] shapes, sparse binary inputs (shifted), a constant channel; with
    ReLU fused, against the composition followed by ``F.relu``. The largest shape is split over
    threads where there are several."""
    case = batch_norm_case(shape)
    x32 = paddle.to_tensor(case[0].astype("float32"))
    assert registry.active().fuses_batch_norm(x32), "float32 CPU must take the fused operator"
    fused = batch_norm_derivatives(*case, "float32", relu=relu)
    reference = batch_norm_derivatives(*case, "float64", relu=relu)
    names = ("y", "dx", "dscale", "dshift", "d2x", "d2scale", "d2shift", "d2weights")
    for name, got, want in zip(names, fused, reference):
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < 2e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
def test_inference_skips_the_graph_with_the_same_values(fast, relu) -> None:
    """Under ``paddle.no_grad`` batch norm and the convolution call their kernels directly (no
    PyLayer): the values are bit-identical to those of the recording path."""
    x, scale, shift, _, _ = batch_norm_case([15, 16, 7, 7])
    x, scale, shift = (
        paddle.to_tensor(a.astype("float32"), stop_gradient=False) for a in (x, scale, shift)
    )
    weight = paddle.to_tensor(
        np.linspace(-1, 1, 16 * 16 * 9, dtype="float32").reshape(16, 16, 3, 3)
    )
    weight.stop_gradient = False

    def block():
        return ops.batch_norm(ops.conv2d(x, weight, 2, 1), scale, shift, 1e-3, relu=relu)

    recorded = block()
    assert not recorded.stop_gradient
    with paddle.no_grad():
        scored = block()
    assert scored.stop_gradient
    np.testing.assert_array_equal(scored.numpy(), recorded.numpy())


# Run in a fresh process (the thread count is read when the operator loads): the float32 fused
# batch norm + ReLU derivatives of batch_norm_case(argv[2]), saved to the .npz file argv[1].
_THREADS_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from metalearn.kernels import onednn
from test_fused_batch_norm import batch_norm_case, batch_norm_derivatives
assert onednn.use_kernels("fast") == "fast"
case = batch_norm_case(json.loads(sys.argv[2]), dense=True)
np.savez(sys.argv[1], *batch_norm_derivatives(*case, "float32", relu=True))
"""


@pytest.mark.slow
def test_fused_batch_norm_relu_is_the_same_on_one_and_two_threads(fast, tmp_path) -> None:
    """Each channel's sums stay on one thread, so 1 and 2 threads give bit-identical values and
    first and second derivatives (and these match the float64 composition)."""
    shape = [25, 64, 7, 7]  # large enough to be split over the threads
    results = []
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}.npz"
        env = dict(os.environ, PADDLE_MAML_FASTCONV_THREADS=str(threads))
        command = [sys.executable, "-c", _THREADS_SCRIPT, str(out), json.dumps(shape), str(HERE)]
        result = subprocess.run(
            command, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
        with np.load(out) as saved:
            results.append([saved[f"arr_{i}"] for i in range(len(saved.files))])
    reference = batch_norm_derivatives(*batch_norm_case(shape, dense=True), "float64", relu=True)
    for one, two, want in zip(*results, reference):
        assert np.array_equal(one, two)
        assert np.abs(two - want).max() / np.abs(want).max() < 2e-5


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
    [
        {},
        {"hidden": 16},
        {"rule": "lslr", "per_step_bn": True, "multi_step_loss_for": 10},
        {"adapt": "head"},
    ],
    ids=["maml", "maml-blocked", "maml++", "anil"],
)
def test_fused_meta_gradient_matches_float64(fast, options) -> None:
    """Second-order MAML through the fused operator (float32) against the float64 composition:
    3 stacked tasks in chunks of 2, 3 inner steps; 16 channels: activations in oneDNN's blocked
    layout between the operators (8 channels: plain NCHW where its block is 16, AVX-512); ANIL
    (``paddle.grad`` over the head only) and MAML++ (per-step batch norm, whose blocks keep the
    composition: Paddle would prune the fused operator's scale and shift in the inner loop's
    ``paddle.grad``)."""
    steps = 3
    hidden = options.get("hidden", 8)
    net = ConvNet(n_way=3, hidden=hidden, bn_steps=steps if options.get("per_step_bn") else 0)
    probe = paddle.zeros([1])
    if hidden == 16 and registry.active().activation_block(probe) > 1:
        assert net._activation_layout(probe, {"conv0.weight": probe}) > 1, "must run blocked"
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": steps}
    config = {**config, "inner_rule": options.get("rule", "sgd"), "adapt": options.get("adapt")}
    learner_options = {k: v for k, v in options.items() if k not in ("per_step_bn", "hidden")}
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
