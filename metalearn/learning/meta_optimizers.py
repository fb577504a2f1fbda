"""Meta-optimisers that step every meta-parameter along a given direction in one kernel call.

The direction of a meta-iteration is not a gradient Paddle's autograd left on the parameters (it is
a meta-batch mean, possibly all-reduced over processes), and the network has only a handful of
small tensors, so ``paddle.optimizer`` costs more than the arithmetic: a surrogate backward to
place the direction as ``.grad``, then one kernel call and its Python bookkeeping per parameter.
These classes call Paddle's own kernels directly — ``merged_adam_`` (every parameter in one call)
and ``sgd_`` — so θ moves as with ``paddle.optimizer.Adam``/``SGD``: the same arithmetic, though
in float32 ``merged_adam_`` can round a weight one ulp away from the per-parameter ``adam_``.

State is keyed by the meta-parameters' stable names in Paddle's layout (``<name>_moment1_0``,
``<name>_moment2_0``, ``<name>_beta1_pow_acc_0``, ``<name>_beta2_pow_acc_0``), so checkpoints
written with ``paddle.optimizer.Adam`` load unchanged, and the other way round.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle import _C_ops

TensorDict = dict[str, paddle.Tensor]


class SGD:
    """θ ← θ − lr·d (Reptile's outer step); keeps no state. Also the learning-rate handling and
    interface Adam shares."""

    def __init__(self, params: TensorDict, learning_rate: float):
        self.params = params
        self._lr_value: float | None = None
        self.set_lr(learning_rate)

    def set_lr(self, value: float) -> None:
        """Rebuilds the learning-rate tensor only when the value changes (schedules repeat it)."""
        if value != self._lr_value:
            dtype = next(iter(self.params.values())).dtype
            self._lr_value, self._lr = value, paddle.full([1], value, dtype)

    def get_lr(self) -> float:
        return self._lr_value

    def step(self, direction: TensorDict) -> None:
        """Move every meta-parameter along its entry of ``direction`` (used as its gradient)."""
        with paddle.no_grad():
            for name, value in direction.items():
                _C_ops.sgd_(self.params[name], self._lr, value.detach(), None, False)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def set_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""


class Adam(SGD):
    """Adam (Kingma & Ba) with Paddle's defaults and arithmetic, all parameters in one call."""

    _SLOTS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")

    def __init__(
        self,
        params: TensorDict,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
    ):
        super().__init__(params, learning_rate)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self._state = {
            slot: [self._initial(slot, p) for p in params.values()] for slot in self._SLOTS
        }

    def _initial(self, slot: str, param: paddle.Tensor) -> paddle.Tensor:
        """Paddle's starting values: zero moments, β powers holding β (the first step's power)."""
        powers = {"beta1_pow_acc": self.beta1, "beta2_pow_acc": self.beta2}
        if slot in powers:
            return paddle.full([1], powers[slot], param.dtype)
        return paddle.zeros(param.shape, param.dtype)

    def step(self, direction: TensorDict) -> None:
        grads = [direction[name].detach() for name in self.params]
        with paddle.no_grad():
            _C_ops.merged_adam_(
                list(self.params.values()),
                grads,
                [self._lr] * len(grads),
                self._state["moment1"],
                self._state["moment2"],
                None,  # no AMSGrad maximum
                self._state["beta1_pow_acc"],
                self._state["beta2_pow_acc"],
                None,  # no float32 master weights
                self.beta1,
                self.beta2,
                self.epsilon,
                False,  # multi_precision
                False,  # use_global_beta_pow: each parameter keeps its own β powers
                False,  # amsgrad
            )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Moments and β powers as numpy arrays, keyed ``<stable name>_<slot>_0``."""
        return {
            _key(name, slot): tensors[index].numpy()
            for slot, tensors in self._state.items()
            for index, name in enumerate(self.params)
        }

    def set_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (callers check the keys and shapes first)."""
        for slot, tensors in self._state.items():
            for index, name in enumerate(self.params):
                value = np.asarray(state[_key(name, slot)]).reshape(tensors[index].shape)
                tensors[index].set_value(value.astype(tensors[index].numpy().dtype))


def _key(name: str, slot: str) -> str:
    return f"{name}_{slot}_0"
