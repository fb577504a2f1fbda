"""The one-call meta-optimisers and NaN check against Paddle's per-parameter ones."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from metalearn.data.tasks import SinusoidTasks
from metalearn.learning.learner import MetaLearner, NonFiniteError, make_parameters, mean_if_finite
from metalearn.learning.meta_optimizers import SGD, Adam
from metalearn.nets.builtin import MLP


def arrays(dtype: str) -> dict[str, np.ndarray]:
    return MLP(sizes=(1, 6, 1)).init_params(0, dtype)


def directions(dtype: str, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        {k: rng.normal(size=v.shape).astype(dtype) for k, v in arrays(dtype).items()}
        for _ in range(steps)
    ]


def paddle_steps(optimizer_class, dtype: str, rates: list[float]) -> tuple[dict, dict]:
    """θ and the optimiser's state (by stable name) after Paddle's optimiser took ``rates``."""
    params = make_parameters(arrays(dtype))
    optimizer = optimizer_class(learning_rate=rates[0], parameters=list(params.values()))
    for rate, direction in zip(rates, directions(dtype, len(rates))):
        optimizer.set_lr(rate)
        sum((params[k] * paddle.to_tensor(d)).sum() for k, d in direction.items()).backward()
        optimizer.step()
        optimizer.clear_grad()
    names = {p.name: k for k, p in params.items()}
    state = {}
    for key, value in optimizer.state_dict().items():
        if isinstance(value, paddle.Tensor):  # Paddle's keys start with the per-process name
            owner = max((n for n in names if key.startswith(n + "_")), key=len)
            state[names[owner] + key[len(owner) :]] = value.numpy()
    return {k: p.numpy() for k, p in params.items()}, state


def assert_same(actual: dict, expected: dict, dtype: str) -> None:
    """Equal to rounding: ``merged_adam_`` and ``adam_`` may round float32 differently by an ulp."""
    rtol = 1e-6 if dtype == "float32" else 1e-13
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=rtol, atol=rtol * 1e-3, err_msg=name)


def our_steps(optimizer, params, rates: list[float], dtype: str) -> None:
    for rate, direction in zip(rates, directions(dtype, len(rates))):
        optimizer.set_lr(rate)
        optimizer.step({k: paddle.to_tensor(d) for k, d in direction.items()})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("ours", "theirs"), [(Adam, paddle.optimizer.Adam), (SGD, paddle.optimizer.SGD)]
)
def test_one_call_optimizers_step_like_paddles(ours, theirs, dtype: str) -> None:
    rates = [1e-2, 1e-2, 5e-3, 1e-3]  # a schedule changes the rate between steps
    expected, expected_state = paddle_steps(theirs, dtype, rates)
    params = make_parameters(arrays(dtype))
    optimizer = ours(params, rates[0])
    our_steps(optimizer, params, rates, dtype)
    assert_same({k: p.numpy() for k, p in params.items()}, expected, dtype)
    state = optimizer.state_dict()
    assert state.keys() == expected_state.keys()
    assert_same(state, expected_state, dtype)


def test_adam_resumes_from_a_state_paddles_adam_saved() -> None:
    """Checkpoints written with ``paddle.optimizer.Adam`` continue exactly where they stopped."""
    rates = [1e-2] * 5
    expected, _ = paddle_steps(paddle.optimizer.Adam, "float32", rates)
    theta, state = paddle_steps(paddle.optimizer.Adam, "float32", rates[:3])
    params = make_parameters(theta)
    optimizer = Adam(params, 1e-2)
    optimizer.set_state_dict(state)
    for direction in directions("float32", 5)[3:]:
        optimizer.step({k: paddle.to_tensor(d) for k, d in direction.items()})
    assert_same({k: p.numpy() for k, p in params.items()}, expected, "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mean_if_finite_divides_or_refuses_any_nonfinite_entry(dtype: str) -> None:
    sums = directions(dtype, 1)[0]
    mean = mean_if_finite({k: paddle.to_tensor(v) for k, v in sums.items()}, 25)
    for name, value in sums.items():
        np.testing.assert_allclose(mean[name].numpy(), value * (1 / 25), rtol=1e-6)
    for bad in (np.nan, np.inf, -np.inf):
        for poisoned in sums:
            tensors = {k: paddle.to_tensor(v) for k, v in sums.items()}
            value = sums[poisoned].copy()
            value.flat[-1] = bad
            tensors[poisoned] = paddle.to_tensor(value)
            assert mean_if_finite(tensors, 25) is None, (bad, poisoned)


def test_a_nonfinite_direction_stops_the_meta_update_before_theta_moves(monkeypatch) -> None:
    net = MLP()
    params = make_parameters(net.init_params(0))
    before = {k: p.numpy() for k, p in params.items()}
    learner = MetaLearner(net, params, "maml", 0.01, 1)
    real = MetaLearner.batch_direction

    def poisoned(self, tasks, *args):
        direction, stats = real(self, tasks, *args)
        direction["fc1.bias"] = direction["fc1.bias"] * float("nan")
        return direction, stats

    monkeypatch.setattr(MetaLearner, "batch_direction", poisoned)
    tasks = [SinusoidTasks(5, 5).sample(0, "train", 1, i) for i in range(3)]
    with pytest.raises(NonFiniteError, match="non-finite meta-update"):
        learner.meta_update(tasks, learner.make_optimizer(), 3)
    for name, value in before.items():
        np.testing.assert_array_equal(params[name].numpy(), value)
