"""Omniglot packer: real-data checks (slow), determinism, and one-line errors for bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metalearn.data import omniglot, packing
from metalearn.data.omniglot import CharacterRef
from metalearn.errors import UserError

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
    """Exit code 2, exactly one ``error:`` line, no traceback, nothing written to ``out``."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.is_dir() or not any(out.iterdir()), list(out.iterdir())


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
    with pytest.raises(UserError, match=r"\(1,\) object, expected"):
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


def patch_central_directory(
    archive: Path, *, flag_bits: int = 0, method: int | None = None
) -> None:
    """Mark every member of a zip as encrypted and/or compressed with ``method``, as its central
    directory says (what zipfile trusts), without being able to really write either."""
    data = bytearray(archive.read_bytes())
    start = data.find(b"PK\x01\x02")
    while start != -1:
        data[start + 8] |= flag_bits
        if method is not None:
            data[start + 10 : start + 12] = method.to_bytes(2, "little")
        start = data.find(b"PK\x01\x02", start + 4)
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"flag_bits": 0x1}, ("password-protected",)),
        ({"method": 9}, ("compression method 9", "extract")),  # Deflate64
    ],
    ids=["encrypted", "deflate64"],
)
def test_cli_unreadable_zip_member(repo_root: Path, tmp_path: Path, patch, words) -> None:
    src = write_zips(tmp_path / "src", small_source())
    patch_central_directory(src / "images_evaluation.zip", **patch)
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--source", str(src), "--out", str(out))
    assert_one_error(result, out, "images_evaluation.zip", *words)


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_cli_out_is_a_file(repo_root: Path, tmp_path: Path, under: bool) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "sub" if under else blocker
    result = run_make_data(repo_root, "--source", str(tmp_path), "--out", str(out))
    assert_one_error(result, tmp_path / "absent", "is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_out_without_permission_is_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores permissions, so the refusal of access(2) is simulated."""
    monkeypatch.setattr(omniglot.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="no permission to write in"):
        omniglot.pack(tmp_path / "no-source", tmp_path / "out")


@pytest.mark.parametrize("workers", ["0", "1000"])
def test_cli_workers_out_of_range(repo_root: Path, tmp_path: Path, workers: str) -> None:
    out = tmp_path / "out"
    result = run_make_data(repo_root, "--workers", workers, "--out", str(out))
    assert_one_error(result, out, "--workers must be between 1 and")


def test_cli_preview_path_is_a_folder(repo_root: Path, tmp_path: Path) -> None:
    result = run_make_data(repo_root, "--preview", "--out", str(tmp_path), "--preview_path", ".")
    assert_one_error(result, tmp_path, "--preview_path . is a folder")


def packed_tiny(out: Path, image_seed: int) -> dict[str, np.ndarray]:
    """Write a 7-character set of random images into ``out``; return its arrays by split."""
    images = np.random.default_rng(image_seed).random((7, *SHAPE_TAIL), dtype=np.float32)
    omniglot.write_pack(images, fake_refs(7), out, (4, 2, 1))
    return {split: omniglot.load_split(out, split) for split in omniglot.SPLITS}


def test_full_disk_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    old = packed_tiny(out, 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = packing.atomic_write

    def write_until_full(path, write):
        if path.name == omniglot.npy_name("test"):  # the third file of the new set
            raise OSError(28, "No space left on device")
        real_write(path, write)

    monkeypatch.setattr(packing, "atomic_write", write_until_full)
    with pytest.raises(UserError, match=r"cannot write the packed data .*No space left"):
        packed_tiny(out, 2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left
    for split, array in old.items():
        np.testing.assert_array_equal(omniglot.load_split(out, split), array)


# Writes a 7-character set (images from seed argv[2]) into argv[1], SIGKILLing itself just before
# the argv[3]-th rename (0 = the first); prints how many renames a complete write made.
_KILLED_WRITER = """
import os, signal, sys
import numpy as np
sys.path[:0] = [{tests!r}, {repo!r}]
from test_make_data import fake_refs, SHAPE_TAIL
from metalearn.data import omniglot

out, image_seed, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
images = np.random.default_rng(image_seed).random((7, *SHAPE_TAIL), dtype=np.float32)
real_replace, renames = os.replace, [0]

def replace(src, dst):
    if renames[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    renames[0] += 1
    real_replace(src, dst)

os.replace = replace
omniglot.write_pack(images, fake_refs(7), out, (4, 2, 1))
print(renames[0])
"""


@pytest.mark.slow
def test_killed_pack_leaves_old_or_new_set(repo_root: Path, tmp_path: Path) -> None:
    """SIGKILL before each rename of a pack: readers then see the old set or the new one, whole,
    and packing again completes with nothing left behind."""
    script = tmp_path / "killed_writer.py"
    script.write_text(_KILLED_WRITER.format(tests=str(Path(__file__).parent), repo=str(repo_root)))

    def writer(out: Path, image_seed: int, kill_at: int) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(script), str(out), str(image_seed), str(kill_at)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    sets = {}
    for name, image_seed in (("old", 1), ("new", 2)):
        sets[name] = packed_tiny(tmp_path / name, image_seed)
        sets[name]["manifest"] = omniglot.manifest_sha256(tmp_path / name)
    complete = writer(tmp_path / "count", 2, -1)
    assert complete.returncode == 0, complete.stderr
    renames = int(complete.stdout)
    seen = []
    for kill_at in range(renames):
        out = tmp_path / f"killed{kill_at}"
        shutil.copytree(tmp_path / "old", out)
        result = writer(out, 2, kill_at)
        assert result.returncode == -signal.SIGKILL, result.stderr
        arrays = {split: omniglot.load_split(out, split) for split in omniglot.SPLITS}
        arrays["manifest"] = omniglot.manifest_sha256(out)
        matches = [
            name
            for name, expected in sets.items()
            if expected["manifest"] == arrays["manifest"]
            and all(np.array_equal(expected[s], arrays[s]) for s in omniglot.SPLITS)
        ]
        assert len(matches) == 1, f"killed before rename {kill_at}: a mix of old and new files"
        seen.append(matches[0])
        packed_tiny(out, 2)  # packing again completes
        assert sorted(p.name for p in out.iterdir()) == sorted(
            p.name for p in (tmp_path / "new").iterdir()
        )
        assert omniglot.manifest_sha256(out) == sets["new"]["manifest"]
    assert "old" in seen and "new" in seen, seen  # kills landed on both sides of the commit
