"""MAML, first-order MAML and Reptile as one meta-learner whose variants differ only in direction.

Each task yields an *update direction* for θ; the meta-batch average of the directions is handed
to the meta-optimiser as if it were a gradient:

* ``maml``:    ∇θ L_query(θ_K(θ)), differentiating through every inner step (second order);
* ``fomaml``:  ∇θ' L_query(θ') at the adapted weights, treated as constants (first order);
* ``reptile``: θ − θ' so that plain SGD with step ε gives φ ← φ + ε·(mean θ' − φ) (Nichol et al.).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle

from metalearn.tasks import Task

ALGORITHMS = ("maml", "fomaml", "reptile")

TensorDict = dict[str, paddle.Tensor]


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


def to_tensors(task: Task) -> tuple[paddle.Tensor, ...]:
    return tuple(
        paddle.to_tensor(a) for a in (task.x_support, task.y_support, task.x_query, task.y_query)
    )


class MetaLearner:
    """Adapts a functional network to tasks and computes meta-update directions for its θ."""

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
            if create_graph:
                updated = {k: w - self.inner_lr * g for (k, w), g in zip(current.items(), grads)}
            else:
                updated = {
                    k: _leaf(w - self.inner_lr * g) for (k, w), g in zip(current.items(), grads)
                }
            trajectory.append(updated)
        return trajectory

    def task_direction(self, task: Task, track_steps: bool = False) -> tuple[TensorDict, TaskStats]:
        """The update direction one task asks of θ, and its query statistics."""
        x_s, y_s, x_q, y_q = to_tensors(task)
        start = (
            self.params if self.algo == "maml" else {k: _leaf(w) for k, w in self.params.items()}
        )
        trajectory = self.adapt(start, x_s, y_s, self.inner_steps, create_graph=self.algo == "maml")
        adapted = trajectory[-1]
        output = self.net.forward(x_q, adapted)
        loss = self.net.loss(output, y_q)
        if self.algo == "reptile":
            direction = {k: (self.params[k] - adapted[k]).detach() for k in self.params}
        else:
            wrt = self.params if self.algo == "maml" else adapted
            grads = paddle.grad(loss, list(wrt.values()))
            direction = dict(zip(self.params, grads))
        stats = TaskStats(loss=float(loss))
        if track_steps:
            stats.metric_per_step = self.query_metrics(trajectory, x_q, y_q)
        return direction, stats

    def query_metrics(self, trajectory: Sequence[TensorDict], x_q, y_q) -> list[float]:
        """The network's metric (accuracy or MSE) on the query set under each weight set."""
        with paddle.no_grad():
            return [float(self.net.metric(self.net.forward(x_q, w), y_q)) for w in trajectory]

    def evaluate(self, task: Task, steps: int) -> list[float]:
        """Adapt (first order: no meta-gradient is needed) and score the query set after each step."""
        x_s, y_s, x_q, y_q = to_tensors(task)
        start = {k: _leaf(w) for k, w in self.params.items()}
        return self.query_metrics(self.adapt(start, x_s, y_s, steps, create_graph=False), x_q, y_q)

    def batch_direction(
        self, tasks: Sequence[Task], track_steps: bool = False
    ) -> tuple[TensorDict, list[TaskStats]]:
        """Sum of the task directions (not the mean, so several processes can add theirs)."""
        total: TensorDict = {}
        stats = []
        for task in tasks:
            direction, task_stats = self.task_direction(task, track_steps)
            for name, value in direction.items():
                total[name] = value if name not in total else total[name] + value
            stats.append(task_stats)
        return total, stats


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
