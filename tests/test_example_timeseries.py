"""examples/timeseries.py: its task family (shapes, labels, seeds, disjoint streams, no trivial
statistic separates the classes), a short meta-training that makes adaptation work, the audit of
its 1-D convolutional network, and bad input as one error line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, assert_one_line_error, run_script

import metalearn
from examples.timeseries import (
    TRAIN,
    SignalTasks,
    check_args,
    held_out_tasks,
    magnitude_spectrum,
    main,
    make_model,
    meta_train,
    nearest_class_mean,
    parse_args,
)
from metalearn.audit import audit, format_reports
from metalearn.data.tasks import Task
from metalearn.errors import UserError
from metalearn.kernels import onednn


@pytest.fixture
def native_kernels_afterwards():
    """metalearn.MAML installs the oneDNN kernels; other modules expect Paddle's."""
    yield
    onednn.use_kernels("native")


def test_a_task_has_the_asked_shapes_and_labels_in_class_order() -> None:
    task = SignalTasks(n_way=3, k_shot=2, k_query=4, length=40).sample(0, TRAIN, 1, 0)
    assert task.x_support.shape == (6, 1, 40) and task.x_query.shape == (12, 1, 40)
    assert task.x_support.dtype == np.float32 and task.y_support.dtype == np.int64
    assert task.y_support.tolist() == [0, 0, 1, 1, 2, 2]
    assert task.y_query.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_a_task_is_a_function_of_its_seed_stream_iteration_and_index() -> None:
    family = SignalTasks(3, 1, 2, length=32)
    again = family.sample(5, TRAIN, 2, 1)
    assert np.array_equal(family.sample(5, TRAIN, 2, 1).x_query, again.x_query)
    for other in [(6, TRAIN, 2, 1), (5, TRAIN, 3, 1), (5, TRAIN, 2, 0)]:
        assert not np.allclose(family.sample(*other).x_query, again.x_query)


def test_held_out_tasks_are_none_of_the_training_tasks() -> None:
    family = SignalTasks(3, 1, 2, length=32)
    trained = {
        family.sample(0, TRAIN, iteration, index).x_support.tobytes()
        for iteration in range(50)
        for index in range(4)
    }
    tested = {task.x_support.tobytes() for task in held_out_tasks(family, 0, 50)}
    assert len(tested) == 50 and not tested & trained


def test_the_support_set_is_needed_and_no_trivial_statistic_separates_the_classes() -> None:
    """Classes share their frequencies: the nearest class mean of their spread is no better
    than a guess (0.2), of their dominant frequency not much better (0.66 when each class had
    its own frequencies); and a label means another waveform in every task."""
    tasks = held_out_tasks(SignalTasks(5, 5, 15), 0, 100)
    assert np.mean([nearest_class_mean(task, _spread) for task in tasks]) < 0.3
    assert np.mean([nearest_class_mean(task, _dominant_frequency) for task in tasks]) < 0.5
    first, second = tasks[:2]
    assert not np.allclose(first.x_support[:5].mean(axis=0), second.x_support[:5].mean(axis=0))


def _spread(signals: np.ndarray) -> np.ndarray:
    return signals.std(axis=1, keepdims=True)


def _dominant_frequency(signals: np.ndarray) -> np.ndarray:
    return magnitude_spectrum(signals)[:, 1:].argmax(axis=1, keepdims=True).astype(float)


def test_the_no_learning_baselines_pick_the_nearest_class_mean() -> None:
    """Half a period later, a class's wave is its negative: far from its raw class mean, the
    same magnitude spectrum."""
    time = np.arange(16) / 16
    slow, fast = np.sin(2 * np.pi * 2 * time), np.sin(2 * np.pi * 5 * time)
    later = np.roll(slow, 4)
    assert np.allclose(later, -slow)
    task = Task(
        np.stack([slow, fast])[:, None], np.array([0, 1]),
        np.stack([later, fast + 0.1])[:, None], np.array([0, 1]),
    )  # fmt: skip
    assert nearest_class_mean(task, np.asarray) == 0.5
    assert nearest_class_mean(task, magnitude_spectrum) == 1.0


@pytest.mark.slow
def test_meta_training_makes_adaptation_beat_the_untrained_network(
    tmp_path, native_kernels_afterwards
) -> None:
    """Measured: one inner step from the random init 0.34 -> 0.51, from the meta-learned one
    (100 iterations) 0.32 -> 0.71; after 1 iteration 0.35 -> 0.53."""
    summary = main(
        [
            *("--n-way", "3", "--k-shot", "5", "--k-query", "5", "--length", "32"),
            *("--iterations", "100", "--meta-batch", "2", "--meta-lr", "0.003"),
            *("--test-steps", "2", "--test-tasks", "40", "--log-every", "50"),
            *("--out", str(tmp_path)),
        ]
    )
    accuracy = summary["accuracy"]
    maml = accuracy["MAML (second order)"]["mean"]
    untrained = accuracy["same network, random init"]["mean"]
    assert len(maml) == len(untrained) == 3
    assert maml[1] > maml[0] + 0.25 and maml[1] > untrained[1] + 0.1
    assert [row[0] for row in summary["train_curve"]] == [50, 100]
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == accuracy


def test_the_audit_passes_the_network_and_fails_it_on_paddles_own_double_grads() -> None:
    """Routing on: every parameter within the tolerance; off: Paddle has no double-grad for
    Flatten (nor for max-pooling), so second order cannot even be computed."""
    build = lambda: make_model((1, 16), 3, hidden=4)  # noqa: E731
    reports = audit(build, (1, 16), 3)
    assert all(report.passed for report in reports), format_reports(reports)[0]
    assert len(reports[0].checks) == 4 * 4 + 2  # conv and batch norm weights, biases; the head
    wrong = audit(build, (1, 16), 3, steps=[1], exact=False)[0]
    assert not wrong.passed and "doesn't have any grad op" in wrong.failure


@pytest.mark.slow
def test_the_audit_command_takes_a_channels_length_shape() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "metalearn.audit", "examples.timeseries:make_model"),
            *("--input-shape", "1,16", "--n-way", "3", "--steps", "1"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("audit passed")


def test_a_loss_that_is_not_finite_stops_training(native_kernels_afterwards) -> None:
    class Broken(SignalTasks):
        def sample(self, *where) -> Task:
            task = super().sample(*where)
            return Task(task.x_support * np.nan, task.y_support, task.x_query, task.y_query)

    maml = metalearn.MAML(make_model((1, 16), 3, hidden=4), inner_lr=0.1)
    with pytest.raises(UserError, match=r"the query loss is nan at iteration [12]: lower"):
        meta_train(maml, Broken(3, 1, 2, length=16), parse_args(["--iterations", "3"]))


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--n-way", "1"], "--n-way 1: must be an integer from 2"),
        (["--k-shot", "0"], "--k-shot 0"),
        (["--iterations", "0"], "--iterations 0"),
        (["--iterations", "-3"], "--iterations -3"),
        (["--length", "8"], "--length 8: must be an integer from 16"),
        (["--inner-lr", "nan"], "--inner-lr nan"),
        (["--meta-lr", "0"], "--meta-lr 0"),
    ],
)
def test_impossible_settings_are_refused(flags, fragment) -> None:
    with pytest.raises(UserError, match=fragment):
        check_args(parse_args(flags))


@pytest.mark.slow
def test_bad_input_is_one_error_line() -> None:
    assert_one_line_error(run_script("examples/timeseries.py", "--k-shot", "0"), "--k-shot 0")
