"""MAML-RL under ``paddle.distributed.launch`` (2 CPU processes) ends with one process's θ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metalearn.runs.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# 3 tasks over 2 processes: an uneven split (2 + 1) that must still average correctly.
FLAGS = ["--dataset", "nav2d", "--task_num", "3", "--k_spt", "4", "--horizon", "20"]
FLAGS += ["--val_tasks", "3", "--ckpt_every", "1"]


@pytest.mark.parametrize("outer", ["trpo", "adam"])
def test_two_processes_end_with_the_same_theta_as_one(tmp_path, outer) -> None:
    """Gradients, Fisher-vector products, line-search losses and KLs are sums over tasks, each
    all-reduced once; tasks and their trajectories are keyed by (iteration, index), so the
    shares see exactly the single process's tasks. Sums in another order round differently in
    float32, hence a tolerance."""
    args = [*FLAGS, "--outer", outer, "--work_dir", str(tmp_path), "--epochs", "2"]
    single = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, "--run_name", "one"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2"]
    launch += ["--log_dir", str(tmp_path / "logs"), str(REPO / "train.py")]
    double = subprocess.run(
        [*launch, *args, "--run_name", "two"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stdout + double.stderr
    one = load_checkpoint(tmp_path / "one" / "last.npz")
    two = load_checkpoint(tmp_path / "two" / "last.npz")
    for name in one.params:
        np.testing.assert_allclose(one.params[name], two.params[name], rtol=0, atol=2e-5)
    log_one, log_two = (c.meta["state"]["log"] for c in (one, two))
    for a, b in zip(log_one, log_two):
        np.testing.assert_allclose(a["query_per_step"], b["query_per_step"], rtol=1e-4)
