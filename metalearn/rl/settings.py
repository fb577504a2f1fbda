"""Names and defaults of the reinforcement-learning problems (no Paddle: the flags import this).

The defaults follow the MAML paper (section 5.3 and appendix A.2) and its public code: 20 tasks
per meta-batch, 20 trajectories per task for 2D navigation, one inner policy-gradient step of
α = 0.1, TRPO with a KL bound of 0.01. For half-cheetah the paper's code samples 40 tasks × 20
trajectories × horizon 200 (α = 0.1); the defaults here are the reduced budget this machine can
run (docs/rl.md).
"""

from __future__ import annotations

NAV2D, CHEETAH_VEL, CHEETAH_DIR = "nav2d", "cheetah_vel", "cheetah_dir"
RL_DATASETS = (NAV2D, CHEETAH_VEL, CHEETAH_DIR)
OUTER_OPTIMIZERS = ("trpo", "adam")

_COMMON = {
    "n_way": 1,
    "k_query": None,  # trajectories per task after adaptation: default k_spt
    "glob_update_step": 1,
    "glob_update_step_test": 3,
    "glob_meta_lr": 0.01,  # Adam's step with --outer adam
    "glob_base_lr": 0.1,
    "log_every": 1,
    "val_every": 25,
    "val_tasks": 40,
    "ckpt_every": 5,
}
RL_DEFAULTS = {
    NAV2D: {**_COMMON, "k_spt": 20, "task_num": 20, "epochs": 500, "horizon": 100},
    CHEETAH_VEL: {**_COMMON, "k_spt": 10, "task_num": 10, "epochs": 100, "horizon": 100},
    CHEETAH_DIR: {**_COMMON, "k_spt": 10, "task_num": 10, "epochs": 100, "horizon": 100},
}
"""Per-dataset flag defaults (train.py's names: ``k_spt`` trajectories per task and inner step,
``task_num`` tasks per meta-batch, ``epochs`` meta-iterations)."""

RL_FLAG_DEFAULTS = {
    "outer": None,  # trpo for RL datasets (resolved), unused otherwise
    "max_kl": 0.01,
    "gamma": 0.99,
    "gae_lambda": 1.0,
    "horizon": None,
    "oracle": False,
    "normalized_actions": False,
    "later_steps_lr": None,  # α after the first inner step: --glob_base_lr
}
"""Flags only reinforcement learning reads, with their defaults for every dataset."""

MAX_TRAJECTORIES = 1000
MAX_HORIZON = 1000
MAX_BATCH_STEPS = 2_000_000
"""Upper bounds of --k_spt / --k_query, --horizon and of a meta-batch's steps (tasks × trajectories
× horizon, 50 times the paper's 2D-navigation batch): a meta-batch's trajectories, the policy's
activations on them and the graph of their second derivatives are held in memory at once."""
