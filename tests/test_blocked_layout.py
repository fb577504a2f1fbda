"""The training path keeps ConvNet's activations in oneDNN's channel-blocked layout nChw{B}c from
the first convolution's output to the spatial mean. Each operator computes on blocked tensors
what it computes on plain NCHW ones (the tensors converted by numpy), and ConvNet's
second-order meta-gradient is the same either way; the float64 proof of the blocked path is
tests/test_fused_batch_norm.py::test_fused_meta_gradient_matches_float64[maml-blocked]."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from metalearn.kernels import onednn, ops, registry
from metalearn.learning.learner import MetaLearner, initial_arrays, make_parameters
from metalearn.nets.builtin import ConvNet
from tests.test_fused_batch_norm import binary_tasks


@pytest.fixture(scope="module")
def block() -> int:
    """B of this CPU (skipped where the kernels cannot be built or oneDNN prefers plain NCHW)."""
    kernels = onednn.load_kernels()
    if kernels is None:
        pytest.skip("the oneDNN kernels could not be built here")
    found = kernels.activation_block(paddle.zeros([1]))
    if found == 1:
        pytest.skip("oneDNN prefers plain NCHW on this CPU")
    return found


def blocked(a: np.ndarray, b: int) -> np.ndarray:
    """[N, C, H, W] plain -> the same shape holding nChw{b}c."""
    n, c, h, w = a.shape
    return a.reshape(n, c // b, b, h, w).transpose(0, 1, 3, 4, 2).reshape(n, c, h, w)


def plain(a: np.ndarray, b: int) -> np.ndarray:
    n, c, h, w = a.shape
    return a.reshape(n, c // b, h, w, b).transpose(0, 1, 4, 2, 3).reshape(n, c, h, w)


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert error < 1e-5, f"{what}: relative error {error:.2e}"


# (images, input channels, size, output channels, kernel, stride, padding, groups, layout bits)
CONV_CASES = [
    (7, 3, 13, 96, 3, 2, 1, 3, 2),  # stacked tasks' first layer: one input channel per group
    (4, 2, 9, 64, 3, 1, 0, 2, 2),  # the same, stride 1, no padding
    (5, 3, 10, 32, 3, 2, 1, 1, 2),  # images of several channels into blocked outputs
    (6, 64, 7, 64, 3, 2, 1, 2, 3),  # inner layers of 2 stacked tasks
    (3, 32, 6, 32, 3, 1, 1, 1, 1),  # blocked in, plain out
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"c{c[1]}-o{c[3]}-g{c[7]}-l{c[8]}")
def test_convolutions_on_blocked_activations_equal_plain(block, case) -> None:
    n, c, size, o, k, stride, padding, groups, layout = case
    kernels = onednn.load_kernels()
    rng = np.random.default_rng(sum(case))
    x = rng.normal(size=(n, c, size, size)).astype("float32")
    w = rng.normal(size=(o, c // groups, k, k)).astype("float32")
    x_in = blocked(x, block) if layout & 1 else x
    geometry = (stride, padding, groups)
    y = kernels.forward(paddle.to_tensor(x), paddle.to_tensor(w), *geometry).numpy()
    dy = rng.normal(size=y.shape).astype("float32")
    dy_in = blocked(dy, block) if layout & 2 else dy
    x_out = (lambda a: plain(a, block)) if layout & 1 else (lambda a: a)
    y_out = (lambda a: plain(a, block)) if layout & 2 else (lambda a: a)
    t = [paddle.to_tensor(a) for a in (x, w, dy, x_in, dy_in)]
    dx, dw = kernels.backward(t[0], t[1], t[2], *geometry)
    got = kernels.forward(t[3], t[1], *geometry, layout).numpy()
    assert_close(y_out(got), y, "forward")
    got_dx, got_dw = kernels.backward(t[3], t[1], t[4], *geometry, layout)
    assert_close(x_out(got_dx.numpy()), dx.numpy(), "backward dx")
    assert_close(got_dw.numpy(), dw.numpy(), "backward dw")
    got = kernels.backward_data(t[3], t[1], t[4], *geometry, layout).numpy()
    assert_close(x_out(got), dx.numpy(), "backward_data")
    got = kernels.backward_weights(t[3], t[1], t[4], *geometry, layout).numpy()
    assert_close(got, dw.numpy(), "backward_weights")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize("lanes", [8, 16])
def test_batch_norm_passes_on_blocked_activations_equal_plain(block, lanes, relu) -> None:
    """Forward, backward and double backward with block = 8 and 16 (any CPU runs both), on
    sparse binary inputs with a constant channel and shifts of both signs."""
    kernels = onednn.load_kernels()
    rng = np.random.default_rng(lanes + relu)
    shape = (9, 2 * lanes, 5, 5)
    x = ((rng.random(shape) < 0.15) * 3.0 + 0.5).astype("float32")
    x[:, 1] = 0.7
    dy, gx = (rng.normal(size=shape).astype("float32") for _ in range(2))
    scale, shift, gs, gb = (rng.normal(size=shape[1]).astype("float32") for _ in range(4))
    shift_arg = paddle.to_tensor(shift) if relu else None

    def passes(convert, b):
        x_in = paddle.to_tensor(convert(x))
        y, mean, rstd = kernels.batch_norm_forward(
            x_in, paddle.to_tensor(scale), paddle.to_tensor(shift), 1e-3, relu, block=b
        )
        common = (x_in, mean, rstd, paddle.to_tensor(scale), paddle.to_tensor(convert(dy)))
        first = kernels.batch_norm_backward(*common, shift_arg, block=b)
        cotangents = (paddle.to_tensor(convert(gx)), paddle.to_tensor(gs), paddle.to_tensor(gb))
        second = kernels.batch_norm_double_backward(*common, *cotangents, shift_arg, block=b)
        return [t.numpy() for t in (y, mean, rstd, *first, *second)]

    reference = passes(lambda a: a, 1)
    got = passes(lambda a: blocked(a, lanes), lanes)
    names = ("y", "mean", "rstd", "dx", "dscale", "dshift", "d_x", "d_scale", "d_dy")
    for name, g, want in zip(names, got, reference):
        assert_close(plain(g, lanes) if g.ndim == 4 else g, want, name)


def test_convnet_meta_gradient_is_the_same_blocked_or_plain(block, monkeypatch) -> None:
    """Second-order MAML, 2 inner steps, 3 tasks stacked in chunks of 2; the blocked run must
    have run blocked (``activation_block`` asked and used), the other plain."""
    net = ConvNet(n_way=3, hidden=2 * block)
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": 2}
    tasks = [
        dataclasses.replace(
            t, x_support=t.x_support.astype("float32"), x_query=t.x_query.astype("float32")
        )
        for t in binary_tasks(3, (1, 28, 28))
    ]
    layouts: list[int] = []
    original = ConvNet._activation_layout

    def recorded(self, x, params):
        layouts.append(original(self, x, params))
        return layouts[-1]

    def direction() -> np.ndarray:
        arrays = initial_arrays(net, config, dtype="float32")
        learner = MetaLearner(net, make_parameters(arrays), "maml", 0.4, 2, task_chunk=2)
        found, _ = learner.batch_direction(tasks, iteration=1)
        return np.concatenate([found[k].numpy().ravel() for k in sorted(found)])

    onednn.use_kernels("fast")
    try:
        monkeypatch.setattr(ConvNet, "_activation_layout", recorded)
        with_blocks = direction()
        assert layouts and set(layouts) == {block}
        monkeypatch.setattr(ConvNet, "_activation_layout", lambda self, x, params: 1)
        without = direction()
    finally:
        onednn.use_kernels("native")
    assert registry.in_use() == "native"
    error = np.linalg.norm(with_blocks - without) / np.linalg.norm(without)
    assert error < 1e-5, f"relative error {error:.2e}"


def test_spatial_mean_reads_the_blocked_layout() -> None:
    x = np.random.default_rng(0).normal(size=(3, 32, 2, 3)).astype("float32")
    got = ops.spatial_mean(paddle.to_tensor(blocked(x, 16)), 16).numpy()
    np.testing.assert_allclose(got, x.mean(axis=(2, 3)), rtol=1e-6)


def test_plain_layout_setting_keeps_training_in_nchw(block) -> None:
    """PADDLE_MAML_FASTCONV_LAYOUT=plain means NCHW everywhere: no blocked activations either."""
    code = (
        "import paddle\nfrom metalearn.kernels import onednn\n"
        "print(onednn.load_kernels().activation_block(paddle.zeros([1])))"
    )
    env = {**os.environ, "PADDLE_MAML_FASTCONV_LAYOUT": "plain"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "1"
