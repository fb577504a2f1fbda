"""Your own dataset: image folders -> validated packed splits -> training, evaluation, playground.

The data is real and made here: letters rendered with Pillow from the installed TrueType fonts
(Debian's fonts-dejavu-core and fonts-liberation), one class per letter, every image in a random
font, colour, offset and rotation, saved in a mix of formats and modes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FONTS, assert_one_line_error, make_glyph_folder, needs_fonts, run_script
from PIL import Image, ImageDraw

from metalearn.data import folders, images, omniglot
from metalearn.data.tasks import ClassImages, ImageTasks
from metalearn.errors import UserError

# ---------------------------------------------------------------------------------------------
# Preprocessing


def _encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def test_exif_rotation_is_honoured() -> None:
    """A 60x40 photo stored sideways with orientation 6 comes out as the upright 60x40 one."""
    upright = Image.new("RGB", (60, 40), "white")
    ImageDraw.Draw(upright).rectangle((0, 0, 29, 39), fill=(255, 0, 0))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    seen = images.preprocess(_encoded(stored, format="JPEG", quality=98, exif=exif), 20, 3)
    expected = images.preprocess(_encoded(upright, format="PNG"), 20, 3)
    assert seen.shape == (3, 20, 20)
    assert np.abs(seen.astype(int) - expected.astype(int)).max() < 40
    assert seen[0, :, :8].mean() > 200 and seen[1, :, :8].mean() < 60  # red on the left
    assert seen[1, :, 12:].mean() > 200  # white on the right


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_the_requested_channels(mode: str) -> None:
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    base = Image.fromarray(gray).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    data = _encoded(image, format="JPEG" if mode == "CMYK" else "PNG")
    for channels in (1, 3):
        out = images.preprocess(data, 16, channels)
        assert out.shape == (channels, 16, 16) and out.dtype == np.uint8
        if mode not in ("1", "P"):  # the others keep the ramp from black to white
            assert out[:, :, 0].mean() < 30 and out[:, :, -1].mean() > 225, mode


def test_transparency_is_white_and_crop_is_centred() -> None:
    clear = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    assert (images.preprocess(_encoded(clear, format="PNG"), 8, 3) == 255).all()
    wide = Image.new("L", (300, 100), 0)
    ImageDraw.Draw(wide).rectangle((70, 0, 229, 99), fill=255)  # white around the centre square
    assert (images.preprocess(_encoded(wide, format="PNG"), 10, 1) >= 250).all()  # not squashed


def test_playground_and_omniglot_use_the_same_function() -> None:
    """decode_ink (Omniglot packing and drawn queries) is 1 - preprocess / 255 exactly."""
    drawing = Image.new("L", (105, 105), 255)
    ImageDraw.Draw(drawing).line((10, 10, 90, 80), fill=0, width=6)
    data = _encoded(drawing, format="PNG")
    ink = omniglot.decode_ink(data)
    assert np.array_equal(ink, 1.0 - images.to_float(images.preprocess(data, 28, 1)[0]))


def test_broken_and_oversized_images_are_one_line_errors() -> None:
    with pytest.raises(UserError, match=r"cannot decode x\.png"):
        images.preprocess(b"not an image", 8, 3, name="x.png")
    with pytest.raises(images.ImageTooLarge, match="larger than 50x50"):
        images.preprocess(_encoded(Image.new("RGB", (60, 10)), format="PNG"), 8, 3, max_side=50)


# ---------------------------------------------------------------------------------------------
# Packing and validation


def _pack(source: Path, out: Path, *flags: str, name: str = "glyphs"):
    return run_script(
        "make_data.py", "--images", str(source), "--name", name, "--out", str(out), *flags
    )


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FONTS:
        pytest.skip("no TrueType fonts found (apt-get install fonts-dejavu-core fonts-liberation)")
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs") / "images")


@needs_fonts
def test_pack_writes_splits_manifest_and_rows(glyph_folder: Path, tmp_path: Path) -> None:
    result = _pack(glyph_folder, tmp_path, "--workers", "2", "--min_per_class", "5")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # every mode and format of the folder was read
    manifest = json.loads((tmp_path / "glyphs_manifest.json").read_text())
    counts = {s: manifest["files"][s]["classes"] for s in omniglot.SPLITS}
    assert counts == {"train": 18, "val": 6, "test": 6}  # 0.6/0.2/0.2 of 30
    for split in omniglot.SPLITS:
        classes = folders.load_split(tmp_path, "glyphs", split)
        assert classes.pixels.shape == (20 * counts[split], 3, 84, 84)
        assert classes.pixels.dtype == np.uint8 and list(classes.counts()) == [20] * counts[split]
        row = manifest["splits"][split][1]  # the second class: its rows are its files, in order
        path = glyph_folder / row["files"][3]
        expected = images.preprocess(path.read_bytes(), 84, 3)
        assert np.array_equal(classes.pixels[row["start"] + 3], expected)
    # The same set again from one process: identical files (decoding order does not matter).
    again = tmp_path / "again"
    assert _pack(glyph_folder, again, "--workers", "1", "--min_per_class", "5").returncode == 0
    assert (again / "glyphs_train.npy").read_bytes() == (tmp_path / "glyphs_train.npy").read_bytes()


@needs_fonts
def test_own_split_is_kept_and_preview_draws_rgb(glyph_folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "split"
    for split, letters in (("train", "ABCDEF"), ("val", "GHJ"), ("test", "KLMNP")):
        for letter in letters:
            (source / split).mkdir(parents=True, exist_ok=True)
            (source / split / letter).symlink_to(glyph_folder / letter)
    result = _pack(source, tmp_path / "out", "--size", "32", "--channels", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out/glyphs_manifest.json").read_text())
    assert [row["class"] for row in manifest["splits"]["val"]] == list("GHJ")
    assert manifest["files"]["test"]["shape"] == [100, 1, 32, 32]
    preview = run_script(
        "make_data.py", "--preview", "--name", "glyphs", "--out", str(tmp_path / "out")
    )
    assert preview.returncode == 0, preview.stderr
    assert Image.open(tmp_path / "out/task_preview.png").size[0] > 100


def _class(root: Path, name: str, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.mark.parametrize(
    ("build", "flags", "fragment"),
    [
        (lambda r: None, [], "no class folders"),
        (lambda r: _class(r, "a", 3) or (r / "a/0.png").rename(r / "0.png"), [], "directly in it"),
        (
            lambda r: [_class(r, c, 4) for c in "abc"] + [(r / "a" / "sub").mkdir()],
            [],
            "nested too deep",
        ),
        (lambda r: [_class(r / s, "x" + s, 4) for s in ("train", "test")], [], "no val/ folder"),
        (lambda r: [_class(r / "train", "x", 4), _class(r, "y", 4)], [], "mixes split folders"),
        (lambda r: [_class(r, c, 4) for c in "ab"], ["--min_per_class", "2"], "too few classes"),
        (
            lambda r: [_class(r, c, 4) for c in "abcd"] + [(r / "e").mkdir()],
            ["--min_per_class", "2", "--strict"],
            "1 class folders have no images and are left out: e (refused: --strict)",
        ),
        (
            lambda r: [_class(r, c, 4) for c in "abcd"] + [_class(r, "e", 1)],
            ["--min_per_class", "2", "--strict"],
            "1 classes have fewer than --min_per_class 2 usable images and are left out: e (1)",
        ),
        (
            lambda r: [_class(r, c, 4) for c in "abc"] + [(r / "a" / "x.jpg").write_text("no")],
            ["--min_per_class", "2", "--strict"],
            "1 files could not be decoded and are skipped: a/x.jpg (",
        ),
        (
            lambda r: [_class(r, c, 4) for c in "abc"] + [(r / "b" / "notes.txt").write_text("")],
            ["--min_per_class", "2", "--strict"],
            "1 files are not images",
        ),
        (
            lambda r: [_class(r, c, 4) for c in "abc"],
            ["--min_per_class", "2", "--split", "2,1,1"],
            "class counts must be three non-negative numbers summing to the 3 usable classes",
        ),
    ],
    ids=[
        "empty-class-only",
        "loose-files",
        "nested",
        "split-missing",
        "mixed",
        "too-few-classes",
        "empty-class-strict",
        "small-class-strict",
        "broken-strict",
        "not-image-strict",
        "bad-split",
    ],
)
def test_bad_folders_give_one_line_and_write_nothing(tmp_path, build, flags, fragment) -> None:
    root = tmp_path / "images"
    root.mkdir()
    build(root)
    out = tmp_path / "out"
    result = _pack(root, out, "--workers", "1", *flags)
    assert_one_line_error(result, fragment)
    assert not out.exists() or not any(out.iterdir())


def test_problems_are_skipped_with_a_warning_line(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for c in "abcd":
        _class(root, c, 4)
    _class(root, "small", 1)
    (root / "empty").mkdir()
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "notes.txt").write_text("not an image")
    result = _pack(root, tmp_path / "out", "--min_per_class", "2", "--split", "2,1,1")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4, result.stderr
    assert "1 files are not images" in warnings[0] and "b/notes.txt" in warnings[0]
    assert "1 class folders have no images and are left out: empty" in warnings[1]
    assert "1 files could not be decoded" in warnings[2] and "a/broken.png" in warnings[2]
    assert "fewer than --min_per_class 2 usable images and are left out: small (1)" in warnings[3]
    manifest = json.loads((tmp_path / "out/glyphs_manifest.json").read_text())
    assert manifest["skipped"]["undecodable"][0]["file"] == "a/broken.png"
    assert sum(manifest["files"][s]["classes"] for s in omniglot.SPLITS) == 4


def test_loading_checks_files_against_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for c in "abc":
        _class(root, c, 3)
    out = tmp_path / "out"
    assert _pack(root, out, "--min_per_class", "1", "--split", "1,1,1").returncode == 0
    with pytest.raises(UserError, match=r"not found; run `python make_data\.py --images"):
        folders.load_split(out, "other", "train")
    offsets = out / "glyphs_val_offsets.npy"
    np.save(offsets, np.array([0, 1, 3]))
    with pytest.raises(UserError, match=r"do not match glyphs_manifest\.json"):
        folders.load_split(out, "glyphs", "val")
    np.save(out / "glyphs_test.npy", np.zeros((3, 3, 84, 84), np.float32))
    with pytest.raises(UserError, match=r"expected \(N, 3, 84, 84\) uint8"):
        folders.load_split(out, "glyphs", "test")
    for bad in ("../x", "", "omniglot", "a b"):
        with pytest.raises(UserError, match="--name / --data"):
            folders.check_name(bad)


# ---------------------------------------------------------------------------------------------
# Sampling ragged classes and augmenting


def test_ragged_sampler_and_augmentations() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3 + 5 + 4, 3, 16, 16), dtype=np.uint8)
    classes = ClassImages(pixels, np.array([0, 3, 8, 12]))
    plain = ImageTasks(classes, 3, 1, 2)
    task = plain.sample(0, "train", 1, 0)
    assert task.x_support.dtype == np.float32 and task.x_support.shape == (3, 3, 16, 16)
    as_float = {
        tuple(np.round(image.ravel() * 255).astype(int)) for image in images.to_float(pixels)
    }
    assert all(tuple(np.round(x.ravel() * 255).astype(int)) in as_float for x in task.x_query)
    augmented = ImageTasks(classes, 3, 1, 2, "flip,crop,jitter").sample(0, "train", 1, 0)
    assert not np.array_equal(augmented.x_query, task.x_query)
    assert augmented.x_query.min() >= 0 and augmented.x_query.max() <= 1
    with pytest.raises(UserError, match="exceeds the 3 images of the smallest class of"):
        ImageTasks(classes, 3, 2, 2)
    with pytest.raises(UserError, match="n_way=4 is larger than the 3 classes of the val split"):
        ImageTasks(classes, 4, 1, 1, where="the val split")
    with pytest.raises(UserError, match="unknown augmentation 'blur'"):
        ImageTasks(classes, 3, 1, 1, "flip,blur")


# ---------------------------------------------------------------------------------------------
# Training and evaluating on a folder set

CHANCE = 1 / 5


@pytest.mark.slow
@needs_fonts
def test_maml_learns_held_out_glyph_classes(glyph_folder: Path, tmp_path: Path) -> None:
    """5-way 1-shot MAML on 18 letters beats chance clearly on 6 letters it never saw.

    Packed at 28x28 grayscale to stay short (the conv4 net); 200 meta-iterations took ~80 s on a
    shared 2-core machine and reached ~0.4 validation accuracy.
    """
    data, work = tmp_path / "data", tmp_path / "work"
    packed = _pack(glyph_folder, data, "--size", "28", "--channels", "1", "--workers", "2")
    assert packed.returncode == 0, packed.stderr
    flags = ["--data", "glyphs", "--data_dir", str(data), "--work_dir", str(work)]
    trained = run_script(
        "train.py",
        *flags,
        *("--k_query", "5", "--task_num", "4", "--glob_meta_lr", "0.003"),
        *("--glob_base_lr", "0.4", "--glob_update_step", "2", "--glob_update_step_test", "5"),
        *("--epochs", "200", "--val_every", "200", "--val_tasks", "20", "--log_every", "100"),
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((work / "glyphs_5w1s_maml_seed0/config.json").read_text())
    assert (config["dataset"], config["data"], config["net"]) == ("folder", "glyphs", "conv4")
    assert config["network"]["in_channels"] == 1 and config["data_manifest_sha256"]
    tested = run_script("evaluate.py", *flags, "--tasks", "100", timeout=600)
    assert tested.returncode == 0, tested.stderr[-2000:]
    results = json.loads((work / "glyphs_5w1s_maml_seed0/test_results.json").read_text())
    mean, ci95 = results["acc_mean"][-1], results["acc_ci95"][-1]
    assert mean - ci95 > CHANCE + 0.05, (mean, ci95)
    assert results["acc_mean"][0] < mean  # adaptation is what helps


@pytest.mark.slow
@needs_fonts
@pytest.mark.parametrize("algo", ["fomaml", "reptile"])
def test_every_algorithm_and_the_pool_net_run_on_rgb_folders(
    glyph_folder: Path, tmp_path: Path, algo: str
) -> None:
    """84x84 RGB with the MiniImagenet net (the default for RGB) and natural-image augmentation."""
    data, work = tmp_path / "data", tmp_path / "work"
    assert _pack(glyph_folder, data, "--workers", "2").returncode == 0
    flags = ["--data", "glyphs", "--data_dir", str(data), "--work_dir", str(work)]
    trained = run_script(
        "train.py",
        *flags,
        *("--algo", algo, "--k_query", "1", "--task_num", "1", "--glob_update_step", "1"),
        *("--glob_update_step_test", "1", "--epochs", "2", "--val_every", "2", "--val_tasks", "2"),
        *("--augment", "flip,crop,jitter"),
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = work / f"glyphs_5w1s_{algo}_seed0"
    config = json.loads((run / "config.json").read_text())
    assert config["net"] == "pool4" and config["network"]["in_channels"] == 3
    assert config["augment"] == "flip,crop,jitter"
    tested = run_script("evaluate.py", "--ckpt", str(run), "--data_dir", str(data), "--tasks", "2")
    assert tested.returncode == 0, tested.stderr[-2000:]


@needs_fonts
def test_n_way_above_a_split_is_refused_when_training_starts(
    glyph_folder: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    assert _pack(glyph_folder, data, "--size", "16", "--channels", "1").returncode == 0
    result = run_script(
        "train.py",
        *("--data", "glyphs", "--data_dir", str(data), "--work_dir", str(tmp_path / "w")),
        *("--n_way", "10", "--k_query", "2", "--epochs", "1"),
    )
    assert_one_line_error(result, "n_way=10 is larger than the 6 classes of the val split")
    result = run_script("train.py", "--dataset", "folder", "--data_dir", str(data))
    assert_one_line_error(result, "--dataset folder needs --data NAME")
