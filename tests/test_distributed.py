"""Training under ``paddle.distributed.launch`` (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import as_flags, tiny

from metalearn.runs.checkpoint import load_checkpoint
from metalearn.runs.records import RunRecords
from metalearn.training import distributed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


# Learned inner rules: schedules fixed, so that a run started with --epochs 2 has the same.
LEARNED = {"glob_update_step": 2, "first_order_epochs": 1, "cosine_meta_lr_epochs": 3}


def flags(omniglot_dir: Path, work: Path, algo: str) -> list[str]:
    # 3 tasks over 2 processes: an uneven split (2 + 1) that must still average correctly.
    learned = LEARNED if algo in ("maml++", "metasgd") else {}
    return as_flags(tiny(omniglot_dir, work, algo=algo, task_num=3, ckpt_every=1, **learned))


def launch(args: list[str], log_dir: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        "2",
        "--log_dir",
        str(log_dir),
        str(REPO / "train.py"),
        *args,
    ]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("algo", ["maml", "reptile", "maml++", "metasgd"])
def test_two_processes_end_with_the_same_theta_as_one(omniglot_dir, tmp_path, algo) -> None:
    """One process for 3 iterations == two processes for 2, then resumed under the launcher;
    learned inner rates (param:lr:...) travel in the same all-reduce and must agree too.

    Each process stacks its share (2 tasks, then 1) into one computation; the single process
    computes the same chunks (--task_chunk 2). Other chunks give the same θ up to float32
    rounding, which Adam's normalisation magnifies where a gradient component is nearly zero."""
    one = one_and_two_processes(flags(omniglot_dir, tmp_path, algo), tmp_path, "2")
    assert any(k.startswith("lr:") for k in one) == (algo in ("maml++", "metasgd"))


def test_a_user_layer_trains_on_two_processes_to_the_same_theta_as_one(omniglot_dir, tmp_path):
    """--net MODULE:FUNCTION: every process builds the model from the factory with the run's
    seed and stacks the same chunks of tasks as the built-in network (--task_chunk 2)."""
    args = [*flags(omniglot_dir, tmp_path, "maml"), "--net", "tests.user_models:omniglot_net"]
    one = one_and_two_processes(args, tmp_path, "2")
    assert "body.0.weight" in one


def one_and_two_processes(args: list[str], tmp_path: Path, chunk: str | None) -> dict:
    """θ of one process run for 3 iterations, checked equal to that of two processes run for 2
    and resumed to 3 (with one writer)."""
    single = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *args,
            *("--epochs", "3", "--run_name", "one"),
            *(("--task_chunk", chunk) if chunk else ()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    for step in (
        ["--epochs", "2", *args, "--run_name", "two"],
        ["--resume", str(tmp_path / "two"), "--epochs", "3"],
    ):
        job = launch(step, tmp_path / "logs")
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output
    one = load_checkpoint(tmp_path / "one" / "last.npz").params
    two = load_checkpoint(tmp_path / "two" / "last.npz").params
    assert list(one) == list(two)
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-5, err_msg=name)
    # One writer: the record exists once and is complete; only rank 0 printed progress.
    assert RunRecords(tmp_path).get_run("two")["status"] == "complete"
    assert "best validation" in (tmp_path / "logs" / "workerlog.0").read_text()
    assert "best validation" not in (tmp_path / "logs" / "workerlog.1").read_text()
    return one


def worker_pids(run_name: str) -> dict[int, int]:
    """Rank -> PID of this job's train.py workers (read from /proc)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if run_name.encode() in cmdline and any(c.endswith(b"train.py") for c in cmdline):
            for item in environ:
                if item.startswith(b"PADDLE_TRAINER_ID="):
                    pids[int(item.split(b"=")[1])] = int(entry.name)
    return pids


def test_a_killed_process_stops_the_whole_job(omniglot_dir, tmp_path) -> None:
    job = launch(
        [*flags(omniglot_dir, tmp_path, "maml"), "--epochs", "500", "--run_name", "cut"],
        tmp_path / "logs",
    )
    last = tmp_path / "cut" / "last.npz"
    deadline = time.time() + 180
    while time.time() < deadline and not last.exists():
        time.sleep(0.2)
    assert last.exists(), "training never started"
    os.kill(worker_pids("cut")[1], signal.SIGKILL)
    job.communicate(timeout=240)  # bounded: a hang fails the test here
    assert job.returncode != 0
    assert load_checkpoint(last).meta["state"]["iteration"] < 500
    survivor = (tmp_path / "logs" / "workerlog.0").read_text()
    assert "error: process 0 " in survivor  # one clear line: stopped, or lost contact
    assert "Traceback" not in survivor


def test_shares_cover_the_meta_batch_once(monkeypatch) -> None:
    for world in (1, 2, 3, 5):
        seen = []
        for rank in range(world):
            monkeypatch.setenv("PADDLE_TRAINERS_NUM", str(world))
            monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
            seen.extend(distributed.my_share(7))
        assert seen == list(range(7))
