"""Functional networks: parameters are an explicit ordered dict, ``forward(x, params)`` is pure.

MAML needs the adapted weights θ' = θ − α∇L(θ) to stay a differentiable function of θ, so no
network here owns its weights: every call takes them as an argument. Parameter names are stable
strings, which checkpoints and optimiser state use as keys.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from metalearn import ops
from metalearn.metrics import ACCURACY, MSE

Params = "OrderedDict[str, paddle.Tensor]"


def _glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


class ConvNet:
    """The paper's Omniglot network: 4 × [3×3 conv (stride 2), batch norm, ReLU], spatial mean, linear.

    Stride-2 convolutions replace max-pooling, as in Finn et al. for Omniglot (28 → 14 → 7 → 4 → 2).
    The convolutions have no bias: batch norm subtracts the batch mean right after, so a bias would
    compute the same function and always receive a zero gradient. Batch norm always normalises with
    the current batch's statistics (meta-train and meta-test alike), as the paper's code does.
    """

    kind = "conv"

    def __init__(
        self,
        n_way: int,
        in_channels: int = 1,
        hidden: int = 64,
        blocks: int = 4,
        activation: str = "relu",
        bn_eps: float = 1e-3,
    ):
        self.n_way, self.in_channels, self.hidden, self.blocks = n_way, in_channels, hidden, blocks
        self.activation = activation
        self.bn_eps = bn_eps

    def config(self) -> dict:
        """Everything needed to rebuild this architecture (stored in checkpoints)."""
        return {
            "kind": self.kind,
            "n_way": self.n_way,
            "in_channels": self.in_channels,
            "hidden": self.hidden,
            "blocks": self.blocks,
            "activation": self.activation,
        }

    def init_params(self, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
        """Glorot-uniform weights, unit BN scales, zero shifts and output bias, as numpy arrays."""
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        channels = self.in_channels
        for block in range(self.blocks):
            shape = (self.hidden, channels, 3, 3)
            arrays[f"conv{block}.weight"] = _glorot_uniform(
                rng, shape, channels * 9, self.hidden * 9
            )
            arrays[f"bn{block}.scale"] = np.ones(self.hidden)
            arrays[f"bn{block}.shift"] = np.zeros(self.hidden)
            channels = self.hidden
        arrays["head.weight"] = _glorot_uniform(
            rng, (self.hidden, self.n_way), self.hidden, self.n_way
        )
        arrays["head.bias"] = np.zeros(self.n_way)
        return {name: value.astype(dtype) for name, value in arrays.items()}

    def forward(self, x: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Logits [batch, n_way] for images ``x`` [batch, channels, 28, 28] under ``params``."""
        act = _activation(self.activation)
        for block in range(self.blocks):
            x = ops.conv2d(x, params[f"conv{block}.weight"], stride=2, padding=1)
            x = _batch_norm(x, params[f"bn{block}.scale"], params[f"bn{block}.shift"], self.bn_eps)
            x = act(x)
        features = x.mean(axis=[2, 3])
        return paddle.matmul(features, params["head.weight"]) + params["head.bias"]

    metric = ACCURACY
    task_batched = False

    def loss(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return ops.cross_entropy(output, target)

    def task_losses(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.loss(output, target).reshape([1])

    def task_metrics(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return (output.argmax(axis=1) == target).astype("float32").mean().reshape([1])


class MLP:
    """The paper's sinusoid regressor: 1 → 40 → 40 → 1 with ReLU, trained on mean squared error."""

    kind = "mlp"

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1), activation: str = "relu"):
        self.sizes = tuple(sizes)
        self.activation = activation

    def config(self) -> dict:
        return {"kind": self.kind, "sizes": list(self.sizes), "activation": self.activation}

    def init_params(self, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        for layer, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            arrays[f"fc{layer}.weight"] = _glorot_uniform(rng, (fan_in, fan_out), fan_in, fan_out)
            arrays[f"fc{layer}.bias"] = np.zeros(fan_out)
        return {name: value.astype(dtype) for name, value in arrays.items()}

    def forward(self, x: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Outputs [points, 1] for x [points, 1], or [tasks, points, 1] with per-task weights."""
        act = _activation(self.activation)
        layers = len(self.sizes) - 1
        for layer in range(layers):
            bias = params[f"fc{layer}.bias"]
            if x.ndim == 3:  # stacked tasks: bias [tasks, out] broadcasts over each task's points
                bias = bias.unsqueeze(1)
            x = paddle.matmul(x, params[f"fc{layer}.weight"]) + bias
            if layer < layers - 1:
                x = act(x)
        return x

    metric = MSE
    task_batched = True

    def task_losses(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """Mean squared error of each task ([tasks] for stacked input, a scalar for one task)."""
        return ((output - target) ** 2).mean(axis=[-2, -1])

    def loss(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """Sum of per-task means, so each task's copy of θ gets exactly its own task's gradient."""
        return self.task_losses(output, target).sum()

    def task_metrics(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.task_losses(output, target)


def _activation(name: str):
    """ReLU for training; tanh and softplus exist so finite-difference checks see a smooth function."""
    return {"relu": F.relu, "tanh": paddle.tanh, "softplus": F.softplus}[name]


def _batch_norm(x: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor, eps: float):
    """Batch norm with the batch's own statistics, written out in elementwise ops.

    Paddle's fused batch-norm double-grad kernel costs ~100 ms on a 5-image CPU batch; these ops
    have exact, cheap double-grads. The work is done on an [N, C, H·W] view with [C, 1]
    statistics: Paddle's CPU kernels broadcast that shape ~10x faster than [1, C, 1, 1] over
    [N, C, H, W]. Running averages are never used (batch statistics everywhere).
    """
    n, c, h, w = x.shape
    rows = x.reshape([n, c, h * w])
    mean = rows.mean(axis=[0, 2], keepdim=True).squeeze(0)
    centred = rows - mean
    var = (centred * centred).mean(axis=[0, 2], keepdim=True).squeeze(0)
    normalised = centred * (paddle.rsqrt(var + eps) * scale.reshape([c, 1]))
    return (normalised + shift.reshape([c, 1])).reshape([n, c, h, w])


def build_network(config: dict):
    """Rebuild a network from :meth:`config` output (checkpoints store it)."""
    options = {key: value for key, value in config.items() if key != "kind"}
    if config["kind"] == ConvNet.kind:
        return ConvNet(**options)
    if config["kind"] == MLP.kind:
        return MLP(sizes=tuple(options["sizes"]), activation=options["activation"])
    raise ValueError(f"unknown network kind {config['kind']!r}")
