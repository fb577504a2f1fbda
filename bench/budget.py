"""Omniglot 5-way 1-shot within a wall-clock budget: the recommended recipe, trained, then tested.

    python bench/budget.py [--minutes 30] [--k_query 5] [--seed 0] [--run_name budget30_5w1s]
                           [--data_dir .] [--work_dir work] [--print-only]

Runs ``train.py`` with the budget recipe below and ``--max_minutes`` (wall time, validation and
checkpoints included), then ``evaluate.py`` on 600 fixed
test tasks of the test split (never seen in training or validation), which prints the accuracy
after each inner step ± 95% CI. The two commands are printed first and use only the scripts'
own flags, so they can be copied as they are (from the project folder; relative folders are
relative to where this script is started). ``bench/budget_torch.py`` trains the same run with
the PyTorch reference.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Second-order MAML, the paper's 5-way network and support set; 1 inner step of α = 0.4 in
# training and 3 at test time, rotations as new classes. For the budget: 5 query images per
# class and 16 tasks per meta-batch (more, noisier meta-iterations), a meta learning rate of
# 3e-3 (three times Adam's usual 1e-3) cosine-annealed over the ~9000 iterations 30 minutes
# give on a 2-core CPU (docs/results.md#recipe-changes-for-the-budget).
RECIPE = (
    *("--n_way", "5", "--k_spt", "1", "--glob_update_step", "1", "--glob_base_lr", "0.4"),
    *("--task_num", "16", "--augment", "rot90", "--glob_update_step_test", "3"),
    *("--k_query", "5", "--glob_meta_lr", "0.003"),
    *("--cosine_meta_lr", "--cosine_meta_lr_epochs", "9000"),
    *("--epochs", "100000", "--val_every", "400", "--val_tasks", "100"),
    *("--log_every", "100", "--ckpt_every", "100"),
)
TEST_TASKS = 600


def commands(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """train.py's and evaluate.py's argv for the budget run."""
    common = ("--data_dir", args.data_dir, "--work_dir", args.work_dir)
    queries = () if args.k_query is None else ("--k_query", str(args.k_query))
    train = [
        *("train.py", *RECIPE, *queries, "--seed", str(args.seed)),
        *("--max_minutes", f"{args.minutes:g}"),
        *("--run_name", args.run_name, *common),
    ]
    run_dir = str(Path(args.work_dir) / args.run_name)
    evaluate = [
        *("evaluate.py", "--ckpt", run_dir, "--glob_update_step_test", "3"),
        *("--tasks", str(TEST_TASKS), *common),
    ]
    return train, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--k_query", type=int, help="query images per class (the recipe's: 5)")
    parser.add_argument("--seed", type=int, default=0, help="θ's initialisation and training tasks")
    parser.add_argument("--run_name", default="budget30_5w1s")
    parser.add_argument("--data_dir", default=".")
    parser.add_argument("--work_dir", default="work")
    parser.add_argument("--print-only", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    for argv in commands(args):
        print("python " + shlex.join(argv), flush=True)
    if args.print_only:
        return
    for argv in commands(args):
        if subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]]).returncode != 0:
            sys.exit(f"error: {argv[0]} failed")


if __name__ == "__main__":
    main()
