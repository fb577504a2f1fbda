"""bench/budget.py prints commands a user can copy: train.py's and evaluate.py's own parsers
accept them, and they carry the recipe, the seed and the budget."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from metalearn.training.config import evaluate_parser, train_parser

_SPEC = importlib.util.spec_from_file_location(
    "budget", Path(__file__).resolve().parent.parent / "bench" / "budget.py"
)
budget = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(budget)


def test_the_printed_commands_parse_with_the_scripts_own_flags() -> None:
    args = argparse.Namespace(
        minutes=30.0, k_query=None, seed=1, run_name="r", data_dir="d", work_dir="w"
    )
    train, evaluate = budget.commands(args)
    assert train[0] == "train.py" and evaluate[0] == "evaluate.py"
    trained = train_parser().parse_args(train[1:])
    assert (trained.seed, trained.max_minutes, trained.task_num) == (1, 30.0, 16)
    assert trained.glob_meta_lr == float(budget.RECIPE[budget.RECIPE.index("--glob_meta_lr") + 1])
    tested = evaluate_parser().parse_args(evaluate[1:])
    assert tested.ckpt == str(Path("w") / "r") and tested.tasks == 600
