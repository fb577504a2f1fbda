"""The Gaussian MLP policy as a pure function of a parameter dict (like nets/builtin.py's nets).

π_θ(a|s) = N(μ_θ(s), diag(exp(2·log_std))): μ is the paper's MLP (two hidden layers of 100 ReLU
units; tanh for finite-difference checks) and ``log_std`` a learned vector, one per action axis,
independent of the state (the paper's and rllab's GaussianMLPPolicy). Weights may carry a leading
task axis (one copy per task, T stacked tasks in one computation); observations are then
[T, M, obs_dim]. Every function is composed of recorded Paddle ops with exact second
derivatives, which the meta-gradient and TRPO's curvature need.
"""

from __future__ import annotations

import math

import numpy as np
import paddle

from metalearn.metrics import RETURN
from metalearn.nets.builtin import MLP

LOG_STD = "log_std"
_LOG_2PI = math.log(2 * math.pi)


class GaussianPolicy:
    """μ_θ(s) by an MLP of ``hidden`` units, and a state-independent learned log-std."""

    kind = "gaussian_mlp"
    metric = RETURN
    default_task_chunk = None

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: tuple[int, ...] = (100, 100),
        activation: str = "relu",
        init_log_std: float = 0.0,
    ):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.hidden, self.activation = tuple(hidden), activation
        self.init_log_std = init_log_std
        self.mlp = MLP(sizes=(obs_dim, *self.hidden, act_dim), activation=activation)

    def config(self) -> dict:
        """Everything needed to rebuild this architecture (stored in checkpoints)."""
        return {
            "kind": self.kind,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
        }

    def init_params(self, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
        """Glorot-uniform weights and zero biases (the MLP's), log-std ``init_log_std`` (σ = 1)."""
        arrays = self.mlp.init_params(seed, dtype)
        arrays[LOG_STD] = np.full(self.act_dim, self.init_log_std, dtype)
        return arrays

    @property
    def head_names(self) -> tuple[str, ...]:
        return (*self.mlp.head_names, LOG_STD)

    def per_step_names(self) -> tuple[str, ...]:
        return ()

    def distribution(
        self, obs: paddle.Tensor, params: dict[str, paddle.Tensor]
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Mean [T, M, act] and log-std broadcast to the same shape, for obs [T, M, obs_dim]."""
        mean = self.mlp.forward(obs, params)
        log_std = params[LOG_STD].unsqueeze(1).expand(mean.shape)
        return mean, log_std

    def log_prob(
        self, obs: paddle.Tensor, actions: paddle.Tensor, params: dict[str, paddle.Tensor]
    ) -> paddle.Tensor:
        """log π(a|s) per sample, [T, M]."""
        mean, log_std = self.distribution(obs, params)
        z = (actions - mean) * paddle.exp(-log_std)
        return (-0.5 * paddle.square(z) - log_std).sum(axis=-1) - 0.5 * self.act_dim * _LOG_2PI

    def kl_from(
        self,
        old_mean: paddle.Tensor,
        old_log_std: paddle.Tensor,
        obs: paddle.Tensor,
        params: dict[str, paddle.Tensor],
    ) -> paddle.Tensor:
        """KL(π_old(·|s) ‖ π_θ(·|s)) per sample, [T, M], for the fixed old Gaussians given."""
        mean, log_std = self.distribution(obs, params)
        ratio = paddle.exp(2 * (old_log_std - log_std))
        spread = paddle.square(old_mean - mean) * paddle.exp(-2 * log_std)
        return (log_std - old_log_std + 0.5 * (ratio + spread - 1)).sum(axis=-1)
