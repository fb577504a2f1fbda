"""Operations whose second derivatives are exact, for true second-order MAML.

Paddle's built-in ``F.conv2d`` double-grad runs but returns wrong numbers, and ``cross_entropy``,
``log_softmax``, ``flatten`` and ``max_pool2d`` have no double-grad at all (see docs/design.md).
MAML differentiates through the inner-loop gradient, so every op on that path needs a correct
derivative of its own backward pass. This module supplies the three the networks need:

* :func:`conv2d`: the native convolution kernels for the forward and backward passes, with the
  double-backward written out by hand. The backward of a convolution is bilinear, so its own
  derivatives are again plain convolution forward / input-gradient / weight-gradient calls, which
  Paddle computes correctly. No third derivative is ever needed by MAML.
* :func:`max_pool2x2`: Paddle's max-pooling kernels for the forward and backward passes, with the
  backward's own derivative written out (the backward routes gradients through a fixed mask).
* :func:`cross_entropy`: mean cross-entropy from ``exp``/``log``/``sum`` only.
* :func:`batch_norm`: with the oneDNN kernels (float32 CPU) one fused operator whose backward
  and double-backward are hand-written C++ operators; otherwise elementwise ops.
"""

from __future__ import annotations

import contextlib

import paddle
from paddle import _C_ops
from paddle.autograd import PyLayer

from metalearn import kernels


class _ConvGrad(PyLayer):
    """The map (x, w, dy) -> (dx, dw) of a convolution's backward pass, as a differentiable op."""

    @staticmethod
    def forward(ctx, x, weight, grad_out, geometry):
        ctx.save_for_backward(x, weight, grad_out)
        ctx.geometry = geometry
        return kernels.active().backward(x, weight, grad_out, *geometry)

    @staticmethod
    def backward(ctx, grad_dx, grad_dw):
        # dx = J_x(w)^T dy and dw = J_w(x)^T dy are bilinear. With incoming cotangents (gx, gw):
        #   d/d dy = conv(gx, w) + conv(x, gw)
        #   d/d w  = weight-gradient of conv at input gx with output-gradient dy
        #   d/d x  = input-gradient  of conv at weight gw with output-gradient dy
        x, weight, grad_out = ctx.saved_tensor()
        geometry, kernel = ctx.geometry, kernels.active()
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
        return kernels.active().backward_weights(x, weight, grad_out, *geometry)

    @staticmethod
    def backward(ctx, grad_dw):
        (x,) = ctx.saved_tensor()
        return None, None, kernels.active().forward(x, grad_dw, *ctx.geometry)


class _Conv(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, geometry):
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return kernels.active().forward(x, weight, *geometry)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensor()
        if x.stop_gradient:
            grad_weight = _ConvWeightGrad.apply(x, weight.detach(), grad_out, ctx.geometry)
            return None, _as_input_grad(grad_weight, weight)
        grad_x, grad_weight = _ConvGrad.apply(x, weight, grad_out, ctx.geometry)
        return _as_input_grad(grad_x, x), _as_input_grad(grad_weight, weight)


def conv2d(
    x: paddle.Tensor, weight: paddle.Tensor, stride: int = 1, padding: int = 0, groups: int = 1
) -> paddle.Tensor:
    """Bias-free NCHW convolution with exact first and second derivatives.

    With ``groups`` = T it computes T independent convolutions at once (weight [T·O, C, k, k],
    input [N, T·C, H, W]): the stacked tasks of a meta-batch, each with its own weights. The
    derivations below hold group by group, so they are unchanged.
    """
    return _Conv.apply(x, weight, (stride, padding, groups))


_POOL = (
    [2, 2],
    [2, 2],
    [0, 0],
    False,
    False,
    False,
)  # kernel, stride, padding, global, adaptive, ceil


class _MaxPoolGrad(PyLayer):
    """The map dy -> dx of 2×2 max-pooling's backward pass, as a differentiable op.

    With ``index`` (each window's argmax) fixed, dx is dy scattered to the argmax positions: linear
    in dy, so its derivative along dy is the gather ``g -> g[index]`` (the forward pass with the
    same mask). ``index`` is piecewise constant in x, so the derivative along x is zero wherever
    no window has a tie; x only gives the shape and receives no gradient.
    """

    @staticmethod
    def forward(ctx, x, index, grad_out):
        ctx.save_for_backward(index)
        return _C_ops.max_pool2d_with_index_grad(x, index, grad_out, *_POOL)

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
    """Collect the argmax indices (numpy) of every :func:`max_pool2x2` call in the block.

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
    def forward(ctx, x):
        out, index = _C_ops.max_pool2d_with_index(x, *_POOL)
        ctx.save_for_backward(x, index)
        if _pool_index_log is not None:
            _pool_index_log.append(index.numpy())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index = ctx.saved_tensor()
        return _MaxPoolGrad.apply(x.detach(), index, grad_out)


def max_pool2x2(x: paddle.Tensor) -> paddle.Tensor:
    """2×2 max-pooling with stride 2 (NCHW) with exact first and second derivatives.

    Odd rows/columns at the bottom/right are dropped (floor, like TensorFlow's 'VALID': 21 -> 10).
    A tie inside a window sends the whole gradient to its first maximum in row-major order, the
    subgradient Paddle's and PyTorch's CPU kernels pick. Away from ties the function is linear in
    x with a locally constant mask, so these derivatives are the true ones.
    """
    return _MaxPool.apply(x)


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


class _BatchNormGrad(PyLayer):
    """The map (x, scale, dy) -> (dx, dscale, dshift) of batch norm's backward pass, as a
    differentiable op. x enters through x̂ and rstd (saved by the forward); it is an input only
    so that its gradient reaches it. The derivative is the fused double-backward operator
    (formulas in csrc/onednn_conv.cc, "Batch norm"); MAML never needs a third derivative."""

    @staticmethod
    def forward(ctx, x, scale, grad_out, xhat, rstd):
        ctx.save_for_backward(x, scale, grad_out, xhat, rstd)
        return kernels.active().batch_norm_backward(xhat, rstd, scale, grad_out)

    @staticmethod
    def backward(ctx, g_x, g_scale, g_shift):
        x, scale, grad_out, xhat, rstd = ctx.saved_tensor()
        g_x = paddle.zeros_like(grad_out) if g_x is None else g_x
        g_scale = paddle.zeros_like(scale) if g_scale is None else g_scale
        g_shift = paddle.zeros_like(scale) if g_shift is None else g_shift
        d_x, d_scale, d_grad_out = kernels.active().batch_norm_double_backward(
            xhat, rstd, scale, grad_out, g_x, g_scale, g_shift
        )
        return (
            _as_input_grad(d_x, x),
            _as_input_grad(d_scale, scale),
            _as_input_grad(d_grad_out, grad_out),
            None,
            None,
        )


class _BatchNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        y, xhat, rstd = kernels.active().batch_norm_forward(x, scale, shift, eps)
        ctx.save_for_backward(x, scale, shift, xhat, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, shift, xhat, rstd = ctx.saved_tensor()
        grad_x, grad_scale, grad_shift = _BatchNormGrad.apply(x, scale, grad_out, xhat, rstd)
        return (
            _as_input_grad(grad_x, x),
            _as_input_grad(grad_scale, scale),
            _as_input_grad(grad_shift, shift),
        )


def batch_norm(
    x: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor, eps: float, fuse: bool = True
) -> paddle.Tensor:
    """Batch norm of ``x`` [N, C, H, W] with the batch's own statistics and exact first and
    second derivatives; ``scale`` and ``shift`` hold C values (any shape). Running averages are
    never used (batch statistics everywhere). For stacked tasks C = T·C': each task's channels
    get their own statistics.

    Where the active kernels fuse it (oneDNN kernels, float32 CPU) it is one operator for the
    forward, backward and double-backward passes each; elsewhere (float64 for the gradient
    checks, GPU) it is :func:`_batch_norm_composed`, the reference the fused one is tested
    against.

    ``fuse=False`` keeps the composition where a ``paddle.grad(..., inputs=subset)`` may want
    x's gradient but not scale's and shift's: Paddle then prunes them and requires the fused
    operator's backward to return None for them, without telling it (MAML++'s per-step rows are
    not adapted in the inner loop, while the convolutions before them are).
    """
    c = x.shape[1]
    scale, shift = scale.reshape([c]), shift.reshape([c])
    if fuse and kernels.active().fuses_batch_norm(x, scale, shift):
        return _BatchNorm.apply(x, scale, shift, eps)
    return _batch_norm_composed(x, scale, shift, eps)


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

    Where the active kernels fuse it (:meth:`~metalearn.kernels.NativeKernels.fuses_linear`) the
    whole network is one autograd node, its backward one more and the backward's derivative
    a hand-written sweep (:class:`_ReluNetworkGrad`): second-order MAML on the sinusoid MLP
    otherwise spends most of its time on the bookkeeping of ~15 small Paddle ops per layer and
    pass. Elsewhere (float64, Paddle's own kernels) the layers are composed of :func:`linear`
    and ``relu``: the reference the fused network is tested against.
    """
    params = [t for pair in zip(weights, biases) for t in pair]
    if all(w.ndim == x.ndim for w in weights) and kernels.active().fuses_linear(x, *params):
        return _ReluNetwork.apply(x, *params)
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = linear(x, weight, bias)
        if layer < len(weights) - 1:
            x = paddle.nn.functional.relu(x)
    return x


def _relu_mask(hidden: paddle.Tensor, grad: paddle.Tensor) -> paddle.Tensor:
    """``grad`` where the ReLU output ``hidden`` is positive, else 0: the ReLU's backward, linear
    in ``grad`` with a mask that is locally constant, so also its own derivative."""
    return _C_ops.relu_grad(hidden, grad)


class _Saved:
    """Tensors handed to a PyLayer without making them differentiable inputs."""

    def __init__(self, *tensors: paddle.Tensor):
        self.tensors = tensors


class _ReluNetwork(PyLayer):
    """Forward pass: h_0 = x, z_l = h_l·W_l + b_l, h_{l+1} = relu(z_l), output z_{L-1}."""

    @staticmethod
    def forward(ctx, x, *params):
        kernel = kernels.active()
        hidden = []
        out = x
        for layer in range(len(params) // 2):
            if layer:
                out = _C_ops.relu(out)
                hidden.append(out)
            out = kernel.linear_forward(out, params[2 * layer], params[2 * layer + 1])
        ctx.save_for_backward(x, *params)
        ctx.hidden = _Saved(*hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensor()
        grads = _ReluNetworkGrad.apply(x, grad_out, *params, ctx.hidden)
        grad_x, grad_params = (grads[0], grads[1:]) if not x.stop_gradient else (None, grads)
        return (_as_input_grad(grad_x, x), *map(_as_input_grad, grad_params, params))


class _ReluNetworkGrad(PyLayer):
    """The backward pass (x, dy, W_0, b_0, ...) -> ([dx,] dW_0, db_0, ...) of
    :class:`_ReluNetwork` as one differentiable op. dx is an output only if x needs a gradient.

    Backward, l = L-1 .. 0, with dz_{L-1} = dy: dW_l = h_lᵀ·dz_l, db_l = Σ_rows dz_l,
    dh_l = dz_l·W_lᵀ, dz_{l-1} = mask_l ⊙ dh_l (mask_l: h_l > 0, locally constant).
    Its derivative for incoming cotangents (ḡx, ḡW_l, ḡb_l) has two sweeps:

    * up, l = 0 .. L-1, with c_0 = ḡx (the cotangent of dh_l): each layer's backward is
      bilinear, so (linear_double_backward) d dz_l = c_l·W_l + h_l·ḡW_l + ḡb_l, W̄_l = c_lᵀ·dz_l,
      h̄_l = dz_l·ḡW_lᵀ; then c_{l+1} = mask_{l+1} ⊙ d dz_l, and d dy = d dz_{L-1};
    * down: the h̄_l (h_l depends on W_k, b_k for k < l, and on x) are back-propagated
      through the forward pass as an ordinary backward pass, adding to W̄_k, b̄_k and x̄.
    """

    @staticmethod
    def forward(ctx, x, grad_out, *args):
        *params, saved = args
        hidden = saved.tensors
        kernel, layers = kernels.active(), len(params) // 2
        inputs = [x, *hidden]  # h_l
        grads: list[paddle.Tensor | None] = [None] * (2 * layers)
        grad_z = grad_out
        grad_zs = [grad_out] * layers
        grad_x = None
        for layer in reversed(range(layers)):
            grad_zs[layer] = grad_z
            weight = params[2 * layer]
            if layer or not x.stop_gradient:
                grad_h, grads[2 * layer], grads[2 * layer + 1] = kernel.linear_backward(
                    inputs[layer], weight, grad_z
                )
            else:
                grads[2 * layer], grads[2 * layer + 1] = kernel.linear_param_backward(
                    inputs[layer], grad_z
                )
            if layer:
                grad_z = _relu_mask(hidden[layer - 1], grad_h)
            else:
                grad_x = None if x.stop_gradient else grad_h
        ctx.save_for_backward(x, *params, *hidden, *grad_zs)
        ctx.layers, ctx.with_x = layers, not x.stop_gradient
        return (grad_x, *grads) if ctx.with_x else tuple(grads)

    @staticmethod
    def backward(ctx, *cotangents):
        saved, layers, with_x = ctx.saved_tensor(), ctx.layers, ctx.with_x
        x, params = saved[0], saved[1 : 1 + 2 * layers]
        hidden, grad_zs = saved[1 + 2 * layers : 3 * layers], saved[3 * layers :]
        inputs = [x, *hidden]
        kernel = kernels.active()
        g_x, g_params = (cotangents[0], cotangents[1:]) if with_x else (None, cotangents)
        g_params = [paddle.zeros_like(p) if g is None else g for g, p in zip(g_params, params)]
        bar_params: list[paddle.Tensor | None] = [None] * (2 * layers)
        bar_inputs: list[paddle.Tensor | None] = [None] * layers
        carry = g_x  # cotangent of dh_l
        for layer in range(layers):  # up
            weight, g_weight, g_bias = (
                params[2 * layer],
                g_params[2 * layer],
                g_params[2 * layer + 1],
            )
            if carry is None:
                d_grad_z = kernel.linear_forward(inputs[layer], g_weight, g_bias)
                if layer or with_x:
                    bar_inputs[layer] = _C_ops.matmul(grad_zs[layer], g_weight, False, True)
            else:
                bar_inputs[layer], bar_params[2 * layer], d_grad_z = kernel.linear_double_backward(
                    inputs[layer], weight, grad_zs[layer], carry, g_weight, g_bias
                )
            if layer < layers - 1:
                carry = _relu_mask(hidden[layer], d_grad_z)
        d_grad_out = d_grad_z
        bar_h = bar_inputs[layers - 1]
        for layer in reversed(range(layers - 1)):  # down: h_{layer+1} = relu(z_layer)
            bar_z = _relu_mask(hidden[layer], bar_h)
            if layer or with_x:
                bar_below, d_weight, d_bias = kernel.linear_backward(
                    inputs[layer], params[2 * layer], bar_z
                )
                bar_h = bar_below if bar_inputs[layer] is None else bar_below + bar_inputs[layer]
            else:
                d_weight, d_bias = kernel.linear_param_backward(inputs[layer], bar_z)
            w_index = 2 * layer
            bar_params[w_index] = (
                d_weight if bar_params[w_index] is None else bar_params[w_index] + d_weight
            )
            bar_params[w_index + 1] = d_bias
        bar_x = bar_h if with_x else None
        return (
            _as_input_grad(bar_x, x),
            d_grad_out,
            *map(_as_input_grad, bar_params, params),
        )
