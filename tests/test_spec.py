"""Model specs (metalearn/nets/spec.py): valid ones build the shapes their arithmetic predicts, every
bad one is refused in one line naming the layer, and a saved spec rebuilds the same model."""

from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest
from conftest import REPO_ROOT

from metalearn.errors import UserError
from metalearn.nets.builtin import ConvNet
from metalearn.nets.spec import (
    LAYER_NAMES,
    MAX_SPEC_BYTES,
    VOCABULARY,
    build_from_spec,
    count_parameters,
    load_spec_file,
    parse_spec,
    resolve_spec,
    save_spec_file,
    validate_spec,
)
from metalearn.service.app import SPEC_EXAMPLE

OMNIGLOT = (1, 28, 28)
CONVNET = json.loads((REPO_ROOT / "examples" / "omniglot_convnet.json").read_text())
"""The paper's Omniglot network (metalearn.nets.builtin.ConvNet) as a spec, as the example ships it."""

EXAMPLE = SPEC_EXAMPLE["model"]
"""The service's documented example."""


def trainable(model: paddle.nn.Layer) -> dict[str, list[int]]:
    """Names and shapes of the parameters that learn (batch norm statistics left out)."""
    return {n: list(p.shape) for n, p in model.named_parameters() if not p.stop_gradient}


def error_of(call, *args) -> str:
    with pytest.raises(UserError) as raised:
        call(*args)
    message = str(raised.value)
    assert "\n" not in message and message, message
    return message


# -- valid specs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_way", [5, 20])
def test_the_omniglot_convnet_spec_matches_the_builtin_network(n_way) -> None:
    paddle.seed(0)
    model = build_from_spec(CONVNET, OMNIGLOT, n_way)
    assert list(model(paddle.randn([3, *OMNIGLOT])).shape) == [3, n_way]
    builtin = ConvNet(n_way).init_params(0)
    assert count_parameters(CONVNET, OMNIGLOT, n_way) == sum(a.size for a in builtin.values())
    assert sum(math.prod(shape) for shape in trainable(model).values()) == sum(
        a.size for a in builtin.values()
    )
    assert trainable(model) == {
        **{f"{3 * b}.weight": [64, 1 if b == 0 else 64, 3, 3] for b in range(4)},
        **{f"{3 * b + 1}.{p}": [64] for b in range(4) for p in ("weight", "bias")},
        "13.weight": [64, n_way],  # Paddle's Linear weight is [in, out]
        "13.bias": [n_way],
    }
    statistics = [n for n, p in model.named_parameters() if p.stop_gradient]
    assert statistics == [f"{3 * b + 1}.{s}" for b in range(4) for s in ("_mean", "_variance")]


EVERY_LAYER = [
    ((3, 20, 20), EXAMPLE),
    (
        (3, 20, 20),
        [
            {"name": "Conv2D", "out_channels": 8, "kernel_size": [3, 5], "padding": [1, 2]},
            {"name": "batchnorm2d", "affine": False},
            {"name": "LeakyReLU", "negative_slope": 0.2},
            {"name": "AvgPool2d", "kernel_size": 3, "stride": 2, "padding": 1},
            {"name": "ELU", "alpha": 0.5},
            {"name": "MaxPool2d", "kernel_size": [2, 3], "stride": 1},
            {"name": "GELU", "approximate": "tanh"},
            {"name": "AdaptiveAvgPool2D", "output_size": [1, 1]},
            {"name": "Flatten"},
            {"name": "LayerNorm"},
            {"name": "Dropout", "p": 0.1},
            {"name": "Linear", "in_features": 8, "out_features": 16, "bias": False},
            {"name": "BatchNorm1d"},
            {"name": "Softplus", "beta": 2, "threshold": 10},
            {"name": "Sigmoid"},
            {"name": "Linear", "out_features": "n_way"},
        ],
    ),
    (
        (2, 30),
        [
            {"name": "Conv1d", "out_channels": 6, "kernel_size": 5, "stride": 2},
            {"name": "BatchNorm1d"},
            {"name": "Tanh"},
            {"name": "LayerNorm", "normalized_shape": 13, "elementwise_affine": False},
            {"name": "Conv1d", "in_channels": 6, "out_channels": "n_way", "kernel_size": 3},
            {"name": "GlobalAvgPool"},
        ],
    ),
    (
        (7,),
        [
            {"name": "Linear", "out_features": 4},
            {"name": "GELU"},
            {"name": "Linear", "out_features": "n_way"},
        ],
    ),
]


@pytest.mark.parametrize(("input_shape", "spec"), EVERY_LAYER)
def test_every_layer_builds_the_shapes_and_parameters_its_arithmetic_predicts(
    input_shape, spec
) -> None:
    assert {layer["name"] for _, s in EVERY_LAYER for layer in validate_spec(s)["layers"]} == set(
        LAYER_NAMES
    )
    resolved = resolve_spec(spec, input_shape, 3)
    model = build_from_spec(spec, input_shape, 3)
    x = paddle.randn([4, *input_shape])
    for index, (layer, expected) in enumerate(zip(model.children(), resolved)):
        x = layer(x)
        assert tuple(x.shape) == (4, *expected.output_shape), (index, expected)
        learned = [p for p in layer.parameters() if not p.stop_gradient]
        assert sum(p.size for p in learned) == expected.parameters, (index, expected)
    assert list(x.shape) == [4, 3]


def test_avg_pool_counts_padding_as_pytorch_does() -> None:
    """PyTorch's AvgPool2d default (count_include_pad): a corner window over ones averages 4/9."""
    spec = [
        {"name": "AvgPool2d", "kernel_size": 3, "stride": 2, "padding": 1},
        {"name": "Flatten"},
        {"name": "Linear", "out_features": "n_way"},
    ]
    pool = next(iter(build_from_spec(spec, (1, 5, 5), 2).children()))
    pooled = pool(paddle.ones([1, 1, 5, 5])).numpy()[0, 0]
    np.testing.assert_allclose(pooled[0, 0], 4 / 9, rtol=1e-6)
    np.testing.assert_allclose(pooled[1, 1], 1.0, rtol=1e-6)


def test_specs_are_normalised_to_explicit_json() -> None:
    spec = validate_spec(
        [{"name": "conv2D", "out_channels": 4, "kernel_size": 3}, *EXAMPLE["layers"][2:]]
    )
    assert spec["layers"][0] == {
        "name": "Conv2d",
        "in_channels": "auto",
        "out_channels": 4,
        "kernel_size": 3,
        "stride": 1,
        "padding": 0,
        "bias": True,
    }
    assert spec["layers"][2] == {"name": "MaxPool2d", "kernel_size": 2, "stride": 2, "padding": 0}
    assert json.loads(json.dumps(spec)) == spec
    assert validate_spec(spec) == spec  # normalising twice changes nothing


def test_validation_leaves_the_given_spec_as_it_was() -> None:
    given = json.loads(json.dumps(EXAMPLE))
    validate_spec(given)
    resolve_spec(given, (3, 20, 20), 5)
    assert given == EXAMPLE


def test_a_saved_spec_rebuilds_the_same_model(tmp_path) -> None:
    path = save_spec_file(tmp_path / "model.json", CONVNET)
    assert json.loads(path.read_text()) == validate_spec(CONVNET)
    assert load_spec_file(path) == validate_spec(CONVNET)
    original, rebuilt = (build_from_spec(s, OMNIGLOT, 5) for s in (CONVNET, load_spec_file(path)))
    names = [(n, list(p.shape)) for n, p in original.named_parameters()]
    assert names == [(n, list(p.shape)) for n, p in rebuilt.named_parameters()]


# -- bad specs -----------------------------------------------------------------------------------
def conv(**keys) -> dict:
    return {"name": "Conv2d", "out_channels": 8, "kernel_size": 3, **keys}


HEAD = [{"name": "Flatten"}, {"name": "Linear", "out_features": "n_way"}]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("conv4", 'a model spec is a JSON object {"layers": [...]} or a list of layers, not'),
        (7, "or a list of layers, not 7"),
        (None, "not null"),
        ({}, 'the spec has no "layers" list'),
        (
            {"layers": [], "optimizer": "adam"},
            "unknown key 'optimizer' in the spec (known: layers)",
        ),
        ({"layers": {}}, "not an object"),
        ([], "the spec has no layers"),
        ([{"name": "ReLU"}] * 65, "the spec has 65 layers; at most 64"),
        ([conv(), "ReLU"], "layer 1: is 'ReLU', not an object like"),
        ([{"name": "Conv3d"}], "layer 0: unknown layer 'Conv3d' (known: AdaptiveAvgPool2d, "),
        ([{"kernel_size": 3}], "layer 0: unknown layer null"),
        ([{"name": "x" * 1000}], "unknown layer 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"),
        ([conv(kernal_size=3)], "layer 0 (Conv2d): unknown key 'kernal_size' (known: in_channels,"),
        (
            [{"name": "ReLU", "inplace": True}],
            "layer 0 (ReLU): unknown key 'inplace' (known: none)",
        ),
        ([{"name": "Conv2d", "kernel_size": 3}], "layer 0 (Conv2d): out_channels is required"),
        (
            [conv(out_channels="64")],
            "out_channels must be an integer from 1 to 4096 or \"n_way\", not '64'",
        ),
        ([conv(out_channels=64.0)], "out_channels must be an integer from 1 to 4096"),
        ([conv(out_channels=True)], "not true"),
        ([conv(out_channels=4097)], "not 4097"),
        ([conv(out_channels=0)], "not 0"),
        (
            [conv(kernel_size=13)],
            "layer 0 (Conv2d): kernel_size must be an integer from 1 to 11 or a list of two, not 13",
        ),
        ([conv(kernel_size=[3, 3, 3])], "not a list of 3"),
        ([conv(stride=0)], "stride must be an integer from 1 to 11"),
        ([conv(padding=-1)], "padding must be an integer from 0 to 11"),
        ([conv(bias="no")], "bias must be true or false, not 'no'"),
        ([conv(in_channels="n_way")], 'in_channels must be an integer from 1 to 4096 or "auto"'),
        (
            [conv(), {"name": "Dropout", "p": 1}],
            "layer 1 (Dropout): p must be a number from 0 to 0.99, not 1",
        ),
        (
            [conv(), {"name": "Dropout", "p": float("nan")}],
            "p must be a number from 0 to 0.99, not NaN",
        ),
        (
            [conv(), {"name": "GELU", "approximate": True}],
            'approximate must be "none" or "tanh", not true',
        ),
        (
            [conv(), {"name": "AdaptiveAvgPool2d", "output_size": 2}],
            "output_size must be an integer 1 or a list of two, not 2",
        ),
        (
            [conv(), {"name": "MaxPool2d", "kernel_size": 2, "padding": 2}],
            "layer 1 (MaxPool2d): padding 2 is more than half the kernel size 2",
        ),
        ([conv(), {"name": "MaxPool2d", "kernel_size": 2, "stride": None}], "stride must be"),
        (
            [conv(out_channels="n_way"), *HEAD],
            'layer 0 (Conv2d): out_channels "n_way" is only allowed in the last Conv or Linear layer',
        ),
        ([{"name": "ReLU"}, {"name": "Flatten"}], "the spec has no parameters"),
        ([{"name": "BatchNorm1d", "affine": False}], "the spec has no parameters"),
        (
            [conv(kernel_size=[[[[[[3]]]]], 3])],
            "kernel_size must be an integer from 1 to 11 or a list of two, not a list of 2",
        ),
    ],
)
def test_bad_specs_are_refused_in_one_line(spec, fragment) -> None:
    assert fragment in error_of(validate_spec, spec)


def test_deeply_nested_values_are_refused_without_recursing() -> None:
    nested: list = [3]
    for _ in range(100_000):
        nested = [nested]
    assert "kernel_size must be" in error_of(validate_spec, [conv(kernel_size=nested)])
    assert "layer 0: is a list of 1" in error_of(validate_spec, nested)


@pytest.mark.parametrize(
    ("input_shape", "spec", "fragment"),
    [
        (
            OMNIGLOT,
            [{"name": "Linear", "out_features": "n_way"}],
            "layer 0 (Linear): needs [features] per example, but its input is [1, 28, 28]: add Flatten or GlobalAvgPool before it",
        ),
        (
            (64,),
            [conv(), *HEAD],
            "layer 0 (Conv2d): needs [channels, height, width] per example, but its input is [64]",
        ),
        (
            OMNIGLOT,
            [conv(in_channels=3), *HEAD],
            'layer 0 (Conv2d): in_channels is 3 but its input has 1 channels (use "auto")',
        ),
        (
            (3, 8, 8),
            [{"name": "Flatten"}, {"name": "Linear", "in_features": 100, "out_features": 5}],
            "layer 1 (Linear): in_features is 100 but its input has 192 features",
        ),
        (
            (1, 5, 5),
            [conv(kernel_size=7), *HEAD],
            "layer 0 (Conv2d): a 7×7 kernel does not fit a 5×5 input",
        ),
        (
            (1, 5, 5),
            [conv(kernel_size=[3, 9], padding=[0, 1]), *HEAD],
            "a 3×9 kernel does not fit a 5×5 input (padding 1)",
        ),
        (
            OMNIGLOT,
            [*[conv(stride=2, padding=1)] * 5, {"name": "MaxPool2d", "kernel_size": 2}, *HEAD],
            "layer 5 (MaxPool2d): a 2×2 pool does not fit a 1×1 input",
        ),
        (
            OMNIGLOT,
            [conv(), {"name": "BatchNorm1d"}, *HEAD],
            "layer 1 (BatchNorm1d): needs [features] or [channels, length] per example, but its input is [8, 26, 26]",
        ),
        (
            OMNIGLOT,
            [conv(), {"name": "BatchNorm2d", "num_features": 16}, *HEAD],
            "layer 1 (BatchNorm2d): num_features is 16 but its input has 8 channels",
        ),
        (
            OMNIGLOT,
            [{"name": "LayerNorm", "normalized_shape": [27, 28]}, conv(), *HEAD],
            "layer 0 (LayerNorm): normalized_shape [27, 28] is not the end of its input's shape [1, 28, 28]",
        ),
        (
            (5,),
            [{"name": "GlobalAvgPool"}, {"name": "Linear", "out_features": 2}],
            "layer 0 (GlobalAvgPool): needs [channels, height, width] or [channels, length] per example, but its input is [5]",
        ),
        (
            OMNIGLOT,
            [conv()],
            "the network's output per example is [8, 26, 26], but it must be [n_way] = [5]",
        ),
        (
            OMNIGLOT,
            [conv(), {"name": "Flatten"}, {"name": "Linear", "out_features": 4}],
            "output per example is [4], but it must be [n_way] = [5]",
        ),
        (
            (3, 84, 84),
            [conv(out_channels=1024, padding=1), *HEAD],
            "layer 0 (Conv2d): its output [1024, 84, 84] has 7,225,344 values per example; at most 4,194,304",
        ),
        (
            (4096,),
            [{"name": "Linear", "out_features": 4096}] * 3
            + [{"name": "Linear", "out_features": "n_way"}],
            "the spec has 50,364,421 parameters for [4096] inputs; at most 50,000,000",
        ),
        ((0, 28), [conv()], "the input shape per example must be 1 to 3 positive sizes"),
    ],
)
def test_specs_that_do_not_fit_the_data_are_refused_before_building(
    input_shape, spec, fragment
) -> None:
    assert fragment in error_of(resolve_spec, spec, input_shape, 5)
    assert fragment in error_of(build_from_spec, spec, input_shape, 5)


def test_n_way_must_be_a_positive_integer() -> None:
    assert "n_way must be a positive integer, not 0" in error_of(resolve_spec, CONVNET, OMNIGLOT, 0)


# -- files and text ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "the spec is not JSON (Expecting property name"),
        ("", "the spec is not JSON"),
        ("[" * 50_000 + "]" * 50_000, "the spec is larger than 65,536 bytes, a model spec's limit"),
        ("[" * 20_000 + "]" * 20_000, "the spec is not JSON (nested too deeply)"),
        (json.dumps(EXAMPLE) + " " * MAX_SPEC_BYTES, "larger than 65,536 bytes"),
        ('{"layers": [{"name": "Conv3d"}]}', "the spec: layer 0: unknown layer 'Conv3d'"),
        ("NaN", "not NaN"),
    ],
)
def test_spec_texts_are_bounded_and_checked(text, fragment) -> None:
    assert fragment in error_of(parse_spec, text)


def test_spec_files_are_read_with_the_same_checks(tmp_path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(EXAMPLE))
    assert load_spec_file(path) == validate_spec(EXAMPLE)
    path.write_text(json.dumps(EXAMPLE) + " " * MAX_SPEC_BYTES)
    assert f"{path} is larger than 65,536 bytes" in error_of(load_spec_file, path)
    path.write_text('[{"name": "ReLU"}]')
    assert f"{path}: the spec has no parameters" in error_of(load_spec_file, path)
    missing = tmp_path / "missing.json"
    assert f"{missing}: cannot read it (No such file or directory)" == error_of(
        load_spec_file, missing
    )
    assert "cannot read it" in error_of(load_spec_file, tmp_path)
    with pytest.raises(UserError, match="unknown layer"):
        save_spec_file(tmp_path / "bad.json", [{"name": "Conv3d"}])
    assert not (tmp_path / "bad.json").exists()


def test_the_vocabulary_is_documented() -> None:
    page = (REPO_ROOT / "docs" / "model_spec.md").read_text(encoding="utf-8")
    for name, keys in VOCABULARY.items():
        assert f"`{name}`" in page, name
        assert all(f"`{key}`" in page for key in keys), (name, keys)
