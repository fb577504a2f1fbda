"""Exact second order for a user's ``paddle.nn.Layer``: Paddle's ops with wrong or missing
double-grads are routed to exact ones while the Layer runs under :class:`ExactRouting`.

Measured on Paddle 3.3.1, CPU, float64 (second-order MAML meta-gradient of a small model around
each op against a central finite difference; the full lists are in docs/models.md): Paddle's
``F.conv2d`` / ``F.conv1d`` double-grad is silently **wrong** whenever the convolution's input
needs no gradient (the first layer, on the images: analytic / finite difference 1.60, −2.44,
1.38 and 1.73 on four small cases; 1.000000 where the input depends on θ), and ``flatten``,
max-pooling, depthwise ``conv2d``, ``cross_entropy`` (its ``mean_all``), ``log_softmax``,
``softmax``, ``layer_norm``, ``dropout`` (also in evaluation mode), ``gelu`` (``erf``) and
``embedding`` have **no** double-grad. Those are routed here; linear, the common activations,
average pooling, batch norm in training mode, instance norm, pad, reshape and the like are
correct as Paddle computes them (:data:`VERIFIED_LAYERS` lists the layer types either way).

Routing has two halves. Layers whose ``forward`` bypasses ``paddle.nn.functional`` (``nn.Conv2D``
calls ``F.conv._conv_nd``, batch norm and layer norm call names imported into their module) get
an exact ``forward`` of their own, built from the layer's attributes (:data:`EXACT_LAYERS`), as
an instance attribute for the duration of the call. Functional entry points that the other
layers and users' own ``forward`` methods call as ``F.name`` (module attribute lookup at call
time) are replaced in ``paddle.nn.functional`` (and ``paddle.flatten`` / ``Tensor.flatten``)
while any routed call runs (:data:`EXACT_FUNCTIONS`). A function imported by name
(``from paddle.nn.functional import conv2d``) before the call is not seen: write ``F.conv2d``.

The replacements follow Paddle's signatures and refuse what they do not compute exactly
(dilation ≠ 1, unequal strides, ``return_mask``, class weights, ...) with a :class:`UserError`.

Batch norm (``nn.BatchNorm1D/2D/3D``) normalises with the batch's own statistics in training and
evaluation mode alike, as the paper's code and the built-in networks do: a meta-learned model is
adapted and scored on small task batches, and running averages blended over the tasks and inner
steps of meta-training would describe no task. The running mean and variance buffers are neither
used nor updated (unless the layer was built with ``use_global_stats=True``: then they are used
as constants). A direct ``F.batch_norm`` call keeps its ``training`` flag (batch statistics when
True, the given running statistics otherwise) and never updates the running statistics.

Stacked tasks: a weight with one more leading axis than Paddle's (conv [T, O, C, k, k], linear
[T, I, O], batch norm [T, C], layer norm [T, F]) holds T tasks' copies, and the activations are
laid out [N, T·C, ...] (each task's channels or features side by side), as the built-in networks
stack tasks: a convolution becomes one grouped convolution (groups × T), batch norm over T·C
channels is each task's own, a linear layer a batched matrix product. Parameter-free ops
(activations, pooling, flatten from axis 1, spatial means) need nothing. LayerNet checks on a
sample that a model computes the same per task this way before it stacks any (layer_net.py).

Thread safety: the functional entry points are replaced process-wide while at least one routed
call runs (a counter under a lock restores them when the last one ends), so a thread that calls
``F.conv2d`` meanwhile gets the exact function: same values, exact derivatives.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddle.nn.functional.conv import _update_padding_nd
from paddle.nn.layer.norm import _BatchNormBase

from metalearn.errors import UserError
from metalearn.kernels import ops


def _unsupported(what: str) -> UserError:
    return UserError(
        f"metalearn's exact second order does not cover {what}; change the model, or check it "
        "with `python -m metalearn.audit` and route it with metalearn.nets.exact"
    )


# -- convolutions ------------------------------------------------------------------------------
def _pair(value, what: str) -> tuple[int, int]:
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise _unsupported(f"a {what} of {value!r}")
    return values[0], values[1]


def _padding_pairs(
    padding,
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    channel_last: bool = False,
) -> list[tuple[int, int]]:
    """(before, after) per spatial axis for Paddle's padding forms (int, list, 'same', 'valid',
    per-side lists); 'same' as Paddle computes it: the total split with the smaller part first."""
    pads, algorithm = _update_padding_nd(padding, channel_last, len(sizes))
    if algorithm == "SAME":
        pairs = []
        for size, k, s in zip(sizes, kernel, stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pairs.append((total // 2, total - total // 2))
        return pairs
    if len(pads) == len(sizes):
        return [(p, p) for p in pads]
    return list(zip(pads[0::2], pads[1::2]))


def _conv_nchw(x, weight, bias, stride: tuple[int, int], pairs, groups: int) -> paddle.Tensor:
    """Exact convolution of x [N, C, H, W] with (top, bottom), (left, right) zero padding."""
    if stride[0] != stride[1]:
        raise _unsupported(f"a convolution with unequal strides {list(stride)}")
    (top, bottom), (left, right) = pairs
    padding = top
    if len({top, bottom, left, right}) > 1:  # asymmetric: pad first (F.pad is exact)
        x, padding = F.pad(x, [left, right, top, bottom]), 0
    out = ops.conv2d(x, weight, stride=stride[0], padding=padding, groups=groups)
    if bias is None:
        return out
    n, c, h, w = out.shape  # [C, 1] over an [N, C, H·W] view: Paddle broadcasts it far faster
    return (out.reshape([n, c, h * w]) + bias.reshape([c, 1])).reshape([n, c, h, w])


def _check_dilation(dilation, spatial: int) -> None:
    if any(d != 1 for d in ([dilation] * spatial if isinstance(dilation, int) else dilation)):
        raise _unsupported(f"a dilated convolution (dilation {dilation})")


def _fold_tasks(weight, bias, groups: int, ndim: int) -> tuple:
    """A stacked weight [T, O, ...] (``ndim`` + 1 axes; module docstring) as one grouped
    convolution's [T·O, ...] with bias [T·O] and T times the groups; others pass unchanged."""
    if weight.ndim == ndim:
        return weight, bias, groups
    tasks = weight.shape[0]
    bias = None if bias is None else bias.reshape([-1])
    return weight.reshape([-1, *weight.shape[2:]]), bias, groups * tasks


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, data_format="NCHW", name=None
):
    """``F.conv2d`` with exact second derivatives (any groups, depthwise included)."""
    _check_dilation(dilation, 2)
    weight, bias, groups = _fold_tasks(weight, bias, groups, 4)
    channel_last = data_format == "NHWC"
    if channel_last:
        x = x.transpose([0, 3, 1, 2])
    stride = _pair(stride, "stride")
    pairs = _padding_pairs(padding, x.shape[2:], weight.shape[2:], stride, channel_last)
    out = _conv_nchw(x, weight, bias, stride, pairs, groups)
    return out.transpose([0, 2, 3, 1]) if channel_last else out


def conv1d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, data_format="NCL", name=None
):
    """``F.conv1d`` as an exact conv2d over a unit height (Paddle's own conv1d is a conv2d with
    an inserted axis too, with the same wrong double-grad)."""
    _check_dilation(dilation, 1)
    weight, bias, groups = _fold_tasks(weight, bias, groups, 3)
    channel_last = data_format == "NLC"
    if channel_last:
        x = x.transpose([0, 2, 1])
    step = _single(stride, "stride")
    pairs = [(0, 0), *_padding_pairs(padding, x.shape[2:], weight.shape[2:], [step], channel_last)]
    out = _conv_nchw(x.unsqueeze(2), weight.unsqueeze(2), bias, (step, step), pairs, groups)
    out = out.squeeze(2)
    return out.transpose([0, 2, 1]) if channel_last else out


def _single(value, what: str) -> int:
    """An int given as itself or as a one-element list."""
    values = [value] if isinstance(value, int) else list(value)
    if len(values) != 1 or not isinstance(values[0], int):
        raise _unsupported(f"a {what} of {value!r}")
    return values[0]


def _conv2d_layer(layer: nn.Conv2D, x: paddle.Tensor) -> paddle.Tensor:
    """``nn.Conv2D.forward`` with the exact convolution (its own calls ``F.conv._conv_nd``)."""
    padding = layer._padding
    if layer._padding_mode != "zeros":
        x = F.pad(
            x,
            layer._reversed_padding_repeated_twice,
            mode=layer._padding_mode,
            data_format=layer._data_format,
        )
        padding = 0
    return conv2d(
        x,
        layer.weight,
        layer.bias,
        layer._stride,
        padding,
        layer._dilation,
        layer._groups,
        layer._data_format,
    )


# -- pooling -----------------------------------------------------------------------------------
def max_pool2d(
    x,
    kernel_size,
    stride=None,
    padding=0,
    return_mask=False,
    ceil_mode=False,
    data_format="NCHW",
    name=None,
):
    """``F.max_pool2d`` with exact second derivatives (any window, stride, symmetric padding)."""
    if return_mask:
        raise _unsupported("max-pooling with return_mask=True")
    channel_last = data_format == "NHWC"
    if channel_last:
        x = x.transpose([0, 3, 1, 2])
    kernel = _pair(kernel_size, "pooling window")
    step = kernel if stride is None else _pair(stride, "stride")
    pairs = _padding_pairs(padding, x.shape[2:], kernel, step, channel_last)
    if any(before != after for before, after in pairs):
        raise _unsupported(f"max-pooling with asymmetric padding {padding!r}")
    out = ops.max_pool2d(x, kernel, step, [before for before, _ in pairs], ceil_mode)
    return out.transpose([0, 2, 3, 1]) if channel_last else out


def max_pool1d(
    x, kernel_size, stride=None, padding=0, return_mask=False, ceil_mode=False, name=None
):
    """``F.max_pool1d`` as an exact max-pool over a unit height."""
    kernel = _single(kernel_size, "pooling window")
    step = kernel if stride is None else _single(stride, "stride")
    if not isinstance(padding, str):
        padding = [0, _single(padding, "padding")]
    out = max_pool2d(x.unsqueeze(2), (1, kernel), (1, step), padding, return_mask, ceil_mode)
    return out.squeeze(2)


def adaptive_max_pool2d(x, output_size, return_mask=False, name=None):
    """``F.adaptive_max_pool2d`` with exact second derivatives (Paddle's adaptive windows)."""
    if return_mask:
        raise _unsupported("adaptive max-pooling with return_mask=True")
    sizes = [output_size] * 2 if isinstance(output_size, int) else list(output_size)
    sizes = [x.shape[2 + i] if size is None else size for i, size in enumerate(sizes)]
    return ops.max_pool2d(x, sizes, (1, 1), (0, 0), adaptive=True)


# -- normalisation -----------------------------------------------------------------------------
def _as_nchw(x: paddle.Tensor, channel_last: bool) -> tuple[paddle.Tensor, Callable]:
    """x [N, C, ...] (or channels last) as [N, C, H, W] for the 4-D batch norm, and the map back."""
    if channel_last:
        x = paddle.moveaxis(x, -1, 1)
    moved = x.shape
    rest = moved[2:]
    flat = [*moved[:2], *([1, 1] if not rest else [math.prod(rest[:-1]), rest[-1]])]

    def back(y: paddle.Tensor) -> paddle.Tensor:
        y = y.reshape(moved)
        return paddle.moveaxis(y, 1, -1) if channel_last else y

    return x.reshape(flat), back


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.9,
    epsilon=1e-05,
    data_format="NCHW",
    use_global_stats=None,
    name=None,
):
    """``F.batch_norm`` with exact second derivatives; the running statistics are not updated
    (module docstring)."""
    channel_last = data_format in ("NHWC", "NLC", "NDHWC")
    if weight is not None and weight.ndim == 2:  # stacked tasks: T·C channels
        tasks = weight.shape[0]
        weight, bias = weight.reshape([-1]), None if bias is None else bias.reshape([-1])
        running_mean, running_var = running_mean.tile([tasks]), running_var.tile([tasks])
    images, back = _as_nchw(x, channel_last)
    channels = images.shape[1]
    scale = weight if weight is not None else paddle.ones([channels], x.dtype)
    shift = bias if bias is not None else paddle.zeros([channels], x.dtype)
    if training and not use_global_stats:
        return back(ops.batch_norm(images, scale, shift, epsilon))
    shape = [1, channels, 1, 1]
    rstd = paddle.rsqrt(running_var.reshape(shape) + epsilon)
    out = (images - running_mean.reshape(shape)) * (rstd * scale.reshape(shape))
    return back(out + shift.reshape(shape))


def _batch_norm_layer(layer: _BatchNormBase, x: paddle.Tensor) -> paddle.Tensor:
    """``nn.BatchNorm1D/2D/3D``: the batch's statistics in both modes (module docstring)."""
    return batch_norm(
        x,
        layer._mean,
        layer._variance,
        layer.weight,
        layer.bias,
        training=True,
        epsilon=layer._epsilon,
        data_format=layer._data_format,
        use_global_stats=layer._use_global_stats,
    )


def layer_norm(x, normalized_shape, weight=None, bias=None, epsilon=1e-05, name=None):
    """``F.layer_norm`` from mean / rsqrt / elementwise ops (exact derivatives)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if weight is not None and weight.ndim == len(shape) + 1:  # stacked tasks: [..., T·F]
        if len(shape) != 1:
            raise _unsupported("stacked tasks through a layer norm over more than one axis")
        tasks = weight.shape[0]
        out = layer_norm(
            x.reshape([*x.shape[:-1], tasks, shape[0]]), [shape[0]], None, None, epsilon
        )
        out = out * weight if bias is None else out * weight + bias
        return out.reshape(x.shape)
    axes = list(range(x.ndim - len(shape), x.ndim))
    centred = x - x.mean(axis=axes, keepdim=True)
    out = centred * paddle.rsqrt((centred * centred).mean(axis=axes, keepdim=True) + epsilon)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _layer_norm_layer(layer: nn.LayerNorm, x: paddle.Tensor) -> paddle.Tensor:
    return layer_norm(x, layer._normalized_shape, layer.weight, layer.bias, layer._epsilon)


# -- linear ----------------------------------------------------------------------------------
_paddle_linear = F.linear


def linear(x, weight, bias=None, name=None):
    """``F.linear`` (Paddle's own, exact); a stacked weight [T, I, O] takes x [..., T·I] as T
    tasks' features side by side and returns [..., T·O] (a batched matrix product)."""
    if weight.ndim == 2:
        return _paddle_linear(x, weight, bias, name)
    tasks, inputs, outputs = weight.shape
    rows = x.reshape([-1, tasks, inputs]).transpose([1, 0, 2])
    out = paddle.matmul(rows, weight) if bias is None else ops.linear(rows, weight, bias)
    return out.transpose([1, 0, 2]).reshape([*x.shape[:-1], tasks * outputs])


# -- elementwise and the rest ------------------------------------------------------------------
def dropout(x, p=0.5, axis=None, training=True, inplace=False, mode="upscale_in_train", name=None):
    """``F.dropout`` as a multiplication by a random mask (Paddle's ``dropout`` op has no
    double-grad, in evaluation mode neither)."""
    upscale = mode == "upscale_in_train"
    if not training or p == 0:
        return x if upscale else x * (1.0 - p)
    if p == 1:
        return x * 0.0
    shape = x.shape
    if axis is not None:
        kept = {a % x.ndim for a in ([axis] if isinstance(axis, int) else axis)}
        shape = [size if i in kept else 1 for i, size in enumerate(shape)]
    keep = (paddle.rand(shape, dtype=x.dtype) >= p).astype(x.dtype)
    return x * keep * (1.0 / (1.0 - p)) if upscale else x * keep


class _Erf(PyLayer):
    """erf with the derivative 2/√π·exp(−x²) written in recorded ops (Paddle's ``erf_grad``
    has no grad op of its own)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return paddle.erf(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensor()
        return grad_out * (paddle.exp(-(x * x)) * (2.0 / math.sqrt(math.pi)))


def gelu(x, approximate=False, name=None):
    """``F.gelu``: x·Φ(x) with an exact erf, or the tanh approximation, in recorded ops."""
    if approximate in (True, "tanh"):
        inner = (x + 0.044715 * x * x * x) * math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + paddle.tanh(inner))
    return 0.5 * x * (1.0 + _Erf.apply(x * (1.0 / math.sqrt(2.0))))


def softmax(x, axis=-1, dtype=None, name=None, *, out=None):
    if out is not None:
        raise _unsupported("softmax(..., out=...)")
    return ops.softmax(x if dtype is None else x.astype(dtype), axis)


def log_softmax(x, axis=-1, dtype=None, name=None):
    return ops.log_softmax(x if dtype is None else x.astype(dtype), axis)


def cross_entropy(
    input,
    label,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    soft_label=False,
    axis=-1,
    use_softmax=True,
    label_smoothing=0.0,
    name=None,
):
    """``F.cross_entropy`` (hard or soft labels, ``ignore_index``, label smoothing, the three
    reductions, Paddle's output shapes) from exact ops; class weights are refused."""
    if weight is not None:
        raise _unsupported("cross_entropy with class weights")
    last = axis % input.ndim == input.ndim - 1
    logits = input if last else paddle.moveaxis(input, axis, -1)
    classes = logits.shape[-1]
    log_p = ops.log_softmax(logits) if use_softmax else paddle.log(logits)
    if soft_label:
        target = label.astype(log_p.dtype) if last else paddle.moveaxis(label, axis, -1)
        valid = None
    else:
        keepdim = label.ndim == input.ndim
        hard = label.squeeze(axis) if keepdim else label
        valid = hard != ignore_index
        picked = paddle.where(valid, hard, paddle.zeros_like(hard))
        target = F.one_hot(picked, classes).astype(log_p.dtype)
        target = target * valid.astype(log_p.dtype).unsqueeze(-1)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / classes
    losses = -(target * log_p).sum(axis=-1, keepdim=soft_label or keepdim)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if valid is not None and ignore_index >= 0:  # Paddle: a negative index ignores nothing
        return losses.sum() / valid.astype(losses.dtype).sum()
    return losses.mean()


def embedding(
    x,
    weight,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    sparse=False,
    scale_grad_by_freq=False,
    name=None,
):
    """``F.embedding`` as a ``gather`` of the weight's rows (exact derivatives)."""
    if padding_idx is not None or max_norm is not None or scale_grad_by_freq:
        raise _unsupported("embedding with padding_idx, max_norm or scale_grad_by_freq")
    rows = paddle.gather(weight, x.reshape([-1]))
    return rows.reshape([*x.shape, weight.shape[-1]])


def flatten(x, start_axis=0, stop_axis=-1, name=None):
    """``paddle.flatten`` as a ``reshape`` (``flatten_grad`` has no grad op)."""
    if x.ndim == 0:
        return x.reshape([1])
    start, stop = start_axis % x.ndim, stop_axis % x.ndim
    shape = x.shape
    return x.reshape([*shape[:start], math.prod(shape[start : stop + 1]), *shape[stop + 1 :]])


# -- the tables --------------------------------------------------------------------------------
EXACT_LAYERS: dict[type, Callable[[nn.Layer, paddle.Tensor], paddle.Tensor]] = {
    nn.Conv2D: _conv2d_layer,
    _BatchNormBase: _batch_norm_layer,
    nn.LayerNorm: _layer_norm_layer,
}
"""Layer classes whose ``forward`` bypasses ``paddle.nn.functional``: their exact forward."""

EXACT_FUNCTIONS: tuple[tuple[object, str, Callable], ...] = (
    *(
        (F, function.__name__, function)
        for function in (
            conv1d,
            conv2d,
            max_pool1d,
            max_pool2d,
            adaptive_max_pool2d,
            batch_norm,
            layer_norm,
            linear,
            dropout,
            gelu,
            softmax,
            log_softmax,
            cross_entropy,
            embedding,
        )
    ),
    (paddle, "flatten", flatten),
    (paddle.Tensor, "flatten", flatten),
)
"""(owner, attribute, exact replacement) patched while a routed call runs."""

VERIFIED_LAYERS: tuple[type, ...] = (
    # routed to exact ops
    nn.Conv1D,
    nn.Conv2D,
    nn.MaxPool1D,
    nn.MaxPool2D,
    nn.AdaptiveMaxPool2D,
    nn.BatchNorm1D,
    nn.BatchNorm2D,
    nn.BatchNorm3D,
    nn.LayerNorm,
    nn.Dropout,
    nn.Flatten,
    nn.GELU,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Embedding,
    # Paddle's own double-grads, measured correct
    nn.Linear,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.Sigmoid,
    nn.Silu,
    nn.Softplus,
    nn.Tanh,
    nn.AvgPool1D,
    nn.AvgPool2D,
    nn.AdaptiveAvgPool1D,
    nn.AdaptiveAvgPool2D,
    nn.InstanceNorm2D,
    nn.Identity,
)
"""Layer types whose second-order meta-gradient is proven against finite differences in
float64 (tests/test_exact_routing.py audits a model holding each of them)."""

CONTAINERS: tuple[type, ...] = (nn.Sequential, nn.LayerList, nn.LayerDict)
"""Layers that only call their sublayers."""


def unverified_layer_types(layer: nn.Layer) -> list[str]:
    """Names of the layer types in ``layer`` whose exact second order nobody verified: Paddle's
    own layers outside :data:`VERIFIED_LAYERS`, and user layers that own parameters directly
    (their ``forward`` uses them in ops we cannot see). User layers that only compose
    sublayers are as exact as those sublayers."""
    found = []
    for sublayer in layer.sublayers(include_self=True):
        kind = type(sublayer)
        if kind in CONTAINERS or _verified_base(kind) is not None:
            continue
        from_paddle = kind.__module__.startswith("paddle.")
        if from_paddle or sublayer._parameters:
            name = f"nn.{kind.__name__}" if from_paddle else kind.__name__
            found.append(name if from_paddle else f"{name} (own parameters)")
    return sorted(set(found))


def _verified_base(kind: type) -> type | None:
    """The verified class whose ``forward`` a layer of ``kind`` runs (itself or a subclass that
    keeps its forward), or None."""
    for base in VERIFIED_LAYERS:
        if issubclass(kind, base) and kind.forward is base.forward:
            return base
    return None


# -- switching the routes on and off -----------------------------------------------------------
_patch_lock = threading.Lock()
_patched: dict[tuple[int, str], list] = {}  # (id(owner), name) -> [original, replacement, users]


@contextlib.contextmanager
def functions_replaced(replacements: Sequence[tuple[object, str, Callable]]) -> Iterator[None]:
    """Set each ``owner.name = replacement`` while the block runs; nested and concurrent blocks
    share one replacement per attribute (counted), the last one out restores the original."""
    with _patch_lock:
        for owner, name, replacement in replacements:
            entry = _patched.get((id(owner), name))
            if entry is not None and entry[1] is not replacement:
                raise RuntimeError(f"{name} is already replaced by another routing")
        for owner, name, replacement in replacements:
            entry = _patched.setdefault((id(owner), name), [getattr(owner, name), replacement, 0])
            entry[2] += 1
            setattr(owner, name, replacement)
    try:
        yield
    finally:
        with _patch_lock:
            for owner, name, _ in replacements:
                entry = _patched[(id(owner), name)]
                entry[2] -= 1
                if entry[2] == 0:
                    setattr(owner, name, entry[0])
                    del _patched[(id(owner), name)]


class ExactRouting:
    """The routes of one Layer, found once: which sublayers get an exact ``forward``.

    ``extra_layers`` / ``extra_functions`` add routes (the audit's smooth activations) on top
    of :data:`EXACT_LAYERS` / :data:`EXACT_FUNCTIONS`.
    """

    def __init__(
        self,
        layer: nn.Layer,
        extra_layers: dict[type, Callable] | None = None,
        extra_functions: Sequence[tuple[object, str, Callable]] = (),
    ):
        table = {**EXACT_LAYERS, **(extra_layers or {})}
        self.overrides = []
        for sublayer in layer.sublayers(include_self=True):
            route = next(
                (
                    route
                    for base, route in table.items()
                    if isinstance(sublayer, base) and type(sublayer).forward is base.forward
                ),
                None,
            )
            if route is not None:
                self.overrides.append((sublayer, functools.partial(route, sublayer)))
        self.functions = (*EXACT_FUNCTIONS, *extra_functions)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Routes on for the block (the caller holds the Layer's lock: the sublayers' forward
        overrides are instance attributes)."""
        with functions_replaced(self.functions):
            for sublayer, forward in self.overrides:
                sublayer.__dict__["forward"] = forward
            try:
                yield
            finally:
                for sublayer, _ in self.overrides:
                    sublayer.__dict__.pop("forward", None)
