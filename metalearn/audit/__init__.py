"""Audit a user's model: its second-order MAML meta-gradient against finite differences.

``audit(model, input_shape, n_way)`` builds one small random task, computes the meta-gradient
of the query loss after 1 (and 2, ...) inner steps in float64 the way training does
(:class:`~metalearn.learning.learner.MetaLearner` over a
:class:`~metalearn.nets.layer_net.LayerNet`), and compares, for every parameter tensor, its
directional derivative along a random direction with a central finite difference of the
meta-objective (:func:`metalearn.learning.gradcheck.central_difference`). ``python -m
metalearn.audit my_module:make_model`` prints the table.

ReLU's derivative jumps, so the meta-objective L_q(θ − α∇L_s(θ)) jumps too and its finite
differences diverge (docs/design.md); the audit therefore runs a copy of the model with
``nn.ReLU`` / ``F.relu`` as softplus and ``nn.LeakyReLU`` / ``F.leaky_relu`` as
slope·x + (1 − slope)·softplus(x) (``smooth=False`` keeps them). Max-pooling is checked with a
step that moves no window's maximum. Dropout draws the same masks in every evaluation (Paddle
is re-seeded before each).

``exact=False`` runs the model on Paddle's own double-grads: a model whose first layer is
``nn.Conv2D`` then FAILS (tests/test_audit.py), which is what the routing is for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from metalearn.data.tasks import Task
from metalearn.learning.gradcheck import central_difference, with_pool_indices
from metalearn.learning.learner import Batch, MetaLearner, make_parameters, to_tensors
from metalearn.learning.variants import Order
from metalearn.nets.exact import functions_replaced
from metalearn.nets.layer_net import LayerNet

TOLERANCE = 1e-4
"""Largest relative error that passes (float64; correct models measure 1e-6 and below)."""


@dataclass
class ParameterCheck:
    """One parameter's directional derivative: analytic, finite difference, relative error."""

    name: str
    analytic: float
    numeric: float
    error: float

    @property
    def passed(self) -> bool:
        return self.error <= TOLERANCE


@dataclass
class AuditReport:
    """The checks of one number of inner steps, or why the meta-gradient could not be computed."""

    steps: int
    checks: list[ParameterCheck] = field(default_factory=list)
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None and all(check.passed for check in self.checks)


def audit(
    model: nn.Layer | Callable[[], nn.Layer],
    input_shape: Sequence[int],
    n_way: int,
    steps: Sequence[int] = (1, 2),
    loss: str = "cross_entropy",
    exact: bool = True,
    smooth: bool = True,
    inner_lr: float = 0.1,
    adapt: str | Sequence[str] = "all",
    seed: int = 0,
    eps: float = 1e-5,
) -> list[AuditReport]:
    """One report per entry of ``steps``. ``model`` is a Layer (a float64 copy is audited) or
    a function that builds one (called with Paddle's default dtype float64)."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        if isinstance(model, nn.Layer):
            layer = copy.deepcopy(model)
            layer.to(dtype="float64")
        else:
            layer = model()
        layer.train()  # Paddle's own batch norm (exact=False) then uses the batch's statistics
        if smooth:
            _smooth_activations(layer)
        net = LayerNet(layer, n_way, input_shape, loss=loss, exact=exact)
        task = _random_task(net, input_shape, n_way, seed)
        net.check_sample(paddle.to_tensor(task.x_support), n_way)
        with functions_replaced(_SMOOTH_FUNCTIONS if smooth else ()):
            return [_check(net, task, count, inner_lr, adapt, seed, eps) for count in steps]
    finally:
        paddle.set_default_dtype(previous)


def _check(net: LayerNet, task: Task, steps: int, inner_lr, adapt, seed: int, eps: float):
    arrays = net.init_params(seed, "float64")
    rng = np.random.default_rng(seed + 1)
    directions = {name: rng.standard_normal(value.shape) for name, value in arrays.items()}

    def learner(values: dict[str, np.ndarray]) -> MetaLearner:
        return MetaLearner(net, make_parameters(values), "maml", inner_lr, steps, adapt=adapt)

    def meta_loss(values: dict[str, np.ndarray]) -> float:
        paddle.seed(seed)  # dropout: the same masks in every evaluation
        meta = learner(values)
        run = meta.inner_loop(Batch(*to_tensors([task]), count=1), Order.NONE)
        with paddle.no_grad():
            return float(meta.query_losses(run, None).sum())

    report = AuditReport(steps)
    try:
        paddle.seed(seed)
        (grads, _), indices = with_pool_indices(lambda: learner(arrays).task_direction(task))
    except Exception as error:  # a missing double-grad, an unsupported option: the finding
        report.failure = " ".join(str(error).split())[:300] or type(error).__name__
        return report
    numerics = {}
    for name in arrays:
        direction = {name: directions[name]}
        numerics[name] = central_difference(meta_loss, arrays, direction, eps, indices)
    floor = 1e-4 * max(abs(v) for v in numerics.values())  # gradients that are exactly zero
    for name, numeric in numerics.items():
        analytic = float((grads[name].numpy() * directions[name]).sum())
        error = abs(analytic - numeric) / max(abs(numeric), floor, 1e-300)
        report.checks.append(ParameterCheck(name, analytic, numeric, error))
    return report


def _random_task(net: LayerNet, input_shape: Sequence[int], n_way: int, seed: int) -> Task:
    """One support image per class, two queries per class; regression targets are random
    outputs of the model's shape."""
    rng = np.random.default_rng(seed)
    support = rng.random((n_way, *input_shape))
    query = rng.random((2 * n_way, *input_shape))
    if net.loss_name == "cross_entropy":
        return Task(support, np.arange(n_way), query, np.arange(n_way).repeat(2))
    with paddle.no_grad():
        shape = net.forward(paddle.to_tensor(support), net.parameters()).shape[1:]
    return Task(
        support,
        rng.standard_normal((n_way, *shape)),
        query,
        rng.standard_normal((2 * n_way, *shape)),
    )


def _softplus_relu(x, name=None):
    return F.softplus(x)


def _smooth_leaky_relu(x, negative_slope=0.01, name=None):
    return negative_slope * x + (1.0 - negative_slope) * F.softplus(x)


class _SmoothLeakyReLU(nn.Layer):
    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return _smooth_leaky_relu(x, self.negative_slope)


_SMOOTH_FUNCTIONS = ((F, "relu", _softplus_relu), (F, "leaky_relu", _smooth_leaky_relu))


def _smooth_activations(layer: nn.Layer) -> None:
    """Replace the ReLU and LeakyReLU sublayers of ``layer`` (a copy) with smooth ones."""
    for sublayer in layer.sublayers(include_self=True):
        for name, child in list(sublayer._sub_layers.items()):
            if type(child) is nn.ReLU:
                sublayer._sub_layers[name] = nn.Softplus()
            elif type(child) is nn.LeakyReLU:
                sublayer._sub_layers[name] = _SmoothLeakyReLU(child._negative_slope)


def format_reports(reports: list[AuditReport], exact: bool = True) -> tuple[str, bool]:
    """The table (parameter, relative error, verdict per number of steps) and one summary line;
    and whether everything passed."""
    lines = []
    for report in reports:
        lines.append(f"{report.steps} inner step{'s' if report.steps > 1 else ''}:")
        if report.failure:
            lines.append(f"  the meta-gradient could not be computed: {report.failure}")
            continue
        width = max(len(check.name) for check in report.checks)
        lines.append(f"  {'parameter'.ljust(width)}  relative error  verdict")
        for check in report.checks:
            verdict = "ok" if check.passed else "WRONG"
            lines.append(f"  {check.name.ljust(width)}  {check.error:14.2e}  {verdict}")
    failed = [r for r in reports if not r.passed]
    routing = "exact routing on" if exact else "exact routing OFF (Paddle's own double-grads)"
    if not failed:
        lines.append(
            f"audit passed: every parameter's second-order meta-gradient is within "
            f"{TOLERANCE:g} of finite differences ({routing})"
        )
    else:
        wrong = sum(1 for r in failed for c in r.checks if not c.passed)
        errors = sum(1 for r in failed if r.failure)
        lines.append(
            f"audit FAILED: {wrong} parameter check(s) off and {errors} run(s) without a "
            f"meta-gradient ({routing})"
        )
    return "\n".join(lines), not failed
