"""The learned inner loop (MAML++, Meta-SGD, ANIL): meta-gradients against finite differences and
independent computations, the schedules, and the flags that switch each ingredient."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest
from helpers import tiny

from metalearn.data.tasks import SinusoidTasks
from metalearn.errors import UserError
from metalearn.learning.gradcheck import meta_gradient_error, tiny_arrays, tiny_problem
from metalearn.learning.inner_rules import RATE_PREFIX, rate_name
from metalearn.learning.learner import (
    Batch,
    MetaLearner,
    initial_arrays,
    make_parameters,
    multi_step_loss_weights,
    to_tensors,
)
from metalearn.learning.variants import Order, QueryGradient, make_variant
from metalearn.nets.builtin import MLP, ConvNet
from metalearn.runs.checkpoint import load_checkpoint
from metalearn.training.config import check_saved_config, resolve_defaults, validate_config
from metalearn.training.evaluation import load_trained
from metalearn.training.notebook import show_adaptation
from metalearn.training.trainer import train


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


def numpy(direction: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in direction.items()}


MAML_PLUS_PLUS = {"rule": "lslr", "per_step_bn": True, "multi_step_loss_for": 10, "iteration": 4}


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        {"rule": "lslr"},
        {"rule": "metasgd"},
        {"per_step_bn": True},
        {"adapt": "head"},
        MAML_PLUS_PLUS,
    ],
    ids=["lslr", "metasgd", "per_step_bn", "anil", "maml++"],
)
def test_meta_gradient_with_learned_rates_matches_finite_differences(case, steps) -> None:
    """Along a random direction of θ, the learned rates and the per-step BN rows at once."""
    assert meta_gradient_error("conv", steps, **case) < 1e-4


@pytest.mark.parametrize("case", [{"rule": "metasgd"}, {"rule": "lslr"}, {"adapt": "head"}])
def test_stacked_mlp_meta_gradient_matches_finite_differences(case) -> None:
    assert meta_gradient_error("mlp", 2, **case) < 1e-4


@pytest.mark.parametrize("rule", ["lslr", "metasgd"])
def test_learned_rates_at_alpha_give_plain_maml_exactly(rule, float64) -> None:
    net, task = tiny_problem("conv")
    config = {"seed": 0, "glob_base_lr": 0.5, "glob_update_step": 2, "inner_rule": rule}
    arrays = initial_arrays(net, config, dtype="float64")  # every rate starts at α
    assert any(k.startswith("lr:") for k in arrays)
    learned = MetaLearner(net, make_parameters(arrays), "maml", 0.5, 2, rule=rule)
    theta = {k: v for k, v in arrays.items() if not k.startswith("lr:")}
    plain = MetaLearner(net, make_parameters(theta), "maml", 0.5, 2)
    ours, ours_stats = learned.task_direction(task)
    maml, maml_stats = plain.task_direction(task)
    assert ours_stats.loss == maml_stats.loss
    for name in theta:
        np.testing.assert_allclose(ours[name].numpy(), maml[name].numpy(), rtol=1e-12, atol=0)
    assert all(float(paddle.abs(ours[rate_name(k)]).max()) > 0 for k in learned.adapted)


def test_anil_is_maml_with_the_bodys_inner_gradients_zeroed(float64) -> None:
    """Independently of the features-once path: the whole network in the inner loop, the
    body's inner gradients multiplied by zero, second order throughout."""
    net, task = tiny_problem("conv")
    arrays = net.init_params(0, dtype="float64")
    anil = MetaLearner(net, make_parameters(arrays), "maml", 0.5, 2, adapt="head")
    assert anil.adapted == list(net.head_names)
    ours, stats = anil.task_direction(task)
    params = make_parameters(arrays)
    weights = dict(params)
    x_s, y_s = paddle.to_tensor(task.x_support), paddle.to_tensor(task.y_support)
    for _ in range(2):
        loss = net.loss(net.forward(x_s, weights), y_s)
        grads = paddle.grad(loss, list(weights.values()), create_graph=True)
        weights = {
            k: w - 0.5 * (g if k in net.head_names else g * 0.0)
            for (k, w), g in zip(weights.items(), grads)
        }
    query = net.loss(
        net.forward(paddle.to_tensor(task.x_query), weights), paddle.to_tensor(task.y_query)
    )
    expected = dict(zip(params, paddle.grad(query, list(params.values()))))
    assert stats.loss == pytest.approx(float(query), rel=1e-12)
    for name in arrays:
        np.testing.assert_allclose(
            ours[name].numpy(), expected[name].numpy(), rtol=1e-9, atol=1e-14
        )
    assert float(paddle.abs(ours["conv0.weight"]).max()) > 0  # the body is still meta-learned


@pytest.mark.parametrize(
    "options",
    [{"rule": "metasgd"}, {"rule": "lslr"}, {"adapt": "head"}, {"multi_step_loss_for": 5}],
)
def test_stacked_meta_batch_equals_the_sum_of_single_tasks(options) -> None:
    net = MLP()
    config = {"seed": 0, "glob_base_lr": 0.01, "glob_update_step": 2}
    config["inner_rule"] = options.get("rule", "sgd")
    config["adapt"] = options.get("adapt", "all")
    arrays = initial_arrays(net, config)
    tasks = [SinusoidTasks(5, 5).sample(0, "train", 1, i) for i in range(4)]
    learner = MetaLearner(net, make_parameters(arrays), "maml", 0.01, 2, **options)
    stacked, stats = learner.batch_direction(tasks, track_steps=True, iteration=2)
    single = [learner.task_direction(t, track_steps=True, iteration=2) for t in tasks]
    assert set(stacked) == set(arrays)
    for name in arrays:
        expected = sum(direction[name].numpy() for direction, _ in single)
        np.testing.assert_allclose(stacked[name].numpy(), expected, rtol=1e-4, atol=1e-6)
    for (_, one), many in zip(single, stats):
        assert one.loss == pytest.approx(many.loss, rel=1e-5)


def test_multi_step_loss_is_the_weighted_sum_of_the_step_losses(float64) -> None:
    """Loss and direction equal Σ_k w_k × (MAML with k inner steps), computed separately."""
    net, task = tiny_problem("conv")
    arrays = net.init_params(0, dtype="float64")
    steps, iteration, anneal = 3, 4, 10
    weights = multi_step_loss_weights(steps, iteration, anneal)
    learner = MetaLearner(
        net, make_parameters(arrays), "maml", 0.5, steps, multi_step_loss_for=anneal
    )
    ours, stats = learner.task_direction(task, iteration=iteration)
    loss, expected = 0.0, {k: 0.0 for k in arrays}
    for k, weight in enumerate(weights, start=1):
        direction, one = MetaLearner(net, make_parameters(arrays), "maml", 0.5, k).task_direction(
            task
        )
        loss += weight * one.loss
        expected = {name: expected[name] + weight * direction[name].numpy() for name in arrays}
    assert stats.loss == pytest.approx(loss, rel=1e-12)
    for name in arrays:
        np.testing.assert_allclose(ours[name].numpy(), expected[name], rtol=1e-9, atol=1e-14)
    final_only, _ = learner.task_direction(task, iteration=anneal + 1)  # annealing has ended
    last, _ = MetaLearner(net, make_parameters(arrays), "maml", 0.5, steps).task_direction(task)
    for name in arrays:
        np.testing.assert_array_equal(final_only[name].numpy(), last[name].numpy())


def test_multi_step_loss_weights_follow_the_maml_plus_plus_code() -> None:
    steps, anneal = 5, 100
    np.testing.assert_allclose(multi_step_loss_weights(steps, 1, anneal), np.full(5, 0.2))
    previous = None
    for iteration in range(1, anneal + 1):
        weights = multi_step_loss_weights(steps, iteration, anneal)
        assert weights.sum() == pytest.approx(1.0)
        assert (weights[:-1] >= 0.03 / steps - 1e-15).all()
        if previous is not None:
            assert weights[-1] >= previous[-1] and (weights[:-1] <= previous[:-1]).all()
        previous = weights
    assert previous[-1] == pytest.approx(1 - 4 * 0.03 / 5)  # the code's floor is reached
    np.testing.assert_array_equal(multi_step_loss_weights(steps, anneal + 1, anneal), np.eye(5)[-1])
    np.testing.assert_array_equal(multi_step_loss_weights(steps, None, anneal), np.eye(5)[-1])


def test_derivative_order_annealing_is_fomaml_then_maml_exactly() -> None:
    net, task = ConvNet(n_way=5), omniglot_like_task()
    arrays = net.init_params(4)
    annealed = QueryGradient("maml++", first_order_until=2)
    assert [annealed.order(i) for i in (1, 2, 3)] == [Order.FIRST, Order.FIRST, Order.SECOND]

    def direction(variant, iteration=None):
        learner = MetaLearner(net, make_parameters(arrays), variant, 0.4, 2)
        return numpy(learner.task_direction(task, iteration=iteration)[0])

    early, late = direction(annealed, 2), direction(annealed, 3)
    fomaml, maml = direction("fomaml"), direction("maml")
    for name in arrays:
        np.testing.assert_array_equal(early[name], fomaml[name])
        np.testing.assert_array_equal(late[name], maml[name])
    assert not np.allclose(fomaml["conv0.weight"], maml["conv0.weight"], rtol=1e-3)


def omniglot_like_task(seed: int = 0):
    from metalearn.data.tasks import Task

    rng = np.random.default_rng(seed)
    labels = np.arange(5).repeat(2)
    images = (rng.random((10, 1, 28, 28)) < 0.1).astype("float32")
    return Task(images[::2].copy(), labels[::2].copy(), images, labels)


def test_first_order_learned_rates_get_their_first_order_gradient(float64) -> None:
    """FOMAML with Meta-SGD: θ gets FOMAML's direction and each rate −g_s·∇L_q (one step)."""
    net, task = tiny_problem("conv")
    arrays = tiny_arrays(net, 0.5, 1, "metasgd", "all", 0)
    learner = MetaLearner(net, make_parameters(arrays), "fomaml", 0.5, 1, rule="metasgd")
    ours = numpy(learner.task_direction(task)[0])
    weights = {k: paddle.to_tensor(v, stop_gradient=False) for k, v in arrays.items()}
    theta = [k for k in arrays if not k.startswith("lr:")]
    x_s, y_s = paddle.to_tensor(task.x_support), paddle.to_tensor(task.y_support)
    support = paddle.grad(net.loss(net.forward(x_s, weights), y_s), [weights[k] for k in theta])
    adapted = {
        k: paddle.to_tensor(arrays[k] - arrays[rate_name(k)] * g.numpy(), stop_gradient=False)
        for k, g in zip(theta, support)
    }
    query = net.loss(
        net.forward(paddle.to_tensor(task.x_query), adapted), paddle.to_tensor(task.y_query)
    )
    at_adapted = dict(zip(theta, paddle.grad(query, list(adapted.values()))))
    for k, g in zip(theta, support):
        np.testing.assert_allclose(ours[k], at_adapted[k].numpy(), rtol=1e-9, atol=1e-14)
        expected = -g.numpy() * at_adapted[k].numpy()
        np.testing.assert_allclose(ours[rate_name(k)], expected, rtol=1e-9, atol=1e-14)


def test_per_step_batch_norm_uses_the_row_of_the_step() -> None:
    net = ConvNet(n_way=5, hidden=4, bn_steps=3)
    arrays = net.init_params(0)
    assert arrays["bn0.scale"].shape == (3, 4) and net.config()["bn_steps"] == 3
    assert "bn_steps" not in ConvNet(n_way=5).config()  # older checkpoints still match
    rng = np.random.default_rng(0)
    for name in net.per_step_names():
        arrays[name] = arrays[name] + rng.normal(size=arrays[name].shape).astype("float32")
    params, x = make_parameters(arrays), paddle.to_tensor(omniglot_like_task().x_query)
    outputs = [net.forward(x, params, step).numpy() for step in range(5)]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])
    np.testing.assert_array_equal(outputs[4], outputs[2])  # past the last row: the last row
    row = {k: v[1] if k in net.per_step_names() else v for k, v in arrays.items()}
    single = ConvNet(n_way=5, hidden=4).forward(x, make_parameters(row)).numpy()
    np.testing.assert_allclose(outputs[1], single, rtol=1e-5, atol=1e-6)
    learner = MetaLearner(net, params, "maml", 0.4, 2)
    assert not set(net.per_step_names()) & set(learner.adapted)  # meta-learned, not adapted


def test_outer_schedules_live_in_the_variants() -> None:
    cosine = make_variant(
        "maml++",
        {"glob_meta_lr": 1e-3, "cosine_meta_lr": True, "min_meta_lr": 1e-5, "epochs": 300}
        | {"cosine_meta_lr_epochs": 100},
    )
    assert cosine.learning_rate(1) == pytest.approx(1e-3)
    assert cosine.learning_rate(51) == pytest.approx((1e-3 + 1e-5) / 2)
    rates = [cosine.learning_rate(i) for i in range(1, 101)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 1e-5
    assert cosine.learning_rate(101) == cosine.learning_rate(250) == pytest.approx(1e-5)
    constant = make_variant("maml", {"glob_meta_lr": 1e-3, "min_meta_lr": 1e-5, "epochs": 100})
    assert constant.learning_rate(50) == 1e-3
    reptile = make_variant("reptile", {"meta_step": 1.0, "meta_step_final": 0.0, "epochs": 11})
    assert [reptile.learning_rate(i) for i in (1, 6, 11)] == pytest.approx([1.0, 0.5, 0.0])
    assert math.isinf(make_variant("fomaml").first_order_until)


def test_meta_update_steps_the_learned_rates_with_the_scheduled_rate() -> None:
    net = ConvNet(n_way=5)
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": 1, "inner_rule": "lslr"}
    params = make_parameters(initial_arrays(net, config))
    variant = make_variant("maml", {"cosine_meta_lr": True, "min_meta_lr": 0.0, "epochs": 2})
    learner = MetaLearner(net, params, variant, 0.4, 1, rule="lslr")
    optimizer = learner.make_optimizer()
    learner.meta_update([omniglot_like_task()], optimizer, 1, iteration=2)
    assert optimizer.get_lr() == pytest.approx(0.0005)
    assert not np.allclose(params["lr:conv0.weight"].numpy(), 0.4)


def test_reptile_scores_the_query_set_only_on_iterations_it_logs() -> None:
    """Reptile's step needs no query loss, so an unlogged iteration reports none; a logged one
    reports the query loss after the inner loop. Both move θ the same way."""
    net = ConvNet(n_way=5)
    config = {"seed": 0, "glob_base_lr": 0.4, "glob_update_step": 2}
    tasks = [omniglot_like_task(seed) for seed in (0, 1)]
    results = {}
    for logged in (False, True):
        params = make_parameters(initial_arrays(net, config))
        learner = MetaLearner(net, params, "reptile", 0.4, 2, task_chunk=2)
        loss, per_step = learner.meta_update(tasks, learner.make_optimizer(), 2, logged)
        results[logged] = loss, per_step, numpy(params)
    assert results[False][:2] == (None, [])
    fresh = MetaLearner(net, make_parameters(initial_arrays(net, config)), "reptile", 0.4, 2)
    expected = []
    for task in tasks:  # one at a time, through the inner loop and the query loss directly
        run = fresh.inner_loop(Batch(*to_tensors([task]), count=1), Order.NONE)
        expected.append(fresh.query_losses(run, None).numpy().item())
    assert results[True][0] == pytest.approx(np.mean(expected), rel=1e-5)
    assert len(results[True][1]) == 3
    for name, value in results[False][2].items():
        np.testing.assert_array_equal(value, results[True][2][name])


def test_algo_presets_and_single_ingredient_flags(tmp_path) -> None:
    plus = resolve_defaults({"algo": "maml++", "epochs": 1500})
    assert (plus["inner_rule"], plus["adapt"], plus["per_step_bn"]) == ("lslr", "all", True)
    assert plus["multi_step_loss"] and plus["cosine_meta_lr"] and plus["min_meta_lr"] == 1e-5
    assert (plus["multi_step_loss_epochs"], plus["first_order_epochs"]) == (150, 500)
    assert plus["cosine_meta_lr_epochs"] == 1500
    ablation = resolve_defaults({"algo": "maml++", "inner_rule": "sgd", "multi_step_loss": False})
    assert ablation["inner_rule"] == "sgd" and ablation["multi_step_loss_epochs"] == 0
    assert resolve_defaults({"algo": "metasgd"})["inner_rule"] == "metasgd"
    assert resolve_defaults({"algo": "anil"})["adapt"] == "head"
    plain = resolve_defaults({"algo": "maml"})
    assert (plain["inner_rule"], plain["first_order_epochs"], plain["per_step_bn"]) == (
        "sgd",
        0,
        False,
    )
    one = resolve_defaults({"algo": "maml", "inner_rule": "lslr", "first_order_epochs": 7})
    assert one["inner_rule"] == "lslr" and one["first_order_epochs"] == 7
    # A run saved before these flags existed is read as plain MAML (it trained without them).
    old = {k: v for k, v in plain.items() if k not in ("inner_rule", "adapt", "per_step_bn")}
    assert check_saved_config(old, "old run")["inner_rule"] == "sgd"


@pytest.mark.parametrize(
    "given, message",
    [
        ({"algo": "reptile", "inner_rule": "lslr"}, "--inner_rule lslr needs a meta-gradient"),
        ({"algo": "pretrain", "dataset": "sinusoid", "adapt": "head"}, "--adapt head"),
        ({"algo": "maml", "dataset": "sinusoid", "per_step_bn": True}, "no batch norm"),
        ({"algo": "anil", "per_step_bn": True}, "ANIL computes the body's features once"),
        ({"algo": "metasgd", "export_pkl": True}, "cannot hold learned rates"),
        ({"algo": "maml++", "min_meta_lr": -1.0}, "--min_meta_lr"),
        ({"algo": "maml++", "first_order_epochs": -1}, "--first_order_epochs"),
    ],
)
def test_meaningless_combinations_are_refused(given, message) -> None:
    with pytest.raises(UserError, match=message):
        validate_config(resolve_defaults(given))


@pytest.mark.slow
def test_a_trained_maml_plus_plus_run_reloads_with_its_rates_and_per_step_rows(
    omniglot_dir, tmp_path
) -> None:
    """Evaluation, the notebook and the playground load a run through one function; a learned
    inner loop must come back as trained (rates and per-step BN rows), not as plain MAML."""
    train(tiny(omniglot_dir, tmp_path, run_name="pp", epochs=2, algo="maml++"))
    best = tmp_path / "pp" / "best.npz"
    saved = load_checkpoint(best).params
    overrides = {"data_dir": str(omniglot_dir), "use_gpu": False}
    problem, learner, config = load_trained(best, overrides)
    assert config["inner_rule"] == "lslr" and problem.net.bn_steps == 2
    loaded = {name: value.numpy() for name, value in learner.params.items()}
    assert set(loaded) == set(saved) and any(name.startswith(RATE_PREFIX) for name in loaded)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)
    accuracies = show_adaptation(best, omniglot_dir, tmp_path / "adaptation.png")
    assert len(accuracies) == config["glob_update_step_test"] + 1
    assert (tmp_path / "adaptation.png").stat().st_size > 0
