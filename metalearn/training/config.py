"""Command-line flags for train.py and evaluate.py, mapped to one plain config dict.

Flags keep the seed project's names. Defaults depend on the dataset (the paper's sinusoid settings
differ from Omniglot's), so parsers default to ``None`` and :func:`resolve_defaults` fills in what
the user did not give; that also tells a resumed run which flags were set explicitly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from metalearn.data.omniglot import IMAGE_SIZE, NUM_CHARACTERS, check_seed
from metalearn.errors import UserError
from metalearn.nets.factory import is_factory
from metalearn.rl.settings import (
    MAX_BATCH_STEPS,
    MAX_HORIZON,
    MAX_TRAJECTORIES,
    NAV2D,
    OUTER_OPTIMIZERS,
    RL_DATASETS,
    RL_DEFAULTS,
    RL_FLAG_DEFAULTS,
)

DATASETS = ("omniglot", "sinusoid", "folder", *RL_DATASETS)
NETS = ("conv4", "pool4")
"""conv4: the paper's Omniglot net (stride-2 convolutions, spatial mean); pool4: its MiniImagenet net
(32 filters, 2x2 max-pools, flatten). Default: conv4 for 1-channel data, pool4 for RGB. Any other
value is the user's own: a model spec file (.json, metalearn/nets/spec.py) or a model factory
``module:function`` (metalearn/nets/factory.py)."""

DEFAULTS = {
    "omniglot": {
        "n_way": 5,
        "k_spt": 1,
        "k_query": 15,
        "task_num": 32,
        "glob_update_step": 5,
        "glob_update_step_test": 5,
        "glob_meta_lr": 0.001,
        "glob_base_lr": 0.1,
        "epochs": 10000,
    },
    # Image folders (make_data.py --images): the paper's MiniImagenet settings (section 5.2):
    # 5 inner steps of α = 0.01 in training, 10 at test time, 4 tasks per meta-batch, 15 queries.
    "folder": {
        "n_way": 5,
        "k_spt": 1,
        "k_query": 15,
        "task_num": 4,
        "glob_update_step": 5,
        "glob_update_step_test": 10,
        "glob_meta_lr": 0.001,
        "glob_base_lr": 0.01,
        "epochs": 60000,
    },
    # Finn et al. 2017, section 5.1 and appendix: 1 step of α = 0.01, 25 tasks, Adam 0.001, 70k its.
    "sinusoid": {
        "n_way": 1,
        "k_spt": 10,
        "k_query": None,
        "task_num": 25,
        "glob_update_step": 1,
        "glob_update_step_test": 10,
        "glob_meta_lr": 0.001,
        "glob_base_lr": 0.01,
        "epochs": 70000,
    },
    **RL_DEFAULTS,  # reinforcement learning: the paper's section 5.3 (metalearn/rl/settings.py)
}
COMMON_DEFAULTS = {
    "algo": "maml",
    "meta_step": 1.0,
    "meta_step_final": None,
    "seed": 0,
    "data_dir": ".",
    "work_dir": "work",
    "run_name": None,
    "log_every": 100,
    "val_every": 1000,
    "val_tasks": 200,
    "ckpt_every": 100,
    "augment": "none",
    "data": None,
    "net": None,
    "use_gpu": False,
    "export_pkl": False,
    "max_minutes": None,
    "kernels": "fast",
    "task_chunk": None,
    "resume": None,
    # The learner's ingredients; None: from the --algo preset (LEARNER_PRESETS).
    "inner_rule": None,
    "adapt": None,
    "per_step_bn": None,
    "multi_step_loss": None,
    "multi_step_loss_epochs": None,
    "first_order_epochs": None,
    "cosine_meta_lr": None,
    "cosine_meta_lr_epochs": None,
    "min_meta_lr": 1e-5,  # HowToTrainYourMAMLPytorch's min_learning_rate
    **RL_FLAG_DEFAULTS,
}

# What each --algo switches on; flags given explicitly win (ablations: --algo maml++
# --inner_rule sgd). MAML++'s schedules follow Antoniou et al. 2019 and their public code, which
# trains 150 epochs of 500 iterations: the multi-step loss is annealed over the first 15 epochs
# and the first 50 epochs are first order (the paper's §4; their configs use up to 80). Here they
# are the same fractions of --epochs (meta-iterations), fixed when the run starts.
LEARNER_PRESETS = {
    "maml++": {
        "inner_rule": "lslr",
        "per_step_bn": True,
        "multi_step_loss": True,
        "cosine_meta_lr": True,
        "first_order_fraction": 50 / 150,
    },
    "metasgd": {"inner_rule": "metasgd"},
    "anil": {"adapt": "head"},
}
_PLAIN_LEARNER = {
    "inner_rule": "sgd",
    "adapt": "all",
    "per_step_bn": False,
    "multi_step_loss": False,
    "cosine_meta_lr": False,
    "first_order_fraction": 0.0,
}
MULTI_STEP_LOSS_FRACTION = 15 / 150
LEARNER_KEYS = (
    "inner_rule",
    "adapt",
    "per_step_bn",
    "multi_step_loss",
    "multi_step_loss_epochs",
    "first_order_epochs",
    "cosine_meta_lr",
    "cosine_meta_lr_epochs",
    "min_meta_lr",
)


def _add_task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help="omniglot (default), sinusoid, folder: a set of your own images (see --data), or "
        "reinforcement learning: nav2d (2D navigation), cheetah_vel, cheetah_dir (half-cheetah "
        "goal velocity / direction; needs requirements-rl.txt)",
    )
    parser.add_argument(
        "--data",
        metavar="NAME",
        help="an image set packed by `make_data.py --images DIR --name NAME` into --data_dir "
        "(implies --dataset folder)",
    )
    parser.add_argument("--n_way", type=int, help="classes per task (default 5)")
    parser.add_argument("--k_spt", type=int, help="support examples per class (default 1)")
    parser.add_argument(
        "--k_query", type=int, help="query examples per class (default 15; sinusoid: k_spt)"
    )
    parser.add_argument(
        "--glob_update_step_test",
        type=int,
        help="inner steps at test time (default 5; sinusoid 10)",
    )
    parser.add_argument(
        "--glob_base_lr",
        type=float,
        help="inner step size α on the mean loss (default 0.1; sinusoid 0.01)",
    )
    parser.add_argument(
        "--data_dir",
        help="folder with omniglot_{train,val,test}.npy or NAME_*.npy (default .)",
    )
    parser.add_argument("--work_dir", help="where runs live (default work)")
    parser.add_argument(
        "--kernels",
        choices=("fast", "native"),
        help="convolution kernels: fast (oneDNN on the CPU, built on first use; default) or "
        "native (Paddle's own, the plain path); both give the same exact meta-gradient",
    )
    parser.add_argument(
        "--task_chunk",
        type=int,
        help="tasks computed together as one stacked computation (grouped convolutions); "
        "default: 8 for the conv4 net with the fast kernels (16 for Reptile), else 1 (task by "
        "task); a smaller chunk lowers peak memory (second order keeps every stacked task's "
        "graph)",
    )
    parser.add_argument(
        "--use_gpu",
        action="store_true",
        default=None,
        help="use the GPU if Paddle has CUDA; otherwise warn and use the CPU",
    )


def _add_rl_flags(parser: argparse.ArgumentParser) -> None:
    """Flags only the reinforcement-learning datasets read (metalearn/rl)."""
    group = parser.add_argument_group(
        "reinforcement learning (nav2d, cheetah_vel, cheetah_dir; --k_spt: trajectories per "
        "task and inner step, --k_query: after adaptation)"
    )
    group.add_argument(
        "--outer",
        choices=OUTER_OPTIMIZERS,
        help="outer optimiser: trpo (the paper's, default) or adam (on the surrogate, "
        "--glob_meta_lr)",
    )
    group.add_argument("--max_kl", type=float, help="TRPO's KL bound δ (default 0.01)")
    group.add_argument("--gamma", type=float, help="discount factor (default 0.99)")
    group.add_argument(
        "--gae_lambda",
        type=float,
        help="GAE's λ (default 1.0: discounted return minus the linear baseline)",
    )
    group.add_argument("--horizon", type=int, help="steps per trajectory (default 100)")
    group.add_argument(
        "--oracle",
        action="store_true",
        default=None,
        help="the paper's oracle baseline: the goal is part of the observation (with --algo "
        "pretrain)",
    )
    group.add_argument(
        "--normalized_actions",
        action="store_true",
        default=None,
        help="nav2d: the policy acts in [-1, 1], scaled to the ±0.1 velocity bounds (the paper's "
        "code, rllab's normalize); default: the action is the velocity",
    )
    _add_later_steps_flag(group)


def _add_later_steps_flag(parser) -> None:
    """--later_steps_lr, for training and for testing (the paper changed it at test time)."""
    parser.add_argument(
        "--later_steps_lr",
        type=float,
        help="reinforcement learning: the inner step size after the first step (default: "
        "--glob_base_lr; the paper's 2D-navigation test used half the first step's)",
    )


def train_parser() -> argparse.ArgumentParser:
    # Imported here: the service imports this module for its defaults and checks, and must not
    # load Paddle for that.
    from metalearn.learning.inner_rules import INNER_RULES
    from metalearn.learning.learner import ADAPT, ALGORITHMS

    parser = argparse.ArgumentParser(
        description="Meta-train MAML / FOMAML / Reptile / MAML++ / Meta-SGD / ANIL."
    )
    _add_task_flags(parser)
    _add_rl_flags(parser)
    parser.add_argument(
        "--net",
        metavar="{conv4,pool4,SPEC.json,MODULE:FUNCTION}",
        help="conv4: the paper's Omniglot net; pool4: its MiniImagenet net (max-pools); "
        "default conv4 for 1-channel images, pool4 for RGB; or your own network: a model spec "
        "file (.json, see metalearn/nets/spec.py), or a paddle.nn.Layer from MODULE:FUNCTION, a "
        "function of a module in the working directory called as FUNCTION((C, H, W), n_way) "
        "(exact second order through both: see docs/models.md)",
    )
    parser.add_argument("--task_num", type=int, help="tasks per meta-batch (default 32)")
    parser.add_argument("--glob_update_step", type=int, help="inner steps in training (default 5)")
    parser.add_argument("--glob_meta_lr", type=float, help="Adam step for θ (default 0.001)")
    parser.add_argument("--epochs", type=int, help="meta-iterations (default 10000)")
    parser.add_argument(
        "--algo",
        choices=ALGORITHMS,
        help="maml (second order, default), fomaml (first order), reptile, pretrain "
        "(sinusoid only: the paper's baseline, plain regression on the tasks' points), "
        "maml++ (all of the ingredients below), metasgd (--inner_rule metasgd) or anil "
        "(--adapt head); the flags below switch single ingredients on or off",
    )
    parser.add_argument(
        "--inner_rule",
        choices=tuple(INNER_RULES),
        help="inner update: sgd (fixed α), lslr (learned rate per layer and step, init α; "
        "MAML++) or metasgd (learned rate per weight, init α)",
    )
    parser.add_argument(
        "--adapt",
        choices=ADAPT,
        help="what the inner loop adapts: all of θ, or the head only (ANIL)",
    )
    parser.add_argument(
        "--per_step_bn",
        action=argparse.BooleanOptionalAction,
        help="batch-norm scale and shift per inner step (MAML++; meta-learned, not adapted)",
    )
    parser.add_argument(
        "--multi_step_loss",
        action=argparse.BooleanOptionalAction,
        help="MAML++'s multi-step loss: weighted query losses after every inner step, "
        "annealed towards the last step",
    )
    parser.add_argument(
        "--multi_step_loss_epochs",
        type=int,
        help="iterations over which the multi-step loss anneals (default 10%% of --epochs)",
    )
    parser.add_argument(
        "--first_order_epochs",
        type=int,
        help="derivative-order annealing: first order for this many iterations, then second "
        "order (maml++ default: a third of --epochs; 0: second order throughout)",
    )
    parser.add_argument(
        "--cosine_meta_lr",
        action=argparse.BooleanOptionalAction,
        help="cosine-anneal the meta learning rate from --glob_meta_lr to --min_meta_lr",
    )
    parser.add_argument(
        "--cosine_meta_lr_epochs",
        type=int,
        help="iterations the cosine takes to reach --min_meta_lr (default: --epochs when the run "
        "starts; a run resumed with more --epochs stays at the minimum)",
    )
    parser.add_argument(
        "--min_meta_lr", type=float, help="end of the cosine annealing (default 1e-5)"
    )
    parser.add_argument("--meta_step", type=float, help="Reptile's outer step ε (default 1.0)")
    parser.add_argument(
        "--meta_step_final",
        type=float,
        help="Reptile: anneal ε linearly to this value (default: constant)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed for θ's initialisation and tasks (default 0)"
    )
    parser.add_argument(
        "--run_name",
        help="folder name under work_dir (default: from the flags): letters, digits, '.', '_', "
        "'-', starting with a letter or digit, at most 100 characters",
    )
    parser.add_argument("--log_every", type=int, help="iterations between log lines (default 100)")
    parser.add_argument("--val_every", type=int, help="iterations between validations (1000)")
    parser.add_argument("--val_tasks", type=int, help="fixed validation tasks (default 200)")
    parser.add_argument("--ckpt_every", type=int, help="iterations between last.npz saves (100)")
    parser.add_argument(
        "--augment",
        help="none (default) or a comma-separated list drawn per class of a training task: "
        "rot90 (paper, Omniglot), flip, crop (shift up to size/8), jitter (brightness, "
        "contrast, saturation), e.g. flip,crop,jitter",
    )
    parser.add_argument(
        "--max_minutes",
        type=float,
        help="stop (validate and save) once training has used this many minutes",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    parser.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="with --resume: take the run over even though its record says another process "
        "is training it (for when that process is gone but this cannot be told, e.g. it ran on "
        "another host less than a minute ago)",
    )
    parser.add_argument(
        "--export_pkl",
        action="store_true",
        default=None,
        help="also write best.pkl in the seed's pickled-list layout",
    )
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test a meta-trained model on fixed test tasks.")
    _add_task_flags(parser)
    parser.add_argument(
        "--ckpt",
        help="best.npz (or a run folder); default: the newest run in "
        "work_dir matching --dataset/--n_way/--k_spt",
    )
    parser.add_argument("--tasks", type=int, default=600, help="test tasks (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test tasks (default 0)")
    _add_later_steps_flag(parser)
    return parser


def resolve_defaults(given: dict) -> dict:
    """Fill every flag the user left out with its dataset's default."""
    dataset = given.get("dataset") or ("folder" if given.get("data") else "omniglot")
    config = {**COMMON_DEFAULTS, **DEFAULTS[dataset], "dataset": dataset}
    config.update({k: v for k, v in given.items() if v is not None})
    if config["k_query"] is None:
        config["k_query"] = config["k_spt"]
    if dataset in RL_DATASETS and config["outer"] is None:
        config["outer"] = "trpo"
    if config["meta_step_final"] is None:
        config["meta_step_final"] = config["meta_step"]
    preset = {**_PLAIN_LEARNER, **LEARNER_PRESETS.get(config["algo"], {})}
    for key in ("inner_rule", "adapt", "per_step_bn", "multi_step_loss", "cosine_meta_lr"):
        if config[key] is None:
            config[key] = preset[key]
    if not config["multi_step_loss"]:
        config["multi_step_loss_epochs"] = 0
    elif config["multi_step_loss_epochs"] is None:
        config["multi_step_loss_epochs"] = max(
            round(config["epochs"] * MULTI_STEP_LOSS_FRACTION), 1
        )
    if config["cosine_meta_lr_epochs"] is None:
        config["cosine_meta_lr_epochs"] = config["epochs"]
    if config["first_order_epochs"] is None:
        config["first_order_epochs"] = round(config["epochs"] * preset["first_order_fraction"])
    return config


_POSITIVE_INTS = (
    "n_way",
    "k_spt",
    "k_query",
    "task_num",
    "epochs",
    "log_every",
    "val_every",
    "val_tasks",
    "ckpt_every",
    "cosine_meta_lr_epochs",
    "task_chunk",
)
_NON_NEGATIVE_INTS = (
    "glob_update_step",
    "glob_update_step_test",
    "multi_step_loss_epochs",
    "first_order_epochs",
)
MAX_TASKS = 10_000
"""Upper bound of --task_num and --val_tasks: every task of a meta-batch (or of the validation set)
is held in memory at once, ~250 KB each for 5-way Omniglot, so 10,000 is already ~2.5 GB; the paper
uses 32 (Omniglot) and 25 (sinusoid)."""
_BOUNDED_TASK_COUNTS = ("task_num", "val_tasks")
_POSITIVE_FLOATS = ("glob_meta_lr", "glob_base_lr", "meta_step", "max_minutes")


def validate_config(config: dict) -> None:
    """Reject impossible settings before any work is done, with one clear message."""
    for key in _POSITIVE_INTS:
        if key in config and config[key] is not None and config[key] <= 0:
            raise UserError(f"--{key} must be a positive integer, got {config[key]}")
    for key in _NON_NEGATIVE_INTS:
        if key in config and config[key] is not None and config[key] < 0:
            raise UserError(f"--{key} must be zero or more, got {config[key]}")
    for key in _BOUNDED_TASK_COUNTS:
        if config.get(key) is not None and config[key] > MAX_TASKS:
            raise UserError(
                f"--{key} {config[key]} is more than {MAX_TASKS:,} tasks, which are all held in "
                "memory at once; use fewer"
            )
    if "seed" in config:
        check_seed(config["seed"])
    for key in _POSITIVE_FLOATS:
        value = config.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{key} must be a positive number, got {value}")
    check_learner(config)
    _validate_rl(config)
    final = config.get("meta_step_final")
    if final is not None and not (math.isfinite(final) and final >= 0):
        raise UserError(f"--meta_step_final must be zero or more, got {final}")
    if config.get("algo") == "pretrain" and config.get("dataset") not in ("sinusoid", *RL_DATASETS):
        raise UserError(
            "--algo pretrain is the paper's sinusoid baseline (plain regression on the tasks' "
            "points); for Omniglot use --algo maml, fomaml or reptile"
        )
    if config.get("dataset") == "sinusoid" and config.get("n_way") != 1:
        raise UserError("sinusoid regression has no classes: leave --n_way out (it is 1)")
    _validate_data(config)
    _validate_net(config)
    if config.get("dataset") == "omniglot" and config["k_spt"] + config["k_query"] > 20:
        raise UserError(
            f"k_spt + k_query = {config['k_spt'] + config['k_query']} but Omniglot has only 20 "
            "drawings per character"
        )


def _validate_rl(config: dict) -> None:
    """Reinforcement learning's flags: only for its datasets, within bounds."""
    if config.get("dataset") not in RL_DATASETS:
        given = [
            f"--{k}" for k in ("outer", "horizon", "later_steps_lr") if config.get(k) is not None
        ]
        given += [f"--{k}" for k in ("oracle", "normalized_actions") if config.get(k)]
        if given:
            raise UserError(f"{given[0]} is for reinforcement learning (--dataset nav2d, ...)")
        return
    if config.get("algo") not in ("maml", "fomaml", "pretrain"):
        raise UserError(
            f"--algo {config.get('algo')}: reinforcement learning runs maml, fomaml or pretrain"
        )
    if config.get("oracle") and config.get("algo") != "pretrain":
        raise UserError(
            "--oracle is the paper's baseline trained on all tasks: use --algo pretrain"
        )
    later = config.get("later_steps_lr")
    if later is not None and not (isinstance(later, (int, float)) and 0 < later < math.inf):
        raise UserError(f"--later_steps_lr must be a positive number, got {later}")
    if later is not None and (config.get("inner_rule") or "sgd") != "sgd":
        raise UserError(
            "--later_steps_lr is a fixed step: learned inner rates (--inner_rule) set their own"
        )
    if config.get("normalized_actions") and config.get("dataset") != NAV2D:
        raise UserError(
            "--normalized_actions is for nav2d: half-cheetah's actions are already in [-1, 1]"
        )
    for key, bound in (("k_spt", MAX_TRAJECTORIES), ("k_query", MAX_TRAJECTORIES)):
        if config.get(key) is not None and config[key] > bound:
            raise UserError(f"--{key} {config[key]} is more than {bound} trajectories per task")
    horizon = config.get("horizon")
    if not (isinstance(horizon, int) and 1 <= horizon <= MAX_HORIZON):
        raise UserError(f"--horizon must be between 1 and {MAX_HORIZON}, got {horizon}")
    steps = config["task_num"] * max(config["k_spt"], config["k_query"]) * horizon
    if steps > MAX_BATCH_STEPS:
        raise UserError(
            f"--task_num × trajectories × --horizon = {steps:,} steps per meta-batch is more "
            f"than {MAX_BATCH_STEPS:,}, which are all held in memory at once; use fewer"
        )
    ranges = {
        "max_kl": ("a positive number", lambda v: 0 < v < math.inf),
        "gamma": ("in (0, 1]", lambda v: 0 < v <= 1),
        "gae_lambda": ("in [0, 1]", lambda v: 0 <= v <= 1),
    }
    for key, (wanted, holds) in ranges.items():
        value = config.get(key)
        if not (isinstance(value, (int, float)) and holds(value)):
            raise UserError(f"--{key} must be {wanted}, got {value}")
    if config.get("n_way") != 1:
        raise UserError("reinforcement learning has no classes: leave --n_way out (it is 1)")
    if config.get("outer") == "trpo" and config.get("inner_rule") not in (None, "sgd"):
        raise UserError("--outer trpo steps θ only: learned inner rates need --outer adam")


def check_learner(config: dict) -> None:
    """Refuse combinations of the learner's ingredients that mean nothing."""
    algo = config.get("algo")
    ingredients = [
        f"--inner_rule {config['inner_rule']}"
        if config.get("inner_rule") not in (None, "sgd")
        else "",
        "--adapt head" if config.get("adapt") == "head" else "",
        "--per_step_bn" if config.get("per_step_bn") else "",
        "--multi_step_loss" if config.get("multi_step_loss") else "",
        "--first_order_epochs" if config.get("first_order_epochs") else "",
        "--cosine_meta_lr" if config.get("cosine_meta_lr") else "",
    ]
    used = [flag for flag in ingredients if flag]
    if algo in ("reptile", "pretrain") and used:
        raise UserError(
            f"{used[0]} needs a meta-gradient through the inner loop; --algo {algo} has none "
            "(use maml, fomaml, maml++, metasgd or anil)"
        )
    if config.get("per_step_bn") and config.get("dataset") == "sinusoid":
        raise UserError("--per_step_bn: the sinusoid network has no batch norm")
    if config.get("per_step_bn") and config.get("adapt") == "head":
        raise UserError(
            "--per_step_bn with --adapt head: ANIL computes the body's features once per task, "
            "so they cannot change with the inner step"
        )
    if config.get("export_pkl") and config.get("inner_rule") not in (None, "sgd"):
        raise UserError(
            "--export_pkl writes θ only, the seed's layout; it cannot hold learned rates"
        )
    low = config.get("min_meta_lr")
    if low is not None and not (math.isfinite(low) and low >= 0):
        raise UserError(f"--min_meta_lr must be zero or more, got {low}")


def check_saved_config(config: object, source: str, fill_defaults: bool = False) -> dict:
    """A run's saved config (config.json, a checkpoint's meta) from this version of the code.

    Every flag train.py knows must be there with the type its parser gives, so a damaged,
    hand-edited or older config is one clear line rather than a crash deep inside training.
    ``fill_defaults`` takes flags a config lacks from the defaults (evaluation: the network is
    checked against the checkpoint anyway) instead of refusing it (resume).
    """
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a JSON object")
    dataset = config.get("dataset")
    if dataset not in DATASETS:
        raise UserError(f"{source}: dataset is {dataset!r:.40}, not one of {DATASETS}")
    defaults = resolve_defaults({"dataset": dataset})
    if fill_defaults:
        config = {**defaults, **config}
    else:  # a run from before the learner's ingredients (or --task_chunk) existed had none
        kept = (*LEARNER_KEYS, "task_chunk", *RL_FLAG_DEFAULTS)
        config = {**{k: defaults[k] for k in kept}, **config}
    for action in train_parser()._actions:
        if action.dest not in defaults:
            continue
        if action.dest not in config:
            raise UserError(f"{source} lacks {action.dest!r} (written by another version?)")
        value = config[action.dest]
        if not _has_flag_type(value, action, nullable=defaults[action.dest] is None):
            raise UserError(f"{source}: {action.dest}={value!r:.40} is not a valid value")
    if dataset == "omniglot" and config["n_way"] > NUM_CHARACTERS:
        raise UserError(f"{source}: n_way={config['n_way']} exceeds Omniglot's characters")
    return config


def _has_flag_type(value: object, action: argparse.Action, nullable: bool) -> bool:
    if value is None:
        return nullable
    if action.choices is not None:
        return isinstance(value, str) and value in action.choices
    if action.type is int:
        return type(value) is int
    if action.type is float:
        return type(value) in (int, float)
    if action.const is True or isinstance(action, argparse.BooleanOptionalAction):
        return type(value) is bool
    return isinstance(value, str)


_MAX_CONFIG_BYTES = 16 << 20  # a genuine one is about 1 kB


def read_run_config(path: str | os.PathLike[str]) -> dict:
    """Read and check a run folder's config.json (see :func:`check_saved_config`)."""
    try:
        if Path(path).stat().st_size > _MAX_CONFIG_BYTES:
            raise UserError(f"{path} is larger than any config of ours")
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"{path} is unreadable or not JSON ({error})") from None
    return check_saved_config(config, str(path))


def _validate_data(config: dict) -> None:
    """--data names a folder set exactly when --dataset is folder; images only take --net."""
    from metalearn.data.folders import check_name  # the rule for set names (they become file names)
    from metalearn.data.tasks import parse_augment

    dataset = config.get("dataset")
    if dataset == "folder":
        if not config.get("data"):
            raise UserError("--dataset folder needs --data NAME (a set packed by make_data.py)")
        check_name(config["data"])
    elif config.get("data"):
        raise UserError(f"--data {config['data']} is an image-folder set: use --dataset folder")
    if dataset == "sinusoid" and config.get("net"):
        raise UserError("--net chooses an image network; sinusoid regression uses the paper's MLP")
    if dataset in RL_DATASETS and config.get("net"):
        raise UserError("--net chooses an image network; policies are the paper's Gaussian MLP")
    if config.get("augment") is not None:
        config["augment"] = ",".join(parse_augment(config["augment"])) or "none"


def _validate_net(config: dict) -> None:
    """--net is a built-in network, a model factory or a model spec file, whose spec must fit
    the run's images."""
    from metalearn.nets.spec import load_spec_file

    net = config.get("net")
    if net is None or net in NETS or is_factory(net):  # a factory is checked when built
        return
    if not net.endswith(".json"):
        raise UserError(
            f"--net {net!r:.100} is not one of {', '.join(NETS)} or a model spec (.json), nor "
            "MODULE:FUNCTION (a model factory in the working directory)"
        )
    try:
        check_model_spec(load_spec_file(net), config, net)
    except UserError as error:
        raise UserError(f"--net {error}") from None


def check_model_spec(spec: dict, config: dict, source: str) -> None:
    """Refuse a model spec (from ``source``) that does not fit the run's images and n_way, before
    anything is built."""
    from metalearn.data.folders import read_manifest
    from metalearn.nets.spec import resolve_spec

    if config.get("dataset") == "omniglot":
        shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    elif config.get("dataset") == "folder":
        settings = read_manifest(Path(config["data_dir"]), config["data"])["preprocessing"]
        shape = (int(settings["channels"]), int(settings["size"]), int(settings["size"]))
    else:
        raise UserError(f"{source}: a model spec is for images; sinusoid uses the paper's MLP")
    try:
        resolve_spec(spec, shape, config["n_way"])
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
