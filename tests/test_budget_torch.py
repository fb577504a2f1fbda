"""bench/budget_torch.py: the PyTorch reference of bench/speed.py trains bench/budget.py's recipe
within a time budget, and its validation curve is drawn beside our run's.

The reference is first checked to compute our meta-gradient (float64), so the curves compare two
implementations of one computation, not two algorithms.
"""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import paddle
import pytest
from helpers import REPO, assert_one_line_error, run_script, tiny

from metalearn.data.tasks import ImageTasks, Task
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import ConvNet
from metalearn.runtime import OPT_OUT
from metalearn.training.trainer import train

pytest.importorskip("torch", reason="PyTorch (requirements-bench.txt) not installed")

BUDGET_MINUTES = 0.02
sys.path.insert(0, str(REPO / "bench"))
from budget import RECIPE  # noqa: E402


@pytest.fixture(scope="module")
def speed():
    """bench/speed.py as a module (its allocator re-exec opted out: this is pytest's process)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPT_OUT, "1")
        patch.syspath_prepend(str(REPO / "bench"))
        yield importlib.import_module("speed")
    sys.modules.pop("speed", None)


@pytest.fixture
def float64():
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype("float32")


@pytest.mark.parametrize("variant", ["Reference", "VmapReference"])
@pytest.mark.parametrize("steps", [1, 2])
def test_reference_meta_gradient_is_ours(speed, float64, variant: str, steps: int) -> None:
    """The gradient the reference's training step hands to Adam is our second-order
    meta-gradient of the same task (the budget recipe's 1 inner step, and 2)."""
    net = ConvNet(n_way=3, hidden=8)
    rng = np.random.default_rng(3)
    labels = np.arange(3).repeat(2)
    task = Task(rng.random((6, 1, 28, 28)), labels, rng.random((6, 1, 28, 28)), labels)
    arrays = net.init_params(1, dtype="float64")
    config = speed.Config("check", n_way=3, steps=steps, batch=1, inner_lr=0.4)
    reference = getattr(speed, variant)(config, arrays)
    reference.step([task])
    ours, _ = MetaLearner(net, make_parameters(arrays), "maml", 0.4, steps).task_direction(task)
    fomaml, _ = MetaLearner(net, make_parameters(arrays), "fomaml", 0.4, steps).task_direction(task)
    for name, weight in reference.params.items():
        want = ours[name].numpy()
        np.testing.assert_allclose(
            weight.grad.numpy(), want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name
        )
    first = "conv0.weight"  # the comparison tells second order from first order
    gap = np.abs(fomaml[first].numpy() - ours[first].numpy()).max()
    assert gap > 1e-3 * np.abs(ours[first].numpy()).max()


def test_reference_scores_tasks_as_ours(speed, float64) -> None:
    """Validation and test accuracies after 0..3 steps are the same numbers on both sides."""
    net = ConvNet(n_way=5, hidden=8)
    images = np.random.default_rng(4).random((8, 4, 1, 28, 28))
    sampler = ImageTasks(images, n_way=5, k_spt=1, k_query=3)
    tasks = [
        Task(t.x_support.astype(np.float64), t.y_support, t.x_query.astype(np.float64), t.y_query)
        for t in (sampler.sample(0, "val", 0, index) for index in range(3))
    ]
    arrays = net.init_params(2, dtype="float64")
    reference = speed.Reference(speed.Config("check", steps=3, inner_lr=0.4), arrays)
    ours = MetaLearner(net, make_parameters(arrays), "maml", 0.4, 3).evaluate(tasks, 3)
    np.testing.assert_allclose(reference.evaluate(tasks, 3), ours, rtol=0, atol=1e-12)
    assert ours.shape == (3, 4) and len(np.unique(ours)) > 1


@pytest.fixture(scope="module")
def torch_result(omniglot_dir, tmp_path_factory) -> dict:
    """A tiny budget run of the vmap reference (the loop's step is the other one checked above)."""
    out = tmp_path_factory.mktemp("budget_torch") / "result.json"
    result = run_script(
        "bench/budget_torch.py",
        *("--minutes", str(BUDGET_MINUTES), "--k_query", "2", "--variant", "vmap"),
        *("--data_dir", str(omniglot_dir), "--out", str(out)),
        *("--threads", "1", "--test_tasks", "10"),
    )
    assert result.returncode == 0, result.stderr
    assert f"results written to {out}" in result.stdout
    return {"path": out, **json.loads(out.read_text())}


@pytest.mark.slow
def test_budget_run_writes_its_curve_and_test(torch_result: dict) -> None:
    curve = torch_result["curve"]
    assert curve, "at least the validation at the last iteration"
    assert [p["iteration"] for p in curve] == sorted({p["iteration"] for p in curve})
    assert curve[-1]["minutes"] * 60 <= torch_result["training_wall_seconds"]  # a wall clock
    assert torch_result["iterations"] == curve[-1]["iteration"]
    assert all(0 <= p["accuracy"] <= 1 and len(p["per_step"]) == 4 for p in curve)
    assert torch_result["best"]["accuracy"] == max(p["accuracy"] for p in curve)
    test = torch_result["test"]
    assert test["tasks"] == 10 and len(test["acc_mean"]) == len(test["acc_ci95"]) == 4
    assert all(0 <= m <= 1 for m in test["acc_mean"]) and all(c >= 0 for c in test["acc_ci95"])
    settings = torch_result["settings"]  # the recipe, with the flags given
    recipe = dict(zip(RECIPE, RECIPE[1:]))  # bench/budget.py's "--flag value" pairs
    assert settings["k_query"] == 2 and settings["glob_update_step"] == 1  # flag given, recipe's
    assert settings["task_num"] == int(recipe["--task_num"])
    assert settings["glob_meta_lr"] == float(recipe["--glob_meta_lr"])
    assert settings["max_minutes"] == BUDGET_MINUTES
    assert settings["cosine_meta_lr"]
    assert settings["cosine_meta_lr_epochs"] == int(recipe["--cosine_meta_lr_epochs"])


@pytest.mark.slow
def test_plot_draws_our_run_beside_the_reference(torch_result, omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="ours", epochs=2, val_every=1))
    png = tmp_path / "budget_vs_torch.png"
    result = run_script(
        "bench/budget_torch.py",
        *("--plot", str(tmp_path / "ours"), str(torch_result["path"]), "-o", str(png)),
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    # The tiny run is not the recipe: the figure is drawn, and the differences are named.
    assert "differs from our run in" in result.stderr and "task_num" in result.stderr


@pytest.mark.slow
def test_plot_refuses_a_file_that_is_no_result(omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="ours", epochs=1))
    other = tmp_path / "other.json"
    other.write_text('{"curve": 3}')
    result = run_script("bench/budget_torch.py", "--plot", str(tmp_path / "ours"), str(other))
    assert_one_line_error(result, "is not a result of bench/budget_torch.py")
