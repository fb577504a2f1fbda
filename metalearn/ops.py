"""Operations whose second derivatives are exact, for true second-order MAML.

Paddle's built-in ``F.conv2d`` double-grad runs but returns wrong numbers, and ``cross_entropy``,
``log_softmax``, ``flatten`` and ``max_pool2d`` have no double-grad at all (see docs/design.md).
MAML differentiates through the inner-loop gradient, so every op on that path needs a correct
derivative of its own backward pass. This module supplies the two the networks need:

* :func:`conv2d`: the native convolution kernels for the forward and backward passes, with the
  double-backward written out by hand. The backward of a convolution is bilinear, so its own
  derivatives are again plain convolution forward / input-gradient / weight-gradient calls, which
  Paddle computes correctly. No third derivative is ever needed by MAML.
* :func:`cross_entropy`: mean cross-entropy from ``exp``/``log``/``sum`` only.
"""

from __future__ import annotations

import paddle
from paddle import _C_ops
from paddle.autograd import PyLayer


class NativeKernels:
    """Paddle's own first-order convolution kernels (NCHW, no bias): any device, any dtype."""

    def forward(self, x: paddle.Tensor, weight: paddle.Tensor, stride: int, padding: int):
        return _C_ops.conv2d(
            x, weight, [stride, stride], [padding, padding], "EXPLICIT", [1, 1], 1, "NCHW"
        )

    def backward(self, x, weight, grad_out, stride: int, padding: int):
        """(dL/dx, dL/dweight) for ``y = conv(x, weight)`` given ``grad_out = dL/dy``."""
        return _C_ops.conv2d_grad(
            x, weight, grad_out, [stride, stride], [padding, padding], "EXPLICIT", [1, 1], 1, "NCHW"
        )

    def backward_data(self, x, weight, grad_out, stride: int, padding: int):
        return self.backward(x, weight, grad_out, stride, padding)[0]

    def backward_weights(self, x, weight, grad_out, stride: int, padding: int):
        return self.backward(x, weight, grad_out, stride, padding)[1]


_kernels: NativeKernels = NativeKernels()


def use_kernels(kind: str) -> str:
    """Pick the convolution kernels: ``"fast"`` (oneDNN, CPU float32; built on first use, see
    metalearn/fastconv.py) or ``"native"`` (Paddle's). Returns the kind actually in use: fast
    falls back to native on a GPU or where oneDNN cannot be built. Both compute the same function.
    """
    global _kernels
    if kind == "fast" and paddle.get_device() == "cpu":
        from metalearn import fastconv

        fast = fastconv.load_kernels()
        if fast is not None:
            _kernels = fast
            return "fast"
    _kernels = NativeKernels()
    return "native"


class _ConvGrad(PyLayer):
    """The map (x, w, dy) -> (dx, dw) of a convolution's backward pass, as a differentiable op."""

    @staticmethod
    def forward(ctx, x, weight, grad_out, stride, padding):
        ctx.save_for_backward(x, weight, grad_out)
        ctx.stride, ctx.padding = stride, padding
        return _kernels.backward(x, weight, grad_out, stride, padding)

    @staticmethod
    def backward(ctx, grad_dx, grad_dw):
        # dx = J_x(w)^T dy and dw = J_w(x)^T dy are bilinear. With incoming cotangents (gx, gw):
        #   d/d dy = conv(gx, w) + conv(x, gw)
        #   d/d w  = weight-gradient of conv at input gx with output-gradient dy
        #   d/d x  = input-gradient  of conv at weight gw with output-gradient dy
        x, weight, grad_out = ctx.saved_tensor()
        stride, padding = ctx.stride, ctx.padding
        d_grad_out = paddle.zeros_like(grad_out)
        d_x = d_weight = None
        if grad_dx is not None:
            d_grad_out = d_grad_out + _kernels.forward(grad_dx, weight, stride, padding)
            d_weight = _kernels.backward_weights(grad_dx, weight, grad_out, stride, padding)
        if grad_dw is not None:
            d_grad_out = d_grad_out + _kernels.forward(x, grad_dw, stride, padding)
            d_x = _kernels.backward_data(x, grad_dw, grad_out, stride, padding)
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


class _Conv(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return _kernels.forward(x, weight, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensor()
        grad_x, grad_weight = _ConvGrad.apply(x, weight, grad_out, ctx.stride, ctx.padding)
        return _as_input_grad(grad_x, x), _as_input_grad(grad_weight, weight)


def conv2d(
    x: paddle.Tensor, weight: paddle.Tensor, stride: int = 1, padding: int = 0
) -> paddle.Tensor:
    """Bias-free NCHW convolution with exact first and second derivatives."""
    return _Conv.apply(x, weight, stride, padding)


def cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of ``logits`` [n, classes] against integer ``labels`` [n].

    Built from double-differentiable ops only. The max subtracted for numerical stability is
    detached: log-sum-exp does not depend on it, so the derivatives stay exact.
    """
    shift = logits.max(axis=1, keepdim=True).detach()
    shifted = logits - shift
    log_norm = paddle.log(paddle.exp(shifted).sum(axis=1, keepdim=True))
    one_hot = paddle.nn.functional.one_hot(labels, logits.shape[1]).astype(logits.dtype)
    picked = (shifted * one_hot).sum(axis=1, keepdim=True)
    return (log_norm - picked).sum() * (1.0 / logits.shape[0])
