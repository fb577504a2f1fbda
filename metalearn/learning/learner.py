"""The meta-learner: an inner loop over a chosen subset of θ with an inner update rule, and the
direction each task asks of the meta-parameters, given by an algorithm variant (variants.py).

Meta-parameters are θ plus the inner rule's learned rates (inner_rules.py), one flat dict of
Paddle parameters keyed by stable names; the meta-batch average of the directions is handed to
the variant's meta-optimiser as if it were a gradient. ``--algo`` names a preset:

* ``maml``:    second order through every inner step; ``fomaml``: first order;
* ``reptile``: θ − θ_K with SGD and an annealed ε (Nichol et al.);
* ``pretrain``: ∇θ L(θ) on all of the task's points, no inner loop (the paper's sinusoid baseline;
  the flags refuse it for Omniglot, whose tasks relabel their classes);
* ``maml++``:  MAML with learned per-layer per-step rates, per-step batch norm, the multi-step
  loss, derivative-order annealing and a cosine meta learning rate (Antoniou et al. 2019);
* ``metasgd``: MAML with a learned rate per weight (Li et al. 2017);
* ``anil``:    MAML adapting only the head; the body's features are computed once per task
  (Raghu et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import paddle
from paddle import _C_ops

from metalearn.data.tasks import Task
from metalearn.learning.inner_rules import RATE_PREFIX, make_rule
from metalearn.learning.meta_optimizers import SGD as MetaOptimizer
from metalearn.learning.variants import Order, make_variant

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain", "maml++", "metasgd", "anil")
ADAPT = ("all", "head")

TensorDict = dict[str, paddle.Tensor]


_LOSS, _METRIC = "__loss_sum__", "__metric_sum__"


class NonFiniteError(ArithmeticError):
    """The meta-loss or the update direction is NaN or infinite."""

    def __init__(self, loss: float | None):
        told = "" if loss is None else f" (meta-loss {loss:.4g})"
        super().__init__(f"non-finite meta-update{told}")
        self.loss = loss


@dataclass
class TaskStats:
    """What one task reports: the final query loss and the query metric after each inner step."""

    loss: float | None  # None: not computed (Reptile on an iteration that is not logged)
    metric_per_step: list[float] = field(default_factory=list)


def make_parameters(arrays: dict[str, np.ndarray]) -> TensorDict:
    """Wrap numpy arrays as Paddle parameters, keyed by their stable names.

    Paddle wants parameter names unique per process, so each tensor gets a generated name; the
    dict key is the stable name that checkpoints and optimiser state are saved under.
    """
    return {
        name: paddle.create_parameter(
            list(value.shape),
            str(value.dtype),
            name=paddle.utils.unique_name.generate(name),
            default_initializer=paddle.nn.initializer.Assign(value),
        )
        for name, value in arrays.items()
    }


def to_tensors(tasks: Sequence[Task]) -> tuple[paddle.Tensor, ...]:
    """Support and query arrays of one task, or of several stacked on a leading task axis."""
    fields = ("x_support", "y_support", "x_query", "y_query")
    if len(tasks) == 1:
        return tuple(paddle.to_tensor(getattr(tasks[0], f)) for f in fields)
    return tuple(paddle.to_tensor(np.stack([getattr(t, f) for t in tasks])) for f in fields)


@dataclass
class Batch:
    """One chunk's tensors: a single task, or several stacked on a leading task axis."""

    x_support: paddle.Tensor
    y_support: paddle.Tensor
    x_query: paddle.Tensor
    y_query: paddle.Tensor
    count: int


@dataclass
class InnerRun:
    """An inner loop's weights before and after each step and how to score the query set.

    ``query_inputs`` are the query images, or for head-only adaptation the body's features of
    them (computed once); ``output(inputs, weights, step)`` maps them to network outputs.
    """

    trajectory: list[TensorDict]
    query_inputs: paddle.Tensor
    y_query: paddle.Tensor
    output: Callable[[paddle.Tensor, TensorDict, int], paddle.Tensor]


def multi_step_loss_weights(steps: int, iteration: int | None, anneal_for: int) -> np.ndarray:
    """MAML++'s importance of the query loss after each inner step 1..K at ``iteration``.

    As in HowToTrainYourMAMLPytorch's ``get_per_step_loss_importance_vector``: uniform 1/K at the
    start; the non-final weights fall linearly to 0.03/K and the final one rises to
    1 − (K−1)·0.03/K over the first ``anneal_for`` iterations (their code counts epochs of 500
    iterations, so its weights move in steps; ours move every iteration); afterwards only the
    final step's loss counts.
    """
    final_only = np.eye(steps)[-1]
    if iteration is None or anneal_for <= 0 or iteration > anneal_for or steps < 2:
        return final_only
    progress = (iteration - 1) / anneal_for
    floor = 0.03 / steps
    weights = np.maximum(np.full(steps, 1.0 / steps) - progress / steps, floor)
    weights[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
    return weights


class MetaLearner:
    """Adapts a functional network to tasks and computes meta-update directions.

    ``variant`` (a name of :data:`ALGORITHMS` or a variants.py object) chooses the direction and
    the outer optimiser; ``rule`` (inner_rules.py) the inner update; ``adapt`` the subset of θ
    the inner loop changes (``"all"``, ``"head"``: ANIL, or a list of parameter names). Per-step
    parameters of the network (per-step batch norm) are meta-learned but never adapted, as in
    MAML++'s code.
    ``multi_step_loss_for`` > 0 makes the first that many iterations use MAML++'s multi-step loss.

    Networks stack tasks as their ``default_task_chunk`` says (the sinusoid MLP: all of them; the
    Omniglot conv net: 8 at a time with the oneDNN kernels, 16 for Reptile, else one): θ gets a leading task
    axis, every task adapts its own copy (batched matrix products, grouped convolutions), and the
    loss is the sum of per-task means, so each copy's gradient is exactly its task's gradient. ``task_chunk`` overrides that
    choice: k stacks at most k tasks per computation (a smaller peak memory: second order keeps the
    graphs of all stacked tasks at once), 1 goes through the tasks one at a time.
    """

    def __init__(
        self,
        net,
        params: TensorDict,
        variant,
        inner_lr: float,
        inner_steps: int,
        rule: str = "sgd",
        adapt: str | Sequence[str] = "all",
        multi_step_loss_for: int = 0,
        task_chunk: int | None = None,
    ):
        if task_chunk is not None and task_chunk < 1:
            raise ValueError(f"task_chunk must be at least 1, not {task_chunk}")
        if task_chunk not in (None, 1) and not getattr(net, "stacks_tasks", True):
            raise ValueError(f"{type(net).__name__} computes one task at a time (task_chunk 1)")
        self.task_chunk = task_chunk
        self.variant = make_variant(variant) if isinstance(variant, str) else variant
        self.net, self.params, self.inner_steps = net, params, inner_steps
        self.rule = make_rule(rule, inner_lr)
        self.head_only = adapt == "head"
        self.adapted = adapted_names(net, params, adapt)
        self._adapted_set = set(self.adapted)
        self.theta = [k for k in params if not k.startswith(RATE_PREFIX)]
        # Paddle's partial paddle.grad prunes the inputs it does not need, then requires a
        # PyLayer's backward to return None for them without telling it which. A network whose
        # ops may all be PyLayers (unless only its head runs in the inner loop: ANIL) therefore
        # takes the second-order inner gradient w.r.t. every weight it sees, with the weights
        # the inner loop keeps fixed as fresh aliases per step: the gradient then stops at
        # them instead of following θ back through the previous steps' gradients.
        self.alias_fixed = getattr(net, "inner_grad_of_all", False) and not self.head_only
        self.multi_step_loss_for = multi_step_loss_for
        needed = set(self.rule.init_arrays(dict.fromkeys(self.adapted, ()), 1, "float32"))
        if not needed <= set(params):
            raise ValueError(f"inner rule {rule!r} needs the meta-parameters {sorted(needed)}")

    @classmethod
    def from_config(cls, net, params: TensorDict, config: dict, steps: int) -> MetaLearner:
        """The learner a run's ``config`` describes, adapting for ``steps`` inner steps."""
        return cls(
            net,
            params,
            make_variant(config["algo"], config),
            config["glob_base_lr"],
            steps,
            rule=config.get("inner_rule") or "sgd",
            adapt=config.get("adapt") or "all",
            multi_step_loss_for=config.get("multi_step_loss_epochs") or 0,
            task_chunk=config.get("task_chunk") or None,
        )

    # -- the inner loop ------------------------------------------------------------------------
    def inner_loop(self, batch: Batch, order: Order, steps: int | None = None) -> InnerRun:
        """Adapt the chosen subset of θ on the support loss for ``steps`` (default: training's);
        see :meth:`adapt` for the orders."""
        steps = self.inner_steps if steps is None else steps
        start = self._start(batch.count, differentiable=order is not Order.NONE)
        if self.head_only:  # ANIL: the body's features once per task, outside the inner loop
            with paddle.no_grad() if order is Order.NONE else nullcontext():
                support = self.net.features(batch.x_support, start)
                query = self.net.features(batch.x_query, start)

            def output(inputs, weights, step):
                return self.net.head(inputs, weights)

        else:
            support, query, output = batch.x_support, batch.x_query, self.net.forward
        trajectory = [start, *self.adapt(start, support, batch.y_support, order, steps, output)]
        return InnerRun(trajectory, query, batch.y_query, output)

    def start(self, order: Order) -> TensorDict:
        """θ for one task, as the inner loop of ``order`` starts from it."""
        return self._start(1, differentiable=order is not Order.NONE)

    def adapt(
        self,
        weights: TensorDict,
        support: paddle.Tensor,
        y_support: paddle.Tensor,
        order: Order,
        steps: int,
        output: Callable[[paddle.Tensor, TensorDict, int], paddle.Tensor] | None = None,
        first_step: int = 0,
    ) -> list[TensorDict]:
        """The weights after each of ``steps`` inner steps from ``weights`` (which were reached
        after ``first_step`` steps) on the support loss of ``output(support, weights, step)``
        (default: the network's forward).

        SECOND keeps the inner gradients' graph (second order); FIRST computes them at detached
        weights, so the adapted weights depend on the meta-parameters only through the update
        arithmetic; NONE detaches everything (evaluation, Reptile).
        """
        output = output or self.net.forward
        trajectory = []
        for step in range(first_step, first_step + steps):
            if order is Order.SECOND:
                wrt = self.adapted
                if self.alias_fixed:
                    weights = {
                        k: w if k in self._adapted_set else w * 1.0 for k, w in weights.items()
                    }
                    wrt = list(weights)
                loss = self.net.loss(output(support, weights, step), y_support)
                grads = paddle.grad(loss, [weights[k] for k in wrt], create_graph=True)
                grads = [dict(zip(wrt, grads))[k] for k in self.adapted]
            else:
                leaves = {
                    k: _leaf(w) if k in self._adapted_set else w.detach()
                    for k, w in weights.items()
                }
                loss = self.net.loss(output(support.detach(), leaves, step), y_support)
                grads = paddle.grad(loss, [leaves[k] for k in self.adapted])
            updated = dict(weights)
            with paddle.no_grad() if order is Order.NONE else nullcontext():  # no graph to build
                for name, grad in zip(self.adapted, grads):
                    updated[name] = self.rule.update(name, weights[name], grad, step, self.params)
            trajectory.append(updated)
            weights = updated
        return trajectory

    def pooled(self, batch: Batch) -> InnerRun:
        """No inner loop: θ scored on all of the task's points (the pretrained baseline)."""
        points = 1 if batch.count > 1 else 0  # the axis after the stacked tasks' axis
        x = paddle.concat([batch.x_support, batch.x_query], axis=points)
        y = paddle.concat([batch.y_support, batch.y_query], axis=points)
        return InnerRun([self._start(batch.count, True)], x, y, self.net.forward)

    def query_losses(self, run: InnerRun, iteration: int | None) -> paddle.Tensor:
        """Per task, the query loss after the inner loop, or MAML++'s weighted multi-step loss
        (the query losses after steps 1..K) while it is switched on at ``iteration``."""
        steps = len(run.trajectory) - 1
        weights = (
            multi_step_loss_weights(steps, iteration, self.multi_step_loss_for)
            if steps
            else np.ones(1)
        )
        total = None
        for offset, weight in enumerate(weights):
            if weight == 0:
                continue
            step = steps - len(weights) + 1 + offset
            out = run.output(run.query_inputs, run.trajectory[step], step)
            losses = self.net.task_losses(out, run.y_query)
            if weight != 1:  # the usual final-step-only loss needs no (exact) ×1 op
                losses = losses * float(weight)
            total = losses if total is None else total + losses
        return total

    def gradient(self, objective: paddle.Tensor) -> TensorDict:
        """∇ of ``objective`` for every meta-parameter (zeros where it does not depend on one)."""
        names = list(self.params)
        grads = paddle.grad(objective, [self.params[k] for k in names], allow_unused=True)
        return {
            k: paddle.zeros_like(self.params[k]) if g is None else g for k, g in zip(names, grads)
        }

    @staticmethod
    def task_sum(value: paddle.Tensor, count: int) -> paddle.Tensor:
        """Sum over the leading task axis of a stacked chunk (a single task has none)."""
        return value.sum(axis=0) if count > 1 else value

    def _chunks(self, tasks: Sequence[Task], graph_free: bool = False) -> list[Sequence[Task]]:
        """How tasks are computed: stacked ``task_chunk`` at a time (default: the network's
        ``default_task_chunk``, None: all); the last chunk may be smaller. A ``graph_free``
        training step (Reptile's: no graph through the inner loop) holds little per task, so it
        stacks twice the default (Reptile 5-way 1-shot: 10.1 ms per task at 16, 12.3 at 8)."""
        size = self.task_chunk or self.net.default_task_chunk or len(tasks)
        if graph_free and not self.task_chunk and size > 1:
            size *= 2
        return [tasks[start : start + size] for start in range(0, len(tasks), max(size, 1))]

    def _start(self, count: int, differentiable: bool) -> TensorDict:
        """θ, or for a stacked chunk one copy of θ per task; detached unless ``differentiable``."""
        base = {k: self.params[k] for k in self.theta}
        if not differentiable:
            base = {k: w.detach() for k, w in base.items()}
        if count > 1:  # one broadcast each (its gradient sums the copies' gradients back)
            base = {k: w.expand([count, *w.shape]) for k, w in base.items()}
        return base

    def _chunk_direction(self, tasks: Sequence[Task], track_steps: bool, iteration: int | None):
        """Summed direction and per-task statistics of one chunk (one task, or a stacked batch)."""
        batch = Batch(*to_tensors(tasks), count=len(tasks))
        direction, task_losses, run = self.variant.direction(self, batch, iteration)
        if task_losses is None and track_steps:  # the variant's step needs no query loss
            with paddle.no_grad():
                task_losses = self.query_losses(run, None)
        losses = (
            [None] * batch.count
            if task_losses is None
            else task_losses.numpy().reshape(-1).tolist()
        )
        metrics = self._query_metrics(run) if track_steps else [[]] * batch.count
        return direction, [TaskStats(loss, m) for loss, m in zip(losses, metrics)]

    def _query_metrics(self, run: InnerRun) -> list[list[float]]:
        """Per task, the network's metric on the query set after each step."""
        with paddle.no_grad():
            per_step = [
                self.net.task_metrics(run.output(run.query_inputs, w, step), run.y_query).numpy()
                for step, w in enumerate(run.trajectory)
            ]
        return np.stack(per_step, axis=-1).reshape(-1, len(run.trajectory)).tolist()

    def task_direction(
        self, task: Task, track_steps: bool = False, iteration: int | None = None
    ) -> tuple[TensorDict, TaskStats]:
        """The update direction one task asks of the meta-parameters, and its query statistics
        (``iteration`` selects the schedules' state; None: after they have all ended)."""
        direction, stats = self._chunk_direction([task], track_steps, iteration)
        return direction, stats[0]

    def batch_direction(
        self, tasks: Sequence[Task], track_steps: bool = False, iteration: int | None = None
    ) -> tuple[TensorDict, list[TaskStats]]:
        """Sum of the task directions (not the mean, so several processes can add theirs)."""
        total: TensorDict = {}
        stats: list[TaskStats] = []
        graph_free = self.variant.order(iteration) is Order.NONE
        for chunk in self._chunks(tasks, graph_free):
            direction, chunk_stats = self._chunk_direction(chunk, track_steps, iteration)
            for name, value in direction.items():
                total[name] = value if name not in total else total[name] + value
            stats.extend(chunk_stats)
        return total, stats

    def make_optimizer(self) -> MetaOptimizer:
        """The variant's meta-optimiser over every meta-parameter."""
        return self.variant.make_optimizer(self.params)

    def meta_update(
        self,
        tasks: Sequence[Task],
        optimizer: MetaOptimizer,
        batch_size: int,
        track_steps: bool = False,
        reduce: Callable[[TensorDict], TensorDict] = lambda tensors: tensors,
        iteration: int | None = None,
    ) -> tuple[float | None, list[float]]:
        """One meta-iteration: directions of ``tasks``, summed by ``reduce`` over processes,
        averaged over the whole meta-batch of ``batch_size`` tasks, then applied to the
        meta-parameters with the variant's learning rate of ``iteration``.

        Returns the mean query loss (None when neither the variant's step nor ``track_steps``
        needed it: Reptile) and, with ``track_steps``, the mean query metric after each inner
        step. Raises :class:`NonFiniteError` (before touching θ) on NaN or inf.
        """
        direction, stats = self.batch_direction(tasks, track_steps, iteration)
        if not direction:  # a process with no task of this meta-batch still joins the sum
            direction = {k: paddle.zeros_like(w) for k, w in self.params.items()}
        dtype = next(iter(direction.values())).dtype  # one dtype: the sums travel in one buffer
        with_loss = track_steps or self.variant.steps_on_query_loss
        totals = {_LOSS: paddle.full([1], sum(s.loss for s in stats), dtype)} if with_loss else {}
        if track_steps:
            steps = self.inner_steps + 1 if self.variant.inner_loop else 1
            per_task = [s.metric_per_step for s in stats] or [[0.0] * steps]
            totals[_METRIC] = paddle.to_tensor(np.sum(per_task, axis=0), dtype=dtype)
        summed = reduce({**direction, **totals})
        loss = float(summed.pop(_LOSS).numpy()[0]) / batch_size if with_loss else None
        per_step = (summed.pop(_METRIC).numpy() / batch_size).tolist() if track_steps else []
        mean = mean_if_finite(summed, batch_size)
        if mean is None or (loss is not None and not np.isfinite(loss)):
            raise NonFiniteError(loss)
        if iteration is not None:
            optimizer.set_lr(self.variant.learning_rate(iteration))
        optimizer.step(mean)  # the direction as if it were the meta-parameters' gradient
        return loss, per_step

    def evaluate(self, tasks: Sequence[Task], steps: int) -> np.ndarray:
        """Adapt each task (no meta-gradient is needed) and score its query set after
        0..steps inner steps; returns an array [tasks, steps + 1]."""
        rows = []
        for chunk in self._chunks(tasks):
            batch = Batch(*to_tensors(chunk), count=len(chunk))
            rows.extend(self._query_metrics(self.inner_loop(batch, Order.NONE, steps)))
        return np.array(rows, dtype=np.float64).reshape(len(rows), steps + 1)

    def predict_after_steps(
        self, task: Task, x: np.ndarray, steps: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """Outputs for inputs ``x`` after adapting to ``task`` for each number of ``steps``."""
        batch = Batch(*to_tensors([task]), count=1)
        trajectory = self.inner_loop(batch, Order.NONE, max(steps)).trajectory
        with paddle.no_grad():
            inputs = paddle.to_tensor(x)
            return {k: self.net.forward(inputs, trajectory[k], k).numpy() for k in steps}


def adapted_names(net, params: TensorDict, adapt: str | Sequence[str] = "all") -> list[str]:
    """The weights the inner loop changes: all of θ, the head (ANIL) or the named ones, minus
    per-step ones; in θ's order."""
    if isinstance(adapt, str) and adapt not in ADAPT:
        raise ValueError(f"unknown adapted subset {adapt!r}; choose one of {ADAPT} or names")
    if isinstance(adapt, str):
        pool = set(net.head_names if adapt == "head" else params)
    else:
        pool = set(adapt)
        unknown = sorted(pool - set(params))
        if unknown or not pool:
            raise ValueError(f"no parameters to adapt named {unknown or list(adapt)}")
    fixed = set(net.per_step_names())
    return [k for k in params if k in pool and k not in fixed and not k.startswith(RATE_PREFIX)]


def initial_arrays(
    net, config: dict, seed: int | None = None, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """A run's initial meta-parameters: θ of ``net``, then the inner rule's rates (if learned)."""
    theta = net.init_params(config["seed"] if seed is None else seed, dtype)
    adapted = adapted_names(net, theta, config.get("adapt") or "all")
    rule = make_rule(config.get("inner_rule") or "sgd", config["glob_base_lr"])
    shapes = {k: theta[k].shape for k in adapted}
    return {**theta, **rule.init_arrays(shapes, config["glob_update_step"], dtype)}


def mean_if_finite(sums: TensorDict, count: int) -> TensorDict | None:
    """``sums`` divided by ``count`` (in place), or None if any entry is NaN or infinite.

    One call of Paddle's mixed-precision check (``check_finite_and_unscale_``: x · (1/count)
    and the finiteness test of every tensor at once) instead of three calls per parameter.
    """
    values = list(sums.values())
    scale = paddle.full([1], count, values[0].dtype)
    _, found_nonfinite = _C_ops.check_finite_and_unscale_(values, scale, paddle.zeros([1], "bool"))
    return None if bool(found_nonfinite) else sums


def _leaf(value: paddle.Tensor) -> paddle.Tensor:
    leaf = value.detach()
    leaf.stop_gradient = False
    return leaf
