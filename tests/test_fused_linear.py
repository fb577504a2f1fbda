"""The fused ReLU network (ops.relu_network, the sinusoid MLP's path with the fast kernels)
computes the composed layers' function: values, first and second derivatives, and MAML
meta-gradients, for stacked and single tasks.

Two fused paths are checked: the hand-written backward and double-backward sweeps on Paddle's
own ops in float64 (a kernel set that fuses everything, so the sweeps are held to 1e-10), and
the C++ loops of the fast kernels in float32 against the float64 composition."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import SinusoidTasks, Task
from metalearn.kernels import onednn, ops, registry
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import MLP

SIZES = (2, 5, 4, 3)


class _FusingNative(registry.NativeKernels):
    """Paddle's kernels, but relu_network takes the fused path for any dtype."""

    def fuses_linear(self, *tensors) -> bool:
        return True


@pytest.fixture()
def restore_kernels():
    previous, kind = registry.active(), registry.in_use()
    yield
    registry.install(previous, kind)


@pytest.fixture(scope="module")
def fast_kernels():
    kernel = onednn.load_kernels()
    if kernel is None:
        pytest.skip("the fast kernels could not be built here")
    return kernel


def network_arrays(stacked: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Input, target and weights of a SIZES network (3 tasks when stacked), float64."""
    rng = np.random.default_rng(seed)
    tasks = (3,) if stacked else ()
    arrays = {"x": rng.normal(size=(*tasks, 6, SIZES[0])), "y": rng.normal(size=(*tasks, 6, 3))}
    for layer, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        arrays[f"w{layer}"] = rng.normal(size=(*tasks, fan_in, fan_out))
        arrays[f"b{layer}"] = rng.normal(size=(*tasks, fan_out)) * 0.5
    return arrays


def derivatives(arrays: dict[str, np.ndarray], dtype: str, x_grad: bool) -> list[np.ndarray]:
    """Network output, the gradients of a squared loss (for x too if ``x_grad``), and the
    gradients of a query loss after one SGD step plus a term in the input gradient: what
    second-order MAML differentiates."""
    tensors = {k: paddle.to_tensor(v.astype(dtype), stop_gradient=False) for k, v in arrays.items()}
    x, y = tensors["x"], tensors["y"]
    x.stop_gradient, y.stop_gradient = not x_grad, True
    weights = [tensors[f"w{k}"] for k in range(len(SIZES) - 1)]
    biases = [tensors[f"b{k}"] for k in range(len(SIZES) - 1)]
    params = [*weights, *biases]
    wrt = params + ([x] if x_grad else [])
    out = ops.relu_network(x, weights, biases)
    grads = paddle.grad(((out - y) ** 2).sum(), wrt, create_graph=True)
    adapted = [p - 0.1 * g for p, g in zip(params, grads)]
    count = len(weights)
    query = ops.relu_network(x * 0.5, adapted[:count], adapted[count:])
    meta = ((query - y) ** 2).sum() + sum((g * g).sum() for g in grads[len(params) :])
    meta_grads = paddle.grad(meta, wrt)
    return [t.numpy().astype("float64") for t in (out, *grads, *meta_grads)]


def assert_outputs_close(got: list[np.ndarray], want: list[np.ndarray], tolerance: float) -> None:
    """Each output's max error relative to its reference's largest value below ``tolerance``."""
    for index, (value, reference) in enumerate(zip(got, want)):
        error = np.abs(value - reference).max() / np.abs(reference).max()
        assert error < tolerance, f"output {index}: relative error {error:.2e}"


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("x_grad", [False, True])
def test_fused_sweeps_equal_the_composition_in_float64(restore_kernels, stacked, x_grad) -> None:
    arrays = network_arrays(stacked)
    registry.install(registry.NativeKernels(), "native")
    reference = derivatives(arrays, "float64", x_grad)
    registry.install(_FusingNative(), "native")
    fused = derivatives(arrays, "float64", x_grad)
    assert_outputs_close(fused, reference, 1e-10)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("x_grad", [False, True])
def test_fast_kernels_equal_the_float64_composition(
    restore_kernels, fast_kernels, stacked, x_grad
) -> None:
    arrays = network_arrays(stacked, seed=1)
    registry.install(registry.NativeKernels(), "native")
    reference = derivatives(arrays, "float64", x_grad)
    registry.install(fast_kernels, "fast")
    assert fast_kernels.fuses_linear(paddle.ones([2, 2])), "float32 CPU must take the fused path"
    fused = derivatives(arrays, "float32", x_grad)
    assert_outputs_close(fused, reference, 1e-5)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("with_x", [False, True])
@pytest.mark.parametrize("sizes", [(1, 40, 40, 1), (9, 13, 5), (3, 8), (2, 24, 17, 16, 3)])
def test_fast_network_passes_equal_paddles(fast_kernels, stacked, with_x, sizes) -> None:
    """Each pass of the C++ operators against the same pass composed of Paddle operators
    (NativeKernels, float32): the sinusoid MLP's widths (1-wide first and last layers), widths
    off the 8-wide vectors, one layer, four layers."""
    rng = np.random.default_rng(len(sizes))
    tasks = (4,) if stacked else ()

    def tensor(*shape):
        return paddle.to_tensor(rng.normal(size=(*tasks, *shape)).astype("float32"))

    x = tensor(10, sizes[0])
    params = [t for a, b in zip(sizes[:-1], sizes[1:]) for t in (tensor(a, b), tensor(b))]
    grad_out = tensor(10, sizes[-1])
    cotangents = ([tensor(10, sizes[0])] if with_x else []) + [
        paddle.to_tensor(rng.normal(size=p.shape).astype("float32")) for p in params
    ]
    native = registry.NativeKernels()
    results = []
    for kernel in (fast_kernels, native):
        out, state = kernel.relu_network_forward(x, params)
        grads, grad_zs = kernel.relu_network_backward(x, params, state, grad_out, with_x)
        double = kernel.relu_network_double_backward(x, params, state, grad_zs, cotangents, with_x)
        results.append([out, *grads, *double])
    assert len(results[0]) == len(results[1]) == 2 + 2 * len(cotangents)
    for got, want in zip(*results):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def sinusoid_meta_gradient(dtype: str, steps: int) -> dict[str, np.ndarray]:
    """The summed second-order MAML direction of 5 stacked sinusoid tasks on the paper's MLP."""
    net = MLP()
    params = make_parameters(net.init_params(3, dtype))
    learner = MetaLearner(net, params, "maml", 0.01, steps)
    sampler = SinusoidTasks(10, 10)
    tasks = [sampler.sample(0, "test", 0, i) for i in range(5)]
    tasks = [Task(*(np.asarray(a, dtype) for a in vars(task).values())) for task in tasks]
    direction, _ = learner.batch_direction(tasks)
    return {k: v.numpy().astype("float64") for k, v in direction.items()}


@pytest.mark.parametrize("steps", [1, 2])
def test_fused_maml_meta_gradient_equals_the_composed_one(
    restore_kernels, fast_kernels, steps
) -> None:
    registry.install(registry.NativeKernels(), "native")
    reference = sinusoid_meta_gradient("float64", steps)
    registry.install(fast_kernels, "fast")
    fused = sinusoid_meta_gradient("float32", steps)
    for name, want in reference.items():
        error = np.abs(fused[name] - want).max() / np.abs(want).max()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
