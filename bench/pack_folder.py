"""How fast `make_data.py --images` packs a folder of realistic photos, and the miniImageNet estimate.

Makes a synthetic folder (default 20 classes x 600 JPEGs of 500x375, the typical ImageNet photo
size; smooth random colour fields, so the JPEGs are of realistic size), then packs it at 84x84 RGB
with each --workers count and prints images per second and the time this rate gives for
miniImageNet's 100 x 600 images.

python bench/pack_folder.py                       # 12,000 JPEGs, workers 1 and 2
python bench/pack_folder.py --classes 5 --per_class 100 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MINI_IMAGENET = 100 * 600


def make_photos(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """``root/classNN/NNNN.jpg``: 500x375 JPEGs (quality 90) of smooth random colour fields."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            field = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 13, (375, 500, 3))
            pixels = np.clip(np.asarray(field, np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per_class", type=int, default=600)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        started = time.perf_counter()
        make_photos(root, args.classes, args.per_class)
        count = args.classes * args.per_class
        size = sum(p.stat().st_size for p in root.rglob("*.jpg")) / count / 1024
        print(
            f"made {count} JPEGs 500x375 (mean {size:.0f} KiB) in {time.perf_counter() - started:.0f} s"
        )
        for workers in args.workers:
            command = [
                sys.executable,
                str(REPO / "make_data.py"),
                "--images",
                str(root),
                "--name",
                "bench",
                "--out",
                str(Path(tmp) / f"out{workers}"),
                "--workers",
                str(workers),
            ]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds = time.perf_counter() - started
            rate = count / seconds
            print(
                f"workers {workers}: {seconds:.1f} s, {rate:.0f} images/s "
                f"-> miniImageNet ({MINI_IMAGENET} images) ~{MINI_IMAGENET / rate / 60:.1f} min"
            )


if __name__ == "__main__":
    main()
