"""Sinusoid regression: batched tasks compute the same directions, training helps, bad flags fail."""

from __future__ import annotations

import numpy as np
import pytest

from metalearn.data.tasks import SinusoidTasks
from metalearn.errors import UserError
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import MLP
from metalearn.training.trainer import Trainer, prepare_config

SAMPLER = SinusoidTasks(k_spt=5, k_query=5)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "pretrain"])
def test_stacked_meta_batch_equals_the_sum_of_single_tasks(algo: str) -> None:
    net = MLP()
    arrays = net.init_params(0)
    tasks = [SAMPLER.sample(0, "train", 1, i) for i in range(4)]
    learner = MetaLearner(net, make_parameters(arrays), algo, 0.01, 2)
    stacked, stats = learner.batch_direction(tasks, track_steps=True)
    single = [learner.task_direction(task, track_steps=True) for task in tasks]
    for name in arrays:
        expected = sum(direction[name].numpy() for direction, _ in single)
        np.testing.assert_allclose(stacked[name].numpy(), expected, rtol=1e-4, atol=1e-6)
    for (_, one), many in zip(single, stats):
        assert one.loss == pytest.approx(many.loss, rel=1e-5)
        np.testing.assert_allclose(one.metric_per_step, many.metric_per_step, rtol=1e-5)


def test_sinusoid_tasks_follow_the_paper_distribution() -> None:
    rng = np.random.default_rng(0)
    amplitudes, phases = zip(*(SAMPLER.sample_function(rng) for _ in range(2000)))
    assert min(amplitudes) >= 0.1 and max(amplitudes) <= 5.0
    assert min(phases) >= 0.0 and max(phases) <= np.pi
    task = SAMPLER.sample(0, "test", 0, 3)
    assert task.x_support.shape == (5, 1) and task.y_query.shape == (5, 1)
    assert np.all(np.abs(task.x_query) <= 5.0)
    assert np.array_equal(task.x_support, SAMPLER.sample(0, "test", 0, 3).x_support)


def sinusoid_config(tmp_path, **overrides) -> dict:
    given = {
        "dataset": "sinusoid",
        "k_spt": 5,
        "work_dir": str(tmp_path),
        "epochs": 300,
        "val_every": 300,
        "val_tasks": 100,
        "log_every": 100,
        "glob_update_step_test": 5,
        **overrides,
    }
    return prepare_config(given)


def test_sinusoid_defaults_are_the_papers(tmp_path) -> None:
    config = prepare_config({"dataset": "sinusoid", "work_dir": str(tmp_path)})
    assert (
        config["k_spt"],
        config["k_query"],
        config["task_num"],
        config["glob_update_step"],
        config["glob_base_lr"],
        config["glob_meta_lr"],
        config["epochs"],
    ) == (10, 10, 25, 1, 0.01, 0.001, 70000)


def test_short_sinusoid_training_beats_its_untrained_start(tmp_path) -> None:
    trainer = Trainer(sinusoid_config(tmp_path, run_name="sin", glob_meta_lr=0.01))
    tasks = [trainer.problem.samplers["val"].sample(0, "val", 0, i) for i in range(100)]
    untrained = trainer.learner.evaluate(tasks, 5).mean(axis=0)
    trainer.run()
    trained = trainer.learner.evaluate(tasks, 5).mean(axis=0)
    assert trained[5] < 0.7 * trained[0]  # adaptation lowers the query error clearly
    assert trained[5] < 0.7 * untrained[5]  # and more than from the untrained initialisation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k_spt": 0}, "--k_spt must be a positive"),
        ({"k_query": -1}, "--k_query must be"),
        ({"n_way": 5}, "no classes"),
        ({"glob_base_lr": -0.1}, "--glob_base_lr"),
    ],
)
def test_bad_sinusoid_flags_are_rejected(tmp_path, overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        sinusoid_config(tmp_path, **overrides)


def test_negative_ranges_are_rejected() -> None:
    with pytest.raises(UserError, match="amplitude"):
        SinusoidTasks(5, 5, amplitude=(-1.0, 2.0))
    with pytest.raises(UserError, match="x range"):
        SinusoidTasks(5, 5, x_range=(5.0, -5.0))


def test_evaluation_writes_results_and_the_papers_figures(tmp_path) -> None:
    from PIL import Image

    from metalearn.training.evaluation import evaluate

    Trainer(sinusoid_config(tmp_path, run_name="fig", epochs=20, val_tasks=10)).run()
    results = evaluate(
        {"dataset": "sinusoid", "k_spt": 5, "work_dir": str(tmp_path), "tasks": 20, "seed": 0}
    )
    assert len(results["mse_mean"]) == len(results["mse_ci95"]) == 6  # steps 0..5
    for name in ("sinusoid_fits.png", "sinusoid_steps.png", "test_steps.png"):
        with Image.open(tmp_path / "fig" / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert image.width > 200 and image.height > 200
        assert pixels.std() > 5, f"{name} is blank"
