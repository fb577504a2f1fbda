"""Which network and task samplers go with each dataset: the only dataset-specific wiring."""

from __future__ import annotations

from dataclasses import dataclass

from metalearn import omniglot, ops
from metalearn.nets import MLP, ConvNet
from metalearn.tasks import ImageTasks, SinusoidTasks


@dataclass
class Problem:
    """A network (whose ``metric`` scores tasks) plus a sampler per split."""

    net: object
    samplers: dict


def build_problem(config: dict, splits: tuple[str, ...] = ("train", "val", "test")) -> Problem:
    """The network and the samplers of ``splits`` for ``config['dataset']``."""
    if config["dataset"] == "sinusoid":
        sampler = SinusoidTasks(config["k_spt"], config["k_query"])
        return Problem(MLP(), {split: sampler for split in splits})
    samplers = {}
    for split in splits:
        images = omniglot.load_split(config["data_dir"], split)
        # Rotation is a training augmentation; validation and test tasks use the images as drawn.
        augment = config.get("augment", "none") if split == "train" else "none"
        samplers[split] = ImageTasks(
            images, config["n_way"], config["k_spt"], config["k_query"], augment
        )
    config["kernels"] = ops.use_kernels(config.get("kernels", "fast"))  # what is really in use
    # Per-step batch norm (MAML++): one row per inner step's weights θ_0..θ_K of training.
    bn_steps = config["glob_update_step"] + 1 if config.get("per_step_bn") else 0
    return Problem(ConvNet(n_way=config["n_way"], bn_steps=bn_steps), samplers)
