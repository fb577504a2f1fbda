"""Stacked tasks (one computation per chunk of a meta-batch: grouped convolutions, per-task batch
norm and losses) give the directions and statistics of the tasks computed one at a time."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import Task
from metalearn.kernels import onednn, registry
from metalearn.learning.gradcheck import meta_gradient_error
from metalearn.learning.learner import MetaLearner, initial_arrays, make_parameters
from metalearn.nets.builtin import ConvNet, PoolConvNet


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


def image_tasks(count: int, shape: tuple[int, ...], n_way: int = 3, seed: int = 0) -> list[Task]:
    """Random float64 images, 1 support and 2 query images per class."""
    rng = np.random.default_rng(seed)
    support, query = np.arange(n_way), np.arange(n_way).repeat(2)
    return [
        Task(rng.random((n_way, *shape)), support, rng.random((2 * n_way, *shape)), query)
        for _ in range(count)
    ]


def directions(learner: MetaLearner, tasks: list[Task], chunk: int, iteration=None):
    learner.task_chunk = chunk
    direction, stats = learner.batch_direction(tasks, track_steps=True, iteration=iteration)
    return {k: v.numpy() for k, v in direction.items()}, stats


def assert_same_directions(stacked, single, tolerance: float = 1e-10) -> None:
    (many, many_stats), (one, one_stats) = stacked, single
    assert set(many) == set(one)
    for name in one:
        scale = np.abs(one[name]).max()
        assert scale > 0, name
        error = np.abs(many[name] - one[name]).max() / scale
        assert error <= tolerance, f"{name}: relative error {error:.2e}"
    for a, b in zip(many_stats, one_stats):
        assert a.loss == pytest.approx(b.loss, rel=1e-12)
        np.testing.assert_allclose(a.metric_per_step, b.metric_per_step, rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "pretrain"])
def test_stacked_chunks_equal_single_tasks(float64, algo: str, steps: int) -> None:
    """5 tasks as chunks of 2, 2, 1 (uneven last chunk) and all 5 at once, against 5 singles."""
    net = ConvNet(n_way=3, hidden=8)
    arrays = initial_arrays(
        net, {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": steps}, dtype="float64"
    )
    learner = MetaLearner(net, make_parameters(arrays), algo, 0.4, steps)
    tasks = image_tasks(5, (1, 28, 28))
    single = directions(learner, tasks, 1)
    assert_same_directions(directions(learner, tasks, 2), single)
    assert_same_directions(directions(learner, tasks, 5), single)


@pytest.mark.parametrize(
    "options",
    [
        {"rule": "lslr", "per_step_bn": True, "multi_step_loss_for": 10},
        {"rule": "metasgd"},
        {"adapt": "head"},
    ],
    ids=["maml++", "metasgd", "anil"],
)
def test_stacked_chunks_equal_single_tasks_with_learned_inner_loops(float64, options) -> None:
    steps = 2
    net = ConvNet(n_way=3, hidden=8, bn_steps=steps + 1 if options.get("per_step_bn") else 0)
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": steps}
    config = {**config, "inner_rule": options.get("rule", "sgd"), "adapt": options.get("adapt")}
    arrays = initial_arrays(net, config, dtype="float64")
    learner_options = {k: v for k, v in options.items() if k != "per_step_bn"}
    learner = MetaLearner(net, make_parameters(arrays), "maml", 0.4, steps, **learner_options)
    tasks = image_tasks(3, (1, 28, 28))
    stacked = directions(learner, tasks, 2, iteration=4)
    assert_same_directions(stacked, directions(learner, tasks, 1, iteration=4))


def test_stacked_pool_network_equals_single_tasks(float64) -> None:
    net = PoolConvNet(n_way=3, image_size=18, filters=4)
    arrays = initial_arrays(
        net, {"seed": 0, "glob_base_lr": 0.1, "glob_update_step": 2}, dtype="float64"
    )
    learner = MetaLearner(net, make_parameters(arrays), "maml", 0.1, 2)
    tasks = image_tasks(3, (3, 18, 18))
    assert_same_directions(directions(learner, tasks, 3), directions(learner, tasks, 1))


def test_stacked_evaluation_equals_single_tasks(float64) -> None:
    net = ConvNet(n_way=3, hidden=8)
    arrays = initial_arrays(
        net, {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": 1}, dtype="float64"
    )
    learner = MetaLearner(net, make_parameters(arrays), "maml", 0.4, 1)
    tasks = image_tasks(5, (1, 28, 28))
    learner.task_chunk = 1
    single = learner.evaluate(tasks, 3)
    learner.task_chunk = 2
    np.testing.assert_array_equal(learner.evaluate(tasks, 3), single)
    assert single.shape == (5, 4)


@pytest.mark.parametrize("kind", ["conv", "pool"])
def test_stacked_meta_gradient_matches_finite_differences(kind: str) -> None:
    """The meta-batch path train.py takes: 2 tasks stacked in one computation."""
    assert meta_gradient_error(kind, 2, stacked_tasks=2) < 1e-4


def test_conv_net_stacks_tasks_by_default_only_with_the_fast_kernels() -> None:
    previous = registry.in_use()
    try:
        net, pool = ConvNet(n_way=5), PoolConvNet(n_way=5)
        onednn.use_kernels("native")
        assert net.default_task_chunk == 1
        if onednn.use_kernels("fast") == "fast":
            assert net.default_task_chunk > 1
            assert pool.default_task_chunk == 1  # measured: no faster, 2.5x the memory
    finally:
        onednn.use_kernels(previous)


def test_reptile_stacks_twice_the_default_and_an_explicit_chunk_stays() -> None:
    """Reptile keeps no graph through its inner loop, so its training chunks are twice the
    network's default; MAML's are the default; --task_chunk wins over both."""
    net = ConvNet(n_way=5)
    params = make_parameters(
        initial_arrays(net, {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": 1})
    )

    def chunk_sizes(algo: str, task_chunk: int | None) -> set[int]:
        learner = MetaLearner(net, params, algo, 0.4, 1, task_chunk=task_chunk)
        seen = []
        learner._chunk_direction = lambda chunk, *args: seen.append(len(chunk)) or ({}, [])
        learner.batch_direction(list(range(64)), iteration=1)
        return set(seen)

    previous = registry.in_use()
    try:
        for kernels in ("native", "fast"):
            if onednn.use_kernels(kernels) != kernels:
                continue
            default = net.default_task_chunk
            assert chunk_sizes("maml", None) == {default}
            assert chunk_sizes("reptile", None) == {2 * default if default > 1 else 1}
            assert chunk_sizes("reptile", 4) == chunk_sizes("maml", 4) == {4}
        assert registry.in_use() == "native" or default > 1
    finally:
        onednn.use_kernels(previous)


def test_task_chunk_must_be_positive() -> None:
    net = ConvNet(n_way=5)
    with pytest.raises(ValueError, match="task_chunk"):
        MetaLearner(net, make_parameters(net.init_params(0)), "maml", 0.4, 1, task_chunk=0)
