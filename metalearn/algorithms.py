"""MAML, first-order MAML and Reptile as one meta-learner whose variants differ only in direction.

Each task yields an *update direction* for θ; the meta-batch average of the directions is handed
to the meta-optimiser as if it were a gradient:

* ``maml``:    ∇θ L_query(θ_K(θ)), differentiating through every inner step (second order);
* ``fomaml``:  ∇θ' L_query(θ') at the adapted weights, treated as constants (first order);
* ``reptile``: θ − θ' so that plain SGD with step ε gives φ ← φ + ε·(mean θ' − φ) (Nichol et al.);
* ``pretrain``: ∇θ L(θ) on all of the task's points, no inner loop: the paper's "pretrained"
  baseline for sinusoid regression, fine-tuned with the same inner steps only at test time.
  (Classification tasks relabel their classes per task, so there it is meaningless; the flags
  refuse it for Omniglot.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle

from metalearn.tasks import Task

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")

TensorDict = dict[str, paddle.Tensor]


_LOSS, _METRIC = "__loss_sum__", "__metric_sum__"


class NonFiniteError(ArithmeticError):
    """The meta-loss or the update direction is NaN or infinite."""

    def __init__(self, loss: float):
        super().__init__(f"non-finite meta-update (meta-loss {loss:.4g})")
        self.loss = loss


@dataclass
class TaskStats:
    """What one task reports: the final query loss and the query metric after each inner step."""

    loss: float
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


def optimizer_state(
    optimizer: paddle.optimizer.Optimizer, params: TensorDict
) -> dict[str, np.ndarray]:
    """The optimiser's tensors keyed by stable parameter names (not the per-process ones)."""
    state = {}
    for key, value in optimizer.state_dict().items():
        if isinstance(value, paddle.Tensor):
            state[_rename(key, {p.name: name for name, p in params.items()})] = value.numpy()
    return state


def load_optimizer_state(
    optimizer: paddle.optimizer.Optimizer, params: TensorDict, state: dict[str, np.ndarray]
) -> None:
    """Inverse of :func:`optimizer_state` for this process's parameter names."""
    renames = {name: p.name for name, p in params.items()}
    optimizer.set_state_dict({_rename(k, renames): paddle.to_tensor(v) for k, v in state.items()})


def _rename(key: str, renames: dict[str, str]) -> str:
    """Swap the parameter-name prefix of an optimiser key (``<param>_moment1_0``)."""
    for old in sorted(renames, key=len, reverse=True):
        if key.startswith(old + "_"):
            return renames[old] + key[len(old) :]
    return key


def to_tensors(tasks: Sequence[Task]) -> tuple[paddle.Tensor, ...]:
    """Support and query arrays of one task, or of several stacked on a leading task axis."""
    fields = ("x_support", "y_support", "x_query", "y_query")
    if len(tasks) == 1:
        return tuple(paddle.to_tensor(getattr(tasks[0], f)) for f in fields)
    return tuple(paddle.to_tensor(np.stack([getattr(t, f) for t in tasks])) for f in fields)


class MetaLearner:
    """Adapts a functional network to tasks and computes meta-update directions for its θ.

    Networks that declare ``task_batched`` (the sinusoid MLP) process a whole meta-batch at once:
    θ gets a leading task axis, every task adapts its own copy with batched matrix products, and
    the loss is the sum of per-task means, so each copy's gradient is exactly its task's gradient.
    Others (the convolutional net) go through the tasks one at a time.
    """

    def __init__(self, net, params: TensorDict, algo: str, inner_lr: float, inner_steps: int):
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}")
        self.net, self.params, self.algo = net, params, algo
        self.inner_lr, self.inner_steps = inner_lr, inner_steps

    def adapt(
        self, params: TensorDict, x: paddle.Tensor, y: paddle.Tensor, steps: int, create_graph: bool
    ) -> list[TensorDict]:
        """Gradient steps on the support loss; returns the weights before and after each step.

        With ``create_graph`` the adapted weights remain differentiable functions of ``params``
        (second order); without it each step's weights are fresh leaves (first order).
        """
        trajectory = [params]
        for _ in range(steps):
            current = trajectory[-1]
            loss = self.net.loss(self.net.forward(x, current), y)
            grads = paddle.grad(loss, list(current.values()), create_graph=create_graph)
            updated = {k: w - self.inner_lr * g for (k, w), g in zip(current.items(), grads)}
            trajectory.append(
                updated if create_graph else {k: _leaf(w) for k, w in updated.items()}
            )
        return trajectory

    def _chunks(self, tasks: Sequence[Task]) -> list[Sequence[Task]]:
        """How tasks are computed: all stacked at once, or one by one (none: no chunk)."""
        if getattr(self.net, "task_batched", False):
            return [tasks] if tasks else []
        return [[t] for t in tasks]

    def _start(self, count: int, differentiable: bool) -> TensorDict:
        """θ, or for a stacked chunk one copy of θ per task; leaves unless ``differentiable``."""
        base = self.params if differentiable else {k: w.detach() for k, w in self.params.items()}
        if count > 1:
            base = {
                k: w.unsqueeze(0) + paddle.zeros([count, *w.shape], w.dtype)
                for k, w in base.items()
            }
        return base if differentiable else {k: _leaf(w) for k, w in base.items()}

    def _chunk_direction(self, tasks: Sequence[Task], track_steps: bool):
        """Summed direction and per-task statistics of one chunk (one task, or a stacked batch)."""
        x_s, y_s, x_q, y_q = to_tensors(tasks)
        count, second_order = len(tasks), self.algo == "maml"
        start = self._start(count, differentiable=second_order)
        if self.algo == "pretrain":  # the paper's baseline: regress on all of the task's points
            trajectory = [start]
            x_q, y_q = paddle.concat([x_s, x_q], axis=-2), paddle.concat([y_s, y_q], axis=-2)
        else:
            trajectory = self.adapt(start, x_s, y_s, self.inner_steps, create_graph=second_order)
        adapted = trajectory[-1]
        task_losses = self.net.task_losses(self.net.forward(x_q, adapted), y_q)
        if self.algo == "reptile":
            direction = {k: _task_sum(self.params[k] - adapted[k], count).detach() for k in adapted}
        else:
            wrt = self.params if second_order else adapted
            grads = paddle.grad(task_losses.sum(), list(wrt.values()))
            direction = {
                k: g if second_order else _task_sum(g, count) for k, g in zip(self.params, grads)
            }
        losses = task_losses.numpy().reshape(-1).tolist()
        metrics = self._query_metrics(trajectory, x_q, y_q) if track_steps else [[]] * count
        return direction, [TaskStats(loss, m) for loss, m in zip(losses, metrics)]

    def _query_metrics(self, trajectory: Sequence[TensorDict], x_q, y_q) -> list[list[float]]:
        """Per task, the network's metric (accuracy or MSE) on the query set after each step."""
        with paddle.no_grad():
            per_step = [
                self.net.task_metrics(self.net.forward(x_q, w), y_q).numpy() for w in trajectory
            ]
        return np.stack(per_step, axis=-1).reshape(-1, len(trajectory)).tolist()

    def task_direction(self, task: Task, track_steps: bool = False) -> tuple[TensorDict, TaskStats]:
        """The update direction one task asks of θ, and its query statistics."""
        direction, stats = self._chunk_direction([task], track_steps)
        return direction, stats[0]

    def batch_direction(
        self, tasks: Sequence[Task], track_steps: bool = False
    ) -> tuple[TensorDict, list[TaskStats]]:
        """Sum of the task directions (not the mean, so several processes can add theirs)."""
        total: TensorDict = {}
        stats: list[TaskStats] = []
        for chunk in self._chunks(tasks):
            direction, chunk_stats = self._chunk_direction(chunk, track_steps)
            for name, value in direction.items():
                total[name] = value if name not in total else total[name] + value
            stats.extend(chunk_stats)
        return total, stats

    def meta_update(
        self,
        tasks: Sequence[Task],
        optimizer: paddle.optimizer.Optimizer,
        batch_size: int,
        track_steps: bool = False,
        reduce: Callable[[TensorDict], TensorDict] = lambda tensors: tensors,
    ) -> tuple[float, list[float]]:
        """One meta-iteration: directions of ``tasks``, summed by ``reduce`` over processes,
        averaged over the whole meta-batch of ``batch_size`` tasks, then applied to θ.

        Returns the mean query loss and, with ``track_steps``, the mean query metric after each
        inner step. Raises :class:`NonFiniteError` (before touching θ) on NaN or inf.
        """
        direction, stats = self.batch_direction(tasks, track_steps)
        if not direction:  # a process with no task of this meta-batch still joins the sum
            direction = {k: paddle.zeros_like(w) for k, w in self.params.items()}
        dtype = next(iter(direction.values())).dtype  # one dtype: the sums travel in one buffer
        totals = {_LOSS: paddle.to_tensor([sum(s.loss for s in stats)], dtype=dtype)}
        if track_steps:
            steps = 1 if self.algo == "pretrain" else self.inner_steps + 1
            per_task = [s.metric_per_step for s in stats] or [[0.0] * steps]
            totals[_METRIC] = paddle.to_tensor(np.sum(per_task, axis=0), dtype=dtype)
        summed = reduce({**direction, **totals})
        loss = float(summed.pop(_LOSS).numpy()[0]) / batch_size
        per_step = (summed.pop(_METRIC).numpy() / batch_size).tolist() if track_steps else []
        mean = {k: v * (1.0 / batch_size) for k, v in summed.items()}
        if not (np.isfinite(loss) and all(bool(paddle.isfinite(v).all()) for v in mean.values())):
            raise NonFiniteError(loss)
        apply_direction(self.params, optimizer, mean)
        return loss, per_step

    def evaluate(self, tasks: Sequence[Task], steps: int) -> np.ndarray:
        """Adapt each task (first order: no meta-gradient is needed) and score its query set after
        0..steps inner steps; returns an array [tasks, steps + 1]."""
        rows = []
        for chunk in self._chunks(tasks):
            x_s, y_s, x_q, y_q = to_tensors(chunk)
            trajectory = self.adapt(self._start(len(chunk), False), x_s, y_s, steps, False)
            rows.extend(self._query_metrics(trajectory, x_q, y_q))
        return np.array(rows, dtype=np.float64).reshape(len(rows), steps + 1)

    def predict_after_steps(
        self, task: Task, x: np.ndarray, steps: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """Outputs for inputs ``x`` after adapting to ``task`` for each number of ``steps``."""
        x_s, y_s, _, _ = to_tensors([task])
        trajectory = self.adapt(self._start(1, False), x_s, y_s, max(steps), False)
        with paddle.no_grad():
            inputs = paddle.to_tensor(x)
            return {k: self.net.forward(inputs, trajectory[k]).numpy() for k in steps}


def _task_sum(value: paddle.Tensor, count: int) -> paddle.Tensor:
    """Sum over the leading task axis of a stacked chunk (a single task has none)."""
    return value.sum(axis=0) if count > 1 else value


def apply_direction(
    params: TensorDict, optimizer: paddle.optimizer.Optimizer, direction: TensorDict
) -> None:
    """Let the meta-optimiser step θ along ``direction`` as if it were θ's gradient.

    The surrogate Σ ⟨θ, d⟩ has gradient exactly d, which keeps the optimiser's own bookkeeping.
    """
    surrogate = sum((params[name] * value.detach()).sum() for name, value in direction.items())
    surrogate.backward()
    optimizer.step()
    optimizer.clear_grad()


def _leaf(value: paddle.Tensor) -> paddle.Tensor:
    leaf = value.detach()
    leaf.stop_gradient = False
    return leaf
