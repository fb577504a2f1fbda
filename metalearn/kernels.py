"""The first-order convolution kernels behind :mod:`metalearn.ops`, and which ones are in use.

Both :mod:`metalearn.ops` (the differentiable convolution) and :mod:`metalearn.fastconv` (the
oneDNN operator, a subclass of :class:`NativeKernels`) import this module, and it imports neither:
the choice is installed here by :func:`metalearn.fastconv.use_kernels`, and read by the ops at
each call, so switching kernels needs no reload of the ops.
"""

from __future__ import annotations

from paddle import _C_ops


class NativeKernels:
    """Paddle's own first-order convolution kernels (NCHW, no bias): any device, any dtype.

    ``groups`` splits the channels as Paddle does: weight [O, C / groups, k, k], output channels
    [g·O/groups, (g+1)·O/groups) see only input channels [g·C/groups, (g+1)·C/groups).
    """

    def forward(self, x, weight, stride: int, padding: int, groups: int = 1):
        return _C_ops.conv2d(
            x, weight, [stride, stride], [padding, padding], "EXPLICIT", [1, 1], groups, "NCHW"
        )

    def backward(self, x, weight, grad_out, stride: int, padding: int, groups: int = 1):
        """(dL/dx, dL/dweight) for ``y = conv(x, weight)`` given ``grad_out = dL/dy``."""
        geometry = ([stride, stride], [padding, padding], "EXPLICIT", [1, 1], groups, "NCHW")
        return _C_ops.conv2d_grad(x, weight, grad_out, *geometry)

    def backward_data(self, x, weight, grad_out, stride: int, padding: int, groups: int = 1):
        return self.backward(x, weight, grad_out, stride, padding, groups)[0]

    def backward_weights(self, x, weight, grad_out, stride: int, padding: int, groups: int = 1):
        return self.backward(x, weight, grad_out, stride, padding, groups)[1]

    def fuses_batch_norm(self, *tensors) -> bool:
        """Whether the ``batch_norm_*`` kernels take these tensors: Paddle has no kernels of
        its own with an exact double-backward, so :func:`metalearn.ops.batch_norm` then
        composes batch norm of elementwise ops."""
        return False

    # -- linear layers: y = x·W + b for one task ([N, I]·[I, O] + [O]) or for T stacked tasks
    # ([T, N, I]·[T, I, O] + [T, O]), see metalearn.ops.linear -----------------------------------
    def fuses_linear(self, *tensors) -> bool:
        """Whether :func:`metalearn.ops.linear` takes these tensors as one operator call per pass
        (forward, backward, double-backward). Off here, so with Paddle's kernels the composed
        linear layer stays the reference the fused one is tested against."""
        return False

    def linear_forward(self, x, weight, bias):
        """x·W + b, one call: ``baddbmm``/``addmm`` broadcast the bias over the rows."""
        if x.ndim == 3:
            return _C_ops.baddbmm(_C_ops.unsqueeze(bias, [1]), x, weight, 1.0, 1.0)
        return _C_ops.addmm(bias, x, weight, 1.0, 1.0)

    def linear_backward(self, x, weight, grad_out):
        """(dx, dW, db) given dL/dy: dx = dy·Wᵀ, dW = xᵀ·dy, db = Σ_rows dy."""
        grad_x, grad_weight = _C_ops.matmul_grad(x, weight, grad_out, False, False)
        return grad_x, grad_weight, _C_ops.sum(grad_out, [-2], None, False)

    def linear_param_backward(self, x, grad_out):
        """(dW, db) alone, for an input that needs no gradient (the data at the first layer)."""
        return _C_ops.matmul(x, grad_out, True, False), _C_ops.sum(grad_out, [-2], None, False)

    def linear_double_backward(self, x, weight, grad_out, g_x, g_weight, g_bias):
        """Cotangents of (x, W, dy) for incoming ones (g_x, g_weight, g_bias) on the backward's
        outputs (dx, dW, db). The backward is bilinear: d dy = g_x·W + x·g_weight + g_bias,
        d x = dy·g_weightᵀ, d W = g_xᵀ·dy (the last two are matmul_grad(g_x, g_weight, dy))."""
        d_grad_out = self.linear_forward(g_x, weight, g_bias)
        if x.ndim == 3:
            d_grad_out = _C_ops.baddbmm(d_grad_out, x, g_weight, 1.0, 1.0)
        else:
            d_grad_out = _C_ops.addmm(d_grad_out, x, g_weight, 1.0, 1.0)
        d_x, d_weight = _C_ops.matmul_grad(g_x, g_weight, grad_out, False, False)
        return d_x, d_weight, d_grad_out


_active: NativeKernels = NativeKernels()
_active_kind = "native"


def active() -> NativeKernels:
    """The kernels the ops call now."""
    return _active


def in_use() -> str:
    """``"fast"`` or ``"native"``: what was installed last (native until anything is)."""
    return _active_kind


def install(kernels: NativeKernels, kind: str) -> None:
    """Make ``kernels`` (described as ``kind``) the ones every later op call uses."""
    global _active, _active_kind
    _active, _active_kind = kernels, kind
