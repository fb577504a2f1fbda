"""train.py / evaluate.py: learning, resume, NaN handling and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import REPO, TINY, as_flags, assert_one_line_error, run_script, tiny

from metalearn.errors import UserError
from metalearn.learning import learner
from metalearn.runs.checkpoint import load_checkpoint
from metalearn.runs.records import RunRecords
from metalearn.training import trainer as trainer_module
from metalearn.training.evaluation import evaluate
from metalearn.training.trainer import Trainer, prepare_config, train

TINY_LR = TINY["glob_base_lr"]


def theta(path: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(path).params


def assert_same_theta(a: Path, b: Path) -> None:
    left, right = theta(a), theta(b)
    assert list(left) == list(right)
    for name in left:
        np.testing.assert_allclose(left[name], right[name], rtol=0, atol=1e-6, err_msg=name)


# The schedules fixed explicitly, so that a run started with --epochs 2 and resumed to 4 has the
# same ones as a run started with 4: first order at iteration 1, multi-step loss over 1..2.
LEARNED = {
    "glob_update_step": 2,
    "first_order_epochs": 1,
    "multi_step_loss_epochs": 2,
    "cosine_meta_lr_epochs": 4,
}


@pytest.mark.parametrize(
    "options",
    [
        {},
        pytest.param({"algo": "maml++", **LEARNED}, marks=pytest.mark.slow, id="maml++"),
        pytest.param({"algo": "metasgd", **LEARNED}, marks=pytest.mark.slow, id="metasgd"),
    ],
)
def test_resume_ends_with_the_same_theta(omniglot_dir, tmp_path, options) -> None:
    """θ and, for learned inner rules, their rates (checkpointed as param:lr:...)."""
    train(tiny(omniglot_dir, tmp_path, run_name="whole", epochs=4, ckpt_every=2, **options))
    train(tiny(omniglot_dir, tmp_path, run_name="split", epochs=2, ckpt_every=2, **options))
    state = train({"resume": str(tmp_path / "split"), "epochs": 4})
    assert state.iteration == 4
    assert_same_theta(tmp_path / "whole" / "last.npz", tmp_path / "split" / "last.npz")
    rates = {k: v for k, v in theta(tmp_path / "split" / "last.npz").items() if "lr:" in k}
    assert bool(rates) == bool(options)
    assert all(not np.allclose(v, TINY_LR) for v in rates.values())  # they were meta-learned
    resumed = load_checkpoint(tmp_path / "split" / "last.npz").meta["state"]
    assert [entry["iteration"] for entry in resumed["log"]] == [1, 2, 4]


def test_existing_run_is_not_overwritten(omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="once", epochs=1))
    with pytest.raises(UserError, match="--resume"):
        train(tiny(omniglot_dir, tmp_path, run_name="once", epochs=1))


def test_nan_meta_loss_stops_and_keeps_the_last_good_checkpoint(
    omniglot_dir, tmp_path, monkeypatch
) -> None:
    config = prepare_config(tiny(omniglot_dir, tmp_path, run_name="nan", epochs=6, ckpt_every=2))
    trainer = Trainer(config)
    real = learner.MetaLearner.batch_direction

    def poisoned(self, tasks, *args):
        direction, stats = real(self, tasks, *args)
        if trainer.state.iteration >= 2:  # the third step goes wrong
            direction = {k: v * float("nan") for k, v in direction.items()}
        return direction, stats

    monkeypatch.setattr(learner.MetaLearner, "batch_direction", poisoned)
    with pytest.raises(UserError, match="iteration 3"):
        trainer.run()
    last = load_checkpoint(tmp_path / "nan" / "last.npz")
    assert last.meta["state"]["iteration"] == 2
    assert all(np.isfinite(v).all() for v in last.params.values())


@pytest.mark.slow
def test_short_training_lifts_accuracy(omniglot_dir, tmp_path) -> None:
    config = prepare_config(
        tiny(
            omniglot_dir,
            tmp_path,
            run_name="learn",
            epochs=40,
            task_num=4,
            glob_meta_lr=0.003,
            k_query=5,
            val_every=40,
        )
    )
    trainer = Trainer(config)
    tasks = [trainer.problem.samplers["val"].sample(0, "val", 0, i) for i in range(40)]
    before = trainer.learner.evaluate(tasks, 1).mean(axis=0)
    trainer.run()
    after = trainer.learner.evaluate(tasks, 1).mean(axis=0)
    assert after[1] > before[1] + 0.1, (before, after)


@pytest.mark.slow
def test_the_time_budget_is_wall_time_with_the_final_validation_inside(
    omniglot_dir, tmp_path, monkeypatch
) -> None:
    """On a fake clock where a meta-iteration takes 1 s and a validation 10 s, a 1-minute budget
    with validation every 5 iterations: 15 iterations and 3 validations take 45 s, then training
    stops at iteration 19 (49 s), where one more iteration and the final validation would reach
    60 s; the final validation ends at 59 s."""
    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for method, seconds in (("_meta_step", 1.0), ("_validate", 10.0)):
        original = getattr(Trainer, method)

        def timed(self, original=original, seconds=seconds):
            original(self)
            clock[0] += seconds

        monkeypatch.setattr(Trainer, method, timed)
    state = train(
        tiny(omniglot_dir, tmp_path, epochs=1000, val_every=5, max_minutes=1.0, run_name="budget")
    )
    assert state.iteration == 19
    assert clock[0] == state.elapsed_seconds == 59.0
    validations = RunRecords(tmp_path).get_run("budget")["validation"]
    assert [(v["iteration"], v["elapsed"]) for v in validations] == [
        (5, 5.0), (10, 20.0), (15, 35.0), (19, 49.0)
    ]  # fmt: skip


def test_killed_training_resumes_to_the_same_theta(omniglot_dir, tmp_path) -> None:
    args = as_flags(tiny(omniglot_dir, tmp_path, val_tasks=2, ckpt_every=1, epochs=8))
    assert run_script("train.py", *args, "--run_name", "whole").returncode == 0
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, "--run_name", "cut"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "cut" / "last.npz"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        last.exists() and load_checkpoint(last).meta["state"]["iteration"] >= 2
    ):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert load_checkpoint(last).meta["state"]["iteration"] < 8, "finished before it was killed"
    assert run_script("train.py", "--resume", str(tmp_path / "cut")).returncode == 0
    assert_same_theta(tmp_path / "whole" / "last.npz", last)


@pytest.mark.slow
def test_sigint_stops_between_iterations_keeps_last_and_resumes(omniglot_dir, tmp_path) -> None:
    args = as_flags(tiny(omniglot_dir, tmp_path, epochs=400, ckpt_every=1000, val_every=1000))
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, "--run_name", "stop"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:  # the first log line comes after the first meta-iteration
        if "it 1: meta-loss" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130
    assert_one_line_error(subprocess.CompletedProcess([], 130, "", stderr), "interrupted at")
    done = load_checkpoint(tmp_path / "stop" / "last.npz").meta["state"]["iteration"]
    assert 1 <= done < 400 and f"iteration {done};" in stderr
    record = RunRecords(tmp_path).get_run("stop")
    assert (record["status"], record["completed_iterations"]) == ("interrupted", done)
    resumed = run_script("train.py", "--resume", str(tmp_path / "stop"), "--epochs", str(done + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert RunRecords(tmp_path).get_run("stop")["completed_iterations"] == done + 2


def test_evaluate_writes_per_step_results_with_intervals(omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="ev", epochs=1))
    given = {
        "dataset": "omniglot",
        "n_way": 5,
        "k_spt": 1,
        "work_dir": str(tmp_path),
        "data_dir": str(omniglot_dir),
        "tasks": 6,
        "seed": 0,
        "glob_update_step_test": 2,
    }
    first = evaluate(given)
    saved = json.loads((tmp_path / "ev" / "test_results.json").read_text())
    assert saved["tasks"] == 6
    assert len(saved["acc_mean"]) == len(saved["acc_ci95"]) == 3
    assert all(0 <= a <= 1 for a in saved["acc_mean"]) and all(c >= 0 for c in saved["acc_ci95"])
    assert evaluate(given)["acc_mean"] == first["acc_mean"]  # the same tasks every time


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k_spt", "10", "--k_query", "15"], "only 20 drawings"),
        (["--n_way", "400"], "larger than the 325 classes"),
        (["--glob_meta_lr", "-1"], "--glob_meta_lr must be a positive number"),
        (["--task_num", "0"], "--task_num must be a positive integer"),
    ],
)
def test_impossible_settings_are_rejected_before_any_work(
    omniglot_dir, tmp_path, flags, message
) -> None:
    work = tmp_path / "work"
    result = run_script(
        "train.py", "--data_dir", str(omniglot_dir), "--work_dir", str(work), *flags
    )
    assert_one_line_error(result, message)
    assert not work.exists()


def test_missing_data_is_one_clear_error(tmp_path) -> None:
    result = run_script("train.py", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"))
    assert_one_line_error(result, "make_data.py")
    assert not (tmp_path / "w").exists()


def test_evaluate_without_a_trained_run_is_one_clear_error(tmp_path) -> None:
    result = run_script("evaluate.py", "--work_dir", str(tmp_path))
    assert_one_line_error(result, "no trained omniglot run")


def test_use_gpu_without_cuda_warns_once_and_trains_on_cpu(omniglot_dir, tmp_path) -> None:
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle has CUDA: the fallback is not reachable here")
    result = run_script(
        "train.py",
        "--use_gpu",
        "--data_dir",
        str(omniglot_dir),
        "--work_dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--task_num",
        "1",
        "--k_query",
        "1",
        "--glob_update_step",
        "1",
        "--val_tasks",
        "2",
        "--run_name",
        "gpu",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "--use_gpu" in line]
    assert len(warnings) == 1 and "running on the CPU" in warnings[0]
    assert json.loads((tmp_path / "gpu" / "config.json").read_text())["device"] == "cpu"


def test_exported_pickle_evaluates_like_the_npz(omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="pkl", epochs=1, export_pkl=True))
    given = {"work_dir": str(tmp_path), "data_dir": str(omniglot_dir), "tasks": 4, "seed": 0}
    from_npz = evaluate({**given, "ckpt": str(tmp_path / "pkl" / "best.npz")})
    from_pkl = evaluate({**given, "ckpt": str(tmp_path / "pkl" / "best.pkl")})
    assert from_pkl["acc_mean"] == from_npz["acc_mean"]
