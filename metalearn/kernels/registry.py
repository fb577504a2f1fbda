"""The first-order convolution kernels behind :mod:`metalearn.kernels.ops`, and which ones are in use.

Both :mod:`metalearn.kernels.ops` (the differentiable convolution) and :mod:`metalearn.kernels.onednn` (the
oneDNN operator, a subclass of :class:`NativeKernels`) import this module, and it imports neither:
the choice is installed here by :func:`metalearn.kernels.onednn.use_kernels`, and read by the ops at
each call, so switching kernels needs no reload of the ops.
"""

from __future__ import annotations

import paddle
from paddle import _C_ops


class NativeKernels:
    """Paddle's own first-order convolution kernels (NCHW, no bias): any device, any dtype.

    ``groups`` splits the channels as Paddle does: weight [O, C / groups, k, k], output channels
    [g·O/groups, (g+1)·O/groups) see only input channels [g·C/groups, (g+1)·C/groups).

    ``layout`` says how the activations are laid out (:meth:`activation_block`): 0 for plain
    NCHW, the only layout these kernels take.
    """

    def forward(self, x, weight, stride: int, padding: int, groups: int = 1, layout: int = 0):
        _plain_only(layout)
        return _C_ops.conv2d(
            x, weight, [stride, stride], [padding, padding], "EXPLICIT", [1, 1], groups, "NCHW"
        )

    def backward(
        self, x, weight, grad_out, stride: int, padding: int, groups: int = 1, layout: int = 0
    ):
        """(dL/dx, dL/dweight) for ``y = conv(x, weight)`` given ``grad_out = dL/dy``."""
        _plain_only(layout)
        geometry = ([stride, stride], [padding, padding], "EXPLICIT", [1, 1], groups, "NCHW")
        return _C_ops.conv2d_grad(x, weight, grad_out, *geometry)

    def backward_data(
        self, x, weight, grad_out, stride: int, padding: int, groups: int = 1, layout: int = 0
    ):
        return self.backward(x, weight, grad_out, stride, padding, groups, layout)[0]

    def backward_weights(
        self, x, weight, grad_out, stride: int, padding: int, groups: int = 1, layout: int = 0
    ):
        return self.backward(x, weight, grad_out, stride, padding, groups, layout)[1]

    def activation_block(self, *tensors) -> int:
        """B > 1 where these kernels can keep activations of these tensors (float32 CPU, say) in
        oneDNN's channel-blocked layout nChw{B}c between operators: the convolutions then take
        ``layout`` bits (1: x and dx blocked, 2: y and dy blocked) and batch norm ``block`` = B,
        and no convolution reorders its activations. 1 here: plain NCHW only."""
        return 1

    def fuses_batch_norm(self, *tensors) -> bool:
        """Whether the ``batch_norm_*`` kernels take these tensors: Paddle has no kernels of
        its own with an exact double-backward, so :func:`metalearn.kernels.ops.batch_norm` then
        composes batch norm of elementwise ops."""
        return False

    def fuses_relu_conv_body(self, x, *params) -> bool:
        """Whether :meth:`relu_conv_body_features` takes these tensors. Paddle's kernels have no
        such operator: :func:`metalearn.kernels.ops.relu_conv_body` then returns None and the network
        runs its blocks one op at a time."""
        return False

    def relu_conv_body_features(
        self, x, params, stride: int, padding: int, eps: float, groups: int = 1
    ):
        """Features [N, C] of x [N, C_in, H, W] through blocks [conv (no bias, ``groups`` as
        :meth:`forward`'s) → batch norm with the batch's statistics → ReLU], params = [w_0,
        scale_0, shift_0, w_1, ...], then the mean over the spatial positions; no autograd
        record (csrc/body.cc)."""
        raise NotImplementedError

    # -- the ReLU network of metalearn.kernels.ops.relu_network: h_0 = x, z_l = h_l·W_l + b_l,
    # h_{l+1} = relu(z_l), y = z_{L-1}; params = [W_0, b_0, W_1, b_1, ...] ---------------------
    def fuses_linear(self, *tensors) -> bool:
        """Whether :func:`metalearn.kernels.ops.relu_network` runs these tensors as one node per pass
        (the ``relu_network_*`` methods). Off here: with Paddle's kernels the composition of
        recorded ops stays the reference the fused network is tested against; the methods below
        are the same passes composed of Paddle operators, for any dtype (and for the tests)."""
        return False

    def relu_network_forward(self, x, params):
        """(y, state): the output and what the backward passes need (here the hidden h_l)."""
        layers, hidden, out = len(params) // 2, [], x
        for layer in range(layers):
            out = _affine(out, params[2 * layer], params[2 * layer + 1])
            if layer < layers - 1:
                out = _C_ops.relu(out)
                hidden.append(out)
        return out, tuple(hidden)

    def relu_network_backward(self, x, params, state, grad_out, with_x: bool):
        """(([dx,] dW_0, db_0, ...), dz): the gradients for dL/dy and what the double-backward
        needs. l = L-1 .. 0 with dz_{L-1} = dy: dW_l = h_lᵀ·dz_l, db_l = Σ_rows dz_l,
        dh_l = dz_l·W_lᵀ, dz_{l-1} = [h_l > 0] ⊙ dh_l."""
        layers, inputs = len(params) // 2, [x, *state]  # h_l
        grads: list = [None] * (2 * layers)
        grad_zs: list = [grad_out] * layers
        grad_z, grad_x = grad_out, None
        for layer in reversed(range(layers)):
            grad_zs[layer] = grad_z
            grads[2 * layer] = _C_ops.matmul(inputs[layer], grad_z, True, False)
            grads[2 * layer + 1] = _C_ops.sum(grad_z, [-2], None, False)
            if layer or with_x:
                grad_h = _C_ops.matmul(grad_z, params[2 * layer], False, True)
                if layer:
                    grad_z = _C_ops.relu_grad(inputs[layer], grad_h)
                else:
                    grad_x = grad_h
        return ((grad_x,) if with_x else ()) + tuple(grads), tuple(grad_zs)

    def relu_network_double_backward(self, x, params, state, grad_zs, cotangents, with_x: bool):
        """Cotangents of ([x,] W_0, b_0, ..., dy) for ``cotangents`` (none None) of the
        backward's outputs ([dx,] dW_0, db_0, ...). The backward is linear in dy and each
        layer's part bilinear, so two sweeps:

        * up, l = 0 .. L-1, with c_0 = ḡx (the cotangent of dh_l; none without x):
          d dz_l = c_l·W_l + h_l·ḡW_l + ḡb_l, W̄_l = c_lᵀ·dz_l, h̄_l = dz_l·ḡW_lᵀ,
          c_{l+1} = [h_{l+1} > 0] ⊙ d dz_l; d dy = d dz_{L-1};
        * down: the h̄_l (h_l depends on W_k, b_k for k < l, and on x) back-propagated through
          the forward pass like an ordinary backward, adding to W̄_k, b̄_k and x̄.
        """
        layers, inputs = len(params) // 2, [x, *state]
        first = 1 if with_x else 0
        carry = cotangents[0] if with_x else None
        g_params = cotangents[first:]
        bar: list = [None] * (2 * layers)
        bar_inputs: list = [None] * layers
        for layer in range(layers):  # up
            weight, g_weight = params[2 * layer], g_params[2 * layer]
            d_grad_z = _affine(inputs[layer], g_weight, g_params[2 * layer + 1])
            if carry is not None:
                d_grad_z = _matmul_add(d_grad_z, carry, weight)
                bar[2 * layer] = _C_ops.matmul(carry, grad_zs[layer], True, False)
            if layer or with_x:
                bar_inputs[layer] = _C_ops.matmul(grad_zs[layer], g_weight, False, True)
            if layer < layers - 1:
                carry = _C_ops.relu_grad(inputs[layer + 1], d_grad_z)
        bar_h = bar_inputs[layers - 1]
        for layer in reversed(range(layers - 1)):  # down: h_{layer+1} = relu(z_layer)
            bar_z = _C_ops.relu_grad(inputs[layer + 1], bar_h)
            d_weight = _C_ops.matmul(inputs[layer], bar_z, True, False)
            bar[2 * layer] = d_weight if bar[2 * layer] is None else bar[2 * layer] + d_weight
            bar[2 * layer + 1] = _C_ops.sum(bar_z, [-2], None, False)
            if layer or with_x:
                bar_h = _matmul_add(bar_inputs[layer], bar_z, params[2 * layer], True)
        bar[-1] = paddle.zeros_like(params[-1])  # the last bias does not enter the backward
        if bar[0] is None:  # one layer without x: the backward does not depend on W_0
            bar[0] = paddle.zeros_like(params[0])
        return ((bar_h,) if with_x else ()) + tuple(bar) + (d_grad_z,)


def _plain_only(layout: int) -> None:
    if layout:
        raise ValueError("Paddle's convolution kernels take plain NCHW activations only")


def _affine(x, weight, bias):
    """x·W + b in one call (``baddbmm``/``addmm`` broadcast the bias over the rows)."""
    if x.ndim == 3:
        return _C_ops.baddbmm(_C_ops.unsqueeze(bias, [1]), x, weight, 1.0, 1.0)
    return _C_ops.addmm(bias, x, weight, 1.0, 1.0)


def _matmul_add(base, a, b, transpose_b: bool = False):
    """base + a·b (or a·bᵀ)."""
    return _C_ops.add(base, _C_ops.matmul(a, b, False, transpose_b))


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
