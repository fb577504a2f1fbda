"""Fuzz: crafted and mutated checkpoints never crash evaluate.py, run code or eat memory.

The whole corpus (tests/checkpoint_corpus.py) goes through evaluate.py's entry function in one
child process under an address-space limit, so a runaway allocation fails loudly instead of
taking the machine; a representative subset also runs as ``evaluate.py --ckpt FILE`` processes.
Every file must end in one ``error:`` line, except byte flips that leave a genuine checkpoint
intact (a zip's CRC or a flip inside float data), which must load as a valid checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_corpus import write_corpus
from helpers import REPO, assert_one_line_error

ADDRESS_SPACE_LIMIT = 3 << 30  # bytes; Paddle itself maps under 1 GiB
PEAK_RSS_BOUND_KIB = 2 << 20  # 2 GiB, in ru_maxrss units (KiB on Linux)

# The child: evaluate.py's own entry function on every file, one JSON line per outcome.
CHILD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from metalearn.args import evaluate_parser
from metalearn.errors import UserError
from metalearn.evaluation import evaluate
data_dir, work_dir, *paths = sys.argv[2:]
for path in paths:
    print(json.dumps({"file": path, "outcome": "started"}), flush=True)
    flags = ["--ckpt", path, "--data_dir", data_dir, "--work_dir", work_dir, "--tasks", "1",
             "--glob_update_step_test", "0", "--kernels", "native"]
    try:
        evaluate(vars(evaluate_parser().parse_args(flags)))
        outcome, message = "ok", ""
    except UserError as error:
        outcome, message = "error", str(error)
    except BaseException as error:  # reported, so one bad file does not hide the others
        outcome, message = "crash", f"{type(error).__name__}: {error}"
    print(json.dumps({"file": path, "outcome": outcome, "message": message}), flush=True)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.fixture(scope="module")
def corpus(omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("corpus")
    return {"folder": folder, "files": write_corpus(folder, omniglot_dir)}


@pytest.fixture(scope="module")
def outcomes(corpus: dict, omniglot_dir: Path) -> dict:
    """Run the whole corpus through evaluate() in one memory-limited child process."""
    paths = [str(p) for files in corpus["files"].values() for p in files]
    work = corpus["folder"] / "work"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(ADDRESS_SPACE_LIMIT),
            str(omniglot_dir),
            str(work),
            *paths,
        ],
        cwd=corpus["folder"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    finished = {
        line["file"]: line for line in lines if line.get("outcome") not in (None, "started")
    }
    started = [line["file"] for line in lines if line.get("outcome") == "started"]
    assert result.returncode == 0, (
        f"child died ({result.returncode}) on {started[-1] if started else '?'}:\n"
        f"{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return {"files": finished, "peak_rss_kib": lines[-1]["peak_rss_kib"]}


def test_corpus_is_large_and_varied(corpus: dict) -> None:
    files = corpus["files"]
    assert sum(len(paths) for paths in files.values()) >= 40
    suffixes = {p.suffix for paths in files.values() for p in paths}
    assert suffixes == {".pkl", ".npz"}


@pytest.mark.parametrize("category", ["crafted_pkl", "crafted_npz", "truncated"])
def test_every_crafted_or_truncated_file_is_one_clear_error(
    corpus: dict, outcomes: dict, category: str
) -> None:
    for path in corpus["files"][category]:
        outcome = outcomes["files"][str(path)]
        assert outcome["outcome"] == "error", (path.name, outcome)
        assert "\n" not in outcome["message"] and outcome["message"], (path.name, outcome)


def test_byte_flips_are_refused_or_harmless(corpus: dict, outcomes: dict) -> None:
    """A flip either breaks the file (one error) or lands where the format allows it (float
    data of a pickle, an ignored zip field): then the checkpoint is still a valid one."""
    results = [outcomes["files"][str(p)]["outcome"] for p in corpus["files"]["flipped"]]
    assert set(results) <= {"error", "ok"}, results
    assert "error" in results  # the seeds do hit structure


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
    """As a user runs it: exit 2, one error line, no traceback, modest peak memory."""
    stdout, stderr = corpus["folder"] / f"{Path(name).name}.out", corpus["folder"] / "err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "evaluate.py"),
                "--ckpt",
                str(corpus["folder"] / name),
                "--data_dir",
                str(omniglot_dir),
                "--work_dir",
                str(corpus["folder"] / "work"),
            ],
            cwd=corpus["folder"],
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr.read_text())
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "")
    assert usage.ru_maxrss < PEAK_RSS_BOUND_KIB
