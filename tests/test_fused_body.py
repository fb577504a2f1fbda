"""The fused convolution body of the oneDNN fast path (``ops.relu_conv_body``: every block of
ConvNet's body in one operator call, used where nothing records a graph) computes the function
of the blocks run op by op: against the float64 composition, on the layouts it picks (channel
blocks where the width allows, plain NCHW where it does not), and it is what scoring uses."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import Task
from metalearn.kernels import ops, registry
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import ConvNet


def perturbed_params(net: ConvNet, seed: int) -> dict[str, np.ndarray]:
    """θ with batch-norm scales and shifts away from 1 and 0, so both enter the result."""
    arrays = net.init_params(seed)
    rng = np.random.default_rng(seed)
    for name, value in arrays.items():
        if name.startswith("bn"):
            arrays[name] = value + rng.normal(0, 0.3, value.shape).astype(value.dtype)
    return arrays


def features(net: ConvNet, x: np.ndarray, arrays: dict, dtype: str, step: int = 0) -> np.ndarray:
    params = {k: paddle.to_tensor(v.astype(dtype)) for k, v in arrays.items()}
    with paddle.no_grad():
        return net.features(paddle.to_tensor(x.astype(dtype)), params, step).numpy()


@pytest.mark.parametrize(
    "images, size, channels, width, blocks",
    [
        (75, 28, 1, 64, 4),  # a query set of the paper's 5-way network (channel blocks)
        (5, 28, 1, 64, 4),  # a support set
        (1, 28, 1, 64, 4),  # one image: the last block normalises over 4 values
        (3, 20, 3, 16, 4),  # colour images, 16 filters
        (4, 28, 1, 32, 2),  # two blocks
        (7, 13, 3, 12, 3),  # 12 filters: no channel blocks of 8 fit, plain NCHW
        (2, 9, 2, 5, 1),  # one block of 5 filters
    ],
)
def test_fused_body_matches_the_float64_composition(
    fast, images: int, size: int, channels: int, width: int, blocks: int
) -> None:
    net = ConvNet(5, in_channels=channels, image_size=size, hidden=width, blocks=blocks)
    arrays = perturbed_params(net, seed=images + width)
    rng = np.random.default_rng(size)
    x = (rng.random((images, channels, size, size)) < 0.2).astype("float64")  # sparse strokes
    fused = features(net, x, arrays, "float32")
    reference = features(net, x, arrays, "float64")  # not fast: blocks op by op, float64
    assert fused.shape == (images, width)
    scale = np.abs(reference).max()
    assert np.abs(fused - reference).max() <= 1e-5 * scale
    assert np.array_equal(fused, features(net, x, arrays, "float32")), "not deterministic"


@pytest.mark.parametrize("bn_steps", [0, 2])
def test_fused_body_of_stacked_tasks_is_each_tasks_body(fast, bn_steps: int) -> None:
    """T tasks stacked (images [T, N, C, H, W], θ with a leading task axis) run as one call with
    grouped convolutions; each task's features are its own body's, as in float64 one by one."""
    net = ConvNet(5, hidden=16, bn_steps=bn_steps)
    per_task = [perturbed_params(net, seed=task) for task in range(3)]
    stacked = {k: np.stack([arrays[k] for arrays in per_task]) for k in per_task[0]}
    rng = np.random.default_rng(4)
    x = (rng.random((3, 10, 1, 28, 28)) < 0.2).astype("float64")
    fused = features(net, x, stacked, "float32", step=1)
    assert fused.shape == (3, 10, 16)
    for task, arrays in enumerate(per_task):
        reference = features(net, x[task], arrays, "float64", step=1)
        assert np.abs(fused[task] - reference).max() <= 1e-5 * np.abs(reference).max()


def test_fused_body_uses_the_step_row_of_per_step_batch_norm(fast) -> None:
    net = ConvNet(5, hidden=16, bn_steps=3)
    arrays = perturbed_params(net, seed=3)
    x = np.random.default_rng(0).random((6, 1, 28, 28))
    for step in (0, 1, 4):  # 4: past the last row, which then applies
        fused = features(net, x, arrays, "float32", step)
        reference = features(net, x, arrays, "float64", step)
        assert np.abs(fused - reference).max() <= 1e-5 * np.abs(reference).max()
    assert not np.allclose(features(net, x, arrays, "float32", 0), fused)


@pytest.fixture
def fused_calls(fast, monkeypatch):
    """How often the fused body ran since the test started."""
    calls = []
    active = registry.active()
    original = active.relu_conv_body_features

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(active, "relu_conv_body_features", counted)
    return calls


def test_scoring_runs_the_fused_body_and_training_does_not(fused_calls) -> None:
    net = ConvNet(n_way=3, hidden=8)
    params = make_parameters(net.init_params(0))
    learner = MetaLearner(net, params, "maml", 0.4, 2)
    rng = np.random.default_rng(1)
    task = Task(
        rng.random((3, 1, 28, 28)).astype("float32"),
        np.arange(3, dtype="int64"),
        rng.random((6, 1, 28, 28)).astype("float32"),
        np.repeat(np.arange(3, dtype="int64"), 2),
    )
    learner.meta_update([task, task], learner.make_optimizer(), 2)
    assert fused_calls == [], "a recorded forward pass must not take the inference operator"
    accuracies = learner.evaluate([task], 2)
    assert accuracies.shape == (1, 3)
    assert fused_calls == [[6, 1, 28, 28]] * 3, "each of the 3 weight sets scores the queries"
    fused_calls.clear()
    assert np.array_equal(learner.evaluate([task, task], 2), np.concatenate([accuracies] * 2))
    assert fused_calls == [[6, 2, 28, 28]] * 3, "two stacked tasks: one call per weight set"


def test_fused_and_op_by_op_scoring_agree(fast, monkeypatch) -> None:
    net = ConvNet(n_way=5)
    arrays = perturbed_params(net, seed=7)
    x = (np.random.default_rng(2).random((25, 1, 28, 28)) < 0.2).astype("float32")
    fused = features(net, x, arrays, "float32")
    monkeypatch.setattr(registry.active(), "fuses_relu_conv_body", lambda *tensors: False)
    op_by_op = features(net, x, arrays, "float32")
    assert np.abs(fused - op_by_op).max() <= 1e-5 * np.abs(op_by_op).max()


def test_without_the_fused_kernels_the_body_is_composed() -> None:
    native = registry.NativeKernels()
    x = paddle.ones([2, 1, 8, 8])
    blocks = [(paddle.ones([4, 1, 3, 3]), paddle.ones([4]), paddle.zeros([4]))]
    previous, kind = registry.active(), registry.in_use()
    registry.install(native, "native")
    try:
        with paddle.no_grad():
            assert ops.relu_conv_body(x, blocks, 2, 1, 1e-3) is None
    finally:
        registry.install(previous, kind)
