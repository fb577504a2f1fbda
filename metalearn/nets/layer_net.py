"""Any ``paddle.nn.Layer`` as a network of the learner's protocol: :class:`LayerNet`.

The learner, the trainer, checkpoints, evaluation and the distributed sharding treat networks as
pure functions ``forward(x, params, step)`` of a dict of parameters (nets/builtin.py).
:class:`LayerNet` gives a user's Layer that shape: ``forward`` runs the Layer's own ``forward``
with ``params`` substituted for its parameters (nets/functional.py) and, unless ``exact`` is
off, with Paddle's wrong or missing double-grads routed to exact ops (nets/exact.py).
Parameter names are the Layer's ``named_parameters()`` names.

Stacked tasks, as the built-in networks compute them: with weights that have a leading task axis
T, the inputs [T, N, C, ...] run as one batch [N, T·C, ...] through the exact routes' stacked
forms (nets/exact.py), and the output [N, T·O] comes back as [T, N, O]. Whether a model computes
the same per task this way (it does not if its ``forward`` reshapes by fixed sizes, mixes
samples, or runs ops with parameters outside the routes) is measured on the sample batch of
:meth:`LayerNet.check_sample`; until then, and when it does not, tasks run one at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np
import paddle

from metalearn.errors import UserError
from metalearn.kernels import registry
from metalearn.nets.builtin import Classification, Regression
from metalearn.nets.exact import ExactRouting, unverified_layer_types
from metalearn.nets.functional import FunctionalLayer
from metalearn.nets.stacking import one_per_task, side_by_side

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
    stacked_tasks = 8  # per computation, as the built-in ConvNet (docs/performance.md)
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
        self.stacks_tasks = False  # until check_sample has seen it compute stacked tasks
        if not self.functional.parameter_names:
            raise UserError(f"{type(layer).__name__} has no parameters to meta-learn")
        self._ndims = {name: tensor.ndim for name, tensor in self.parameters().items()}
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

    @property
    def default_task_chunk(self) -> int:
        """Tasks per computation: ``stacked_tasks`` once the model proved it stacks them, with
        the oneDNN kernels (Paddle's grouped convolutions are slower than one task at a time)."""
        return self.stacked_tasks if self.stacks_tasks and registry.in_use() == "fast" else 1

    # -- the function -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self, params: dict[str, paddle.Tensor]):
        routes = self.routing.active() if self.routing else contextlib.nullcontext()
        with self.functional.substituted(params) as layer, routes:
            yield layer

    def forward(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The Layer's output for ``x`` with ``params`` as its parameters (``step`` unused);
        stacked tasks' ``x`` [T, N, ...] give [T, N, O]."""
        tasks = self._tasks_in(params)
        with self._running(params) as layer:
            out = layer(side_by_side(x) if tasks else x)
        return one_per_task(out, tasks) if tasks else out

    def _tasks_in(self, params: dict[str, paddle.Tensor]) -> int:
        """T for stacked weights (a leading task axis), 0 for one task's."""
        name, value = next(iter(params.items()))
        return value.shape[0] if value.ndim > self._ndims[name] else 0

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The head sublayer's input for ``x`` (ANIL computes it once per task)."""
        tasks = self._tasks_in(params)
        x = side_by_side(x) if tasks else x
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
        return one_per_task(seen[0][0], tasks) if tasks else seen[0][0]

    def head(self, features: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """The head sublayer alone on ``features``, with ``params`` as the parameters."""
        tasks = self._tasks_in(params)
        with self._running(params):
            out = self._head(side_by_side(features) if tasks else features)
        return one_per_task(out, tasks) if tasks else out

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
    def check_sample(self, x: paddle.Tensor, n_way: int | None = None) -> None:
        """Run ``x`` through the model: the output must be [batch, n_way] (classification) and
        depend on every parameter (else :class:`UserError` saying what is wrong); then learn
        whether it computes stacked tasks (:attr:`stacks_tasks`)."""
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
        self.stacks_tasks = self._computes_stacked_tasks(x)

    def _computes_stacked_tasks(self, x: paddle.Tensor) -> bool:
        """Whether two tasks (``x`` and a perturbed copy, each with its own perturbed weights)
        computed as one stacked call give each task's own output (in evaluation mode, so that
        dropout draws no masks). A model that reshapes by fixed sizes, mixes the samples of a
        batch or runs parameters through ops outside the exact routes fails this."""
        if not self.exact:
            return False
        generator = np.random.default_rng(0)

        def perturbed(tensor: paddle.Tensor) -> paddle.Tensor:
            if not paddle.is_floating_point(tensor):
                return tensor.flip([0])
            noise = paddle.to_tensor(generator.standard_normal(tensor.shape), tensor.dtype)
            return tensor * (1.0 + 0.1 * noise) + 0.01 * noise

        theta = {name: p.detach() for name, p in self.parameters().items()}
        tasks = [(x, theta), (perturbed(x), {k: perturbed(v) for k, v in theta.items()})]
        with paddle.no_grad(), _evaluation_mode(self.layer):
            alone = [self.forward(inputs, weights).numpy() for inputs, weights in tasks]
            stacked_weights = {k: paddle.stack([w[k] for _, w in tasks]) for k in theta}
            try:
                stacked = self.forward(paddle.stack([x for x, _ in tasks]), stacked_weights)
            except Exception:  # the model's forward cannot take stacked tasks at all
                return False
        expected = np.stack(alone)
        scale = max(float(np.abs(expected).max()), 1.0)
        return stacked.shape == list(expected.shape) and np.allclose(
            stacked.numpy(), expected, rtol=1e-4, atol=1e-4 * scale
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


@contextlib.contextmanager
def _evaluation_mode(layer: paddle.nn.Layer):
    """``layer.eval()`` for the block, then each sublayer's own mode back."""
    modes = [(sublayer, sublayer.training) for sublayer in layer.sublayers(include_self=True)]
    layer.eval()
    try:
        yield
    finally:
        for sublayer, training in modes:
            sublayer.training = training


def _owns_parameters(layer: paddle.nn.Layer) -> bool:
    return any(p is not None for p in layer._parameters.values())
