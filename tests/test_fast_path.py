"""The fast path (oneDNN kernels) computes the same meta-updates as the plain path."""

from __future__ import annotations

import numpy as np
import pytest

from metalearn.data.tasks import ImageTasks
from metalearn.kernels import onednn
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import ConvNet


@pytest.fixture(scope="module")
def tasks():
    images = (np.random.default_rng(0).random((20, 20, 1, 28, 28)) < 0.15).astype("float32")
    return [ImageTasks(images, 5, 1, 15).sample(0, "train", 1, i) for i in range(2)]


def directions(kind: str, algo: str, steps: int, tasks) -> np.ndarray:
    onednn.use_kernels(kind)
    try:
        net = ConvNet(n_way=5)
        learner = MetaLearner(net, make_parameters(net.init_params(7)), algo, 0.4, steps)
        total, _ = learner.batch_direction(tasks)
        return np.concatenate([total[k].numpy().ravel() for k in learner.params])
    finally:
        onednn.use_kernels("native")


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
def test_fast_kernels_give_the_plain_paths_meta_update(algo: str, steps: int, tasks) -> None:
    if onednn.load_kernels() is None:
        pytest.skip("the oneDNN kernels could not be built here")
    plain = directions("native", algo, steps, tasks)
    fast = directions("fast", algo, steps, tasks)
    assert np.linalg.norm(fast - plain) / np.linalg.norm(plain) < 1e-4
