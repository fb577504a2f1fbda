"""examples/resnet12.py: the ResNet-12 network, Omniglot's zips as an image folder, meta-training
through metalearn.MAML on a packed folder set, the exactness audit, one-line errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers import REPO, assert_one_line_error, make_glyph_folder, needs_fonts, run_script
from PIL import Image

from examples.resnet12 import (
    FULL_WIDTHS,
    ResNet12,
    main,
    make_model,
    omniglot_to_folder,
)
from metalearn.data import folders
from metalearn.errors import UserError
from metalearn.nets.exact import unverified_layer_types

SCRIPT = "examples/resnet12.py"


def expected_parameters(channels: int, widths: tuple[int, ...], n_way: int) -> int:
    """Per block: three 3x3 convolutions and a 1x1 shortcut without bias, four batch norms
    (scale and shift each); then the linear head."""
    total, previous = 0, channels
    for width in widths:
        convolutions = 9 * previous * width + 2 * 9 * width * width + previous * width
        total += convolutions + 4 * 2 * width
        previous = width
    return total + widths[-1] * n_way + n_way


def trainable(model: paddle.nn.Layer) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def test_the_usual_resnet12_has_its_published_size_and_shapes() -> None:
    model = ResNet12(5, 3, FULL_WIDTHS)
    assert trainable(model) == expected_parameters(3, FULL_WIDTHS, 5) == 12_427_525  # "12.4M"
    x = paddle.rand([2, 3, 84, 84])
    features = model.blocks(x)
    assert features.shape == [2, 640, 5, 5]  # 84 -> 42 -> 21 -> 10 -> 5
    assert model(x).shape == [2, 5]


@pytest.mark.parametrize("widths", [(16, 32, 64, 128), (3, 5, 7, 11)])
def test_reduced_widths_on_omniglot_sized_images(widths) -> None:
    model = make_model((1, 28, 28), 5, widths)
    assert trainable(model) == expected_parameters(1, widths, 5)
    x = paddle.rand([4, 1, 28, 28])
    assert model.blocks(x).shape == [4, widths[-1], 1, 1]  # 28 -> 14 -> 7 -> 3 -> 1
    assert model(x).shape == [4, 5]
    assert unverified_layer_types(model) == []  # every layer's exact second order is verified


def test_images_too_small_for_four_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="16"):
        make_model((1, 12, 12), 5)
    with pytest.raises(ValueError, match="four positive widths"):
        ResNet12(5, 1, (8, 8, 8))


# -- Omniglot's zips -> DIR/<alphabet>_<character>/<drawing>.png ---------------------------------
def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_omniglot_zips(folder: Path, characters: dict[str, list[tuple[str, str]]]) -> Path:
    """Official-layout zips: ``{set: [(alphabet, character), ...]}``, 20 drawings each."""
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    for set_name, chars in characters.items():
        with zipfile.ZipFile(folder / f"{set_name}.zip", "w") as archive:
            for alphabet, character in chars:
                number += 1
                for drawer in range(1, 21):
                    member = f"{set_name}/{alphabet}/{character}/{number:04d}_{drawer:02d}.png"
                    archive.writestr(member, png(number * 20 + drawer))
    return folder


def small_omniglot(folder: Path) -> Path:
    return write_omniglot_zips(
        folder,
        {
            "images_background": [("Latin", "character01"), ("Latin", "character02")],
            "images_evaluation": [("Runic", "character01")],
        },
    )


def test_omniglot_zips_become_a_folder_that_make_data_packs(tmp_path: Path, capsys) -> None:
    zips = small_omniglot(tmp_path / "zips")
    images = tmp_path / "images"
    main(["--omniglot-zips", str(zips), "--folder", str(images)])
    assert capsys.readouterr().out == f"3 classes written to {images}\n"
    classes = sorted(p.name for p in images.iterdir())
    assert classes == ["Latin_character01", "Latin_character02", "Runic_character01"]
    drawings = sorted(p.name for p in (images / "Runic_character01").iterdir())
    assert drawings == [f"0003_{d:02d}.png" for d in range(1, 21)]
    assert (images / "Runic_character01" / "0003_07.png").read_bytes() == png(3 * 20 + 7)

    out = tmp_path / "packed"
    flags = ["--size", "28", "--channels", "1", "--split", "1,1,1", "--workers", "1"]
    packed = run_script("make_data.py", "--images", str(images), "--name", "tiny", "--out",
                        str(out), *flags)  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    manifest = folders.read_manifest(out, "tiny")
    names = sorted(manifest["splits"][s][0]["class"] for s in ("train", "val", "test"))
    assert names == classes
    test = folders.load_split(out, "tiny", "test")
    assert test.pixels.shape == (20, 1, 28, 28)


def test_a_folder_that_is_not_omniglot_or_not_empty_is_refused(tmp_path: Path) -> None:
    wrong = write_omniglot_zips(tmp_path / "wrong", {"images_background": [("Latin", "x")]})
    with pytest.raises(UserError, match="images_evaluation"):
        omniglot_to_folder(wrong, tmp_path / "out")
    zips = small_omniglot(tmp_path / "zips")
    (tmp_path / "busy" / "something").mkdir(parents=True)
    with pytest.raises(UserError, match="not empty"):
        omniglot_to_folder(zips, tmp_path / "busy")


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--data", "glyphs", "--widths", "8,8,8"], "--widths '8,8,8': expected four channel"),
        (["--data", "glyphs", "--steps", "0"], "--steps must be 1..20"),
        (["--data", "glyphs", "--inner-lr", "-1"], "--inner-lr must be a positive number"),
        ([], "--data NAME is missing"),
        (["--data", "absent"], "absent_manifest.json not found"),
        (["--omniglot-zips", "."], "--omniglot-zips needs --folder"),
    ],
)
def test_bad_flags_are_refused_before_any_work(flags, fragment, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(fragment)):
        main(["--data_dir", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_the_script_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    result = run_script(SCRIPT, "--data", "absent", "--data_dir", str(tmp_path))
    assert_one_line_error(result, "absent_manifest.json not found")


# -- the audit and a training run ------------------------------------------------------------------
@pytest.mark.slow
def test_the_audit_passes_at_tiny_width() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "metalearn.audit", "examples.resnet12:make_tiny_model",
         "--input-shape", "1,28,28", "--n-way", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr.lower()  # no unverified layer type
    assert result.stdout.splitlines()[-1].startswith("audit passed")
    checked = [line.split()[0] for line in result.stdout.splitlines() if line.endswith(" ok")]
    assert "blocks.0.shortcut.0.weight" in checked and "head.weight" in checked


@pytest.mark.slow
@needs_fonts
def test_meta_training_on_a_glyph_folder_lowers_the_query_loss(tmp_path: Path) -> None:
    make_glyph_folder(tmp_path / "images", classes=20, per_class=20, size=56)
    data = tmp_path / "data"
    packed = run_script("make_data.py", "--images", str(tmp_path / "images"), "--name", "glyphs",
                        "--size", "28", "--channels", "1", "--split", "10,5,5", "--out", str(data))  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    out = tmp_path / "run"
    flags = ["--widths", "4,8,8,16", "--iterations", "40", "--meta-batch", "2", "--k-query", "5",
             "--val-every", "20", "--val-tasks", "20", "--test-tasks", "50", "--steps-test", "2",
             "--meta-lr", "0.01"]  # fmt: skip
    result = run_script(SCRIPT, "--data", "glyphs", "--data_dir", str(data), "--out", str(out),
                        *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr  # no unverified layer type either
    results = json.loads((out / "results.json").read_text())
    losses = results["query_loss"]
    assert results["iterations"] == len(losses) == 40
    # The query loss after adaptation falls as meta-training goes (measured 1.98 -> 1.62).
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    test = results["test"]
    assert test["tasks"] == 50 and len(test["acc_mean"]) == 3  # before and after 2 steps
    assert test["acc_mean"][0] < test["acc_mean"][2]  # adapting helps on held-out letters
    assert results["best_iteration"] in (20, 40)
    assert (out / "best.npz").is_file()
