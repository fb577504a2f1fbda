"""Helpers shared by the tests that run the entry points as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, stdin: str = "", timeout: int = 300):
    """Run ``python <repo>/<script> args`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """A failed run that said what is wrong in one ``error:`` line, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]
