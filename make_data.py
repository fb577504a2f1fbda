"""Pack Omniglot into omniglot_{train,val,test}.npy + omniglot_manifest.json.

See metalearn/omniglot.py for the layout, split and pixel convention.

python make_data.py                          # data/omniglot (downloaded if empty) -> ./
python make_data.py --source DIR --out DIR --split 1100,100,423 --seed 0
python make_data.py --preview --out DIR --n_way 5 --k_spt 1 --k_query 5   # picture of one task
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metalearn import omniglot
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
        default=",".join(map(str, omniglot.DEFAULT_SPLIT)),
        help="train,val,test character counts summing to 1623 (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=omniglot.SPLIT_SEED,
        help="seed of the character split, recorded in the manifest (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes decoding images, at most 2 per CPU; 1 took ~7 s, 2 gave no gain on a busy "
        "2-core machine (default: %(default)s)",
    )
    preview = parser.add_argument_group("task preview (reads the packed omniglot_train.npy)")
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


def preview(out: Path, n_way: int, k_spt: int, k_query: int, path: Path | None = None) -> Path:
    """Draw the first training task (seed 0, iteration 1) of this shape; return the PNG path."""
    from metalearn import plots  # matplotlib only for the preview
    from metalearn.tasks import ImageTasks

    for flag, value in (("n_way", n_way), ("k_spt", k_spt), ("k_query", k_query)):
        if value <= 0:
            raise UserError(f"--{flag} must be a positive integer, got {value}")
    path = path if path is not None else out / "task_preview.png"
    if path.is_dir():
        raise UserError(f"--preview_path {path} is a folder; give the name of a .png file")
    omniglot.check_writable_folder(path.parent, "--preview_path")
    sampler = ImageTasks(omniglot.load_split(out, "train"), n_way, k_spt, k_query)
    task = sampler.sample(0, "train", 1, 0)
    return plots.task_preview(
        path,
        task.x_support,
        task.y_support,
        task.x_query,
        task.y_query,
        title=f"{n_way}-way {k_spt}-shot task, {k_query} query per class\n"
        "support (blue) and query (orange)",
    )


def main(argv: list[str] | None = None) -> None:
    """Check the flags, fetch the source if needed, pack, and print what was written."""
    args = parse_args(argv)
    if args.preview:
        path = preview(args.out, args.n_way, args.k_spt, args.k_query, args.preview_path)
        print(f"task preview written to {path}")
        return
    counts = omniglot.parse_split(args.split)
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
