"""The MiniImagenet network (PoolConvNet), its exact max-pool, and ConvNet at other image shapes.

Max-pooling is piecewise linear, so finite differences are valid only while no window's maximum
changes place: metalearn.learning.gradcheck checks that, and the independent checks (Paddle's own
first-order max-pool, PyTorch's second-order meta-gradient) need no smoothness at all.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from metalearn.data.tasks import Task
from metalearn.errors import UserError
from metalearn.kernels import onednn, ops
from metalearn.kernels.registry import NativeKernels
from metalearn.learning.gradcheck import meta_gradient_error, tiny_problem
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import ConvNet, PoolConvNet, build_network


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


def _tensor(array: np.ndarray, grad: bool = False) -> paddle.Tensor:
    return paddle.to_tensor(array, stop_gradient=not grad)


def _hvp_objective(pooled: paddle.Tensor, weights: paddle.Tensor) -> paddle.Tensor:
    """A smooth function of the pooled values, so that all curvature comes through the pool."""
    return (paddle.tanh(pooled) * weights).sum()


def test_max_pool_matches_paddle_forward_and_first_derivative(float64) -> None:
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((2, 3, 9, 10))  # odd height: the last row is dropped
    weights = _tensor(rng.standard_normal((2, 3, 4, 5)))
    ours_x, ref_x = _tensor(x_np, True), _tensor(x_np, True)
    ours, ref = ops.max_pool2x2(ours_x), F.max_pool2d(ref_x, 2, 2)
    assert ours.shape == [2, 3, 4, 5]
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())
    (ours_grad,) = paddle.grad(_hvp_objective(ours, weights), ours_x)
    (ref_grad,) = paddle.grad(_hvp_objective(ref, weights), ref_x)
    np.testing.assert_allclose(ours_grad.numpy(), ref_grad.numpy(), rtol=0, atol=1e-15)
    assert not ours_grad.numpy()[:, :, 8, :].any()  # the dropped row receives nothing


def test_max_pool_second_derivative_matches_differences_of_paddle_gradients(float64) -> None:
    """Hessian-vector product through our pool vs finite differences of the gradients of Paddle's
    own (first-order) max_pool2d: an implementation that shares no code with ours."""
    rng = np.random.default_rng(1)
    x_np, v_np = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3, 8, 8))
    weights = _tensor(rng.standard_normal((2, 3, 4, 4)))
    x = _tensor(x_np, True)
    (grad,) = paddle.grad(_hvp_objective(ops.max_pool2x2(x), weights), x, create_graph=True)
    (hvp,) = paddle.grad((grad * _tensor(v_np)).sum(), x)

    def paddle_gradient(point: np.ndarray) -> np.ndarray:
        y = _tensor(point, True)
        return paddle.grad(_hvp_objective(F.max_pool2d(y, 2, 2), weights), y)[0].numpy()

    eps = 1e-6
    with ops.recording_pool_indices() as indices:  # the finite step must not move any maximum
        for point in (x_np, x_np + eps * v_np, x_np - eps * v_np):
            ops.max_pool2x2(_tensor(point))
    assert all(np.array_equal(indices[0], other) for other in indices[1:])
    numeric = (paddle_gradient(x_np + eps * v_np) - paddle_gradient(x_np - eps * v_np)) / (2 * eps)
    assert np.abs(hvp.numpy()).max() > 0.1
    np.testing.assert_allclose(hvp.numpy(), numeric, rtol=0, atol=1e-8)


def test_max_pool_tie_sends_the_gradient_to_the_first_maximum() -> None:
    x = _tensor(np.ones((1, 1, 2, 2), dtype="float32"), True)
    (grad,) = paddle.grad(ops.max_pool2x2(x).sum(), x)
    np.testing.assert_array_equal(grad.numpy()[0, 0], [[1, 0], [0, 0]])


@pytest.mark.parametrize("steps", [1, 2])
def test_pool_net_meta_gradient_matches_finite_differences(steps: int) -> None:
    assert meta_gradient_error("pool", steps) < 1e-5


def test_pool_finite_difference_check_avoids_a_moving_maximum() -> None:
    """With this learning rate a window's maximum moves within a step of 1e-5 (the plain
    difference is then off by about 4%); the check must notice and use a smaller step."""
    assert meta_gradient_error("pool", 2, inner_lr=0.1, eps=1e-5) < 1e-5


def test_pool_finite_difference_check_detects_a_first_order_gradient(float64) -> None:
    net, task = tiny_problem("pool")
    arrays = net.init_params(0, dtype="float64")
    maml = MetaLearner(net, make_parameters(arrays), "maml", 0.5, 1).task_direction(task)[0]
    fomaml = MetaLearner(net, make_parameters(arrays), "fomaml", 0.5, 1).task_direction(task)[0]
    diff = sum(float(((maml[k] - fomaml[k]) ** 2).sum()) for k in arrays)
    norm = sum(float((maml[k] ** 2).sum()) for k in arrays)
    assert diff / norm > 1e-4


def _torch_meta_gradient(net: PoolConvNet, arrays, task: Task, inner_lr: float, steps: int):
    """The same network and second-order MAML in PyTorch (float64): conv2d, batch_norm, relu,
    max_pool2d and flatten are all PyTorch's own, with their own double derivatives."""
    torch = pytest.importorskip("torch", reason="PyTorch (requirements-bench.txt) not installed")
    tf = torch.nn.functional

    def forward(x, p):
        for block in range(net.blocks):
            x = tf.conv2d(x, p[f"conv{block}.weight"], padding=1)
            x = tf.batch_norm(
                x, None, None, p[f"bn{block}.scale"], p[f"bn{block}.shift"], True, eps=net.bn_eps
            )
            x = tf.max_pool2d(torch.relu(x), 2)  # the paper's order: activation, then pool
        return torch.flatten(x, 1) @ p["head.weight"] + p["head.bias"]

    theta = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    x_s, y_s = torch.tensor(task.x_support), torch.tensor(task.y_support)
    weights = theta
    for _ in range(steps):
        loss = tf.cross_entropy(forward(x_s, weights), y_s)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {k: w - inner_lr * g for (k, w), g in zip(weights.items(), grads)}
    query = tf.cross_entropy(
        forward(torch.tensor(task.x_query), weights), torch.tensor(task.y_query)
    )
    return dict(zip(theta, (g.numpy() for g in torch.autograd.grad(query, list(theta.values())))))


@pytest.mark.parametrize("steps", [1, 2])
def test_pool_net_meta_gradient_matches_pytorch(float64, steps: int) -> None:
    """The ReLU network (not smooth, so no finite differences) against an independent
    implementation of the same mathematics."""
    net = PoolConvNet(n_way=3, image_size=18, filters=4)
    rng = np.random.default_rng(5)
    labels = np.arange(3).repeat(2)
    task = Task(rng.random((6, 3, 18, 18)), labels, rng.random((6, 3, 18, 18)), labels)
    arrays = net.init_params(2, dtype="float64")
    expected = _torch_meta_gradient(net, arrays, task, 0.5, steps)
    ours, _ = MetaLearner(net, make_parameters(arrays), "maml", 0.5, steps).task_direction(task)
    fomaml, _ = MetaLearner(net, make_parameters(arrays), "fomaml", 0.5, steps).task_direction(task)
    for name, want in expected.items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(
            ours[name].numpy(), want, rtol=0, atol=1e-9 * scale, err_msg=name
        )
    first = "conv0.weight"  # the comparison can tell second order from first order
    assert (
        np.abs(fomaml[first].numpy() - expected[first]).max() > 1e-3 * np.abs(expected[first]).max()
    )


def test_pool_net_at_miniimagenet_shape() -> None:
    net = PoolConvNet(n_way=5)
    assert net.pooled_size() == 5  # 84 -> 42 -> 21 -> 10 -> 5
    arrays = net.init_params(0)
    assert arrays["head.weight"].shape == (800, 5)
    assert arrays["conv0.weight"].shape == (32, 3, 3, 3)
    x = np.random.default_rng(0).random((2, 3, 84, 84)).astype("float32")
    logits = net.forward(_tensor(x), make_parameters(arrays))
    assert logits.shape == [2, 5] and np.isfinite(logits.numpy()).all()
    with pytest.raises(ValueError, match="expects images"):
        net.forward(_tensor(x[:, :, :80, :80]), make_parameters(arrays))


def test_pool_net_refuses_images_too_small_for_its_pools() -> None:
    with pytest.raises(UserError, match="too small"):
        PoolConvNet(n_way=5, image_size=15)
    assert PoolConvNet(n_way=5, image_size=16).pooled_size() == 1


def test_build_network_rebuilds_every_kind() -> None:
    pool = PoolConvNet(n_way=4, in_channels=1, image_size=32, filters=8)
    conv = ConvNet(n_way=5, in_channels=3, image_size=84)
    for net in (pool, conv, ConvNet(n_way=5)):
        assert build_network(net.config()).config() == net.config()
    assert build_network(pool.config()).init_params(0)["head.weight"].shape == (8 * 2 * 2, 4)
    old = {k: v for k, v in ConvNet(n_way=5).config().items() if k != "kind"}
    assert isinstance(build_network(old), ConvNet)  # configs from before "kind" existed


def test_conv_net_config_of_omniglot_runs_is_unchanged() -> None:
    """Checkpoints compare configs key by key: Omniglot runs saved before image_size existed
    must still match, other sizes must not."""
    assert "image_size" not in ConvNet(n_way=5).config()
    assert ConvNet(n_way=5, image_size=84).config()["image_size"] == 84


def test_conv_net_runs_on_colour_images_of_another_size() -> None:
    net = ConvNet(n_way=5, in_channels=3, image_size=40)
    arrays = net.init_params(0)
    assert arrays["conv0.weight"].shape == (64, 3, 3, 3)
    x = np.random.default_rng(0).random((5, 3, 40, 40)).astype("float32")
    assert net.forward(_tensor(x), make_parameters(arrays)).shape == [5, 5]


@pytest.mark.parametrize(
    "shape", [[5, 3, 84, 84], [5, 32, 42, 42], [75, 32, 21, 21], [5, 32, 10, 10]]
)
def test_fast_kernels_match_native_on_pool_net_shapes(shape) -> None:
    """The oneDNN kernels (tuned on Omniglot's shapes) at the pool net's stride 1 / padding 1."""
    kernels = onednn.load_kernels()
    if kernels is None:
        pytest.skip("oneDNN fast path unavailable (see the warning on stderr)")
    rng = np.random.default_rng(0)
    x = _tensor(rng.standard_normal(shape).astype("float32"))
    w = _tensor(rng.standard_normal([32, shape[1], 3, 3]).astype("float32") / 3)
    native = NativeKernels()
    y = kernels.forward(x, w, 1, 1)
    dy = _tensor(rng.standard_normal(y.shape).astype("float32"))
    pairs = [(y, native.forward(x, w, 1, 1))]
    pairs += list(zip(kernels.backward(x, w, dy, 1, 1), native.backward(x, w, dy, 1, 1)))
    for got, want in pairs:
        assert got.shape == want.shape
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-4 * scale
