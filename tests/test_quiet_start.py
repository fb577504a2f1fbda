"""Starting an entry point prints no third-party warning (Paddle's ccache hint printed on every
start, in the terminal, the notebook and every job's output, where it read as something wrong);
warnings of the project itself, and real ones, still show."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "serve.py"])
def test_help_prints_nothing_on_stderr(script: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "usage:" in result.stdout


def test_only_the_ccache_hint_is_silenced() -> None:
    quiet = run("-c", "import metalearn, paddle")
    assert quiet.stderr == ""
    loud = run("-c", "import metalearn, paddle, warnings; warnings.warn('a real one', UserWarning)")
    assert "UserWarning: a real one" in loud.stderr


@pytest.mark.slow
def test_training_start_prints_no_warning(tmp_path) -> None:
    result = run(
        "train.py",
        *("--dataset", "sinusoid", "--k_spt", "5", "--epochs", "2", "--val_every", "2"),
        *("--val_tasks", "2", "--work_dir", str(tmp_path), "--run_name", "quiet"),
    )
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr
