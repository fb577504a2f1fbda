"""Any ``paddle.nn.Layer`` as a network of the learner's protocol: :class:`LayerNet`.

The learner, the trainer, checkpoints, evaluation and the distributed sharding treat networks as
pure functions ``forward(x, params, step)`` of a dict of parameters (nets/builtin.py).
:class:`LayerNet` gives a user's Layer that shape: ``forward`` runs the Layer's own ``forward``
with ``params`` substituted for its parameters (nets/functional.py) and, unless ``exact`` is
off, with Paddle's wrong or missing double-grads routed to exact ops (nets/exact.py).
Parameter names are the Layer's ``named_parameters()`` names.

One task at a time (``default_task_chunk = 1``): a user's Layer computes one batch of images,
not a stack of tasks with per-task weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np
import paddle

from metalearn.errors import UserError
from metalearn.nets.builtin import Classification, Regression
from metalearn.nets.exact import ExactRouting, unverified_layer_types
from metalearn.nets.functional import FunctionalLayer

LOSSES = {"cross_entropy": Classification, "mse": Regression}
"""The task loss and metric: classification (cross-entropy, accuracy) or regression (MSE)."""

AUDIT_HINT = "python -m metalearn.audit MODULE:FUNCTION --input-shape C,H,W --n-way N"


class UnverifiedLayerWarning(UserWarning):
    """A model holds layer types whose exact second order the project has not verified."""


class LayerNet:
    """A user's Layer adapted to the learner (MetaLearner), trainer and checkpoints.

    ``source`` (how the model was described: ``module:function`` or a spec file) and
    ``input_shape`` are only recorded in :meth:`config`, so a checkpoint says how to rebuild it. ANIL's head (``head_names``) is the last
    sublayer, in registration order, that owns parameters; its features are that sublayer's
    input, valid only if the model returns that sublayer's output unchanged (checked per call).
    """

    kind = "layer"
    default_task_chunk = 1
    stacks_tasks = False
    # Any op may be a PyLayer (exact convolution, pooling, batch norm): the learner's inner
    # gradient is taken w.r.t. all of θ (MetaLearner.adapt).
    inner_grad_of_all = True

    def __init__(
        self,
        layer: paddle.nn.Layer,
        n_way: int | None = None,
        input_shape: Sequence[int] | None = None,
        loss: str = "cross_entropy",
        exact: bool = True,
        source: str | None = None,
    ):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {tuple(LOSSES)}")
        self.layer, self.n_way, self.source = layer, n_way, source
        self.input_shape = None if input_shape is None else [int(n) for n in input_shape]
        self.loss_name, self.exact = loss, exact
        self.objective = LOSSES[loss]()
        self.metric = self.objective.metric
        self.functional = FunctionalLayer(layer)
        if not self.functional.parameter_names:
            raise UserError(f"{type(layer).__name__} has no parameters to meta-learn")
        self.routing = ExactRouting(layer) if exact else None
        self._head, self.head_names = self._find_head()
        unverified = unverified_layer_types(layer) if exact else []
        if unverified:
            warnings.warn(
                f"metalearn has not verified the exact second-order meta-gradient through "
                f"{', '.join(unverified)}; check the model with `{AUDIT_HINT}`",
                UnverifiedLayerWarning,
                stacklevel=2,
            )

    def config(self) -> dict:
        """What rebuilds this network (stored in checkpoints; compared key by key on load)."""
        return {
            "kind": self.kind,
            "source": self.source,
            "n_way": self.n_way,
            "input_shape": self.input_shape,
            "loss": self.loss_name,
        }

    def init_params(self, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
        """The Layer's own initial parameters (its constructor drew them; ``seed`` is the one
        the caller seeded Paddle with before building it), as numpy arrays of ``dtype``."""
        return {name: tensor.numpy().astype(dtype) for name, tensor in self.parameters().items()}

    def parameters(self) -> dict[str, paddle.Tensor]:
        """The Layer's own trainable parameters by name (the meta-parameters θ)."""
        named = dict(self.layer.named_parameters())
        return {name: named[name] for name in self.functional.parameter_names}

    def per_step_names(self) -> tuple[str, ...]:
        return ()

    # -- the function -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self, params: dict[str, paddle.Tensor]):
        routes = self.routing.active() if self.routing else contextlib.nullcontext()
        with self.functional.substituted(params) as layer, routes:
            yield layer

    def forward(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The Layer's output for ``x`` with ``params`` as its parameters (``step`` unused)."""
        with self._running(params) as layer:
            return layer(x)

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The head sublayer's input for ``x`` (ANIL computes it once per task)."""
        seen = []
        with self._running(params) as layer:
            handle = self._head.register_forward_post_hook(
                lambda sublayer, inputs, output: seen.append((inputs[0], output))
            )
            try:
                out = layer(x)
            finally:
                handle.remove()
        if len(seen) != 1 or out is not seen[0][1]:
            raise UserError(
                f"adapting only the head (ANIL) needs a model whose output is its last "
                f"parameterised sublayer's ({type(self._head).__name__}) output, computed once"
            )
        return seen[0][0]

    def head(self, features: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """The head sublayer alone on ``features``, with ``params`` as the parameters."""
        with self._running(params):
            return self._head(features)

    def _find_head(self) -> tuple[paddle.nn.Layer, tuple[str, ...]]:
        owners = [s for s in self.layer.sublayers(include_self=True) if _owns_parameters(s)]
        head = owners[-1]
        names = self.functional.names_held_by(head)
        return head, tuple(names)

    # -- the task loss and metric ---------------------------------------------------------------
    def loss(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.objective.loss(output, target)

    def task_losses(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.objective.task_losses(output, target)

    def task_metrics(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.objective.task_metrics(output, target)

    # -- checks ------------------------------------------------------------------------------
    def check_input(self, x: paddle.Tensor) -> None:
        """Refuse inputs of another shape than the one the network was built for."""
        if self.input_shape is not None and list(x.shape[1:]) != self.input_shape:
            raise ValueError(f"the model expects inputs {self.input_shape}, got {list(x.shape)}")

    def check_sample(self, x: paddle.Tensor, n_way: int | None = None) -> None:
        """Run ``x`` through the model: the output must be [batch, n_way] (classification) and
        depend on every parameter; raises :class:`UserError` saying what is wrong."""
        try:
            out, unused = self._sample_output(x)
        except UserError:
            raise
        except Exception as error:  # the user's forward: report, do not crash
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise UserError(
                f"the model failed on a sample batch {list(x.shape)}: {reason}"
            ) from None
        if not isinstance(out, paddle.Tensor):
            raise UserError(f"the model returned {type(out).__name__}, not one tensor")
        expected = [x.shape[0], n_way] if n_way is not None else None
        if expected is not None and self.loss_name == "cross_entropy" and out.shape != expected:
            raise UserError(
                f"on a sample batch {list(x.shape)} the model returned shape {list(out.shape)}, "
                f"expected {expected} (batch, n_way)"
            )
        if unused:
            raise UserError(
                f"the model's output does not depend on {', '.join(unused)} on a sample batch: "
                "metalearn substitutes parameters where layers read them (self.weight), which "
                "nn.GRU / nn.LSTM / nn.SimpleRNN do not (they keep their own copies)"
            )

    def _sample_output(self, x: paddle.Tensor) -> tuple[object, list[str]]:
        """The output for ``x`` and the parameter names it does not depend on."""
        leaves = {name: p.detach() for name, p in self.parameters().items()}
        for leaf in leaves.values():
            leaf.stop_gradient = False
        out = self.forward(x, leaves)
        if not isinstance(out, paddle.Tensor):
            return out, []
        grads = paddle.grad(out.sum(), list(leaves.values()), allow_unused=True)
        return out.detach(), [name for name, grad in zip(leaves, grads) if grad is None]


def _owns_parameters(layer: paddle.nn.Layer) -> bool:
    return any(p is not None for p in layer._parameters.values())
