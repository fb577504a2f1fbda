"""Algorithm variants: what direction each task asks of the meta-parameters, and the outer optimiser.

Everything else (the inner loop, the adapted subset, the inner update rule, the multi-step loss,
sampling, averaging over processes, checkpoints) is shared; the trainer and ``meta_update`` only
ever call the methods below. ``objective`` is the direction as a scalar to back-propagate:
``metalearn.MAML``'s ``learner.loss`` (learning/api.py), so a Paddle optimiser gets it as a
gradient.

* :class:`QueryGradient` — ∇ of the query loss after the inner loop with respect to every
  meta-parameter (θ and learned inner rates). Second order differentiates through the inner
  gradients (MAML); first order treats them as constants, which gives θ exactly FOMAML's
  ∇θ_K L_q (θ_K = θ − constants) and the learned rates their first-order gradient −g·∇L_q, as in
  MAML++'s code. ``first_order_until`` = N anneals the derivative order: first order for
  iterations 1..N, second order afterwards. Outer optimiser: Adam, optionally with the meta
  learning rate cosine-annealed to a minimum (MAML++).
* :class:`Reptile` — θ − θ_K from a plain inner loop, stepped by SGD with ε annealed linearly.
* :class:`Pretrain` — ∇θ of the loss on all of the task's points, no inner loop (the paper's
  sinusoid baseline), Adam.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import paddle

from metalearn.learning import meta_optimizers


class Order(enum.Enum):
    """How the inner loop's adapted weights depend on the meta-parameters."""

    SECOND = "second"  # through the inner gradients (create_graph)
    FIRST = "first"  # through the update arithmetic only: inner gradients are constants
    NONE = "none"  # not at all (evaluation, Reptile)


@dataclass(frozen=True)
class QueryGradient:
    """MAML (``first_order_until`` 0), FOMAML (never second order) and everything in between."""

    name: str = "maml"
    first_order_until: float = 0  # iterations 1..N are first order; math.inf: always
    meta_lr: float = 0.001
    min_meta_lr: float | None = None  # cosine annealing to this value over ``cosine_epochs``
    cosine_epochs: int = 1
    inner_loop = True
    learns_inner_rates = True
    steps_on_query_loss = True  # the direction is computed from the query loss

    def order(self, iteration: int | None) -> Order:
        """The derivative order at ``iteration`` (None: after every schedule has ended)."""
        if iteration is None:
            return Order.FIRST if math.isinf(self.first_order_until) else Order.SECOND
        return Order.FIRST if iteration <= self.first_order_until else Order.SECOND

    def direction(self, learner, batch, iteration: int | None):
        """(direction per meta-parameter, per-task query losses, the inner run) of a chunk."""
        run = learner.inner_loop(batch, self.order(iteration))
        objective, losses = self.objective(learner, run, iteration)
        return learner.gradient(objective), losses, run

    def objective(self, learner, run, iteration: int | None):
        """(a scalar whose gradient in the meta-parameters is the direction, per-task query
        losses): the query loss itself. ``metalearn.MAML`` hands it to ``.backward()``."""
        losses = learner.query_losses(run, iteration)
        return losses.sum(), losses

    def make_optimizer(self, params: dict) -> meta_optimizers.Adam:
        return meta_optimizers.Adam(params, self.meta_lr)

    def learning_rate(self, iteration: int) -> float:
        """The meta learning rate of ``iteration`` (1-based): constant, or cosine-annealed
        (as MAML++'s CosineAnnealingLR), staying at the minimum after ``cosine_epochs``."""
        if self.min_meta_lr is None:
            return self.meta_lr
        progress = min((iteration - 1) / max(self.cosine_epochs, 1), 1.0)
        span = self.meta_lr - self.min_meta_lr
        return self.min_meta_lr + 0.5 * span * (1 + math.cos(math.pi * progress))

    def optimizer_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """What Adam keeps per meta-parameter (Paddle's names): two moments, two β powers."""
        found = {}
        for name, shape in shapes.items():
            found.update({f"{name}_moment1_0": shape, f"{name}_moment2_0": shape})
            found.update({f"{name}_beta1_pow_acc_0": (1,), f"{name}_beta2_pow_acc_0": (1,)})
        return found


@dataclass(frozen=True)
class Pretrain(QueryGradient):
    """No inner loop: the gradient of the loss on all of the task's points."""

    name: str = "pretrain"
    inner_loop = False
    learns_inner_rates = False

    def direction(self, learner, batch, iteration):
        run = learner.pooled(batch)
        objective, losses = self.objective(learner, run, None)
        return learner.gradient(objective), losses, run


@dataclass(frozen=True)
class Reptile:
    """θ − θ_K, so SGD with step ε gives φ ← φ + ε·(mean θ_K − φ) (Nichol et al. 2018)."""

    name: str = "reptile"
    epsilon: float = 1.0
    epsilon_final: float | None = None  # linear annealing to this value over ``epochs``
    epochs: int = 1
    inner_loop = True
    learns_inner_rates = False
    steps_on_query_loss = False

    def order(self, iteration: int | None) -> Order:
        return Order.NONE

    def direction(self, learner, batch, iteration):
        """θ − θ_K summed over the chunk's tasks. No query loss: the step does not need one,
        and scoring the query set would cost about as much as the inner loop (the learner
        scores it on the iterations it logs)."""
        run = learner.inner_loop(batch, Order.NONE)
        adapted = run.trajectory[-1]
        direction = {
            k: learner.task_sum(w - adapted[k], batch.count).detach()
            for k, w in learner.params.items()
        }
        return direction, None, run

    def objective(self, learner, run, iteration: int | None):
        """The query loss's value with the gradient θ − θ_K: the loss after the inner loop
        (no gradient flows through it) plus ½‖θ − θ_K‖² minus its own value. A Paddle
        optimiser stepping θ along that "gradient" is Reptile's step (SGD with learning rate ε:
        θ ← θ + ε(θ_K − θ))."""
        with paddle.no_grad():
            losses = learner.query_losses(run, None)
        adapted = run.trajectory[-1]
        pull = paddle.add_n(
            [0.5 * paddle.square(w - adapted[k]).sum() for k, w in learner.params.items()]
        )
        return losses.sum() + (pull - pull.detach()), losses

    def make_optimizer(self, params: dict) -> meta_optimizers.SGD:
        return meta_optimizers.SGD(params, self.epsilon)

    def learning_rate(self, iteration: int) -> float:
        final = self.epsilon if self.epsilon_final is None else self.epsilon_final
        fraction = (iteration - 1) / max(self.epochs - 1, 1)
        return self.epsilon + fraction * (final - self.epsilon)

    def optimizer_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        return {}  # plain SGD keeps no state


def make_variant(algo: str, config: dict | None = None):
    """The variant behind ``--algo`` with the outer-optimiser settings of ``config``."""
    config = config or {}
    epochs = config.get("epochs", 1)
    if algo == "reptile":
        return Reptile(
            epsilon=config.get("meta_step", 1.0),
            epsilon_final=config.get("meta_step_final"),
            epochs=epochs,
        )
    adam = {
        "meta_lr": config.get("glob_meta_lr", 0.001),
        "min_meta_lr": config.get("min_meta_lr") if config.get("cosine_meta_lr") else None,
        "cosine_epochs": config.get("cosine_meta_lr_epochs") or epochs,
    }
    if algo == "pretrain":
        return Pretrain(**adam)
    if algo == "fomaml":
        return QueryGradient("fomaml", first_order_until=math.inf, **adam)
    return QueryGradient(algo, first_order_until=config.get("first_order_epochs") or 0, **adam)
