"""A network described as JSON data (a model spec), checked without Paddle, built as a Sequential.

A spec is ``{"layers": [{"name": "Conv2d", "out_channels": 32, "kernel_size": 3}, ...]}`` (a bare
list of layers is accepted too). Layer names and keys are PyTorch's, so a model written for
PyTorch-based tools reads the same here; names are case-insensitive, which also accepts Paddle's
spellings (``Conv2D``, ``BatchNorm2D``). It is data, never code: the service takes specs from
clients, so nothing in one is imported, evaluated or used as a path.

Checking comes in two steps that never build a layer, so a bad spec is refused in one line before
any model or training exists:

* :func:`validate_spec`: the spec's own structure. Known layers and keys only, typed and bounded
  values, ``"n_way"`` only in the last Conv/Linear layer, at least one parameter. It returns the
  normalised spec: canonical names, every key explicit (defaults filled in), JSON-serialisable,
  so the copy saved with a run rebuilds the same model when the code's defaults change.
* :func:`resolve_spec`: the spec against the data's input shape (per example, e.g. ``(1, 28, 28)``)
  and the task's ``n_way``, by arithmetic shape propagation: ``"auto"`` input sizes are read from
  the shape arriving at each layer, every kernel and pool must fit, the final output must be
  ``[n_way]`` per example (classification; with ``n_way = 1`` it is a regression's one value), and
  the whole is bounded in parameters and activation size.

:func:`build_from_spec` then builds a ``paddle.nn.Sequential``. Its parameter names are the
Sequential's: ``"<layer index>.<name>"``, e.g. ``"0.weight"`` (Conv: ``[out, in, k, k]``),
``"0.bias"``, ``"5.weight"`` (Linear: ``[in_features, out_features]``, Paddle's order),
``"1.weight"`` / ``"1.bias"`` (batch and layer norm scale and shift). Paddle keeps batch norm's
running statistics as parameters too, ``"1._mean"`` and ``"1._variance"``, with
``stop_gradient=True``; they are not counted as parameters here. Layers without weights
(activations, pools, Flatten, Dropout) keep their index, so names follow the spec's positions.

Dropout is allowed and behaves as the user sets it: it drops units whenever the model is in
training mode, so MAML's inner and query losses each see their own random masks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paddle

from metalearn.errors import UserError
from metalearn.fileio import write_json

MAX_SPEC_BYTES = 64 * 1024
"""Largest spec text (file or request field); a 64-layer spec with every key is about 10 kB."""
MAX_LAYERS = 64
MAX_WIDTH = 4096
"""Largest channel or feature count of one layer."""
MAX_KERNEL = 11
"""Largest kernel, stride and padding of a convolution or pool (per side)."""
MAX_PARAMETERS = 50_000_000
MAX_ACTIVATIONS = 1 << 22
"""Largest output of one layer per example (4,194,304 values, 16 MB in float32): every inner
step of second-order MAML keeps every activation of the whole task batch in memory."""
SPEC_FILE = "model.json"
"""Where a run's spec is kept in its folder (the service writes it there)."""

AUTO, N_WAY = "auto", "n_way"
_REQUIRED = object()


@dataclass(frozen=True)
class _Key:
    """What one layer key accepts: a bounded int or pair of ints, a float, a switch or a choice,
    or one of ``symbols`` (``"auto"``, ``"n_way"``)."""

    kind: str  # int | pair | shape | float | bool | choice
    default: object = _REQUIRED
    low: float = 0
    high: float = 0
    choices: tuple = ()
    symbols: tuple[str, ...] = ()


def _int(default: object, low: int, high: int, *symbols: str) -> _Key:
    return _Key("int", default, low, high, symbols=symbols)


def _pair(default: object, low: int, high: int) -> _Key:
    return _Key("pair", default, low, high)


def _float(default: float, low: float, high: float) -> _Key:
    return _Key("float", default, low, high)


_SWITCH_ON = _Key("bool", True)
_IN_WIDTH = _int(AUTO, 1, MAX_WIDTH, AUTO)


def _conv_keys(window: Callable[[object, int, int], _Key]) -> dict[str, _Key]:
    """Conv2d (``window`` = pairs) and Conv1d (ints)."""
    return {
        "in_channels": _IN_WIDTH,
        "out_channels": _int(_REQUIRED, 1, MAX_WIDTH, N_WAY),
        "kernel_size": window(_REQUIRED, 1, MAX_KERNEL),
        "stride": window(1, 1, MAX_KERNEL),
        "padding": window(0, 0, MAX_KERNEL),
        "bias": _SWITCH_ON,
    }


_EPS = _float(1e-5, 1e-12, 1.0)
_BATCH_NORM = {"num_features": _IN_WIDTH, "eps": _EPS, "affine": _SWITCH_ON}
_POOL = {
    "kernel_size": _pair(_REQUIRED, 1, MAX_KERNEL),
    "stride": _pair(None, 1, MAX_KERNEL),  # None: the kernel size, filled in by normalisation
    "padding": _pair(0, 0, MAX_KERNEL),
}
VOCABULARY: dict[str, dict[str, _Key]] = {
    "Conv2d": _conv_keys(_pair),
    "Conv1d": _conv_keys(_int),
    "Linear": {
        "in_features": _IN_WIDTH,
        "out_features": _int(_REQUIRED, 1, MAX_WIDTH, N_WAY),
        "bias": _SWITCH_ON,
    },
    "BatchNorm1d": _BATCH_NORM,
    "BatchNorm2d": _BATCH_NORM,
    "LayerNorm": {
        "normalized_shape": _Key("shape", AUTO, 1, MAX_WIDTH, symbols=(AUTO,)),
        "eps": _EPS,
        "elementwise_affine": _SWITCH_ON,
    },
    "ReLU": {},
    "LeakyReLU": {"negative_slope": _float(0.01, 0.0, 1.0)},
    "Tanh": {},
    "Sigmoid": {},
    "GELU": {"approximate": _Key("choice", "none", choices=("none", "tanh"))},
    "Softplus": {"beta": _float(1.0, 0.01, 100.0), "threshold": _float(20.0, 1.0, 100.0)},
    "ELU": {"alpha": _float(1.0, 0.0, 10.0)},
    "MaxPool2d": _POOL,
    "AvgPool2d": _POOL,
    "AdaptiveAvgPool2d": {"output_size": _pair(1, 1, 1)},
    "Flatten": {},
    "GlobalAvgPool": {},
    "Dropout": {"p": _float(0.5, 0.0, 0.99)},
}
"""The vocabulary: each layer's keys with their defaults and bounds (PyTorch's names and
defaults; pools' stride defaults to their kernel size, filled in by normalisation)."""

LAYER_NAMES = tuple(sorted(VOCABULARY))
_CANONICAL = {name.lower(): name for name in VOCABULARY}
_WIDTH_OUT = {"Conv2d": "out_channels", "Conv1d": "out_channels", "Linear": "out_features"}
_POOLS = ("MaxPool2d", "AvgPool2d")


def _shown(value: object) -> str:
    """A client value in a message: short, and never the repr of a deep or huge structure."""
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)[:40]
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expected(key: _Key) -> str:
    if key.kind == "bool":
        return "true or false"
    if key.kind == "choice":
        return " or ".join(json.dumps(choice) for choice in key.choices)
    number = "a number" if key.kind == "float" else "an integer"
    bounds = f"{key.low:g}" if key.low == key.high else f"from {key.low:g} to {key.high:g}"
    described = {
        "pair": f"{number} {bounds} or a list of two",
        "shape": f"{number} {bounds} or a list of 1 to 3",
    }.get(key.kind, f"{number} {bounds}")
    return " or ".join([described, *(json.dumps(symbol) for symbol in key.symbols)])


def _within(value: object, key: _Key) -> bool:
    if key.kind == "float":
        number = _is_int(value) or isinstance(value, float)
        return number and math.isfinite(value) and key.low <= value <= key.high
    return _is_int(value) and key.low <= value <= key.high


def _normalise_value(name: str, value: object, key: _Key) -> object:
    """``value`` in its stored form (pairs as lists), or a UserError saying what is expected."""
    if isinstance(value, str) and value in key.symbols:
        return value
    if key.kind == "bool" and isinstance(value, bool):
        return value
    if key.kind == "choice" and isinstance(value, str) and value in key.choices:
        return value
    if key.kind in ("int", "float", "pair", "shape") and _within(value, key):
        return value
    lengths = {"pair": (2,), "shape": (1, 2, 3)}.get(key.kind, ())
    if (
        isinstance(value, (list, tuple))
        and len(value) in lengths
        and all(_within(item, key) for item in value)
    ):
        return list(value)
    raise UserError(f"{name} must be {_expected(key)}, not {_shown(value)}")


def _layer_list(spec: object) -> list:
    if isinstance(spec, dict):
        unknown = [key for key in spec if key != "layers"]
        if unknown:
            raise UserError(f"unknown key {_shown(str(unknown[0]))} in the spec (known: layers)")
        if "layers" not in spec:
            raise UserError('the spec has no "layers" list')
        spec = spec["layers"]
    if not isinstance(spec, (list, tuple)):
        raise UserError(
            'a model spec is a JSON object {"layers": [...]} or a list of layers, not '
            + _shown(spec)
        )
    if not spec:
        raise UserError("the spec has no layers")
    if len(spec) > MAX_LAYERS:
        raise UserError(f"the spec has {len(spec)} layers; at most {MAX_LAYERS}")
    return list(spec)


def _normalise_layer(layer: object) -> dict:
    """One layer with its canonical name and every key (given or default), or a UserError."""
    if not isinstance(layer, dict):
        raise UserError(f'is {_shown(layer)}, not an object like {{"name": "ReLU"}}')
    name = layer.get("name")
    if not _known(name):
        raise UserError(f"unknown layer {_shown(name)} (known: {', '.join(LAYER_NAMES)})")
    canonical = _CANONICAL[name.lower()]
    keys = VOCABULARY[canonical]
    unknown = [key for key in layer if key != "name" and key not in keys]
    if unknown:
        known = ", ".join(keys) or "none"
        raise UserError(f"unknown key {_shown(str(unknown[0]))} (known: {known})")
    normalised = {"name": canonical}
    for key, rule in keys.items():
        if key in layer:
            normalised[key] = _normalise_value(key, layer[key], rule)
        elif rule.default is _REQUIRED:
            raise UserError(f"{key} is required")
        else:
            normalised[key] = rule.default
    if canonical in _POOLS:
        _check_pool(normalised)
    return normalised


def _known(name: object) -> bool:
    return isinstance(name, str) and name.lower() in _CANONICAL


def _label(index: int, layer: object) -> str:
    """``layer 3 (MaxPool2d)``, or ``layer 3`` while its name is not known."""
    name = layer.get("name") if isinstance(layer, dict) else None
    return f"layer {index} ({_CANONICAL[name.lower()]})" if _known(name) else f"layer {index}"


def _check_pool(layer: dict) -> None:
    """Stride defaults to the kernel; padding at most half the kernel (PyTorch's rule; Paddle
    would pad silently)."""
    if layer["stride"] is None:
        layer["stride"] = layer["kernel_size"]
    for kernel, padding in zip(_sides(layer["kernel_size"]), _sides(layer["padding"])):
        if 2 * padding > kernel:
            raise UserError(f"padding {padding} is more than half the kernel size {kernel}")


def _sides(value: int | list[int]) -> list[int]:
    return list(value) if isinstance(value, list) else [value, value]


def _has_parameters(layer: dict) -> bool:
    return layer["name"] in _WIDTH_OUT or bool(layer.get("affine", layer.get("elementwise_affine")))


def validate_spec(spec: object) -> dict:
    """The normalised spec (canonical names, every key explicit, JSON-serialisable), or a
    :class:`UserError` in one line naming the layer and the problem. Pure: no Paddle, no shapes."""
    layers = []
    for index, layer in enumerate(_layer_list(spec)):
        try:
            layers.append(_normalise_layer(layer))
        except UserError as error:
            raise UserError(f"{_label(index, layer)}: {error}") from None
    _check_n_way_place(layers)
    if not any(_has_parameters(layer) for layer in layers):
        raise UserError(
            "the spec has no parameters (no Conv, Linear or affine norm layer): nothing to learn"
        )
    return {"layers": layers}


def _check_n_way_place(layers: list[dict]) -> None:
    """``"n_way"`` names the classifier's width, so only the last Conv/Linear layer may use it."""
    weighted = [i for i, layer in enumerate(layers) if layer["name"] in _WIDTH_OUT]
    for index in weighted[:-1]:
        layer = layers[index]
        key = _WIDTH_OUT[layer["name"]]
        if layer[key] == N_WAY:
            raise UserError(
                f'layer {index} ({layer["name"]}): {key} "n_way" is only allowed in the last '
                "Conv or Linear layer"
            )


@dataclass(frozen=True)
class ResolvedLayer:
    """A layer with every size known: its constructor's sizes, output shape, parameter count."""

    name: str
    settings: dict
    output_shape: tuple[int, ...]
    parameters: int


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _fit_width(settings: dict, key: str, available: int, what: str) -> None:
    """An ``"auto"`` input size becomes the input's; a given one must match it."""
    if settings[key] == AUTO:
        settings[key] = available
    elif settings[key] != available:
        raise UserError(
            f'{key} is {settings[key]} but its input has {available} {what} (use "auto")'
        )


def _window(kind: str, settings: dict, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Output size of a kernel sliding over ``spatial`` (floor mode, as PyTorch and Paddle)."""
    dims = len(spatial)
    kernels = _sides(settings["kernel_size"])[:dims]
    strides = _sides(settings["stride"])[:dims]
    paddings = _sides(settings["padding"])[:dims]
    out = []
    for size, kernel, stride, padding in zip(spatial, kernels, strides, paddings):
        if size + 2 * padding < kernel:
            window = "×".join(map(str, kernels))
            given = "×".join(map(str, spatial))
            padded = f" (padding {padding})" if padding else ""
            raise UserError(f"a {window} {kind} does not fit a {given} input{padded}")
        out.append((size + 2 * padding - kernel) // stride + 1)
    return tuple(out)


_IMAGE = ((3,), "[channels, height, width]")
_INPUT_LAYOUTS = {
    "Conv2d": _IMAGE,
    "Conv1d": ((2,), "[channels, length]"),
    "Linear": ((1,), "[features]"),
    "BatchNorm1d": ((1, 2), "[features] or [channels, length]"),
    "BatchNorm2d": _IMAGE,
    "MaxPool2d": _IMAGE,
    "AvgPool2d": _IMAGE,
    "AdaptiveAvgPool2d": _IMAGE,
    "GlobalAvgPool": ((2, 3), "[channels, height, width] or [channels, length]"),
}
"""The input each layer needs per example (ranks, described); others take any shape."""


def _check_layout(name: str, shape: tuple[int, ...]) -> None:
    ranks, layout = _INPUT_LAYOUTS.get(name, ((len(shape),), ""))
    if len(shape) not in ranks:
        advice = ": add Flatten or GlobalAvgPool before it" if layout == "[features]" else ""
        raise UserError(f"needs {layout} per example, but its input is {_dims(shape)}{advice}")


Sizing = tuple[tuple[int, ...], int]  # (output shape per example, parameter count)


def _conv(settings: dict, shape: tuple[int, ...]) -> Sizing:
    _fit_width(settings, "in_channels", shape[0], "channels")
    out = (settings["out_channels"], *_window("kernel", settings, shape[1:]))
    kernel = math.prod(_sides(settings["kernel_size"])[: len(shape) - 1])
    return out, settings["out_channels"] * (settings["in_channels"] * kernel + settings["bias"])


def _linear(settings: dict, shape: tuple[int, ...]) -> Sizing:
    _fit_width(settings, "in_features", shape[0], "features")
    out = settings["out_features"]
    return (out,), out * (settings["in_features"] + settings["bias"])


def _batch_norm(settings: dict, shape: tuple[int, ...]) -> Sizing:
    _fit_width(settings, "num_features", shape[0], "channels")
    return shape, 2 * shape[0] * settings["affine"]


def _layer_norm(settings: dict, shape: tuple[int, ...]) -> Sizing:
    given = settings["normalized_shape"]
    normalized = list(shape) if given == AUTO else _as_list(given)
    if tuple(normalized) != shape[len(shape) - len(normalized) :]:
        raise UserError(
            f"normalized_shape {_dims(tuple(normalized))} is not the end of its input's shape "
            f"{_dims(shape)}"
        )
    settings["normalized_shape"] = normalized
    return shape, 2 * math.prod(normalized) * settings["elementwise_affine"]


def _pool(settings: dict, shape: tuple[int, ...]) -> Sizing:
    return (shape[0], *_window("pool", settings, shape[1:])), 0


def _as_list(value: int | list[int]) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


_SIZINGS: dict[str, Callable[[dict, tuple[int, ...]], Sizing]] = {
    "Conv2d": _conv,
    "Conv1d": _conv,
    "Linear": _linear,
    "BatchNorm1d": _batch_norm,
    "BatchNorm2d": _batch_norm,
    "LayerNorm": _layer_norm,
    "MaxPool2d": _pool,
    "AvgPool2d": _pool,
    "AdaptiveAvgPool2d": lambda settings, shape: ((shape[0], 1, 1), 0),
    "GlobalAvgPool": lambda settings, shape: ((shape[0],), 0),
    "Flatten": lambda settings, shape: ((math.prod(shape),), 0),
}
"""Output shape and parameters of each layer that has weights or changes the shape; the others
(activations, Dropout) keep the shape and have none."""


def _propagate(layer: dict, shape: tuple[int, ...], n_way: int) -> ResolvedLayer:
    """The layer's resolved sizes and output for input ``shape`` (per example), or a UserError."""
    settings = {key: value for key, value in layer.items() if key != "name"}
    name = layer["name"]
    if name in _WIDTH_OUT and settings[_WIDTH_OUT[name]] == N_WAY:
        settings[_WIDTH_OUT[name]] = n_way
    _check_layout(name, shape)
    out, parameters = _SIZINGS.get(name, lambda settings, shape: (shape, 0))(settings, shape)
    if math.prod(out) > MAX_ACTIVATIONS:
        raise UserError(
            f"its output {_dims(out)} has {math.prod(out):,} values per example; at most "
            f"{MAX_ACTIVATIONS:,}"
        )
    return ResolvedLayer(name, settings, out, parameters)


def _check_input(input_shape: object, n_way: object) -> tuple[int, ...]:
    if not (
        isinstance(input_shape, (tuple, list))
        and 1 <= len(input_shape) <= 3
        and all(_is_int(size) and size >= 1 for size in input_shape)
    ):
        raise UserError(
            f"the input shape per example must be 1 to 3 positive sizes, not {input_shape!r:.60}"
        )
    if not (_is_int(n_way) and n_way >= 1):
        raise UserError(f"n_way must be a positive integer, not {n_way!r:.40}")
    return tuple(input_shape)


def resolve_spec(spec: object, input_shape: tuple[int, ...], n_way: int) -> list[ResolvedLayer]:
    """Every layer of ``spec`` sized for inputs of ``input_shape`` per example (no batch axis) and
    ``n_way`` outputs, by arithmetic alone; a UserError if a layer does not fit its input, the
    output is not ``[n_way]`` or the model is too big."""
    layers = validate_spec(spec)["layers"]
    shape = _check_input(input_shape, n_way)
    resolved = []
    for index, layer in enumerate(layers):
        try:
            resolved.append(_propagate(layer, shape, n_way))
        except UserError as error:
            raise UserError(f"layer {index} ({layer['name']}): {error}") from None
        shape = resolved[-1].output_shape
    if shape != (n_way,):
        raise UserError(
            f"the network's output per example is {_dims(shape)}, but it must be [n_way] = "
            f'[{n_way}]: end with Flatten or GlobalAvgPool, then Linear with out_features "n_way"'
        )
    total = sum(layer.parameters for layer in resolved)
    if total > MAX_PARAMETERS:
        raise UserError(
            f"the spec has {total:,} parameters for {_dims(tuple(input_shape))} inputs; at most "
            f"{MAX_PARAMETERS:,}"
        )
    return resolved


def count_parameters(spec: object, input_shape: tuple[int, ...], n_way: int) -> int:
    """Trainable parameters of the model ``spec`` builds (batch norm statistics excluded)."""
    return sum(layer.parameters for layer in resolve_spec(spec, input_shape, n_way))


class GlobalAvgPool(paddle.nn.Layer):
    """The mean over every axis after the channels: [batch, C, H, W] -> [batch, C] (the paper's
    Omniglot network ends this way)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x.mean(axis=list(range(2, x.ndim)))


def _attr(enabled: bool) -> bool | None:
    """Paddle's switch for a weight or bias: its default, or ``False`` for none at all."""
    return None if enabled else False


def _paddle_layer(layer: ResolvedLayer) -> paddle.nn.Layer:
    s, nn = layer.settings, paddle.nn
    if layer.name in ("Conv2d", "Conv1d"):
        conv = nn.Conv2D if layer.name == "Conv2d" else nn.Conv1D
        return conv(
            s["in_channels"],
            s["out_channels"],
            s["kernel_size"],
            stride=s["stride"],
            padding=s["padding"],
            bias_attr=_attr(s["bias"]),
        )
    if layer.name == "Linear":
        return nn.Linear(s["in_features"], s["out_features"], bias_attr=_attr(s["bias"]))
    if layer.name in ("BatchNorm1d", "BatchNorm2d"):
        norm = nn.BatchNorm2D if layer.name == "BatchNorm2d" else nn.BatchNorm1D
        affine = _attr(s["affine"])
        return norm(s["num_features"], epsilon=s["eps"], weight_attr=affine, bias_attr=affine)
    if layer.name == "LayerNorm":
        affine = _attr(s["elementwise_affine"])
        return nn.LayerNorm(s["normalized_shape"], s["eps"], weight_attr=affine, bias_attr=affine)
    if layer.name in _POOLS:
        if layer.name == "MaxPool2d":
            return nn.MaxPool2D(s["kernel_size"], s["stride"], s["padding"])
        # PyTorch's count_include_pad=True: padding counts in the mean (Paddle's exclusive=False)
        return nn.AvgPool2D(s["kernel_size"], s["stride"], s["padding"], exclusive=False)
    builders = {
        "ReLU": nn.ReLU,
        "Tanh": nn.Tanh,
        "Sigmoid": nn.Sigmoid,
        "Flatten": nn.Flatten,
        "GlobalAvgPool": GlobalAvgPool,
        "AdaptiveAvgPool2d": lambda output_size: nn.AdaptiveAvgPool2D(output_size),
        "LeakyReLU": nn.LeakyReLU,
        "GELU": lambda approximate: nn.GELU(approximate=approximate == "tanh"),
        "Softplus": nn.Softplus,
        "ELU": nn.ELU,
        "Dropout": nn.Dropout,
    }
    return builders[layer.name](**s)


def build_from_spec(spec: dict, input_shape: tuple[int, ...], n_way: int) -> paddle.nn.Sequential:
    """The ``paddle.nn.Sequential`` of ``spec`` for inputs of ``input_shape`` per example, with
    outputs [batch, n_way]; every size was checked by :func:`resolve_spec` first. Parameters are
    Paddle's default initialisation (seed it with ``paddle.seed``)."""
    return paddle.nn.Sequential(*map(_paddle_layer, resolve_spec(spec, input_shape, n_way)))


def parse_spec(text: str | bytes, source: str = "the spec") -> dict:
    """:func:`validate_spec` of a JSON text of at most :data:`MAX_SPEC_BYTES`."""
    if len(text.encode("utf-8") if isinstance(text, str) else text) > MAX_SPEC_BYTES:
        raise UserError(f"{source} is larger than {MAX_SPEC_BYTES:,} bytes, a model spec's limit")
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise UserError(f"{source} is not JSON ({reason})") from None
    try:
        return validate_spec(spec)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def load_spec_file(path: str | os.PathLike[str]) -> dict:
    """The validated, normalised spec in the JSON file ``path`` (at most 64 kB); errors name it."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    return parse_spec(text, str(path))


def save_spec_file(path: str | os.PathLike[str], spec: object) -> Path:
    """Write the normalised ``spec`` to ``path`` atomically (what :func:`load_spec_file` reads)."""
    write_json(path, validate_spec(spec))
    return Path(path)
