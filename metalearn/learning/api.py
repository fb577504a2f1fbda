"""Meta-learning any ``paddle.nn.Layer`` from Python: :class:`MAML` and its adapted
:class:`Learner` (``clone()`` / ``adapt()`` / ``loss()``, as in learn2learn)::

    import paddle, metalearn
    maml = metalearn.MAML(model, inner_lr=0.4, steps=1, order="second")
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=maml.parameters())
    for x_s, y_s, x_q, y_q in tasks:
        learner = maml.clone().adapt(x_s, y_s)
        learner.loss(x_q, y_q).backward()   # the meta-gradient lands in the model's .grad
    opt.step(); opt.clear_grad()

Nothing here is a second inner loop: the model is a :class:`~metalearn.nets.layer_net.LayerNet`
(exact second order through the user's layers), and adaptation, the inner update rules, the
orders and each order's objective are the MetaLearner's and variants.py's, as train.py uses them.

``order``: ``"second"`` (MAML), ``"first"`` (FOMAML: the inner gradients are constants) or
``"reptile"``: the adapted weights do not depend on θ, and ``loss`` carries the query loss's value
with the gradient θ − θ_K, so a Paddle optimiser steps θ towards the adapted weights (SGD with
learning rate ε is Reptile's θ ← θ + ε(θ_K − θ); Adam rescales that direction).
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle

from metalearn.kernels import onednn
from metalearn.learning.inner_rules import make_rule
from metalearn.learning.learner import InnerRun, MetaLearner, adapted_names, make_parameters
from metalearn.learning.variants import Order, make_variant
from metalearn.nets.layer_net import LayerNet

ORDERS = {"second": "maml", "first": "fomaml", "reptile": "reptile"}
"""``order`` -> the variant (variants.py) that defines the direction."""

TensorDict = dict[str, paddle.Tensor]


class MAML:
    """A model and its meta-learning settings; the meta-parameters are the model's own
    parameters (updated in place by your optimiser) plus learned inner rates, if any.

    ``rule``: ``"sgd"`` (fixed ``inner_lr``), ``"lslr"`` (a learned rate per tensor and step) or
    ``"metasgd"`` (a learned rate per weight); ``adapt``: ``"all"``, ``"head"`` (the last
    sublayer with parameters: ANIL) or a list of parameter names; ``loss``: ``"cross_entropy"``
    (integer labels, accuracy) or ``"mse"``; ``exact=False`` runs Paddle's own double-grads
    (for the audit's proof that they are wrong); ``kernels``: ``"fast"`` (oneDNN on the CPU,
    where it builds) or ``"native"`` (Paddle's).
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        inner_lr: float,
        steps: int = 1,
        order: str = "second",
        rule: str = "sgd",
        adapt: str | Sequence[str] = "all",
        loss: str = "cross_entropy",
        exact: bool = True,
        kernels: str = "fast",
    ):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {tuple(ORDERS)}")
        if order == "reptile" and rule != "sgd":
            raise ValueError("Reptile adapts with plain SGD: it has no gradient for learned rates")
        onednn.use_kernels(kernels)
        self.net = LayerNet(model, loss=loss, exact=exact)
        theta = self.net.parameters()
        adapt = list(self.net.head_names) if adapt == "head" else adapt  # full forward each step
        shapes = {name: theta[name].shape for name in adapted_names(self.net, theta, adapt)}
        dtype = str(next(iter(theta.values())).dtype).replace("paddle.", "")
        rates = make_rule(rule, inner_lr).init_arrays(shapes, steps, dtype)
        self.learner = MetaLearner(
            self.net,
            {**theta, **make_parameters(rates)},
            make_variant(ORDERS[order]),
            inner_lr,
            steps,
            rule=rule,
            adapt=adapt,
        )
        self.order: Order = self.learner.variant.order(None)
        self._checked = False

    @property
    def model(self) -> paddle.nn.Layer:
        return self.net.layer

    def parameters(self) -> list[paddle.Tensor]:
        """What the outer optimiser steps: the model's parameters, then the learned rates."""
        return list(self.learner.params.values())

    def clone(self) -> Learner:
        """A learner at θ (nothing adapted yet)."""
        return Learner(self, [self.learner.start(self.order)])

    def adapt(self, x: paddle.Tensor, y: paddle.Tensor, steps: int | None = None) -> Learner:
        """``clone().adapt(x, y, steps)``."""
        return self.clone().adapt(x, y, steps)

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        """The model's output at θ."""
        return self.net.forward(x, self.learner.start(Order.SECOND))

    def _check_once(self, x: paddle.Tensor) -> None:
        """On the first batch: the model returns one tensor that depends on every parameter."""
        if not self._checked:
            self.net.check_sample(x)
            self._checked = True


class Learner:
    """The model adapted to one task: its weights after each inner step so far."""

    def __init__(self, maml: MAML, trajectory: list[TensorDict]):
        self.maml, self.trajectory = maml, trajectory

    @property
    def weights(self) -> TensorDict:
        """The current adapted weights, by the model's parameter names."""
        return self.trajectory[-1]

    def adapt(self, x: paddle.Tensor, y: paddle.Tensor, steps: int | None = None) -> Learner:
        """Take ``steps`` (default: the MAML's) more inner steps on the support set (x, y);
        returns this learner."""
        maml = self.maml
        maml._check_once(x)
        steps = maml.learner.inner_steps if steps is None else steps
        first = len(self.trajectory) - 1
        self.trajectory += maml.learner.adapt(self.weights, x, y, maml.order, steps, None, first)
        return self

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        """The adapted model's output."""
        return self.maml.net.forward(x, self.weights, len(self.trajectory) - 1)

    def loss(self, x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
        """The query loss of the adapted model; its ``.backward()`` puts the order's
        meta-gradient (Reptile: θ − θ_K) into the meta-parameters' ``.grad``."""
        learner = self.maml.learner
        run = InnerRun(self.trajectory, x, y, self.maml.net.forward)
        objective, _ = learner.variant.objective(learner, run, None)
        return objective
