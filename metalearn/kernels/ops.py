"""Operations whose second derivatives are exact, for true second-order MAML.

Paddle's built-in ``F.conv2d`` double-grad runs but returns wrong numbers, and ``cross_entropy``,
``log_softmax``, ``flatten`` and ``max_pool2d`` have no double-grad at all (see docs/design.md).
MAML differentiates through the inner-loop gradient, so every op on that path needs a correct
derivative of its own backward pass. This module supplies what the networks need:

* :func:`conv2d`: the native convolution kernels for the forward and backward passes, with the
  double-backward written out by hand. The backward of a convolution is bilinear, so its own
  derivatives are again plain convolution forward / input-gradient / weight-gradient calls, which
  Paddle computes correctly. No third derivative is ever needed by MAML.
* :func:`max_pool2d` (:func:`max_pool2x2`): Paddle's max-pooling kernels for the forward and
  backward passes, with the backward's own derivative written out (the backward routes
  gradients through a fixed mask).
* :func:`log_softmax`, :func:`softmax`: from ``exp``/``log``/``sum`` only.
* :func:`cross_entropy`: mean cross-entropy from ``exp``/``log``/``sum`` only.
* :func:`batch_norm` (optionally with ReLU): with the oneDNN kernels (float32 CPU) one fused
  operator whose backward and double-backward are hand-written C++ operators; otherwise
  elementwise ops.
"""

from __future__ import annotations

import contextlib

import paddle
from paddle import _C_ops
from paddle.autograd import PyLayer

from metalearn.kernels import registry


class _ConvGrad(PyLayer):
    """The map (x, w, dy) -> (dx, dw) of a convolution's backward pass, as a differentiable op."""

    @staticmethod
    def forward(ctx, x, weight, grad_out, geometry):
        ctx.save_for_backward(x, weight, grad_out)
        ctx.geometry = geometry
        return registry.active().backward(x, weight, grad_out, *geometry)

    @staticmethod
    def backward(ctx, grad_dx, grad_dw):
        # dx = J_x(w)^T dy and dw = J_w(x)^T dy are bilinear. With incoming cotangents (gx, gw):
        #   d/d dy = conv(gx, w) + conv(x, gw)
        #   d/d w  = weight-gradient of conv at input gx with output-gradient dy
        #   d/d x  = input-gradient  of conv at weight gw with output-gradient dy
        x, weight, grad_out = ctx.saved_tensor()
        geometry, kernel = ctx.geometry, registry.active()
        d_grad_out = paddle.zeros_like(grad_out)
        d_x = d_weight = None
        if grad_dx is not None:
            d_grad_out = d_grad_out + kernel.forward(grad_dx, weight, *geometry)
            d_weight = kernel.backward_weights(grad_dx, weight, grad_out, *geometry)
        if grad_dw is not None:
            d_grad_out = d_grad_out + kernel.forward(x, grad_dw, *geometry)
            d_x = kernel.backward_data(x, grad_dw, grad_out, *geometry)
        return (
            _as_input_grad(d_x, x),
            _as_input_grad(d_weight, weight),
            _as_input_grad(d_grad_out, grad_out),
        )


def _as_input_grad(grad, like):
    """PyLayer wants None for inputs that need no gradient and a tensor for every other input."""
    if like.stop_gradient:
        return None
    return paddle.zeros_like(like) if grad is None else grad


class _ConvWeightGrad(PyLayer):
    """(x, dy) -> dw alone, for inputs that need no gradient (the images at the first layer).

    The same weight-gradient kernel as :class:`_ConvGrad`'s (so dw is bit-identical) without the
    wasted input-gradient. dw is linear in dy and does not depend on the weights, so its
    derivative is the convolution of x with the incoming cotangent. ``weight`` only gives the
    shape and is passed detached.
    """

    @staticmethod
    def forward(ctx, x, weight, grad_out, geometry):
        ctx.save_for_backward(x)
        ctx.geometry = geometry
        return registry.active().backward_weights(x, weight, grad_out, *geometry)

    @staticmethod
    def backward(ctx, grad_dw):
        (x,) = ctx.saved_tensor()
        return None, None, registry.active().forward(x, grad_dw, *ctx.geometry)


class _Conv(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, geometry):
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return registry.active().forward(x, weight, *geometry)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensor()
        if not paddle.is_grad_enabled():  # no create_graph: a plain backward, no PyLayer
            kernel = registry.active()
            if x.stop_gradient:
                grad_weight = kernel.backward_weights(x, weight, grad_out, *ctx.geometry)
                return None, _as_input_grad(grad_weight, weight)
            grad_x, grad_weight = kernel.backward(x, weight, grad_out, *ctx.geometry)
            return _as_input_grad(grad_x, x), _as_input_grad(grad_weight, weight)
        if x.stop_gradient:
            grad_weight = _ConvWeightGrad.apply(x, weight.detach(), grad_out, ctx.geometry)
            return None, _as_input_grad(grad_weight, weight)
        grad_x, grad_weight = _ConvGrad.apply(x, weight, grad_out, ctx.geometry)
        return _as_input_grad(grad_x, x), _as_input_grad(grad_weight, weight)


def conv2d(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    layout: int = 0,
) -> paddle.Tensor:
    """Bias-free NCHW convolution with exact first and second derivatives.

    With ``groups`` = T it computes T independent convolutions at once (weight [T·O, C, k, k],
    input [N, T·C, H, W]): the stacked tasks of a meta-batch, each with its own weights. The
    derivations below hold group by group, so they are unchanged.

    ``layout`` (bits, where the kernels' ``activation_block`` B > 1): 1 = x holds the blocked
    layout nChw{B}c under its [N, C, H, W] shape, 2 = so does the output. Every derivative keeps
    its tensor's layout (dx is laid out as x, dy as y), so the derivations hold unchanged too.
    """
    if not _records_graph(x, weight):
        return registry.active().forward(x, weight, stride, padding, groups, layout)
    return _Conv.apply(x, weight, (stride, padding, groups, layout))


def _records_graph(*inputs: paddle.Tensor) -> bool:
    """Whether autograd records an op on ``inputs``. If not (scoring under ``paddle.no_grad``),
    the ops below call their forward kernels directly: a PyLayer would save what its backward
    passes need for nothing."""
    return paddle.is_grad_enabled() and not all(t.stop_gradient for t in inputs)


class _MaxPoolGrad(PyLayer):
    """The map dy -> dx of max-pooling's backward pass, as a differentiable op.

    With ``index`` (each window's argmax, a flat position in its input plane) fixed, dx is dy
    scatter-added to the argmax positions: linear in dy, so its derivative along dy is the
    adjoint gather ``g -> g[index]`` (the forward pass with the same mask), overlapping windows
    included. ``index`` is piecewise constant in x, so the derivative along x is zero wherever
    no window has a tie; x only gives the shape and receives no gradient.
    """

    @staticmethod
    def forward(ctx, x, index, grad_out, geometry):
        ctx.save_for_backward(index)
        return _C_ops.max_pool2d_with_index_grad(x, index, grad_out, *geometry)

    @staticmethod
    def backward(ctx, grad_dx):
        (index,) = ctx.saved_tensor()
        n, c, h, w = grad_dx.shape
        picked = paddle.take_along_axis(
            grad_dx.reshape([n, c, h * w]), index.reshape([n, c, -1]), axis=2
        )
        return None, None, picked.reshape(index.shape)


_pool_index_log: list | None = None


@contextlib.contextmanager
def recording_pool_indices():
    """Collect the argmax indices (numpy) of every :func:`max_pool2d` call in the block.

    Finite-difference checks use it: max-pooling is smooth only while no window's maximum
    changes place, so a check is valid only if the indices at θ ± εd equal those at θ.
    """
    global _pool_index_log
    previous, _pool_index_log = _pool_index_log, []
    try:
        yield _pool_index_log
    finally:
        _pool_index_log = previous


class _MaxPool(PyLayer):
    @staticmethod
    def forward(ctx, x, geometry):
        out, index = _C_ops.max_pool2d_with_index(x, *geometry)
        ctx.save_for_backward(x, index)
        ctx.geometry = geometry
        if _pool_index_log is not None:
            _pool_index_log.append(index.numpy())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index = ctx.saved_tensor()
        return _MaxPoolGrad.apply(x.detach(), index, grad_out, ctx.geometry)


def max_pool2d(
    x: paddle.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] = (0, 0),
    ceil_mode: bool = False,
    adaptive: bool = False,
) -> paddle.Tensor:
    """Max-pooling (NCHW) with exact first and second derivatives: windows ``kernel`` moved by
    ``stride`` over ``x`` padded by ``padding`` (rows, columns) on both sides (padding never
    wins a window), or with ``adaptive`` the output size ``kernel`` (Paddle's adaptive windows).

    A tie inside a window sends the whole gradient to its first maximum in row-major order, the
    subgradient Paddle's and PyTorch's CPU kernels pick. Away from ties the function is linear in
    x with a locally constant mask, so these derivatives are the true ones.
    """
    geometry = (list(kernel), list(stride), list(padding), False, adaptive, ceil_mode)
    return _MaxPool.apply(x, geometry)


def max_pool2x2(x: paddle.Tensor) -> paddle.Tensor:
    """2×2 max-pooling with stride 2 (NCHW), exact (:func:`max_pool2d`). Odd rows/columns at the
    bottom/right are dropped (floor, like TensorFlow's 'VALID': 21 -> 10)."""
    return max_pool2d(x, (2, 2), (2, 2))


def log_softmax(x: paddle.Tensor, axis: int = -1) -> paddle.Tensor:
    """log softmax along ``axis`` from ``exp``/``log``/``sum`` only (exact derivatives of every
    order; Paddle's ``log_softmax`` has no double-grad). The subtracted max is detached: the
    result does not depend on it."""
    shifted = x - x.max(axis=axis, keepdim=True).detach()
    return shifted - paddle.log(paddle.exp(shifted).sum(axis=axis, keepdim=True))


def softmax(x: paddle.Tensor, axis: int = -1) -> paddle.Tensor:
    """softmax along ``axis`` from ``exp``/``sum`` only (Paddle's has no double-grad)."""
    exp = paddle.exp(x - x.max(axis=axis, keepdim=True).detach())
    return exp / exp.sum(axis=axis, keepdim=True)


def cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of ``logits`` [n, classes] against integer ``labels`` [n]; for stacked
    tasks ([T, n, classes] and [T, n]) the T per-task means.

    Built from double-differentiable ops only. The max subtracted for numerical stability is
    detached: log-sum-exp does not depend on it, so the derivatives stay exact.
    """
    shift = logits.max(axis=-1, keepdim=True).detach()
    shifted = logits - shift
    log_norm = paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))
    one_hot = paddle.nn.functional.one_hot(labels, logits.shape[-1]).astype(logits.dtype)
    picked = (shifted * one_hot).sum(axis=-1, keepdim=True)
    return (log_norm - picked).sum(axis=[-2, -1]) * (1.0 / logits.shape[-2])


def spatial_mean(x: paddle.Tensor, block: int = 1) -> paddle.Tensor:
    """Mean over the spatial positions of ``x`` [N, C, H, W] as [N, C]; ``x`` holds nChw{block}c
    if ``block`` > 1 (then C is a multiple of it). Reshapes and a mean: exact derivatives."""
    if block == 1:
        return x.mean(axis=[2, 3])
    n, c, h, w = x.shape
    return x.reshape([n, c // block, h * w, block]).mean(axis=2).reshape([n, c])


class _BatchNormGrad(PyLayer):
    """The map (x, scale, dy) -> (dx, dscale, dshift) of batch norm's backward pass, as a
    differentiable op. The operators recompute x̂ from x and the forward's (mean, rstd), which
    come detached: the derivative along x is the fused double-backward operator's (formulas in
    csrc/batch_norm.cc); MAML never needs a third derivative.

    After a fused ReLU, dy is the gradient of the ReLU's output z and ``relu_shift`` the batch
    norm's shift (detached): the operators recompute the mask [z > 0] from it and x̂ (no output
    is saved: a PyLayer that saves its own output keeps it alive in a reference cycle) and apply
    it to dy and to its cotangent. The mask is piecewise constant, so it adds no other term
    (ReLU's second derivative is 0)."""

    @staticmethod
    def forward(ctx, x, scale, grad_out, mean, rstd, relu_shift, block):
        ctx.save_for_backward(x, scale, grad_out, mean, rstd, relu_shift)
        ctx.block = block
        return registry.active().batch_norm_backward(
            x, mean, rstd, scale, grad_out, relu_shift, block
        )

    @staticmethod
    def backward(ctx, g_x, g_scale, g_shift):
        x, scale, grad_out, mean, rstd, relu_shift = ctx.saved_tensor()
        g_x = paddle.zeros_like(grad_out) if g_x is None else g_x
        g_scale = paddle.zeros_like(scale) if g_scale is None else g_scale
        g_shift = paddle.zeros_like(scale) if g_shift is None else g_shift
        d_x, d_scale, d_grad_out = registry.active().batch_norm_double_backward(
            x, mean, rstd, scale, grad_out, g_x, g_scale, g_shift, relu_shift, ctx.block
        )
        grads = (
            _as_input_grad(d_x, x),
            _as_input_grad(d_scale, scale),
            _as_input_grad(d_grad_out, grad_out),
            None,
            None,
        )
        return grads if relu_shift is None else (*grads, None)


class _BatchNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, scale, shift, eps, relu, block):
        y, mean, rstd = registry.active().batch_norm_forward(
            x, scale, shift, eps, relu, block=block
        )
        ctx.save_for_backward(x, scale, shift, mean, rstd)
        ctx.relu, ctx.block = relu, block
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, shift, mean, rstd = ctx.saved_tensor()
        relu_shift = shift.detach() if ctx.relu else None
        if paddle.is_grad_enabled():  # create_graph: the backward must be differentiable
            grad_x, grad_scale, grad_shift = _BatchNormGrad.apply(
                x, scale, grad_out, mean, rstd, relu_shift, ctx.block
            )
        else:
            grad_x, grad_scale, grad_shift = registry.active().batch_norm_backward(
                x, mean, rstd, scale, grad_out, relu_shift, ctx.block
            )
        return (
            _as_input_grad(grad_x, x),
            _as_input_grad(grad_scale, scale),
            _as_input_grad(grad_shift, shift),
        )


def batch_norm(
    x: paddle.Tensor,
    scale: paddle.Tensor,
    shift: paddle.Tensor,
    eps: float,
    fuse: bool = True,
    relu: bool = False,
    block: int = 1,
) -> paddle.Tensor:
    """Batch norm of ``x`` [N, C, H, W] with the batch's own statistics and exact first and
    second derivatives, followed by ReLU if ``relu``; ``scale`` and ``shift`` hold C values (any
    shape). Running averages are never used (batch statistics everywhere). For stacked tasks
    C = T·C': each task's channels get their own statistics. ``block`` > 1: ``x`` (and the
    output) hold the blocked layout of :func:`conv2d`'s ``layout``, nChw{block}c; only the
    fused operator takes it.

    Where the active kernels fuse it (oneDNN kernels, float32 CPU) it is one operator for the
    forward, backward and double-backward passes each, ReLU included; elsewhere (float64 for the
    gradient checks, GPU) it is :func:`_batch_norm_composed` (then ``F.relu``), the reference the
    fused one is tested against.

    ``fuse=False`` keeps the composition where a ``paddle.grad(..., inputs=subset)`` may want
    x's gradient but not scale's and shift's: Paddle then prunes them and requires the fused
    operator's backward to return None for them, without telling it (MAML++'s per-step rows are
    not adapted in the inner loop, while the convolutions before them are).
    """
    c = x.shape[1]
    scale, shift = scale.reshape([c]), shift.reshape([c])
    if fuse and registry.active().fuses_batch_norm(x, scale, shift):
        if not _records_graph(x, scale, shift):
            return registry.active().batch_norm_forward(x, scale, shift, eps, relu, block=block)[0]
        return _BatchNorm.apply(x, scale, shift, eps, relu, block)
    if block != 1:
        raise ValueError("only the fused batch norm takes blocked activations")
    y = _batch_norm_composed(x, scale, shift, eps)
    return paddle.nn.functional.relu(y) if relu else y


def relu_conv_body(
    x: paddle.Tensor,
    blocks: list[tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]],
    stride: int,
    padding: int,
    eps: float,
    groups: int = 1,
) -> paddle.Tensor | None:
    """Features [N, C] of ``x`` [N, C_in, H, W] through ``blocks`` of (conv weight, BN scale,
    BN shift): conv (``groups`` as :func:`conv2d`'s: stacked tasks) → batch norm with the
    batch's statistics → ReLU each, then the mean over the spatial positions, as one kernel
    call. Only where nothing records a graph (scoring under ``paddle.no_grad``) and the active
    kernels have that call; None otherwise, and the caller runs the blocks op by op (same
    function; the fused call keeps the activations in oneDNN's blocked layout and saves every
    op's dispatch and reorders)."""
    params = [t for block in blocks for t in block]
    active = registry.active()
    if _records_graph(x, *params) or not active.fuses_relu_conv_body(x, *params):
        return None
    flat = [t.reshape([-1]) if i % 3 else t for i, t in enumerate(params)]
    return active.relu_conv_body_features(x, flat, stride, padding, eps, groups)


def _batch_norm_composed(x, scale, shift, eps: float) -> paddle.Tensor:
    """Batch norm written out in elementwise ops, whose double-grads Paddle computes exactly.

    Paddle's fused batch-norm double-grad kernel costs ~100 ms on a 5-image CPU batch. The work
    is done on an [N, C, H·W] view with [C, 1] statistics: Paddle's CPU kernels broadcast that
    shape ~10x faster than [1, C, 1, 1] over [N, C, H, W].
    """
    n, c, h, w = x.shape
    rows = x.reshape([n, c, h * w])
    mean = _channel_mean(rows)
    centred = rows - mean
    var = _channel_mean(centred * centred)
    normalised = centred * (paddle.rsqrt(var + eps) * scale.reshape([c, 1]))
    return (normalised + shift.reshape([c, 1])).reshape([n, c, h, w])


def _channel_mean(rows: paddle.Tensor) -> paddle.Tensor:
    """Mean over axes 0 and 2 of [N, C, L] as [C, 1]: a sum over the contiguous last axis, then
    over N. Paddle's one reduction over both axes was 3-5x slower at [75, 2048, 196] and, in
    float32, left a MAML meta-gradient 1e-3 off float64 (two sums: 1e-5, tests/test_fast_path)."""
    n, _, length = rows.shape
    return rows.sum(axis=2, keepdim=True).sum(axis=0) * (1.0 / (n * length))


# -- linear layers and the ReLU network ----------------------------------------------------------
def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """x·W + b of autograd-recorded Paddle ops (exact derivatives of every order): x [N, I],
    W [I, O], b [O] for one task, or x [T, N, I], W [T, I, O], b [T, O] for T stacked tasks.

    A stacked bias is expanded to the output's shape before the add: Paddle's CPU add
    broadcasting a [T, 1, O] operand over the middle axis took ~130 µs at [25, 10, 40],
    expand + add ~18 µs.
    """
    out = paddle.matmul(x, weight)
    if out.ndim == 3:
        bias = bias.unsqueeze(1).expand(out.shape)
    return out + bias


def relu_network(
    x: paddle.Tensor, weights: list[paddle.Tensor], biases: list[paddle.Tensor]
) -> paddle.Tensor:
    """Linear layers (shapes as :func:`linear`'s) with ReLU between them, not after the last,
    with exact first and second derivatives.

    Where the active kernels fuse it (:meth:`~metalearn.kernels.registry.NativeKernels.fuses_linear`)
    the whole network is one autograd node, :class:`_ReluNetwork`: second-order MAML on the
    sinusoid MLP otherwise spends most of its time on the bookkeeping of ~15 tiny recorded
    Paddle ops per layer and pass. Elsewhere (float64, Paddle's own kernels) the layers are
    composed of :func:`linear` and ``relu``: the reference the fused network is tested against.
    """
    params = [t for pair in zip(weights, biases) for t in pair]
    if all(w.ndim == x.ndim for w in weights) and registry.active().fuses_linear(x, *params):
        return _ReluNetwork.apply(x, *params)
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = linear(x, weight, bias)
        if layer < len(weights) - 1:
            x = paddle.nn.functional.relu(x)
    return x


class _Saved:
    """What a PyLayer is handed without making it a differentiable input."""

    def __init__(self, value):
        self.value = value


class _ReluNetwork(PyLayer):
    """The forward pass of :func:`relu_network` as one node (the kernels' ``relu_network_*``)."""

    @staticmethod
    def forward(ctx, x, *params):
        out, ctx.state = registry.active().relu_network_forward(x, params)
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensor()
        with_x = not x.stop_gradient
        if paddle.is_grad_enabled():  # create_graph: the backward must be differentiable
            grads = _ReluNetworkGrad.apply(x, grad_out, *params, _Saved(ctx.state))
        else:
            grads, _ = registry.active().relu_network_backward(
                x, params, ctx.state, grad_out, with_x
            )
        grad_x, grad_params = (grads[0], grads[1:]) if with_x else (None, grads)
        return (_as_input_grad(grad_x, x), *map(_as_input_grad, grad_params, params))


class _ReluNetworkGrad(PyLayer):
    """The backward pass (x, dy, W_0, b_0, ...) -> ([dx,] dW_0, db_0, ...) of
    :class:`_ReluNetwork` as one node; dx is an output only if x needs a gradient. Its own
    derivative is one more kernel call (formulas: NativeKernels.relu_network_double_backward);
    MAML never needs a third derivative."""

    @staticmethod
    def forward(ctx, x, grad_out, *args):
        *params, saved = args
        ctx.with_x = not x.stop_gradient
        grads, ctx.grad_zs = registry.active().relu_network_backward(
            x, params, saved.value, grad_out, ctx.with_x
        )
        ctx.state = saved.value
        ctx.save_for_backward(x, grad_out, *params)
        return grads

    @staticmethod
    def backward(ctx, *cotangents):
        x, grad_out, *params = ctx.saved_tensor()
        like = ([x] if ctx.with_x else []) + params
        cotangents = [paddle.zeros_like(t) if g is None else g for g, t in zip(cotangents, like)]
        result = registry.active().relu_network_double_backward(
            x, params, ctx.state, ctx.grad_zs, cotangents, ctx.with_x
        )
        d_x = result[0] if ctx.with_x else None
        d_params = result[1 if ctx.with_x else 0 : -1]
        return (
            _as_input_grad(d_x, x),
            _as_input_grad(result[-1], grad_out),
            *map(_as_input_grad, d_params, params),
        )
