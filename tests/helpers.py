"""Helpers shared by the tests: running the entry points as a user would, tiny settings, and a
small real image dataset (letters rendered from Debian's fonts) for image-folder runs."""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

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


# The smallest Omniglot training that still exercises every part of the loop.
TINY = {
    "n_way": 5,
    "k_spt": 1,
    "k_query": 2,
    "task_num": 2,
    "glob_update_step": 1,
    "glob_update_step_test": 1,
    "val_tasks": 3,
    "val_every": 100,
    "log_every": 2,
    "glob_base_lr": 0.4,
}


def tiny(omniglot_dir: Path, work: Path, **overrides) -> dict:
    """TINY as the flags dict ``train()`` takes, with data and work folders."""
    return {**TINY, "data_dir": str(omniglot_dir), "work_dir": str(work), **overrides}


def as_flags(config: dict) -> list[str]:
    """The same settings as train.py's command line."""
    return [item for key, value in config.items() for item in (f"--{key}", str(value))]


SINE_RECORD = {
    "config": {"dataset": "sinusoid", "epochs": 5},
    "log": [],
    "validation": [],
    "iteration": 0,
    "elapsed_seconds": 0.0,
    "best_score": None,
    "best_iteration": None,
    "metric": "mse",
    "higher_is_better": False,
}
"""What ``RunRecords.start_training`` needs of a fresh sinusoid run (records tests)."""


def fresh_state(iteration: int = 0) -> SimpleNamespace:
    """A training state as the Recorder reads it, with nothing trained yet."""
    return SimpleNamespace(
        iteration=iteration, elapsed_seconds=0.0, best_score=None, best_iteration=None, log=[],
        validation=[],
    )  # fmt: skip


def start_script(script: str, *args: str) -> subprocess.Popen:
    """Start one of the project's scripts in the background, its output discarded (kill tests)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# -- a real image dataset: letters of the installed TrueType fonts, one class per letter -------
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
FONT_DIRS = [os.environ.get("FONT_DIR", ""), "/usr/share/fonts", "/usr/local/share/fonts"]
FONTS = sorted(
    {path for root in FONT_DIRS if root for path in glob.glob(f"{root}/**/*.ttf", recursive=True)}
)
FONTS = [f for f in FONTS if "dejavu" in f.lower() or "liberation" in f.lower()] or FONTS
needs_fonts = pytest.mark.skipif(
    not FONTS, reason="no TrueType fonts found (apt-get install fonts-dejavu-core fonts-liberation)"
)
# Every saved form a folder may hold: (suffix, how to save an RGB image).
FORMATS = ("png_rgba", "jpeg", "gif_palette", "png16", "jpeg_cmyk", "jpeg_exif", "webp", "bmp")


def glyph(letter: str, rng: np.random.Generator, size: int = 84) -> Image.Image:
    """One letter in a random font, colours, offset and rotation, as an RGB image."""
    font = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(size * 0.6))
    background = tuple(int(v) for v in rng.integers(140, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 110, 3))
    canvas = Image.new("RGB", (size, size), background)
    offset = rng.integers(-size // 10, size // 10 + 1, 2)
    ImageDraw.Draw(canvas).text(
        (size / 2 + offset[0], size / 2 + offset[1]), letter, fill=ink, font=font, anchor="mm"
    )
    return canvas.rotate(float(rng.uniform(-15, 15)), fillcolor=background)


def save_as(image: Image.Image, path_stem: Path, form: str) -> Path:
    """Save ``image`` so that :func:`images.preprocess` must undo the form to see it again."""
    if form == "png_rgba":
        path, rgba = path_stem.with_suffix(".png"), image.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(path)
    elif form == "jpeg":
        image.save(path := path_stem.with_suffix(".jpg"), quality=95)
    elif form == "gif_palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(
            path := path_stem.with_suffix(".gif")
        )
    elif form == "png16":  # 16-bit grayscale: Pillow alone would clip it to white
        gray = np.asarray(image.convert("L"), np.uint16) * 257
        Image.fromarray(gray).save(path := path_stem.with_suffix(".png"))
    elif form == "jpeg_cmyk":
        image.convert("CMYK").save(path := path_stem.with_suffix(".jpeg"), quality=95)
    elif form == "jpeg_exif":  # stored rotated; EXIF orientation 6 says "rotate 90° clockwise"
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(
            path := path_stem.with_suffix(".jpg"), quality=95, exif=exif
        )
    elif form == "webp":
        image.save(path := path_stem.with_suffix(".webp"), lossless=True)
    else:
        image.save(path := path_stem.with_suffix(".bmp"))
    return path


def make_glyph_folder(
    root: Path, classes: int = 30, per_class: int = 20, seed: int = 0, size: int = 84
) -> Path:
    """``root/<letter>/<i>.<ext>``: ``classes`` letters x ``per_class`` images, mixed forms."""
    rng = np.random.default_rng(seed)
    for letter in LETTERS[:classes]:
        (root / letter).mkdir(parents=True)
        for i in range(per_class):
            save_as(glyph(letter, rng, size), root / letter / f"{i:03d}", FORMATS[i % len(FORMATS)])
    return root


@contextlib.contextmanager
def wait_line_full(client):
    """Every slot of the service's wait line taken while the block runs (a request gets 503)."""
    slots = client.app.state.engine._slots
    taken = 0
    while slots.acquire(blocking=False):
        taken += 1
    try:
        yield
    finally:
        for _ in range(taken):
            slots.release()
