"""train.py / evaluate.py with a user's model (--net MODULE:FUNCTION): training, checkpoints,
a resume that ends with the uninterrupted run's θ, evaluation from the saved factory string, and
one error line for every bad factory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import as_flags, assert_one_line_error, run_script, tiny

from metalearn.data.tasks import Task
from metalearn.nets.layer_net import LayerNet
from metalearn.runs.checkpoint import load_checkpoint
from metalearn.service.playground import load_run

FACTORY = "tests.user_models:omniglot_net"
pytestmark = pytest.mark.slow


def train_flags(omniglot_dir, work, **options) -> list[str]:
    return as_flags(tiny(omniglot_dir, work, net=FACTORY, ckpt_every=2, **options))


def test_a_user_model_trains_resumes_to_the_same_theta_and_evaluates(omniglot_dir, tmp_path):
    whole = run_script("train.py", *train_flags(omniglot_dir, tmp_path, run_name="whole", epochs=4))
    assert whole.returncode == 0, whole.stderr
    split = run_script("train.py", *train_flags(omniglot_dir, tmp_path, run_name="split", epochs=2))
    assert split.returncode == 0, split.stderr
    resumed = run_script("train.py", "--resume", str(tmp_path / "split"), "--epochs", "4")
    assert resumed.returncode == 0, resumed.stderr

    one = load_checkpoint(tmp_path / "whole" / "last.npz")
    two = load_checkpoint(tmp_path / "split" / "last.npz")
    assert list(one.params)[:3] == ["body.0.weight", "body.1.weight", "body.1.bias"]
    assert list(one.params) == list(two.params)
    for name in one.params:
        np.testing.assert_allclose(one.params[name], two.params[name], rtol=0, atol=1e-6)
    assert two.meta["network"]["kind"] == "layer" and two.meta["network"]["source"] == FACTORY
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["net"] == FACTORY and config["network"]["input_shape"] == [1, 28, 28]

    evaluated = run_script("evaluate.py", "--ckpt", str(tmp_path / "split"), "--data_dir",
                           str(omniglot_dir), "--tasks", "4")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "split" / "test_results.json").read_text())
    assert results["tasks"] == 4 and len(results["acc_mean"]) == 2

    played = load_run(tmp_path / "split" / "best.npz", omniglot_dir)  # the playground's loader
    assert isinstance(played.learner.net, LayerNet)
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    task = Task(images, np.arange(5), images, np.zeros(5, np.int64))
    logits = played.learner.predict_after_steps(task, images, [0, 1])
    assert logits[1].shape == (5, 5)


@pytest.mark.parametrize(
    "net, fragment",
    [
        ("tests.user_models:not_a_layer", "returned str, not a paddle.nn.Layer"),
        ("tests.user_models:no_parameters", "without parameters"),
        ("tests.user_models:raises", "raised ValueError: no model today"),
        ("tests.user_models:missing", "has no function missing"),
        ("tests.user_models:wrong_output", "expected [2, 5] (batch, n_way)"),
        ("tests.user_models:recurrent", "nn.GRU"),
        ("tests.broken_model:model", "importable from the working directory"),
        ("tests.nowhere:model", "importable from the working directory"),
        ("json:loads", "not a file under the working directory"),
        ("conv5", "nor MODULE:FUNCTION (a model factory in the working directory)"),
    ],
)
def test_a_bad_factory_is_one_error_line_before_any_training(omniglot_dir, tmp_path, net, fragment):
    flags = as_flags(tiny(omniglot_dir, tmp_path / "work", net=net, epochs=1))
    assert_one_line_error(run_script("train.py", *flags), fragment)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").glob("*/last.npz"))
