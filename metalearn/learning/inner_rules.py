"""Inner update rules: how one adaptation step moves a weight along its support-loss gradient.

``θ_{k+1} = θ_k − rate · g_k`` where the rate is

* ``sgd``:     the fixed α of the flags (MAML);
* ``lslr``:    one learned rate per parameter tensor and per inner step, initialised to α
  (MAML++'s "learning per-layer per-step learning rates", Antoniou et al. 2019);
* ``metasgd``: one learned rate per scalar weight, initialised to α (Li et al. 2017).

Learned rates are meta-parameters like θ: they live in the learner's parameter dict under
``lr:<weight name>``, so checkpoints save them (``param:lr:...``), the meta-optimiser steps them,
and the distributed all-reduce carries their directions in the same flat buffer as θ's. At test
time with more steps than were trained, LSLR keeps using its last step's rates.
"""

from __future__ import annotations

import numpy as np
import paddle

RATE_PREFIX = "lr:"


def rate_name(weight: str) -> str:
    """The meta-parameter holding ``weight``'s learned inner learning rate(s)."""
    return RATE_PREFIX + weight


class SGD:
    """Plain gradient descent with the fixed step α (no meta-parameters of its own), or α for
    the first step and ``later_lr`` for the ones after it (the paper's reinforcement-learning
    test halved the step after the first)."""

    name = "sgd"
    learned = False

    def __init__(self, lr: float, later_lr: float | None = None):
        self.lr = lr
        self.later_lr = lr if later_lr is None else later_lr

    def init_arrays(
        self, shapes: dict[str, tuple], train_steps: int, dtype: str
    ) -> dict[str, np.ndarray]:
        """Initial values of the rule's meta-parameters for the adapted weights ``shapes``."""
        return {}

    def update(
        self,
        name: str,
        weight: paddle.Tensor,
        grad: paddle.Tensor,
        step: int,
        meta: dict[str, paddle.Tensor],
    ) -> paddle.Tensor:
        """The weight after inner step ``step`` (0-based); ``meta`` holds learned rates."""
        return weight - (self.lr if step == 0 else self.later_lr) * grad


class LSLR(SGD):
    """A learned rate per parameter tensor and per inner step (MAML++)."""

    name = "lslr"
    learned = True

    def init_arrays(self, shapes, train_steps, dtype):
        return {rate_name(k): np.full(max(train_steps, 1), self.lr, dtype) for k in shapes}

    def update(self, name, weight, grad, step, meta):
        rates = meta[rate_name(name)]
        row = min(step, rates.shape[0] - 1)
        return weight - rates[row : row + 1] * grad  # contiguous slice: exact double-grad


class MetaSGD(SGD):
    """A learned rate per scalar weight, shared by all inner steps (Meta-SGD)."""

    name = "metasgd"
    learned = True

    def init_arrays(self, shapes, train_steps, dtype):
        return {rate_name(k): np.full(shape, self.lr, dtype) for k, shape in shapes.items()}

    def update(self, name, weight, grad, step, meta):
        return weight - meta[rate_name(name)] * grad


INNER_RULES = {rule.name: rule for rule in (SGD, LSLR, MetaSGD)}


def make_rule(name: str, lr: float, later_lr: float | None = None) -> SGD:
    if name not in INNER_RULES:
        raise ValueError(f"unknown inner rule {name!r}; choose one of {tuple(INNER_RULES)}")
    if name != SGD.name:
        if later_lr is not None:
            raise ValueError(f"inner rule {name!r} learns its rates: a later-steps rate is sgd's")
        return INNER_RULES[name](lr)
    return SGD(lr, later_lr)
