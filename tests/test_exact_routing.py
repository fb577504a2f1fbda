"""The exact routing of nets/exact.py: every layer type of VERIFIED_LAYERS inside a model whose
second-order meta-gradient the audit checks against finite differences (float64), ReLU against
an independent implementation, and each routed function's values against Paddle's own."""

from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from metalearn.audit import audit
from metalearn.data.tasks import Task
from metalearn.errors import UserError
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets import exact
from metalearn.nets.layer_net import LayerNet


class ImageZoo(nn.Layer):
    """Two-dimensional layers on [N, 2, 9, 9]."""

    def __init__(self, n_way: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2D(2, 4, 3, padding="same"),  # with bias
            nn.BatchNorm2D(4),
            nn.GELU(),
            nn.MaxPool2D(3, 2, padding=1),  # 5×5, overlapping windows
            nn.Conv2D(4, 4, 3, padding=[0, 1, 1, 0], groups=4),  # depthwise, asymmetric
            nn.InstanceNorm2D(4),
            nn.ELU(),
            nn.AvgPool2D(2, 1),  # 3×4
            nn.AdaptiveMaxPool2D(3),
            nn.Conv2D(4, 4, 2, stride=1, padding=1, padding_mode="reflect", data_format="NCHW"),
            nn.AdaptiveAvgPool2D(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(16, 8),
            nn.LayerNorm(8),
            nn.Silu(),
            nn.Linear(8, n_way),
        )

    def forward(self, x):
        return self.body(x)


class SequenceZoo(nn.Layer):
    """One-dimensional layers on [N, 3, 12]."""

    def __init__(self, n_way: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1D(3, 4, 3, padding=1),
            nn.BatchNorm1D(4),
            nn.CELU(),
            nn.MaxPool1D(2),  # 6
            nn.Conv1D(4, 4, 3, stride=2, padding="same", data_format="NCL"),  # 3
            nn.Sigmoid(),
            nn.AvgPool1D(2, 1),  # 2
            nn.AdaptiveAvgPool1D(2),
            nn.Flatten(),
            nn.Softplus(),
            nn.Linear(8, 8),
            nn.Softmax(),
            nn.Tanh(),
            nn.Linear(8, n_way),
        )

    def forward(self, x):
        return self.body(x)


class TokenZoo(nn.Layer):
    """Embedding, 3-D batch norm, identity and log-softmax on [N, 1, 6] in [0, 1)."""

    def __init__(self, n_way: int):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm3D(1)
        self.flat = nn.Flatten()
        self.keep = nn.Identity()
        self.out = nn.Linear(24, n_way)
        self.log_p = nn.LogSoftmax()

    def forward(self, x):
        tokens = (x.reshape([x.shape[0], 6]) * 9.99).astype("int64")
        volume = self.norm(self.embed(tokens).reshape([x.shape[0], 1, 6, 2, 2]))
        return self.log_p(self.out(self.keep(self.flat(volume))))


ZOO = {ImageZoo: (2, 9, 9), SequenceZoo: (3, 12), TokenZoo: (1, 6)}


def types_in(model: nn.Layer) -> set[type]:
    return {type(layer) for layer in model.sublayers(include_self=True)}


def test_the_zoo_holds_every_verified_layer_type() -> None:
    """With ReLU, proven by test_relu_..., below."""
    held = set().union(*(types_in(zoo(3)) for zoo in ZOO))
    assert set(exact.VERIFIED_LAYERS) - held == {nn.ReLU, nn.LeakyReLU}


@pytest.mark.parametrize("zoo", list(ZOO), ids=lambda zoo: zoo.__name__)
def test_every_verified_layer_type_passes_the_audit(zoo) -> None:
    """Second-order meta-gradient of every parameter, 1 and 2 inner steps."""
    reports = audit(lambda: zoo(3), ZOO[zoo], 3)
    for report in reports:
        assert report.failure is None, report.failure
        assert report.checks and all(check.passed for check in report.checks), report.checks


class MaskedReLU(nn.Layer):
    """ReLU as a multiplication by its mask: an independent implementation of the same math."""

    def __init__(self, slope: float = 0.0):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        mask = (x > 0).astype(x.dtype)
        return x * (mask + self.slope * (1.0 - mask))


@pytest.mark.parametrize("layer", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["relu", "leaky"])
def test_relu_meta_gradients_equal_an_independent_implementation(layer) -> None:
    """ReLU's finite differences diverge (its derivative jumps), so its meta-gradient is
    compared with the same network written with an explicit mask."""
    paddle.set_default_dtype("float64")
    try:
        paddle.seed(0)
        model = nn.Sequential(nn.Conv2D(1, 4, 3, 2, 1), nn.BatchNorm2D(4), layer(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3))  # fmt: skip
        reference = nn.Sequential(*[model[i] for i in range(2)], MaskedReLU(getattr(
            model[2], "_negative_slope", 0.0)), *[model[i] for i in range(3, 5)])  # fmt: skip
        rng = np.random.default_rng(0)
        x, y = rng.random((6, 1, 8, 8)), np.arange(3).repeat(2)
        task = Task(x, y, rng.random((6, 1, 8, 8)), y)
        directions = []
        for net in (model, reference):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer_net = LayerNet(net)
            params = make_parameters(layer_net.init_params(0, "float64"))
            directions.append(
                MetaLearner(layer_net, params, "maml", 0.3, 2).task_direction(task)[0]
            )
        for name, value in directions[0].items():
            np.testing.assert_allclose(value.numpy(), directions[1][name].numpy(), rtol=1e-12,
                                       atol=1e-14, err_msg=name)  # fmt: skip
    finally:
        paddle.set_default_dtype("float32")


# -- values equal Paddle's -----------------------------------------------------------------------
def rand(*shape: int) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(sum(shape)).standard_normal(shape), "float64")


CONVOLUTIONS = [
    {"stride": 2, "padding": 1},
    {"padding": "same"},
    {"padding": "valid", "stride": 2},
    {"padding": [0, 1, 2, 1]},
    {"padding": [[1, 0], [2, 1]]},  # per spatial axis: (before, after)
    {"groups": 2},
    {"groups": 4, "padding": 1},  # depthwise
]


@pytest.mark.parametrize("options", CONVOLUTIONS, ids=str)
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_conv2d_values_equal_paddles(options, data_format) -> None:
    x = rand(2, 4, 7, 6) if data_format == "NCHW" else rand(2, 7, 6, 4)
    groups = options.get("groups", 1)
    weight, bias = rand(4, 4 // groups, 3, 3), rand(4)
    args = {"data_format": data_format, **options}
    if isinstance(options.get("padding"), list) and isinstance(options["padding"][0], list):
        empty = [[0, 0], [0, 0]]  # the batch and channel axes: around or before the spatial ones
        spatial = options["padding"]
        pads = [*empty, *spatial] if data_format == "NCHW" else [[0, 0], *spatial, [0, 0]]
        args["padding"] = pads
    want = F.conv2d(x, weight, bias, **args)
    np.testing.assert_allclose(exact.conv2d(x, weight, bias, **args).numpy(), want.numpy(),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("options", [{"stride": 2, "padding": 1}, {"padding": "same"},
                                     {"padding": [1, 2]}, {"groups": 3}], ids=str)  # fmt: skip
def test_conv1d_values_equal_paddles(options) -> None:
    x, weight, bias = rand(2, 3, 11), rand(6, 3 // options.get("groups", 1), 3), rand(6)
    want = F.conv1d(x, weight, bias, **options)
    np.testing.assert_allclose(exact.conv1d(x, weight, bias, **options).numpy(), want.numpy(),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1},
     {"kernel_size": [2, 3], "stride": [1, 2], "ceil_mode": True}],
    ids=str,
)  # fmt: skip
def test_max_pool2d_values_equal_paddles(options) -> None:
    x = rand(2, 3, 7, 8)
    np.testing.assert_array_equal(exact.max_pool2d(x, **options).numpy(),
                                  F.max_pool2d(x, **options).numpy())  # fmt: skip


def test_other_routed_functions_equal_paddles() -> None:
    x = rand(4, 5)
    labels = paddle.to_tensor([0, 3, 1, 4])
    soft = F.softmax(rand(4, 5))
    cases = [
        (exact.cross_entropy(x, labels), F.cross_entropy(x, labels)),
        (exact.cross_entropy(x, labels, reduction="none"), F.cross_entropy(x, labels, reduction="none")),
        (exact.cross_entropy(x, labels.unsqueeze(1), reduction="sum"),
         F.cross_entropy(x, labels.unsqueeze(1), reduction="sum")),
        (exact.cross_entropy(x, paddle.to_tensor([0, 2, 1, 2]), ignore_index=2),
         F.cross_entropy(x, paddle.to_tensor([0, 2, 1, 2]), ignore_index=2)),
        (exact.cross_entropy(x, soft, soft_label=True), F.cross_entropy(x, soft, soft_label=True)),
        (exact.cross_entropy(x, labels, label_smoothing=0.1),
         F.cross_entropy(x, labels, label_smoothing=0.1)),
        (exact.cross_entropy(x.t(), labels, axis=0), F.cross_entropy(x.t(), labels, axis=0)),
        (exact.log_softmax(x, 0), F.log_softmax(x, 0)),
        (exact.softmax(x), F.softmax(x)),
        (exact.gelu(x), F.gelu(x)),
        (exact.gelu(x, True), F.gelu(x, True)),
        (exact.layer_norm(rand(2, 3, 4), [3, 4], rand(12), rand(1, 12)),
         F.layer_norm(rand(2, 3, 4), [3, 4], rand(12), rand(1, 12).flatten())),
        (exact.embedding(paddle.to_tensor([[1, 2], [0, 1]]), x),
         F.embedding(paddle.to_tensor([[1, 2], [0, 1]]), x)),
        (exact.flatten(rand(2, 3, 4), 1), paddle.flatten(rand(2, 3, 4), 1)),
        (exact.dropout(x, 0.5, training=False), x),
        (exact.batch_norm(rand(3, 5, 2), rand(5).abs(), rand(5).abs(), rand(5), rand(5)),
         F.batch_norm(rand(3, 5, 2), rand(5).abs(), rand(5).abs(), rand(5), rand(5))),
        (exact.batch_norm(rand(3, 2, 5), rand(5), rand(5).abs(), training=True, data_format="NLC"),
         F.batch_norm(rand(3, 2, 5), rand(5), rand(5).abs(), training=True, data_format="NLC")),
    ]  # fmt: skip
    for index, (ours, theirs) in enumerate(cases):
        assert ours.shape == theirs.shape, index
        # 1e-7: Paddle keeps label smoothing's ε as a float32 attribute (4e-8 off); others: 1e-12
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-7, atol=1e-12,
                                   err_msg=str(index))  # fmt: skip


def test_dropout_keeps_the_expected_share_and_scales() -> None:
    out = exact.dropout(paddle.ones([20000], "float64"), 0.25)
    values = set(np.unique(out.numpy()).round(6))
    assert values == {0.0, round(1 / 0.75, 6)}
    assert abs((out.numpy() == 0).mean() - 0.25) < 0.02


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: exact.conv2d(rand(1, 2, 5, 5), rand(2, 2, 3, 3), dilation=2), "dilated"),
        (lambda: exact.conv2d(rand(1, 2, 5, 5), rand(2, 2, 3, 3), stride=[1, 2]), "unequal"),
        (lambda: exact.max_pool2d(rand(1, 2, 4, 4), 2, return_mask=True), "return_mask"),
        (lambda: exact.cross_entropy(rand(2, 3), paddle.to_tensor([0, 1]), weight=rand(3)),
         "class weights"),
        (lambda: exact.embedding(paddle.to_tensor([1]), rand(3, 2), padding_idx=0), "padding_idx"),
    ],
    ids=["dilation", "strides", "return_mask", "weight", "padding_idx"],
)  # fmt: skip
def test_what_is_not_computed_exactly_is_refused_clearly(call, fragment) -> None:
    with pytest.raises(UserError, match=fragment):
        call()
