"""Pack Omniglot, or a folder of your own images, into validated train/val/test splits.

See metalearn/data/omniglot.py (Omniglot) and metalearn/data/folders.py (your images) for layouts, splits
and pixel conventions, metalearn/data/images.py for the one image preprocessing.

python make_data.py                          # data/omniglot (downloaded if empty) -> ./
python make_data.py --source DIR --out DIR --split 1100,100,423 --seed 0
python make_data.py --preview --out DIR --n_way 5 --k_spt 1 --k_query 5   # picture of one task
python make_data.py --images DIR --name NAME --size 84 --channels 3 --split 0.6,0.2,0.2 --out DIR
python make_data.py --preview --name NAME --out DIR                        # one task of NAME
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from metalearn.data import folders, omniglot
from metalearn.errors import UserError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; values are checked by the library so errors stay one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="folder with images_background.zip and images_evaluation.zip (or the extracted "
        f"folders); default {omniglot.DEFAULT_SOURCE}, downloaded there if missing",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    parser.add_argument(
        "--split",
        default=None,
        help="Omniglot: train,val,test character counts summing to 1623 (default: "
        f"{','.join(map(str, omniglot.DEFAULT_SPLIT))}); --images: fractions summing to 1 or "
        f"class counts (default: {folders.DEFAULT_SPLIT}; not with DIR/{{train,val,test}})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=omniglot.SPLIT_SEED,
        help="seed of the character (or class) split, recorded in the manifest "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes decoding images, at most 2 per CPU; Omniglot: 1 took ~7 s, 2 gave no gain "
        "on a busy 2-core machine (default 1); --images: default one per CPU",
    )
    own = parser.add_argument_group(
        "your own images (DIR/<class>/<image> or DIR/{train,val,test}/<class>/<image>)"
    )
    own.add_argument(
        "--images", type=Path, help="folder of class folders to pack instead of Omniglot"
    )
    own.add_argument(
        "--name", help="name of the set: files NAME_*.npy, train.py --data NAME (and --preview)"
    )
    own.add_argument(
        "--size",
        type=int,
        default=folders.DEFAULT_SIZE,
        help="side of the square images, centre-cropped and resized (default: %(default)s)",
    )
    own.add_argument(
        "--channels",
        type=int,
        default=folders.DEFAULT_CHANNELS,
        help="3 (RGB) or 1 (grayscale) (default: %(default)s)",
    )
    own.add_argument(
        "--min_per_class",
        type=int,
        default=folders.DEFAULT_MIN_PER_CLASS,
        help="classes with fewer usable images are left out, named (default: %(default)s)",
    )
    own.add_argument(
        "--strict",
        action="store_true",
        help="refuse (instead of skipping with a warning) non-images, unreadable files and "
        "small classes",
    )
    preview = parser.add_argument_group(
        "task preview (reads the packed omniglot_train.npy, or NAME_train.npy with --name)"
    )
    preview.add_argument(
        "--preview",
        action="store_true",
        help="instead of packing, draw one sampled N-way K-shot training task from --out",
    )
    preview.add_argument(
        "--preview_path",
        type=Path,
        default=None,
        help="PNG to write (default: <out>/task_preview.png)",
    )
    preview.add_argument("--n_way", type=int, default=5, help="classes (default: %(default)s)")
    preview.add_argument(
        "--k_spt", type=int, default=1, help="support images per class (default: %(default)s)"
    )
    preview.add_argument(
        "--k_query", type=int, default=15, help="query images per class (default: %(default)s)"
    )
    return parser.parse_args(argv)


def preview(
    out: Path,
    n_way: int,
    k_spt: int,
    k_query: int,
    path: Path | None = None,
    name: str | None = None,
) -> Path:
    """Draw the first training task (seed 0, iteration 1) of this shape; return the PNG path.

    ``name`` previews that image-folder set instead of Omniglot.
    """
    from metalearn.data.tasks import ImageTasks
    from metalearn.runs import plots  # matplotlib only for the preview

    for flag, value in (("n_way", n_way), ("k_spt", k_spt), ("k_query", k_query)):
        if value <= 0:
            raise UserError(f"--{flag} must be a positive integer, got {value}")
    path = path if path is not None else out / "task_preview.png"
    if path.is_dir():
        raise UserError(f"--preview_path {path} is a folder; give the name of a .png file")
    omniglot.check_writable_folder(path.parent, "--preview_path")
    if name is None:
        images = omniglot.load_split(out, "train")
    else:
        images = folders.load_split(out, name, "train")
    sampler = ImageTasks(images, n_way, k_spt, k_query, where="the train split")
    task = sampler.sample(0, "train", 1, 0)
    return plots.task_preview(
        path,
        task.x_support,
        task.y_support,
        task.x_query,
        task.y_query,
        title=f"{name or 'Omniglot'}: {n_way}-way {k_spt}-shot task, {k_query} query per class\n"
        "support (blue) and query (orange)",
        ink=name is None,
    )


def pack_folder(args: argparse.Namespace) -> None:
    """make_data.py --images DIR --name NAME: validate, decode, pack, print what was written."""
    if not args.name:
        raise UserError("--images needs --name NAME (the set's name for train.py --data NAME)")
    if args.source is not None:
        raise UserError("--images and --source are two different inputs; give one")
    options = folders.PackOptions(
        size=args.size,
        channels=args.channels,
        split=args.split,
        min_per_class=args.min_per_class,
        strict=args.strict,
        seed=args.seed,
        workers=min(os.cpu_count() or 1, 8) if args.workers is None else args.workers,
    )
    warn = partial(print, file=sys.stderr)
    summary = folders.pack(args.images, args.name, args.out, options, log=print, warn=warn)
    for split, info in summary["files"].items():
        print(
            f"{split:>5}: {info['classes']:4d} classes, {info['shape'][0]:6d} images -> "
            f"{args.out / info['file']} {tuple(info['shape'])} uint8"
        )
    manifest = args.out / folders.manifest_name(args.name)
    print(f"manifest: {manifest} sha256 {summary['manifest_sha256']}")
    print(f"Done in {summary['seconds']:.1f} s; train with: python train.py --data {args.name}")


def main(argv: list[str] | None = None) -> None:
    """Check the flags, fetch the source if needed, pack, and print what was written."""
    args = parse_args(argv)
    if args.preview:
        path = preview(args.out, args.n_way, args.k_spt, args.k_query, args.preview_path, args.name)
        print(f"task preview written to {path}")
        return
    if args.images is not None:
        pack_folder(args)
        return
    if args.name is not None:
        raise UserError("--name names a set packed from --images DIR (or previewed with --preview)")
    counts = omniglot.parse_split(args.split or ",".join(map(str, omniglot.DEFAULT_SPLIT)))
    args.workers = 1 if args.workers is None else args.workers
    omniglot.check_seed(args.seed)
    omniglot.check_workers(args.workers)
    omniglot.check_writable_folder(args.out)  # before a download or minutes of decoding
    source = args.source
    if source is None:
        source = omniglot.DEFAULT_SOURCE
        missing = omniglot.missing_sets(source)
        if missing:
            print(f"Downloading {', '.join(missing)} into {source}")
            omniglot.download(source, missing)
    summary = omniglot.pack(source, args.out, counts, args.seed, args.workers, log=print)
    for split, info in summary["files"].items():
        print(
            f"{split:>5}: {info['shape'][0]:4d} characters -> {args.out / info['file']} "
            f"{tuple(info['shape'])} {info['dtype']}"
        )
    print(f"manifest: {args.out / omniglot.MANIFEST_NAME} sha256 {summary['manifest_sha256']}")
    print(f"Done in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    run_cli(main)
