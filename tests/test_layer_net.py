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
from metalearn.kernels import onednn
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


def test_a_stacked_task_chunk_is_refused_until_the_model_proved_it_stacks() -> None:
    net = LayerNet(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="one task at a time"):
        MetaLearner(net, make_parameters(net.init_params(0)), "maml", 0.1, 1, task_chunk=4)
    net.check_sample(paddle.rand([3, 2]), 2)
    assert net.stacks_tasks
    MetaLearner(net, make_parameters(net.init_params(0)), "maml", 0.1, 1, task_chunk=4)


class Sequence1D(nn.Layer):
    """Conv1D, batch norm, max-pool, layer norm, dropout and GELU before a linear head: every
    stacked form of the exact routes (nets/exact.py) on sequences [N, C, L]."""

    def __init__(self, n_way: int, length: int = 12):
        super().__init__()
        self.conv = nn.Conv1D(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm1D(3)
        self.pool = nn.MaxPool1D(2)
        self.layer_norm = nn.LayerNorm(3 * length // 2)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(3 * length // 2, n_way)

    def forward(self, x):
        x = self.pool(nn.functional.relu(self.norm(self.conv(x))))
        return self.head(self.drop(nn.functional.gelu(self.layer_norm(x.flatten(1)))))


def sequence_tasks(count: int, n_way: int = 3) -> list[Task]:
    rng = np.random.default_rng(2)
    labels = np.arange(n_way)
    return [
        Task(rng.random((n_way, 2, 12)), labels, rng.random((2 * n_way, 2, 12)), labels.repeat(2))
        for _ in range(count)
    ]


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize(
    "build, batch",
    [
        (lambda: OmniglotNet(5, hidden=4), lambda: tasks(5)),
        (lambda: Sequence1D(3), lambda: sequence_tasks(5)),
    ],
    ids=["omniglot copy", "sequences"],
)
def test_stacked_tasks_of_a_user_layer_equal_tasks_one_at_a_time(float64, build, batch, adapt):
    """After check_sample, chunks of 2, 2, 1 stacked tasks give each task's own second-order
    direction and statistics (2 inner steps; ANIL too). The model is in evaluation mode:
    dropout draws no masks, so both sides compute the same function."""
    model = build()
    model.eval()
    examples = batch()
    net = LayerNet(model)
    net.check_sample(paddle.to_tensor(examples[0].x_support))
    assert net.stacks_tasks
    learner = MetaLearner(net, make_parameters(net.init_params(0, "float64")), "maml", 0.3, 2,
                          adapt=adapt)  # fmt: skip
    found = []
    for chunk in (2, 1):
        learner.task_chunk = chunk
        direction, stats = learner.batch_direction(examples, track_steps=True)
        found.append(({k: v.numpy() for k, v in direction.items()}, stats))
    (stacked, stacked_stats), (single, single_stats) = found
    for name, want in single.items():
        assert np.abs(want).max() > 0 or adapt == "head", name
        np.testing.assert_allclose(stacked[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
    for a, b in zip(stacked_stats, single_stats):
        assert a.loss == pytest.approx(b.loss, rel=1e-10)
        np.testing.assert_allclose(a.metric_per_step, b.metric_per_step)


class FixedReshape(nn.Layer):
    """Flattens by a fixed size: stacked tasks would run as one task of twice the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(1, 2, 3, 2, 1)
        self.head = nn.Linear(2 * 14 * 14, 3)

    def forward(self, x):
        return self.head(self.conv(x).reshape([-1, 2 * 14 * 14]))


class MixesSamples(nn.Layer):
    """Centres each feature over the batch's samples with its own op: tasks' samples would mix."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x - x.mean(axis=0, keepdim=True).mean(axis=1, keepdim=True))


@pytest.mark.parametrize(
    "model, x",
    [
        (FixedReshape(), paddle.rand([4, 1, 28, 28])),
        (MixesSamples(), paddle.rand([4, 4])),
        (recurrent((1, 4, 4), 3), None),
    ],
    ids=["fixed reshape", "mixes samples", "exact off"],
)
def test_a_model_that_does_not_compute_stacked_tasks_runs_one_at_a_time(model, x) -> None:
    net = LayerNet(model, exact=x is not None)
    if x is None:  # without the exact routes nothing is stacked, whatever the model
        net, x = LayerNet(nn.Linear(4, 3), exact=False), paddle.rand([4, 4])
    net.check_sample(x, 3)
    assert not net.stacks_tasks and net.default_task_chunk == 1


def test_a_conv1d_runs_on_the_fast_kernels_build_as_on_paddles() -> None:
    """The oneDNN operator computes square kernels only: a Conv1D (a 1×k convolution) falls
    back to Paddle's kernels, inside the same exact construction, with the fast kernels on."""
    model = Sequence1D(3)
    x = paddle.rand([6, 2, 12])
    net = LayerNet(model)
    outputs = []
    for kernels in ("native", "fast"):
        onednn.use_kernels(kernels)
        leaves = {k: v.detach() for k, v in net.parameters().items()}
        for leaf in leaves.values():
            leaf.stop_gradient = False
        model.eval()
        out = net.forward(x, leaves)
        inner = paddle.grad(out.square().sum(), list(leaves.values()), create_graph=True)
        second = paddle.grad(sum(g.square().sum() for g in inner), list(leaves.values()))
        outputs.append([out.numpy(), *(g.numpy() for g in second)])
    onednn.use_kernels("fast")
    scale = max(np.abs(native).max() for native in outputs[0])  # the conv bias's are ~0 (BN)
    for native, fast in zip(*outputs):
        np.testing.assert_allclose(fast, native, rtol=1e-4, atol=1e-4 * scale)


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
