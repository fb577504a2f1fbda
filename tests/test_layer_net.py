"""A user's Layer through LayerNet: the same meta-gradient as the built-in network it copies,
functional calls that substitute and restore parameters, and the checks on a sample batch."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from user_models import OmniglotNet, as_user_arrays, recurrent

from metalearn.data.tasks import Task
from metalearn.errors import UserError
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets import exact
from metalearn.nets.builtin import ConvNet
from metalearn.nets.functional import FunctionalLayer, functional_call
from metalearn.nets.layer_net import LayerNet, UnverifiedLayerWarning


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


def tasks(count: int, seed: int = 1) -> list[Task]:
    rng = np.random.default_rng(seed)
    labels = np.arange(5)
    return [
        Task(rng.random((5, 1, 28, 28)), labels, rng.random((10, 1, 28, 28)), labels.repeat(2))
        for _ in range(count)
    ]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("count", [1, 3], ids=["one task", "meta-batch of 3"])
def test_a_user_copy_of_the_omniglot_net_has_the_built_in_meta_gradient(
    float64, steps, count
) -> None:
    """nn.Conv2D (stride 2, padding 1, no bias), nn.BatchNorm2D, nn.ReLU, spatial mean,
    nn.Linear with the built-in ConvNet's weights: the same second-order meta-gradient to
    1e-10; the built-in stacks the meta-batch into one computation, LayerNet sums its tasks."""
    builtin = ConvNet(5, hidden=8)
    arrays = builtin.init_params(seed=0, dtype="float64")
    model = OmniglotNet(5, hidden=8)
    batch = tasks(count)
    ours = MetaLearner(builtin, make_parameters(arrays), "maml", 0.4, steps, task_chunk=count)
    expected, _ = ours.batch_direction(batch)
    net = LayerNet(model, 5, (1, 28, 28))
    user = MetaLearner(net, make_parameters(as_user_arrays(model, arrays)), "maml", 0.4, steps)
    found, _ = user.batch_direction(batch)
    for (name, want), got in zip(expected.items(), found.values()):
        want, got = want.numpy(), got.numpy()
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), name


def test_without_the_exact_routing_the_copy_gets_paddles_wrong_meta_gradient(float64) -> None:
    """The same model on Paddle's own double-grads (the first convolution's is wrong)."""
    builtin = ConvNet(5, hidden=8)
    arrays = builtin.init_params(seed=0, dtype="float64")
    model = OmniglotNet(5, hidden=8)
    expected, _ = MetaLearner(builtin, make_parameters(arrays), "maml", 0.4, 1).task_direction(
        tasks(1)[0]
    )
    net = LayerNet(model, exact=False)
    user = MetaLearner(net, make_parameters(as_user_arrays(model, arrays)), "maml", 0.4, 1)
    found, _ = user.task_direction(tasks(1)[0])
    want, got = expected["conv0.weight"].numpy(), found["body.0.weight"].numpy()
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


def test_functional_call_substitutes_and_restores_and_gradients_flow() -> None:
    layer = nn.Linear(3, 2)
    own = layer.weight
    weight = paddle.ones([3, 2])
    weight.stop_gradient = False
    out = functional_call(layer, {"weight": weight, "bias": paddle.zeros([2])}, paddle.ones([1, 3]))
    np.testing.assert_allclose(out.numpy(), [[3.0, 3.0]])
    assert layer.weight is own
    (grad,) = paddle.grad(out.sum(), weight)
    np.testing.assert_allclose(grad.numpy(), np.ones([3, 2]))
    with pytest.raises(ZeroDivisionError), FunctionalLayer(layer).substituted({"weight": weight}):
        raise ZeroDivisionError
    assert layer.weight is own
    with pytest.raises(KeyError, match="no parameter or buffer"):
        functional_call(layer, {"nope": weight}, paddle.ones([1, 3]))


def test_functional_call_substitutes_a_tied_weight_everywhere() -> None:
    first = nn.Linear(2, 2, bias_attr=False)
    second = nn.Linear(2, 2, bias_attr=False)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    assert [name for name, _ in model.named_parameters()] == ["0.weight"]
    out = functional_call(model, {"0.weight": 2 * paddle.eye(2)}, paddle.ones([1, 2]))
    np.testing.assert_allclose(out.numpy(), [[4.0, 4.0]])


def test_batch_norm_statistics_are_parameters_of_paddle_but_not_meta_parameters() -> None:
    model = nn.Sequential(nn.Conv2D(1, 2, 3), nn.BatchNorm2D(2))
    assert LayerNet(model).functional.parameter_names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]


def test_routing_restores_paddles_functions_and_layers() -> None:
    model = OmniglotNet(5, hidden=4)
    before = (paddle.nn.functional.conv2d, paddle.flatten, paddle.Tensor.flatten)
    net = LayerNet(model)
    net.forward(paddle.rand([2, 1, 28, 28]), net.parameters())
    assert (paddle.nn.functional.conv2d, paddle.flatten, paddle.Tensor.flatten) == before
    assert all("forward" not in vars(layer) for layer in model.sublayers(include_self=True))
    assert not exact._patched


def test_the_head_is_the_last_layer_with_parameters_and_anil_uses_its_input(float64) -> None:
    model = OmniglotNet(3, hidden=4)
    net = LayerNet(model)
    assert net.head_names == ("head.weight", "head.bias")
    x, params = paddle.rand([4, 1, 28, 28]), net.parameters()
    features = net.features(x, params)
    assert features.shape == [4, 4]
    np.testing.assert_allclose(net.head(features, params).numpy(), net.forward(x, params).numpy())


def test_anil_refuses_a_model_that_changes_the_heads_output() -> None:
    class Scaled(nn.Layer):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return 2 * self.head(x)

    net = LayerNet(Scaled())
    with pytest.raises(UserError, match="last parameterised sublayer"):
        net.features(paddle.rand([3, 4]), net.parameters())


def test_an_unverified_layer_type_gives_one_warning_naming_it_and_the_audit() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LayerNet(nn.Sequential(nn.Linear(4, 4), nn.Hardswish(), nn.PReLU(), nn.Linear(4, 2)))
        LayerNet(OmniglotNet(2, hidden=4))
    assert len(caught) == 1 and caught[0].category is UnverifiedLayerWarning
    message = str(caught[0].message)
    assert "nn.Hardswish" in message and "nn.PReLU" in message
    assert "python -m metalearn.audit" in message


def test_a_layer_that_keeps_its_own_weights_is_refused_on_a_sample_batch() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedLayerWarning)
        net = LayerNet(recurrent((1, 4, 4), 2))
    with pytest.raises(UserError, match=r"gru\.weight_ih_l0.*nn\.GRU"):
        net.check_sample(paddle.rand([2, 1, 4, 4]), 2)


def test_a_stacked_task_chunk_is_refused() -> None:
    net = LayerNet(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="one task at a time"):
        MetaLearner(net, make_parameters(net.init_params(0)), "maml", 0.1, 1, task_chunk=4)


def test_concurrent_calls_on_one_layer_each_see_their_own_weights() -> None:
    """The substitution is serialised per Layer; the routes are counted across threads."""
    net = LayerNet(OmniglotNet(3, hidden=4))
    x = paddle.rand([4, 1, 28, 28])
    weights = [{k: v * (1.0 + 0.1 * i) for k, v in net.parameters().items()} for i in range(4)]
    with paddle.no_grad():
        expected = [net.forward(x, w).numpy() for w in weights]
        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(lambda w: [net.forward(x, w).numpy() for _ in range(5)], weights))
    for want, outs in zip(expected, found):
        for out in outs:
            np.testing.assert_array_equal(out, want)
    assert not exact._patched
