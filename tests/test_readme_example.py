"""The README's "Your own model" example runs as written and meta-learns: adapting to a task
lowers its query loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def readme_example() -> str:
    section = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("## Your own model")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs_and_adaptation_helps(tmp_path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    before, after = map(float, re.findall(r"(\d+\.\d+)", result.stdout.splitlines()[-1]))
    assert after < before


def test_readme_example_is_short() -> None:
    assert len(readme_example().splitlines()) <= 32
