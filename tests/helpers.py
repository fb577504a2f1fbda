"""Helpers shared by the tests that run the entry points as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, stdin: str = "", timeout: int = 300):
    """Run ``python <repo>/<script> args`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """A failed run that said what is wrong in one ``error:`` line, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]


# The smallest Omniglot training that still exercises every part of the loop.
TINY = {
    "n_way": 5,
    "k_spt": 1,
    "k_query": 2,
    "task_num": 2,
    "glob_update_step": 1,
    "glob_update_step_test": 1,
    "val_tasks": 3,
    "val_every": 100,
    "log_every": 2,
    "glob_base_lr": 0.4,
}


def tiny(omniglot_dir: Path, work: Path, **overrides) -> dict:
    """TINY as the flags dict ``train()`` takes, with data and work folders."""
    return {**TINY, "data_dir": str(omniglot_dir), "work_dir": str(work), **overrides}


def as_flags(config: dict) -> list[str]:
    """The same settings as train.py's command line."""
    return [item for key, value in config.items() for item in (f"--{key}", str(value))]


SINE_RECORD = {
    "config": {"dataset": "sinusoid", "epochs": 5},
    "log": [],
    "validation": [],
    "iteration": 0,
    "elapsed_seconds": 0.0,
    "best_score": None,
    "best_iteration": None,
    "metric": "mse",
    "higher_is_better": False,
}
"""What ``RunRecords.start_training`` needs of a fresh sinusoid run (records tests)."""


def fresh_state(iteration: int = 0) -> SimpleNamespace:
    """A training state as the Recorder reads it, with nothing trained yet."""
    return SimpleNamespace(
        iteration=iteration, elapsed_seconds=0.0, best_score=None, best_iteration=None, log=[],
        validation=[],
    )  # fmt: skip


def start_script(script: str, *args: str) -> subprocess.Popen:
    """Start one of the project's scripts in the background, its output discarded (kill tests)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
