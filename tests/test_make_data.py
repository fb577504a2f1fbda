"""Omniglot packer: real-data checks (slow), determinism, and one-line errors for bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metalearn import omniglot
from metalearn.errors import UserError
from metalearn.omniglot import CharacterRef

SHAPE_TAIL = (20, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Fake sources built in tmp_path


def drawing_png(seed: int) -> bytes:
    """A 105x105 mode '1' PNG like Omniglot's: white background, one black stroke."""
    rng = np.random.default_rng(seed)
    image = Image.new("1", (105, 105), 1)
    ImageDraw.Draw(image).line([tuple(rng.integers(10, 95, 2)) for _ in range(3)], fill=0, width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


DRAWINGS = [drawing_png(seed) for seed in range(20)]


def fake_set(set_name: str, chars_per_alphabet: list[int], first_id: int = 1) -> dict[str, bytes]:
    """Members ``set/AlphabetK/characterNN/NNNN_DD.png`` -> PNG bytes, in the Omniglot layout."""
    members, char_id = {}, first_id
    for a, n_chars in enumerate(chars_per_alphabet):
        for c in range(1, n_chars + 1):
            for d in range(1, 21):
                name = f"{set_name}/Alphabet_{a:02d}/character{c:02d}/{char_id:04d}_{d:02d}.png"
                members[name] = DRAWINGS[(char_id + d) % 20]
            char_id += 1
    return members


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def small_source() -> dict[str, dict[str, bytes]]:
    return {
        "images_background": fake_set("images_background", [3, 2]),
        "images_evaluation": fake_set("images_evaluation", [2], first_id=6),
    }


def write_zips(directory: Path, sets: dict[str, dict[str, bytes]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for set_name, members in sets.items():
        with zipfile.ZipFile(directory / f"{set_name}.zip", "w", zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    return directory


def write_folders(directory: Path, sets: dict[str, dict[str, bytes]]) -> Path:
    for members in sets.values():
        for name, data in members.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def full_fake() -> dict[str, dict[str, bytes]]:
    """A fake source with the full counts (30 + 20 alphabets, 964 + 659 characters)."""
    return {
        "images_background": fake_set("images_background", spread(964, 30)),
        "images_evaluation": fake_set("images_evaluation", spread(659, 20), first_id=965),
    }


def run_make_data(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "make_data.py", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_error(result: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    """Non-zero exit, exactly one ``error:`` line, no traceback, nothing written to ``out``."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# ---------------------------------------------------------------------------------------------
# Real data (packs the full dataset once per session unless MAML_DATA_DIR is set)


@pytest.mark.slow
def test_real_arrays_shapes_and_ink_convention(omniglot_dir: Path) -> None:
    for split, n in zip(omniglot.SPLITS, omniglot.DEFAULT_SPLIT):
        array = omniglot.load_split(omniglot_dir, split)
        assert array.shape == (n, *SHAPE_TAIL) and array.dtype == np.float32
        assert array.min() >= 0.0 and array.max() <= 1.0
        assert array.max() == 1.0  # solid ink
        assert array.mean() < 0.2  # mostly background = 0
        assert array[..., 0, 0].mean() < 0.01  # corners are background


@pytest.mark.slow
def test_real_manifest_splits_cover_all_characters(omniglot_dir: Path) -> None:
    manifest = json.loads((omniglot_dir / omniglot.MANIFEST_NAME).read_text())
    assert manifest["split_seed"] == omniglot.SPLIT_SEED
    assert "ink (stroke) = 1.0" in manifest["pixel_convention"]
    keys = {
        split: [(r["set"], r["alphabet"], r["character"]) for r in rows]
        for split, rows in manifest["splits"].items()
    }
    assert [len(keys[s]) for s in omniglot.SPLITS] == list(omniglot.DEFAULT_SPLIT)
    everything = [key for split in omniglot.SPLITS for key in keys[split]]
    assert len(set(everything)) == len(everything) == 1623
    ids = {r["id"] for rows in manifest["splits"].values() for r in rows}
    assert ids == {f"{i:04d}" for i in range(1, 1624)}
    assert len({alphabet for _, alphabet, _ in everything}) == 50
    for split in omniglot.SPLITS:
        rows = manifest["splits"][split]
        assert [r["row"] for r in rows] == list(range(len(rows)))
        data = (omniglot_dir / omniglot.npy_name(split)).read_bytes()
        assert manifest["files"][split]["sha256"] == hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256((omniglot_dir / omniglot.MANIFEST_NAME).read_bytes()).hexdigest()
    assert omniglot.manifest_sha256(omniglot_dir) == digest


@pytest.mark.slow
def test_cli_original_split(repo_root: Path, omniglot_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_make_data(
        repo_root, "--source", str(omniglot_source), "--out", str(out), "--split", "1100,100,423"
    )
    assert result.returncode == 0, result.stderr
    assert "1623 character folders" in result.stdout and "Done in" in result.stdout
    for split, n in zip(omniglot.SPLITS, (1100, 100, 423)):
        assert omniglot.load_split(out, split).shape == (n, *SHAPE_TAIL)
    manifest = json.loads((out / omniglot.MANIFEST_NAME).read_text())
    assert manifest["split_counts"] == {"train": 1100, "val": 100, "test": 423}


# ---------------------------------------------------------------------------------------------
# Determinism and small-source behaviour (fast)


def fake_refs(n: int) -> list[CharacterRef]:
    return [
        CharacterRef("images_background", "A", f"character{i:04d}", f"{i:04d}", ())
        for i in range(n)
    ]


def test_split_is_deterministic_and_seeded() -> None:
    chars = fake_refs(1623)
    first = omniglot.split_characters(chars, (973, 325, 325), seed=0)
    assert first == omniglot.split_characters(chars, (973, 325, 325), seed=0)
    assert first != omniglot.split_characters(chars, (973, 325, 325), seed=1)
    assert [len(first[s]) for s in omniglot.SPLITS] == [973, 325, 325]
    assert sorted(i for s in omniglot.SPLITS for i in first[s]) == list(range(1623))
    assert all(rows == sorted(rows) for rows in first.values())


def test_pack_twice_gives_identical_bytes(tmp_path: Path) -> None:
    source = omniglot.find_source(write_zips(tmp_path / "src", small_source()))
    outputs = []
    for k in range(2):
        chars = omniglot.list_characters(source)
        images = omniglot.load_images(source, chars)
        out = tmp_path / f"out{k}"
        summary = omniglot.write_pack(images, chars, out, (4, 2, 1), seed=3)
        assert summary["manifest_sha256"] == omniglot.manifest_sha256(out)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 4
    assert omniglot.load_split(tmp_path / "out0", "train").shape == (4, *SHAPE_TAIL)


def test_folders_zips_and_workers_agree(tmp_path: Path) -> None:
    zips = omniglot.find_source(write_zips(tmp_path / "zips", small_source()))
    folders = omniglot.find_source(write_folders(tmp_path / "dirs", small_source()))
    chars = omniglot.list_characters(zips)
    assert [c.folder for c in chars] == [c.folder for c in omniglot.list_characters(folders)]
    assert [c.id for c in chars] == [f"{i:04d}" for i in range(1, 8)]
    assert chars[0].members[0].endswith("character01/0001_01.png")
    serial = omniglot.load_images(zips, chars)
    np.testing.assert_array_equal(serial, omniglot.load_images(folders, chars))
    np.testing.assert_array_equal(serial, omniglot.load_images(zips, chars, workers=2))


def test_decode_drawing_ink_is_one() -> None:
    image = Image.new("L", (105, 105), 255)
    ImageDraw.Draw(image).rectangle([30, 30, 74, 74], fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    small = omniglot.decode_drawing(buffer.getvalue())
    assert small.shape == (28, 28) and small.dtype == np.float32
    assert small[14, 14] == 1.0 and small[0, 0] == 0.0


@pytest.mark.parametrize("text", ["973,325", "1000,325,325", "a,b,c", "1623,-1,1", "", "1,2,3,4"])
def test_parse_split_rejects(text: str) -> None:
    with pytest.raises(UserError, match="--split"):
        omniglot.parse_split(text)


def test_parse_split_accepts_original_counts() -> None:
    assert omniglot.parse_split("1100,100,423") == (1100, 100, 423)


# ---------------------------------------------------------------------------------------------
# Loading packed data


def test_load_split_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"make_data\.py"):
        omniglot.load_split(tmp_path, "train")
    np.save(tmp_path / "omniglot_train.npy", np.zeros((2, 20, 28, 28), np.float32))
    with pytest.raises(UserError, match="expected"):
        omniglot.load_split(tmp_path, "train")
    np.save(tmp_path / "omniglot_val.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"not a valid \.npy"):
        omniglot.load_split(tmp_path, "val")
    assert omniglot.manifest_sha256(tmp_path) is None


def test_load_split_rejects_file_not_matching_manifest(tmp_path: Path) -> None:
    source = omniglot.find_source(write_zips(tmp_path / "src", small_source()))
    chars = omniglot.list_characters(source)
    out = tmp_path / "out"
    omniglot.write_pack(omniglot.load_images(source, chars), chars, out, (5, 1, 1))
    np.save(out / "omniglot_val.npy", np.zeros((1, *SHAPE_TAIL), np.float32))
    with pytest.raises(UserError, match="does not match"):
        omniglot.load_split(out, "val")


def test_download_failure_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"could not download .*no network") as caught:
        omniglot.download(tmp_path / "omniglot")
    assert "\n" not in str(caught.value)
    assert not any((tmp_path / "omniglot").iterdir())


# ---------------------------------------------------------------------------------------------
# Bad inputs through the command line: one error line, nothing written


def test_cli_missing_source(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(tmp_path / "nope"), "--out", str(out))
    assert_one_error(result, out, "does not exist")


def test_cli_missing_zip(repo_root: Path, tmp_path: Path) -> None:
    src = write_zips(tmp_path / "src", {"images_background": small_source()["images_background"]})
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, "images_evaluation.zip")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_cli_not_a_zip(repo_root: Path, tmp_path: Path, kind: str) -> None:
    src = write_zips(tmp_path / "src", small_source())
    archive = src / "images_background.zip"
    data = archive.read_bytes()
    archive.write_bytes(b"this is not a zip file" if kind == "garbage" else data[: len(data) // 2])
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, "images_background.zip", "zip")


def test_cli_too_few_alphabets(repo_root: Path, tmp_path: Path) -> None:
    src = write_zips(tmp_path / "src", small_source())
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, "found 2 alphabets", "expected 30")


@pytest.mark.parametrize(
    ("rename", "message"),
    [
        (lambda name: name.split("/", 1)[1], "unexpected file"),  # no top-level set folder
        (lambda name: name.replace("character01", "letter01"), "unexpected file"),
        (lambda name: None if name.endswith("0001_20.png") else name, "19 drawings"),
        (lambda name: name.replace("0002_05.png", "0002_21.png"), "NNNN_01.png..NNNN_20.png"),
    ],
)
def test_cli_wrong_layout(repo_root: Path, tmp_path: Path, rename, message: str) -> None:
    sets = small_source()
    background = {}
    for name, data in sets["images_background"].items():
        if rename(name) is not None:
            background[rename(name)] = data
    sets["images_background"] = background
    src = write_zips(tmp_path / "src", sets)
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, message)


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_cli_corrupt_png(repo_root: Path, tmp_path: Path, full_fake, corruption: str) -> None:
    sets = {name: dict(members) for name, members in full_fake.items()}
    first = next(iter(sets["images_background"]))
    good = sets["images_background"][first]
    sets["images_background"][first] = b"\x89PNG garbage" if corruption == "garbage" else good[:60]
    src = write_zips(tmp_path / "src", sets)
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, "cannot decode", first)


@pytest.mark.parametrize("split", ["973,325,300", "a,b,c", "1623,-1,1", "973,650"])
def test_cli_bad_split(repo_root: Path, tmp_path: Path, split: str) -> None:
    out = tmp_path / "out"
    result = run_make_data(
        repo_root, "--source", str(tmp_path), "--out", str(out), "--split", split
    )
    assert_one_error(result, out, "split")
