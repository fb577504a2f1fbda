"""The allocator re-exec keeps the interpreter's options and honours the opt-out variable."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn import runtime

REPO = Path(__file__).resolve().parent.parent

# Tunes the allocator (re-executing itself), then reports what the re-executed process sees.
_PROBE = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from metalearn.runtime import tune_allocator
tune_allocator()
print("tuned", os.environ.get("MALLOC_MMAP_THRESHOLD_"), "dev", sys.flags.dev_mode,
      "warnoptions", ",".join(sys.warnoptions))
if "--wait" in sys.argv:
    sys.stdin.read()  # keep running until the test closes stdin
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(_PROBE)
    return path


def _untuned_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in runtime.ALLOCATOR_ENV}
    env.pop(runtime.OPT_OUT, None)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def _run(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, *command], env=_untuned_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux-only")
def test_reexec_keeps_dev_mode_and_warning_options(probe: Path) -> None:
    out = _run("-X", "dev", "-W", "error", str(probe))
    assert f"tuned {runtime.ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']} dev True" in out, out
    assert "error" in out.split("warnoptions ")[1].strip().split(","), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux-only")
def test_reexec_keeps_running_under_cprofile(probe: Path) -> None:
    out = _run("-m", "cProfile", str(probe))
    assert f"tuned {runtime.ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}" in out, out
    assert "function calls" in out, out  # cProfile's report: the profiler survived the re-exec


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux-only")
def test_reexec_keeps_output_unbuffered(probe: Path) -> None:
    """With -u (as Paddle's launcher starts workers) a line arrives while the process still runs."""
    child = subprocess.Popen(
        [sys.executable, "-u", str(probe), "--wait"],
        env=_untuned_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # A safety limit only: a buffered line would never arrive while the child waits on stdin.
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready, "no output while the child runs: stdout is buffered after the re-exec"
        assert child.stdout.readline().startswith("tuned 4294967296")
        assert child.poll() is None  # the line came before the process ended
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        child.stdout.close()


class _Exec(Exception):
    """Raised instead of replacing the test process."""


@pytest.fixture
def execv_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def fake_execv(path: str, args: list[str]) -> None:
        calls.append([path, *args[1:]])
        raise _Exec

    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.os, "execv", fake_execv)
    for key in runtime.ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(runtime.OPT_OUT, raising=False)
    return calls


@pytest.mark.parametrize("value", ["0", "", "no", "false"])
def test_opt_out_zero_does_not_turn_tuning_off(
    execv_calls: list, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(runtime.OPT_OUT, value)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-u", "train.py", "--n_way", "5"])
    with pytest.raises(_Exec):
        runtime.tune_allocator()
    assert execv_calls == [[sys.executable, "-u", "train.py", "--n_way", "5"]]


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_opt_out_turns_tuning_off(
    execv_calls: list, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(runtime.OPT_OUT, value)
    runtime.tune_allocator()
    assert execv_calls == []


def test_without_orig_argv_runs_untuned(execv_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.9 cannot repeat its interpreter options, so it skips the re-exec."""
    monkeypatch.delattr(sys, "orig_argv", raising=False)
    runtime.tune_allocator()
    assert execv_calls == []
    assert not any(key in os.environ for key in runtime.ALLOCATOR_ENV)
