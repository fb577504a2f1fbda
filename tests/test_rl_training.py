"""train.py / evaluate.py on 2D navigation: a tiny run learns, resume is exact, bad input is one
line, and the records and checkpoints are those of any other run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_script

from metalearn.errors import UserError
from metalearn.runs.checkpoint import load_checkpoint
from metalearn.runs.records import RunRecords
from metalearn.training.evaluation import evaluate
from metalearn.training.trainer import train

TINY = {
    "dataset": "nav2d",
    "task_num": 4,
    "k_spt": 6,
    "horizon": 30,
    "val_tasks": 4,
    "val_every": 100,
    "log_every": 1,
}


def tiny_flags(work: Path, **overrides) -> dict:
    return {**TINY, "work_dir": str(work), **overrides}


@pytest.mark.slow
def test_a_tiny_run_learns_to_adapt(tmp_path) -> None:
    """After a few meta-iterations the post-update return on held-out tasks beats the
    pre-update one, and the post-update return during training has risen."""
    flags = tiny_flags(tmp_path, task_num=8, k_spt=10, horizon=50, val_tasks=16, epochs=8)
    state = train(flags)
    first, last = state.log[0]["query_per_step"], state.log[-1]["query_per_step"]
    assert last[1] > first[1]
    validation = state.validation[-1]["per_step"]  # returns after 0..3 inner steps
    assert validation[1] > validation[0] and validation[3] > validation[0]
    record = RunRecords(tmp_path).get_run("nav2d_k10_maml_trpo_seed0")
    assert record["status"] == "complete" and record["metric"] == "return"
    request = {
        "dataset": "nav2d",
        "ckpt": str(tmp_path / record["name"]),
        "tasks": 6,
        "seed": 0,
        "work_dir": str(tmp_path),
    }
    results = evaluate(request)
    assert len(results["return_mean"]) == 4 and len(results["return_ci95"]) == 4
    assert (tmp_path / record["name"] / "trajectories.png").is_file()
    # the paper's test: half of α = 0.1 after the first step
    halved = evaluate({**request, "later_steps_lr": 0.05})
    assert halved["return_mean"][:2] == results["return_mean"][:2]
    assert halved["return_mean"][2] != results["return_mean"][2]


@pytest.mark.slow
def test_resume_ends_with_the_same_theta_as_an_uninterrupted_run(tmp_path) -> None:
    train(tiny_flags(tmp_path, epochs=3, run_name="one", ckpt_every=1))
    train(tiny_flags(tmp_path, epochs=2, run_name="two", ckpt_every=1))
    train({"resume": str(tmp_path / "two"), "epochs": 3})
    one = load_checkpoint(tmp_path / "one" / "last.npz")
    two = load_checkpoint(tmp_path / "two" / "last.npz")
    assert list(one.params) == list(two.params)
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name], err_msg=name)

    def history(checkpoint) -> list[dict]:
        return [
            {k: v for k, v in e.items() if k != "elapsed"} for e in checkpoint.meta["state"]["log"]
        ]

    assert history(one) == history(two)


@pytest.mark.slow
def test_resume_with_adam_keeps_its_moments(tmp_path) -> None:
    train(tiny_flags(tmp_path, epochs=2, run_name="one", outer="adam"))
    train(tiny_flags(tmp_path, epochs=1, run_name="two", outer="adam", ckpt_every=1))
    train({"resume": str(tmp_path / "two"), "epochs": 2})
    one = load_checkpoint(tmp_path / "one" / "last.npz")
    two = load_checkpoint(tmp_path / "two" / "last.npz")
    assert one.optimizer and set(one.optimizer) == set(two.optimizer)
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name], err_msg=name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"k_spt": 0}, "--k_spt must be a positive integer"),
        ({"k_spt": 5000}, "--k_spt 5000 is more than 1000 trajectories per task"),
        ({"horizon": 0}, "--horizon must be between 1 and 1000"),
        ({"horizon": 10**6}, "--horizon must be between 1 and 1000"),
        ({"task_num": 10**6}, "tasks, which are all held in memory"),
        ({"task_num": 1000, "k_spt": 100}, "steps per meta-batch is more than 2,000,000"),
        ({"max_kl": -1.0}, "--max_kl must be a positive number"),
        ({"gamma": 1.5}, "--gamma must be in (0, 1]"),
        ({"gae_lambda": -0.1}, "--gae_lambda must be in [0, 1]"),
        ({"algo": "reptile"}, "reinforcement learning runs maml, fomaml or pretrain"),
        ({"oracle": True}, "--oracle is the paper's baseline trained on all tasks"),
        ({"later_steps_lr": -0.1}, "--later_steps_lr must be a positive number"),
        (
            {"later_steps_lr": 0.05, "inner_rule": "lslr", "outer": "adam"},
            "--later_steps_lr is a fixed step",
        ),
        ({"n_way": 5}, "reinforcement learning has no classes"),
        ({"inner_rule": "metasgd"}, "learned inner rates need --outer adam"),
        ({"net": "conv4"}, "policies are the paper's Gaussian MLP"),
    ],
)
def test_impossible_settings_are_refused(tmp_path, flags, message) -> None:
    with pytest.raises(UserError, match=None) as caught:
        train(tiny_flags(tmp_path, **flags))
    assert message in str(caught.value)


def test_rl_flags_are_refused_for_other_datasets(tmp_path) -> None:
    with pytest.raises(UserError, match="--horizon is for reinforcement learning"):
        train({"dataset": "sinusoid", "horizon": 10, "work_dir": str(tmp_path)})
    with pytest.raises(UserError, match="--later_steps_lr is for reinforcement learning"):
        train({"dataset": "sinusoid", "later_steps_lr": 0.1, "work_dir": str(tmp_path)})
    with pytest.raises(UserError, match="--normalized_actions is for reinforcement learning"):
        train({"dataset": "sinusoid", "normalized_actions": True, "work_dir": str(tmp_path)})
    with pytest.raises(UserError, match="--normalized_actions is for nav2d"):
        train({"dataset": "cheetah_dir", "normalized_actions": True, "work_dir": str(tmp_path)})


def test_normalized_actions_reach_the_environment_and_the_run_name(tmp_path) -> None:
    """The flag changes what a step does (rllab's scaling), is kept in the run's config and
    names the run apart from the unnormalised one."""
    from metalearn.rl.problem import make_env

    env = make_env({"dataset": "nav2d", "normalized_actions": True})
    env.reset(np.zeros((1, 2)), 1, np.zeros((1, 1)))
    assert np.allclose(env.step(np.full((1, 1, 2), 0.5))[0], 0.05)
    train(tiny_flags(tmp_path, normalized_actions=True, epochs=1, outer="adam"))
    name = "nav2d_k6_maml_normact_adam_seed0"
    assert RunRecords(tmp_path).get_run(name)["status"] == "complete"
    assert json.loads((tmp_path / name / "config.json").read_text())["normalized_actions"] is True


def test_bad_input_is_one_line_on_the_command_line(tmp_path) -> None:
    unknown = run_script("train.py", "--dataset", "nav3d", "--work_dir", str(tmp_path))
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    errors = [line for line in unknown.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "invalid choice: 'nav3d'" in errors[0]
    bad = run_script(
        "train.py", "--dataset", "nav2d", "--horizon", "0", "--work_dir", str(tmp_path)
    )
    assert_one_line_error(bad, "--horizon must be between 1 and 1000")
