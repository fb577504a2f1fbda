"""Bad inputs to train.py / evaluate.py (and make_data.py's --seed): one clear line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_script, tiny

from metalearn.data import omniglot
from metalearn.errors import UserError
from metalearn.training.config import MAX_TASKS, train_parser
from metalearn.training.evaluation import evaluate
from metalearn.training.trainer import train

SHAPE_TAIL = (omniglot.NUM_DRAWINGS, 1, omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A valid packed set of 30 random characters (enough for 5-way tasks in every split)."""
    from metalearn.data.omniglot import CharacterRef

    chars = [CharacterRef("images_background", "A", f"c{i}", f"{i:04d}", ()) for i in range(30)]
    images = np.random.default_rng(0).random((30, *SHAPE_TAIL), dtype=np.float32)
    out = tmp_path / "data"
    omniglot.write_pack(images, chars, out, (10, 10, 10))
    return out


@pytest.mark.parametrize(
    "flags", [{"seed": -1}, {"seed": -1, "dataset": "sinusoid", "n_way": None}]
)
def test_train_negative_seed(tmp_path: Path, tiny_data: Path, flags: dict) -> None:
    config = {k: v for k, v in {**tiny(tiny_data, tmp_path / "work"), **flags}.items() if v}
    with pytest.raises(UserError, match="--seed must be a non-negative integer, got -1"):
        train(config)


def test_evaluate_negative_seed(tmp_path: Path) -> None:
    given = {"seed": -1, "tasks": 10, "ckpt": str(tmp_path / "best.npz"), "dataset": "sinusoid"}
    with pytest.raises(UserError, match="--seed must be a non-negative integer, got -1"):
        evaluate(given)


@pytest.mark.parametrize("key", ["task_num", "val_tasks"])
def test_train_too_many_tasks(tmp_path: Path, tiny_data: Path, key: str) -> None:
    config = tiny(tiny_data, tmp_path / "work", **{key: 1_000_000})
    with pytest.raises(UserError, match=f"--{key} 1000000 is more than {MAX_TASKS:,} tasks"):
        train(config)


def test_train_pretrain_refused_for_omniglot(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(UserError, match="--algo pretrain is the paper's sinusoid baseline"):
        train(tiny(tiny_data, tmp_path / "work", algo="pretrain"))
    assert "sinusoid only" in train_parser().format_help()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x93NUMPY garbage", "not a valid .npy"),
        (b"random bytes, not numpy at all", "not a valid .npy"),
        (b"", "not a valid .npy"),
    ],
)
def test_train_unreadable_npy(tmp_path: Path, tiny_data: Path, content: bytes, message) -> None:
    (tiny_data / omniglot.npy_name("train")).write_bytes(content)
    (tiny_data / omniglot.MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        train(tiny(tiny_data, tmp_path / "work"))


def test_npy_forged_header_is_refused_before_reading(tmp_path: Path, tiny_data: Path) -> None:
    """A header claiming 10^9 characters is refused without allocating them."""
    path = tiny_data / omniglot.npy_name("val")
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, *SHAPE_TAIL)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    with pytest.raises(UserError, match="claims 1000000000 characters"):
        omniglot.load_split(tiny_data, "val")
    header["shape"] = (5, *SHAPE_TAIL)  # plausible, but the file is shorter
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    with pytest.raises(UserError, match="truncated"):
        omniglot.load_split(tiny_data, "val")


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"files": []}, "records no sha256 for train"),
        ({"files": {"train": "abc"}}, "records no sha256 for train"),
        ({}, "records no sha256 for train"),
        ([1, 2], "is not an Omniglot manifest"),
    ],
    ids=["files-list", "entry-string", "no-files", "not-an-object"],
)
def test_malformed_manifest(tiny_data: Path, manifest, message: str) -> None:
    (tiny_data / omniglot.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        omniglot.load_split(tiny_data, "train")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["make_data.py", "train.py", "evaluate.py"])
def test_cli_negative_seed_one_line(script: str) -> None:
    """The three entry points share one rule for --seed and say it in one line (exit 2)."""
    args = (
        ["--seed", "-1"] if script == "make_data.py" else ["--seed", "-1", "--dataset", "sinusoid"]
    )
    result = run_script(script, *args)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, "--seed must be a non-negative integer, got -1")


def test_data_found_where_make_data_puts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without environment variables the fixtures look in the project folder (packed files) and
    in data/omniglot (source), as the README's first command leaves them."""
    import conftest

    monkeypatch.setattr(conftest, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("MAML_DATA_DIR", raising=False)
    monkeypatch.delenv("OMNIGLOT_SOURCE", raising=False)
    assert conftest.find_packed() == (
        None,
        f"no packed {', '.join(conftest.PACKED_FILES)} in {tmp_path / 'repo'}",
    )
    assert conftest.find_source()[0] is None
    source = tmp_path / "repo" / "data" / "omniglot"
    source.mkdir(parents=True)
    for name in omniglot.SETS:
        (source / f"{name}.zip").touch()
    for name in conftest.PACKED_FILES:
        (tmp_path / "repo" / name).touch()
    assert conftest.find_packed() == (tmp_path / "repo", "")
    assert conftest.find_source() == (source, "")
