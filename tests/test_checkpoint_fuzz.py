"""Fuzz: crafted and mutated checkpoints never crash evaluate.py, run code or eat memory.

The whole corpus (tests/checkpoint_corpus.py, about 100 files) goes through evaluate.py's own
entry (``run_cli`` around ``evaluate``) in one child process under an address-space limit, so a
runaway allocation fails loudly instead of taking the machine; a representative subset also runs
as ``evaluate.py --ckpt FILE`` processes. Every file must exit with code 2 and one ``error:``
line, except byte flips that leave a checkpoint valid (a flip inside a pickle's float data),
which must evaluate normally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_corpus import write_corpus
from helpers import REPO

ADDRESS_SPACE_LIMIT = 3 << 30  # bytes; Paddle itself maps under 1 GiB
PEAK_RSS_BOUND_KIB = 2 << 20  # 2 GiB, in ru_maxrss units (KiB on Linux)

# One JSON line per file: the exit code run_cli gives and what went to stderr.
CHILD = """
import contextlib, io, json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from metalearn.training.config import evaluate_parser
from metalearn.errors import run_cli
from metalearn.training.evaluation import evaluate
data_dir, work_dir, *paths = sys.argv[2:]
for path in paths:
    print(json.dumps({"started": path}), flush=True)
    flags = ["--ckpt", path, "--data_dir", data_dir, "--work_dir", work_dir, "--tasks", "1",
             "--glob_update_step_test", "0", "--kernels", "native"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_cli(lambda: evaluate(vars(evaluate_parser().parse_args(flags))))
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException as error:  # reported, so one bad file does not hide the others
            code = f"{type(error).__name__}: {error}"
    print(json.dumps({"file": path, "code": code, "stderr": stderr.getvalue()}), flush=True)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.fixture(scope="module")
def corpus(omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("corpus")
    return {"folder": folder, "files": write_corpus(folder, omniglot_dir)}


@pytest.fixture(scope="module")
def outcomes(corpus: dict, omniglot_dir: Path) -> dict:
    """Run the whole corpus through evaluate.py's entry in one memory-limited child process."""
    paths = [str(p) for files in corpus["files"].values() for p in files]
    work = str(corpus["folder"] / "work")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(ADDRESS_SPACE_LIMIT), str(omniglot_dir), work, *paths],
        cwd=corpus["folder"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    started = [line["started"] for line in lines if "started" in line]
    assert result.returncode == 0, (
        f"child died ({result.returncode}) on {started[-1] if started else '?'}:\n"
        f"{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return {
        "files": {line["file"]: line for line in lines if "code" in line},
        "peak_rss_kib": lines[-1]["peak_rss_kib"],
    }


def assert_refused_in_one_line(outcome: dict) -> None:
    """Exit code 2, exactly one ``error:`` line, no traceback."""
    assert outcome["code"] == 2, outcome
    assert "Traceback" not in outcome["stderr"], outcome
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome


def test_corpus_is_large_and_varied(corpus: dict) -> None:
    files = corpus["files"]
    assert sum(len(paths) for paths in files.values()) >= 40
    assert {p.suffix for paths in files.values() for p in paths} == {".pkl", ".npz"}


@pytest.mark.parametrize("category", ["crafted_pkl", "crafted_npz", "truncated"])
def test_every_crafted_or_truncated_file_is_one_clear_error(
    corpus: dict, outcomes: dict, category: str
) -> None:
    for path in corpus["files"][category]:
        assert_refused_in_one_line(outcomes["files"][str(path)])


def test_byte_flips_are_refused_or_harmless(corpus: dict, outcomes: dict) -> None:
    """A flip either breaks the file (one error) or lands where the format allows it (float
    data of a pickle; a zip's CRC catches it in a member): then the checkpoint is valid."""
    codes = []
    for path in corpus["files"]["flipped"]:
        outcome = outcomes["files"][str(path)]
        codes.append(outcome["code"])
        if outcome["code"] != 0:
            assert_refused_in_one_line(outcome)
    assert 2 in codes  # the seeds do hit structure


def test_nothing_in_the_corpus_ran_code(corpus: dict, outcomes: dict) -> None:
    assert not list(corpus["folder"].rglob("pwned"))


def test_memory_stays_bounded_by_the_files(outcomes: dict) -> None:
    """1 GiB zip bombs and forged 2**40-element shapes: peak memory stays far below them."""
    assert outcomes["peak_rss_kib"] < PEAK_RSS_BOUND_KIB


REPRESENTATIVE = [
    "legacy_run/segfault_object_fields.pkl",
    "legacy_run/huge_memo_put.pkl",
    "legacy_run/os_system.pkl",
    "archives/zip_bomb.npz",
    "archives/meta_a_list.npz",
    "archives/unicode_member.npz",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_evaluate_script_refuses_in_one_line(corpus: dict, omniglot_dir: Path, name: str) -> None:
    """As a user runs it: exit 2, one error line, no traceback, modest peak memory (the
    child's own, from wait4)."""
    stderr_path = corpus["folder"] / f"{Path(name).name}.stderr"
    command = [sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(corpus["folder"] / name)]
    command += ["--data_dir", str(omniglot_dir), "--work_dir", str(corpus["folder"] / "work")]
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            command, cwd=corpus["folder"], stdout=subprocess.DEVNULL, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    outcome = {"code": process.returncode, "stderr": stderr_path.read_text()}
    assert_refused_in_one_line(outcome)
    assert usage.ru_maxrss < PEAK_RSS_BOUND_KIB
