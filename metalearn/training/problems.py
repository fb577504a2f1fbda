"""Which network and task samplers go with each dataset: the only dataset-specific wiring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle

from metalearn.data import folders, omniglot
from metalearn.data.tasks import ClassImages, ImageTasks, SinusoidTasks
from metalearn.errors import UserError
from metalearn.kernels import onednn
from metalearn.learning.learner import MetaLearner
from metalearn.learning.variants import make_variant
from metalearn.nets import factory
from metalearn.nets.builtin import MLP, ConvNet, PoolConvNet
from metalearn.nets.layer_net import LayerNet
from metalearn.nets.spec import build_from_spec, load_spec_file
from metalearn.rl import problem as rl_problem
from metalearn.rl.learner import optimizer_shapes as rl_optimizer_shapes
from metalearn.rl.settings import RL_DATASETS


def variant_optimizer_shapes(config: dict, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """What the outer optimiser of ``config``'s --algo keeps per meta-parameter (resume checks)."""
    return make_variant(config["algo"], config).optimizer_shapes(shapes)


@dataclass
class Problem:
    """A network (whose ``metric`` scores tasks) plus a sampler per split; ``learner(net, params,
    config, steps)`` builds the learner, ``optimizer_shapes(config, shapes)`` says what its outer
    optimiser keeps (both differ for reinforcement learning)."""

    net: object
    samplers: dict
    learner: Callable = MetaLearner.from_config
    optimizer_shapes: Callable = variant_optimizer_shapes


def build_problem(config: dict, splits: tuple[str, ...] = ("train", "val", "test")) -> Problem:
    """The network and the samplers of ``splits`` for ``config['dataset']``.

    For images the network's input shape comes from the data, and ``config['net']`` is filled in
    when left to its default, so the run's config.json says which network it used.
    """
    if config["dataset"] in RL_DATASETS:
        policy, samplers, learner = rl_problem.build(config, splits)
        return Problem(policy, samplers, learner, _rl_optimizer_shapes)
    if config["dataset"] == "sinusoid":
        sampler = SinusoidTasks(config["k_spt"], config["k_query"])
        return Problem(MLP(), {split: sampler for split in splits})
    samplers = {}
    for split in splits:
        images = _load_images(config, split)
        # Augmentation is for training; validation and test tasks use the images as they are.
        augment = config.get("augment", "none") if split == "train" else "none"
        samplers[split] = ImageTasks(
            images,
            config["n_way"],
            config["k_spt"],
            config["k_query"],
            augment,
            where=f"the {split} split",
        )
    channels, size = next(iter(samplers.values())).classes.pixels.shape[1:3]
    config["kernels"] = onednn.use_kernels(config.get("kernels", "fast"))  # what is really in use
    return Problem(image_network(config, int(channels), int(size)), samplers)


def image_network(config: dict, channels: int, size: int) -> ConvNet | PoolConvNet | LayerNet:
    """The network of an image run's ``config`` for images of ``channels`` x ``size`` x ``size``.

    Training, evaluation and the playground build it here, so the architecture always comes from
    the flags and the data, never from a file's description of itself.
    """
    config["net"] = config.get("net") or ("conv4" if channels == 1 else "pool4")
    if config["net"] not in NETS:
        return user_network(config, (channels, size, size))
    # Per-step batch norm (MAML++): one row per inner step's weights θ_0..θ_K of training.
    bn_steps = config["glob_update_step"] + 1 if config.get("per_step_bn") else 0
    return NETS[config["net"]](
        config["n_way"], in_channels=channels, image_size=size, bn_steps=bn_steps
    )


def _rl_optimizer_shapes(config: dict, shapes: dict[str, tuple]) -> dict[str, tuple]:
    return rl_optimizer_shapes(config["outer"], shapes)


NETS = {"conv4": ConvNet, "pool4": PoolConvNet}
"""``--net``: the paper's Omniglot network and its MiniImagenet network; anything else is the
user's own (:func:`user_layer`)."""


def user_network(config: dict, input_shape: tuple[int, int, int]) -> LayerNet:
    """The user's model of ``config['net']`` as a network, checked on a sample batch."""
    if config.get("per_step_bn"):
        raise UserError(
            "--per_step_bn (on in --algo maml++) needs a built-in network (conv4 or pool4); "
            "add --no-per_step_bn"
        )
    layer = user_layer(config, input_shape, config["n_way"])
    net = LayerNet(layer, config["n_way"], input_shape, source=config["net"])
    try:
        net.check_sample(factory.sample_batch(input_shape), config["n_way"])
    except UserError as error:
        raise UserError(f"--net {config['net']}: {error}") from None
    if (config.get("task_chunk") or 1) > 1 and not net.stacks_tasks:
        raise UserError(
            f"--net {config['net']} computes one task at a time (its forward gives other "
            "outputs for stacked tasks, see docs/models.md): leave --task_chunk out"
        )
    return net


def user_layer(config: dict, input_shape: tuple[int, int, int], n_way: int) -> paddle.nn.Layer:
    """The Layer ``config['net']`` describes: a model spec file (``.json``) or a factory
    (``module:function``), built with Paddle seeded by the run's seed, so every process and
    every rebuild starts from the same weights."""
    paddle.seed(config["seed"])
    if config["net"].endswith(".json"):
        return build_from_spec(load_spec_file(config["net"]), input_shape, n_way)
    return factory.build_layer(config["net"], input_shape, n_way)


def _load_images(config: dict, split: str) -> np.ndarray | ClassImages:
    if config["dataset"] == "folder":
        return folders.load_split(config["data_dir"], config["data"], split)
    return omniglot.load_split(config["data_dir"], split)
