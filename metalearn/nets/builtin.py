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

from metalearn.errors import UserError
from metalearn.kernels import ops, registry
from metalearn.metrics import ACCURACY, MSE
from metalearn.nets.stacking import one_per_task, side_by_side

Params = "OrderedDict[str, paddle.Tensor]"


def _glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


OMNIGLOT_SIZE = 28


class Classification:
    """Mean cross-entropy and accuracy; for stacked tasks ([T, N, classes] outputs) per task."""

    metric = ACCURACY

    def loss(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """Mean cross-entropy; for stacked tasks the sum over tasks of their means."""
        return self.task_losses(output, target).sum()

    def task_losses(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return ops.cross_entropy(output, target).reshape([-1])

    def task_metrics(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        hits = (output.argmax(axis=-1) == target).astype("float32")
        return hits.mean(axis=-1).reshape([-1])


class Regression:
    """Mean squared error, which is also the metric; for stacked tasks per task."""

    metric = MSE

    def task_losses(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """Mean squared error of each task ([tasks] for stacked input, a scalar for one task)."""
        return paddle.square(output - target).mean(axis=[-2, -1])  # square: pow(·, 2) is slow

    def loss(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """Sum of per-task means, so each task's copy of θ gets exactly its own task's gradient."""
        return self.task_losses(output, target).sum()

    def task_metrics(self, output: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self.task_losses(output, target)


class _BlockNet(Classification):
    """What the two image classifiers share: bias-free 3×3 convolution blocks with batch norm,
    a linear head, cross-entropy and accuracy, and the input check.

    The convolutions have no bias: batch norm subtracts the batch mean right after, so a bias would
    compute the same function and always receive a zero gradient. Batch norm always normalises with
    the current batch's statistics (meta-train and meta-test alike), as the paper's code does.

    With ``bn_steps`` > 0 (MAML++'s per-step batch norm) every BN scale and shift gets a leading
    step axis: the weights after k inner steps are run with row min(k, bn_steps − 1).

    Stacked tasks: images [T, N, C, H, W] with weights that have a leading task axis run as one
    computation. The activations are laid out [N, T·C, H, W], so each convolution is one grouped
    convolution (groups = T, each task's filters see only its own channels) and batch norm over
    T·C channels is each task's own batch norm; the head is a batched matrix product giving
    logits [T, N, classes], and the loss is the sum of the per-task mean cross-entropies, so each
    task's copy of θ gets exactly its own task's gradient.
    """

    stacked_tasks = 1  # tasks per computation by default with the oneDNN kernels
    head_names = ("head.weight", "head.bias")

    n_way: int
    in_channels: int
    image_size: int
    width: int
    blocks: int
    bn_steps: int

    def _set_shape(
        self, n_way: int, in_channels: int, image_size: int, width: int, blocks: int
    ) -> None:
        """Set and check the sizes (checkpoint configs come from outside)."""
        shape = {
            "n_way": n_way,
            "in_channels": in_channels,
            "image_size": image_size,
            "width": width,
            "blocks": blocks,
        }
        for name, value in shape.items():
            if not (isinstance(value, int) and value >= 1):
                raise UserError(
                    f"{type(self).__name__}: {name} must be a positive integer, not {value!r}"
                )
            setattr(self, name, value)

    def _feature_count(self) -> int:
        """Length of the vector the head sees."""
        raise NotImplementedError

    def init_params(self, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
        """Glorot-uniform weights, unit BN scales, zero shifts and output bias, as numpy arrays."""
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        channels = self.in_channels
        for block in range(self.blocks):
            shape = (self.width, channels, 3, 3)
            arrays[f"conv{block}.weight"] = _glorot_uniform(
                rng, shape, channels * 9, self.width * 9
            )
            bn_shape = (self.bn_steps, self.width) if self.bn_steps else (self.width,)
            arrays[f"bn{block}.scale"] = np.ones(bn_shape)
            arrays[f"bn{block}.shift"] = np.zeros(bn_shape)
            channels = self.width
        features = self._feature_count()
        arrays["head.weight"] = _glorot_uniform(rng, (features, self.n_way), features, self.n_way)
        arrays["head.bias"] = np.zeros(self.n_way)
        return {name: value.astype(dtype) for name, value in arrays.items()}

    def per_step_names(self) -> tuple[str, ...]:
        """Parameters with a leading inner-step axis (per-step batch norm), or none."""
        if not self.bn_steps:
            return ()
        return tuple(f"bn{b}.{p}" for b in range(self.blocks) for p in ("scale", "shift"))

    def _bn_config(self) -> dict:
        return {"bn_steps": self.bn_steps} if self.bn_steps else {}  # older checkpoints lack it

    def forward(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """Logits [batch, n_way] for images ``x`` [batch, channels, size, size] under ``params``,
        the weights after ``step`` inner steps (which only per-step batch norm looks at)."""
        return self.head(self.features(x, params, step), params)

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The body's output [batch, features]: everything before the linear head."""
        raise NotImplementedError

    @property
    def default_task_chunk(self) -> int:
        """Tasks stacked per computation unless the learner is told otherwise: ``stacked_tasks``
        with the oneDNN kernels; one at a time with Paddle's own, whose grouped convolutions made
        a second-order step ~4x slower than one task at a time."""
        return self.stacked_tasks if registry.in_use() == "fast" else 1

    def check_input(self, x: paddle.Tensor) -> None:
        """Refuse images of another shape than the network was built for (a wiring mistake)."""
        expected = [self.in_channels, self.image_size, self.image_size]
        if list(x.shape[-3:]) != expected or x.ndim not in (4, 5):
            raise ValueError(
                f"{type(self).__name__} expects images {expected}, got {list(x.shape)}"
            )

    def _block_params(self, params, block: int, step: int) -> tuple:
        """(conv weight, BN scale, BN shift, tasks T) of ``block`` for the weights after
        ``step`` inner steps (per-step batch norm's row of that step). Stacked tasks' weights
        come as one grouped convolution's [T·O, C, k, k] (groups = T)."""
        weight = params[f"conv{block}.weight"]
        scale, shift = params[f"bn{block}.scale"], params[f"bn{block}.shift"]
        stacked = weight.ndim == 5
        if self.bn_steps:
            row = min(step, self.bn_steps - 1)
            if stacked:  # [T, steps, C]
                scale, shift = scale[:, row : row + 1], shift[:, row : row + 1]
            else:
                scale, shift = scale[row : row + 1], shift[row : row + 1]
        if not stacked:
            return weight, scale, shift, 1
        return weight.reshape([-1, *weight.shape[2:]]), scale, shift, weight.shape[0]

    def _block(
        self, x, params, block: int, stride: int, step: int, relu: bool = False, layout: int = 1
    ) -> paddle.Tensor:
        """Convolution and batch norm (then ReLU if ``relu``, in the same fused operator where
        batch norm is one); ``x`` is [N, T·C, H, W] for T stacked tasks (weights with a leading
        task axis) or [N, C, H, W] for one task. ``layout`` > 1: the block's output is in the
        channel-blocked layout nChw{layout}c, and so is its input unless it is the first block
        (the images)."""
        weight, scale, shift, tasks = self._block_params(params, block, step)
        bits = 0 if layout == 1 else (2 if block == 0 else 3)
        x = ops.conv2d(x, weight, stride=stride, padding=1, groups=tasks, layout=bits)
        # per-step rows are not adapted in the inner loop: see ops.batch_norm's ``fuse``
        return ops.batch_norm(
            x, scale, shift, self.bn_eps, fuse=not self.bn_steps, relu=relu, block=layout
        )

    @staticmethod
    def _channels_of_tasks(x: paddle.Tensor) -> paddle.Tensor:
        """Stacked images [T, N, C, H, W] as [N, T·C, H, W] (one task's images pass unchanged)."""
        return x if x.ndim == 4 else side_by_side(x)

    @staticmethod
    def _tasks_of_features(x: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Features [N, T·F] of stacked tasks as [T, N, F] (one task's [N, F] pass unchanged)."""
        weight = params["conv0.weight"]
        return x if weight.ndim == 4 else one_per_task(x, weight.shape[0])

    def head(self, features: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Logits [N, classes], or [T, N, classes] for stacked features [T, N, F]."""
        return ops.linear(features, params["head.weight"], params["head.bias"])


class ConvNet(_BlockNet):
    """The paper's Omniglot network: 4 × [3×3 conv (stride 2), batch norm, ReLU], spatial mean, linear.

    Stride-2 convolutions replace max-pooling, as in Finn et al. for Omniglot (28 → 14 → 7 → 4 → 2).
    The spatial mean makes the parameters independent of the image size, so the same network runs
    on any size and channel count (``image_size`` is recorded and checked, nothing more).
    """

    kind = "conv"
    # Measured (docs/performance.md): 8 stacked tasks were as fast as 32 or faster, at 40% of the memory.
    stacked_tasks = 8

    def __init__(
        self,
        n_way: int,
        in_channels: int = 1,
        image_size: int = OMNIGLOT_SIZE,
        hidden: int = 64,
        blocks: int = 4,
        activation: str = "relu",
        bn_eps: float = 1e-3,
        bn_steps: int = 0,
    ):
        self.hidden = hidden
        self._set_shape(n_way, in_channels, image_size, hidden, blocks)
        self.activation, self.bn_eps, self.bn_steps = activation, bn_eps, bn_steps

    def config(self) -> dict:
        """Everything needed to rebuild this architecture (stored in checkpoints).

        ``image_size`` is left out at Omniglot's 28, so the configs of Omniglot runs stay equal
        to those written before it existed (checkpoints compare configs key by key).
        """
        config = {
            "kind": self.kind,
            "n_way": self.n_way,
            "in_channels": self.in_channels,
            "hidden": self.hidden,
            "blocks": self.blocks,
            "activation": self.activation,
            **self._bn_config(),
        }
        if self.image_size != OMNIGLOT_SIZE:
            config["image_size"] = self.image_size
        return config

    def _feature_count(self) -> int:
        return self.hidden

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        self.check_input(x)
        fused_relu = self.activation == "relu"  # ReLU goes into batch norm's operator
        act = _activation(self.activation)
        x = self._channels_of_tasks(x)
        if fused_relu and not paddle.is_grad_enabled():  # scoring: maybe one kernel call
            features = self._fused_features(x, params, step)
            if features is not None:
                return self._tasks_of_features(features, params)
        layout = self._activation_layout(x, params)
        for block in range(self.blocks):
            x = self._block(x, params, block, stride=2, step=step, relu=fused_relu, layout=layout)
            x = x if fused_relu else act(x)
        return self._tasks_of_features(ops.spatial_mean(x, layout), params)

    def _activation_layout(self, x, params) -> int:
        """B where the activations stay in oneDNN's blocked layout nChw{B}c from the first
        convolution's output to the spatial mean (the kernels' ``activation_block``; fused batch
        norm; widths that fill whole blocks): no convolution then reorders them. 1: plain NCHW."""
        if self.bn_steps:  # per-step rows run the composed batch norm, on NCHW
            return 1
        block = registry.active().activation_block(x, params["conv0.weight"])
        return block if self.hidden % block == 0 else 1

    def _fused_features(self, x, params, step: int) -> paddle.Tensor | None:
        """The body's features [N, T·F] of ``x`` [N, T·C, H, W] as one kernel call
        (:func:`metalearn.kernels.ops.relu_conv_body`), or None where the kernels have none."""
        blocks = [self._block_params(params, block, step) for block in range(self.blocks)]
        tasks = blocks[0][3]
        weights = [(weight, scale, shift) for weight, scale, shift, _ in blocks]
        return ops.relu_conv_body(x, weights, 2, 1, self.bn_eps, groups=tasks)


class PoolConvNet(_BlockNet):
    """The paper's MiniImagenet network: 4 × [3×3 conv (32 filters, stride 1, padding 1), batch
    norm, ReLU, 2×2 max-pool], flattened, linear.

    Pooling drops an odd last row/column (floor, like TensorFlow's 'VALID' in the paper's code):
    84 → 42 → 21 → 10 → 5, so the head sees 32·5·5 = 800 features. The pooling is applied before
    the activation: ReLU (or tanh) is monotone, so max-pooling and the activation commute exactly
    (values and derivatives), and the activation then touches a quarter of the values.
    """

    kind = "pool"
    # 84×84 images make every op large: stacking 4 tasks was no faster and took 2.5x the memory.
    stacked_tasks = 1

    def __init__(
        self,
        n_way: int,
        in_channels: int = 3,
        image_size: int = 84,
        filters: int = 32,
        blocks: int = 4,
        activation: str = "relu",
        bn_eps: float = 1e-3,
        bn_steps: int = 0,
    ):
        self.filters = filters
        self._set_shape(n_way, in_channels, image_size, filters, blocks)
        self.activation, self.bn_eps, self.bn_steps = activation, bn_eps, bn_steps
        if self.pooled_size() < 1:
            raise UserError(
                f"images of {image_size}×{image_size} are too small for {blocks} 2×2 max-pools "
                f"(at least {2**blocks} pixels a side)"
            )

    def config(self) -> dict:
        """Everything needed to rebuild this architecture (stored in checkpoints)."""
        return {
            "kind": self.kind,
            "n_way": self.n_way,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "filters": self.filters,
            "blocks": self.blocks,
            "activation": self.activation,
            **self._bn_config(),
        }

    def pooled_size(self) -> int:
        """Side of the last block's output (each pool halves it, rounding down)."""
        size = self.image_size
        for _ in range(self.blocks):
            size //= 2
        return size

    def _feature_count(self) -> int:
        return self.filters * self.pooled_size() ** 2

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        self.check_input(x)
        act = _activation(self.activation)
        x = self._channels_of_tasks(x)
        for block in range(self.blocks):
            x = act(ops.max_pool2x2(self._block(x, params, block, stride=1, step=step)))
        # reshape: flatten has no double-grad; [N, T·C, h, w] -> [N, T, C·h·w] keeps tasks apart
        return self._tasks_of_features(x.reshape([x.shape[0], -1]), params)


class MLP(Regression):
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

    @property
    def head_names(self) -> tuple[str, ...]:
        last = len(self.sizes) - 2
        return (f"fc{last}.weight", f"fc{last}.bias")

    def per_step_names(self) -> tuple[str, ...]:
        return ()

    def forward(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """Outputs [points, 1] for x [points, 1], or [tasks, points, 1] with per-task weights."""
        if self.activation == "relu":  # one operator where the kernels fuse it
            layers = range(len(self.sizes) - 1)
            return ops.relu_network(
                x,
                [params[f"fc{k}.weight"] for k in layers],
                [params[f"fc{k}.bias"] for k in layers],
            )
        return self.head(self.features(x, params, step), params)

    def features(
        self, x: paddle.Tensor, params: dict[str, paddle.Tensor], step: int = 0
    ) -> paddle.Tensor:
        """The last hidden layer's activations (everything before the linear head)."""
        act = _activation(self.activation)
        for layer in range(len(self.sizes) - 2):
            x = act(self._linear(x, params, layer))
        return x

    def head(self, features: paddle.Tensor, params: dict[str, paddle.Tensor]) -> paddle.Tensor:
        return self._linear(features, params, len(self.sizes) - 2)

    @staticmethod
    def _linear(x: paddle.Tensor, params: dict[str, paddle.Tensor], layer: int) -> paddle.Tensor:
        return ops.linear(x, params[f"fc{layer}.weight"], params[f"fc{layer}.bias"])

    default_task_chunk = None  # every task of a call at once: the sinusoid MLP is tiny


def _activation(name: str):
    """ReLU for training; tanh and softplus exist so finite-difference checks see a smooth function."""
    return {"relu": F.relu, "tanh": paddle.tanh, "softplus": F.softplus}[name]


def build_network(config: dict):
    """Rebuild a network from :meth:`config` output (checkpoints store it; a config without
    "kind" predates the pool network and is the Omniglot ConvNet)."""
    kind = config.get("kind", ConvNet.kind)
    options = {key: value for key, value in config.items() if key != "kind"}
    if kind == ConvNet.kind:
        return ConvNet(**options)
    if kind == PoolConvNet.kind:
        return PoolConvNet(**options)
    if kind == MLP.kind:
        return MLP(sizes=tuple(options["sizes"]), activation=options["activation"])
    raise ValueError(f"unknown network kind {kind!r}")
