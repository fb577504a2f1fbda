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
