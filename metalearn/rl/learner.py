"""MAML for reinforcement learning: policy-gradient inner steps, TRPO (or Adam) outer steps.

Inner step k of a task: sample ``k_spt`` trajectories D_k with θ_k, fit the linear baseline, and
take θ_{k+1} = θ_k − α ∇ L_k(θ_k) with the REINFORCE loss L_k(θ) = −mean_{D_k}[log π_θ(a|s) Â]
(the update rule and its learned rates come from learning/inner_rules.py). The meta-objective is
TRPO's surrogate on trajectories D_q sampled with θ_K:

    S(θ) = −mean_{D_q}[π_{θ_K(θ)}(a|s) / π_{θ_K(θ_old)}(a|s) · Â],

with D_0 … D_{K−1} and D_q held fixed (the paper's estimator: the sampling distribution's own
dependence on θ is not differentiated), so S is a deterministic function of θ and its gradient
goes through every inner step: second order (``Order.SECOND``) or first order (the inner
gradients constant). Tasks are stacked: θ gets a leading task axis, the loss is a sum of per-task
means, so each copy gets its own task's gradient (as in learning/learner.py).

TRPO needs F v, the Hessian of the mean KL(π_{θ_K(θ_old)} ‖ π_{θ_K(θ)}) along v. At θ_old the KL's
gradient in θ_K is zero, so that Hessian is exactly Jᵀ F_K J with J = ∂θ_K/∂θ and F_K the KL's
Hessian in θ_K. We apply it as J v (a chain of Hessian-vector products of the inner losses,
forward), F_K, then Jᵀ (the same chain backwards): only second derivatives, where differentiating
the KL's gradient through the inner update would need third derivatives (Paddle has none for
ReLU: ``relu_double_grad`` has no grad op).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import paddle

from metalearn.learning.inner_rules import RATE_PREFIX, make_rule
from metalearn.learning.learner import NonFiniteError, adapted_names, mean_if_finite
from metalearn.learning.meta_optimizers import Adam
from metalearn.learning.variants import Order, QueryGradient
from metalearn.rl.policy import GaussianPolicy
from metalearn.rl.sampler import Episodes, add_advantages, rollout
from metalearn.rl.trpo import TRPO

TensorDict = dict[str, paddle.Tensor]
_RETURNS = "__returns_per_step__"
_LOSS, _KL = "__loss__", "__kl__"
EVALUATION_CHUNK = 20  # a meta-batch's worth of tasks (the paper's) per stacked computation


@dataclass(frozen=True)
class GoalTask:
    """One task: its goal (the environment's parameters) and the seed of its trajectories."""

    goal: np.ndarray
    seed: int


@dataclass(frozen=True)
class Settings:
    """Everything besides the inner rule that a meta-update depends on."""

    horizon: int = 100
    support_trajectories: int = 20
    query_trajectories: int = 20
    gamma: float = 0.99
    gae_lambda: float = 1.0
    outer: str = "trpo"
    max_kl: float = 0.01
    meta_lr: float = 0.01
    first_order: bool = False
    normalise_advantages: bool = True


@dataclass
class PolicyData:
    """Trajectories as tensors [T, M, ...] (M = horizon × trajectories) for the losses; ``weight``
    is the mask divided by each task's count of valid steps (per-task means are sums)."""

    obs: paddle.Tensor
    actions: paddle.Tensor
    advantages: paddle.Tensor
    weight: paddle.Tensor

    @classmethod
    def of(cls, episodes: Episodes, dtype: str) -> PolicyData:
        mask = episodes.mask.reshape(len(episodes.mask), -1)
        weight = mask / mask.sum(axis=1, keepdims=True)
        advantages = episodes.advantages.reshape(weight.shape)
        return cls(
            episodes.flat("observations", dtype),
            episodes.flat("actions", dtype),
            paddle.to_tensor(advantages, dtype=dtype),
            paddle.to_tensor(weight, dtype=dtype),
        )


@dataclass
class Adaptation:
    """θ_0 … θ_K (stacked, a leading task axis) and the data D_0 … D_{K−1} of each inner step."""

    weights: list[TensorDict]
    support: list[PolicyData]
    returns: list[np.ndarray]  # per inner step, each task's average return on D_k


class PolicyGradientLearner:
    """Adapts a Gaussian policy to tasks with policy-gradient steps and meta-updates θ.

    The interface is the trainer's and evaluator's (learning/learner.py's MetaLearner):
    ``meta_update``, ``evaluate``, ``make_optimizer``, ``params``, ``theta``.
    """

    def __init__(
        self,
        policy: GaussianPolicy,
        params: TensorDict,
        env,
        inner_lr: float,
        inner_steps: int,
        settings: Settings,
        rule: str = "sgd",
        later_lr: float | None = None,
    ):
        self.policy, self.params, self.env = policy, params, env
        self.inner_steps, self.settings = inner_steps, settings
        self.rule = make_rule(rule, inner_lr, later_lr)
        self.adapted = adapted_names(policy, params)
        self.theta = [k for k in params if not k.startswith(RATE_PREFIX)]
        self.dtype = str(params[self.theta[0]].dtype).replace("paddle.", "")
        if settings.outer == "trpo" and self.rule.learned:
            raise ValueError("TRPO steps θ only: learned inner rates need --outer adam")

    @classmethod
    def from_config(cls, policy, params: TensorDict, config: dict, env) -> PolicyGradientLearner:
        """The learner a run's ``config`` describes (``pretrain``: no inner step in training)."""
        settings = Settings(
            horizon=config["horizon"],
            support_trajectories=config["k_spt"],
            query_trajectories=config["k_query"],
            gamma=config["gamma"],
            gae_lambda=config["gae_lambda"],
            outer=config["outer"],
            max_kl=config["max_kl"],
            meta_lr=config["glob_meta_lr"],
            first_order=config["algo"] == "fomaml",
        )
        steps = 0 if config["algo"] == "pretrain" else config["glob_update_step"]
        rule = config.get("inner_rule") or "sgd"
        later = config.get("later_steps_lr")
        return cls(policy, params, env, config["glob_base_lr"], steps, settings, rule, later)

    # -- trajectories ----------------------------------------------------------------------------
    def _sample(
        self, tasks: Sequence[GoalTask], weights: TensorDict, phase: int, count: int
    ) -> Episodes:
        """``count`` trajectories per task with the stacked ``weights``; ``phase`` (the inner step,
        or the query's) picks a fresh noise stream of each task's seed."""
        goals = np.stack([task.goal for task in tasks])
        seeds = [[task.seed, phase] for task in tasks]
        episodes = rollout(
            self.env,
            self.policy,
            {k: w.detach() for k, w in weights.items()},
            goals,
            seeds,
            count,
            self.settings.horizon,
        )
        add_advantages(
            episodes,
            self.settings.gamma,
            self.settings.gae_lambda,
            self.settings.normalise_advantages,
        )
        return episodes

    def _start(self, count: int, differentiable: bool) -> TensorDict:
        """θ with a leading task axis of ``count`` copies (their gradients sum back into θ)."""
        return {
            k: (self.params[k] if differentiable else self.params[k].detach()).expand(
                [count, *self.params[k].shape]
            )
            for k in self.theta
        }

    # -- losses ----------------------------------------------------------------------------------
    def inner_loss(self, weights: TensorDict, data: PolicyData) -> paddle.Tensor:
        """REINFORCE's −mean[log π(a|s) Â] of each task, summed over the tasks."""
        log_prob = self.policy.log_prob(data.obs, data.actions, weights)
        return -(log_prob * data.advantages * data.weight).sum()

    def surrogate(
        self, weights: TensorDict, data: PolicyData, old_log_prob: paddle.Tensor
    ) -> paddle.Tensor:
        """TRPO's −mean[ratio · Â] of each task, [T]."""
        ratio = paddle.exp(self.policy.log_prob(data.obs, data.actions, weights) - old_log_prob)
        return -(ratio * data.advantages * data.weight).sum(axis=1)

    def kl(self, weights: TensorDict, data: PolicyData, old: tuple) -> paddle.Tensor:
        """Mean KL(π_old ‖ π) over each task's valid steps, [T]."""
        return (self.policy.kl_from(*old, data.obs, weights) * data.weight).sum(axis=1)

    # -- the inner loop --------------------------------------------------------------------------
    def inner_step(
        self, current: TensorDict, data: PolicyData, order: Order, step: int
    ) -> TensorDict:
        """θ_{k+1} from θ_k: second order keeps the inner gradient's graph; first order takes it
        at detached weights (a constant); NONE builds no graph at all."""
        if order is Order.SECOND:
            wrt = [current[k] for k in self.adapted]
            grads = paddle.grad(self.inner_loss(current, data), wrt, create_graph=True)
        else:
            leaves = {k: _leaf(w) if k in self.adapted else w.detach() for k, w in current.items()}
            grads = paddle.grad(self.inner_loss(leaves, data), [leaves[k] for k in self.adapted])
        updated = dict(current)
        with paddle.no_grad() if order is Order.NONE else nullcontext():
            for name, grad in zip(self.adapted, grads):
                updated[name] = self.rule.update(name, current[name], grad, step, self.params)
        return updated

    def adapt(self, tasks: Sequence[GoalTask], order: Order, steps: int) -> Adaptation:
        """θ_0 … θ_steps for the stacked ``tasks``, sampling each step's trajectories with the
        current weights."""
        weights = [self._start(len(tasks), order is not Order.NONE)]
        data, returns = [], []
        for step in range(steps):
            episodes = self._sample(tasks, weights[-1], step, self.settings.support_trajectories)
            data.append(PolicyData.of(episodes, self.dtype))
            returns.append(episodes.task_returns())
            weights.append(self.inner_step(weights[-1], data[-1], order, step))
        return Adaptation(weights, data, returns)

    def replay(
        self, count: int, support: list[PolicyData], order: Order = Order.NONE
    ) -> TensorDict:
        """θ_K of ``count`` stacked tasks adapted on given inner-step data: TRPO's line search
        moves θ but keeps the trajectories (and the proofs differentiate S(θ) on fixed data)."""
        weights = self._start(count, differentiable=order is not Order.NONE)
        for step, data in enumerate(support):
            weights = self.inner_step(weights, data, order, step)
        return weights

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, tasks: Sequence[GoalTask], steps: int) -> np.ndarray:
        """Average return of each task's trajectories after 0..steps inner steps, [T, steps + 1]
        (``EVALUATION_CHUNK`` tasks stacked at a time, so any number of test tasks fits)."""
        rows = []
        for start in range(0, len(tasks), EVALUATION_CHUNK):
            chunk = tasks[start : start + EVALUATION_CHUNK]
            adaptation = self.adapt(chunk, Order.NONE, steps)
            count = self.settings.support_trajectories
            final = self._sample(chunk, adaptation.weights[-1], steps, count)
            rows.append(np.stack([*adaptation.returns, final.task_returns()], axis=1))
        return np.concatenate(rows)

    def adapted_trajectories(self, task: GoalTask, steps: int) -> list[Episodes]:
        """One task's trajectories after 0..steps inner steps (for figures and the playground)."""
        adaptation = self.adapt([task], Order.NONE, steps)
        return [
            self._sample([task], weights, step, self.settings.support_trajectories)
            for step, weights in enumerate(adaptation.weights)
        ]

    # -- the meta-update -------------------------------------------------------------------------
    def make_optimizer(self) -> TRPO | Adam:
        if self.settings.outer == "trpo":
            return TRPO(max_kl=self.settings.max_kl)
        return Adam(self.params, self.settings.meta_lr)

    def meta_update(
        self,
        tasks: Sequence[GoalTask],
        optimizer: TRPO | Adam,
        batch_size: int,
        track_steps: bool = False,
        reduce: Callable[[TensorDict], TensorDict] = lambda tensors: tensors,
        iteration: int | None = None,
    ) -> tuple[float, list[float]]:
        """One meta-iteration on this process's ``tasks`` of a meta-batch of ``batch_size``
        (``reduce`` sums over processes). Returns minus the mean post-update return (the loss MAML
        lowers) and the mean return after each inner step 0..K."""
        order = Order.FIRST if self.settings.first_order else Order.SECOND
        problem = self.meta_problem(tasks, order)
        losses = self.surrogate(problem.adaptation.weights[-1], problem.query, problem.old_log_prob)
        names = list(self.params) if self.settings.outer == "adam" else self.theta
        grads = self._gradient(losses.sum(), names)
        totals = reduce({**grads, _LOSS: losses.sum().reshape([1]), _RETURNS: problem.returns})
        per_step = (totals.pop(_RETURNS).numpy() / batch_size).tolist()
        loss_before = float(totals.pop(_LOSS).numpy()[0]) / batch_size
        mean = mean_if_finite(totals, batch_size)
        if mean is None or not np.isfinite(loss_before):
            raise NonFiniteError(loss_before)
        if isinstance(optimizer, TRPO):
            self._trpo_step(optimizer, problem, mean, loss_before, reduce, batch_size)
        else:
            optimizer.step(mean)
        return -per_step[-1], per_step

    def _gradient(self, objective: paddle.Tensor, names: list[str]) -> TensorDict:
        """∇ of ``objective`` for the meta-parameters ``names`` (zeros where it has none)."""
        grads = paddle.grad(objective, [self.params[k] for k in names], allow_unused=True)
        return {
            k: paddle.zeros_like(self.params[k]) if g is None else g for k, g in zip(names, grads)
        }

    def meta_problem(self, tasks: Sequence[GoalTask], order: Order) -> MetaProblem:
        """Adapt, sample the post-update trajectories, and fix the old policy on them."""
        steps = self.inner_steps
        adaptation = self.adapt(tasks, order, steps)
        final = adaptation.weights[-1]
        episodes = self._sample(tasks, final, steps, self.settings.query_trajectories)
        query = PolicyData.of(episodes, self.dtype)
        with paddle.no_grad():
            detached = {k: w.detach() for k, w in final.items()}
            old = tuple(t.detach() for t in self.policy.distribution(query.obs, detached))
            old_log_prob = self.policy.log_prob(query.obs, query.actions, detached)
        returns = np.array([r.sum() for r in [*adaptation.returns, episodes.task_returns()]])
        summed = paddle.to_tensor(returns, self.dtype)
        return MetaProblem(adaptation, query, old, old_log_prob, summed)

    def _trpo_step(self, optimizer: TRPO, problem, mean: TensorDict, loss_before, reduce, count):
        """TRPO on θ: the natural-gradient step through the inner update, then the line search
        (each candidate θ adapts again on the same inner-step data)."""
        shapes = {k: self.params[k].shape for k in self.theta}
        old = {k: self.params[k].detach().clone() for k in self.theta}
        product = self.fisher_product(problem, reduce, count)

        def try_step(step: np.ndarray) -> tuple[float, float]:
            delta = _unflatten(step, shapes, old[self.theta[0]].dtype)
            with paddle.no_grad():
                for k in self.theta:
                    self.params[k].set_value(old[k] - delta[k])
            return self.loss_and_kl(problem, reduce, count)

        optimizer.step(_flatten(mean, self.theta), product, try_step, loss_before)

    def loss_and_kl(self, problem, reduce, count) -> tuple[float, float]:
        """Mean surrogate and KL at the current θ, adapting on the stored inner-step data."""
        final = self.replay(len(problem.old_log_prob), problem.adaptation.support)
        with paddle.no_grad():
            loss = self.surrogate(final, problem.query, problem.old_log_prob).sum()
            kl = self.kl(final, problem.query, problem.old).sum()
        totals = reduce({_LOSS: loss.reshape([1]), _KL: kl.reshape([1])})
        return (float(totals[_LOSS].numpy()[0]) / count, float(totals[_KL].numpy()[0]) / count)

    def fisher_product(self, problem, reduce, count) -> Callable[[np.ndarray], np.ndarray]:
        """v ↦ (mean over tasks of J_tᵀ F_t J_t) v at θ_old, flat (see the module's docstring)."""
        shapes = {k: self.params[k].shape for k in self.theta}
        dtype = self.params[self.theta[0]].dtype
        chain = [] if self.settings.first_order else self._inner_curvatures(problem)
        final = {k: _leaf(w) for k, w in problem.adaptation.weights[-1].items()}
        kl = self.kl(final, problem.query, problem.old).sum()
        kl_grad = dict(
            zip(self.theta, paddle.grad(kl, [final[k] for k in self.theta], create_graph=True))
        )
        tasks = len(problem.old_log_prob)

        def product(vector: np.ndarray) -> np.ndarray:
            u = {
                k: v.expand([tasks, *v.shape]) for k, v in _unflatten(vector, shapes, dtype).items()
            }
            for step, hvp in enumerate(chain):  # J v
                h = hvp(u)
                u = {
                    k: self.rule.update(k, u[k], h[k], step, self.params) if k in h else u[k]
                    for k in u
                }
            w = _hvp(kl_grad, final, u)
            for step, hvp in reversed(list(enumerate(chain))):  # Jᵀ w
                h = hvp(
                    {
                        k: self.rule.update(k, paddle.zeros_like(w[k]), w[k], step, self.params)
                        for k in self.adapted
                    }
                )
                w = {k: w[k] + h[k] if k in h else w[k] for k in w}
            summed = reduce({k: w[k].sum(axis=0) for k in self.theta})
            return _flatten(summed, self.theta) / count

        return product

    def _inner_curvatures(self, problem) -> list[Callable[[TensorDict], TensorDict]]:
        """For each inner step, u ↦ ∇²L_k(θ_k) u over the adapted weights (graphs kept)."""
        chain = []
        for step, data in enumerate(problem.adaptation.support):
            values = problem.adaptation.weights[step]
            leaves = {k: _leaf(w) for k, w in values.items()}
            loss = self.inner_loss(leaves, data)
            grads = paddle.grad(loss, [leaves[k] for k in self.adapted], create_graph=True)
            gradient = dict(zip(self.adapted, grads))
            chain.append(lambda u, g=gradient, x=leaves: _hvp(g, x, u))
        return chain


@dataclass
class MetaProblem:
    """A meta-iteration's fixed data: the adaptation, the post-update trajectories, the old
    post-update policy on them, and the per-step summed returns."""

    adaptation: Adaptation
    query: PolicyData
    old: tuple[paddle.Tensor, paddle.Tensor]
    old_log_prob: paddle.Tensor
    returns: paddle.Tensor


def _hvp(gradient: TensorDict, leaves: TensorDict, vector: TensorDict) -> TensorDict:
    """∇(gradient · vector) with respect to ``leaves`` (a Hessian-vector product), graph kept."""
    names = list(gradient)
    dot = sum((gradient[k] * vector[k]).sum() for k in names)
    values = paddle.grad(dot, [leaves[k] for k in names], retain_graph=True)
    return dict(zip(names, values))


def _flatten(tensors: TensorDict, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([tensors[k].numpy().astype(np.float64).ravel() for k in names])


def _unflatten(vector: np.ndarray, shapes: dict, dtype) -> TensorDict:
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = paddle.to_tensor(vector[start : start + size].reshape(shape), dtype=dtype)
        start += size
    return out


def _leaf(value: paddle.Tensor) -> paddle.Tensor:
    leaf = value.detach()
    leaf.stop_gradient = False
    return leaf


def optimizer_shapes(outer: str, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """What the outer optimiser keeps per meta-parameter: nothing for TRPO, Adam's moments."""
    return {} if outer == "trpo" else QueryGradient().optimizer_shapes(shapes)
