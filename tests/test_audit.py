"""The audit of a user's model (python -m metalearn.audit): it passes the user copy of the
Omniglot network through the exact routing and FAILS it on Paddle's own double-grads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, assert_one_line_error
from user_models import OmniglotNet, tanh_omniglot_net

from metalearn.audit import TOLERANCE, audit, format_reports


def test_the_omniglot_copy_passes_with_smooth_activations() -> None:
    """ReLU becomes softplus for the finite differences; 1 and 2 inner steps."""
    reports = audit(lambda: OmniglotNet(3, hidden=4), (1, 28, 28), 3)
    assert [r.steps for r in reports] == [1, 2]
    assert all(r.passed for r in reports), format_reports(reports)[0]
    assert len(reports[0].checks) == 14  # 4 convolutions, 4 × 2 batch norm, linear weight + bias


def test_the_same_model_fails_on_paddles_own_double_grads() -> None:
    """Routing off: Paddle's F.conv2d double-grad (first layer) makes the meta-gradient wrong."""
    reports = audit(lambda: OmniglotNet(3, hidden=4), (1, 28, 28), 3, exact=False)
    table, passed = format_reports(reports, exact=False)
    assert not passed
    first = {check.name: check for check in reports[0].checks}["body.0.weight"]
    assert first.error > 10 * TOLERANCE, table
    assert "audit FAILED" in table.splitlines()[-1]


@pytest.mark.parametrize(
    "adapt", [["body.0.weight", "body.4.bias", "head.weight"], "head"], ids=["names", "anil"]
)
def test_a_subset_of_parameters_adapts_with_an_exact_meta_gradient(adapt) -> None:
    """Named weights: the fixed ones are re-aliased each inner step (MetaLearner.alias_fixed);
    the head (ANIL): the body's features once per task, through LayerNet.features."""
    model = tanh_omniglot_net((1, 28, 28), 3)
    reports = audit(model, (1, 28, 28), 3, adapt=adapt, smooth=False)
    assert all(r.passed for r in reports), format_reports(reports)[0]


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metalearn.audit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_command_prints_the_table_and_its_exit_status_tells() -> None:
    good = audit_cli("tests.user_models:omniglot_net", "--n-way", "3", "--steps", "1")
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert lines[1].split() == ["parameter", "relative", "error", "verdict"]
    assert lines[2].split()[0] == "body.0.weight" and lines[2].split()[-1] == "ok"
    assert lines[-1].startswith("audit passed")
    bad = audit_cli("tests.user_models:omniglot_net", "--n-way", "3", "--steps", "1", "--no-exact")
    assert bad.returncode == 1
    assert "WRONG" in bad.stdout and bad.stdout.splitlines()[-1].startswith("audit FAILED")


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory, fragment",
    [
        ("tests.user_models:not_a_layer", "returned str, not a paddle.nn.Layer"),
        ("tests.user_models:no_parameters", "without parameters"),
        ("tests.user_models:raises", "raised ValueError: no model today"),
        ("tests.user_models:missing", "has no function missing"),
        ("tests.broken_model:model", "the module must be importable from the working directory"),
        ("json:loads", "is not a file under the working directory"),
        ("not a factory", "expected MODULE:FUNCTION"),
        ("tests.user_models:wrong_output", "expected [3, 3] (batch, n_way)"),
        ("tests.user_models:recurrent", "nn.GRU"),
    ],
)
def test_a_bad_model_is_one_error_line(factory, fragment) -> None:
    assert_one_line_error(audit_cli(factory, "--n-way", "3"), fragment)
