"""Your own few-shot dataset: folders of images, one per class -> validated, packed splits.

Input (``--images DIR``), either layout:

* ``DIR/<class>/<image>``: the classes are split into train/val/test by ``--split`` (fractions
  such as ``0.6,0.2,0.2`` or class counts such as ``60,20,20``), shuffled with
  ``numpy.random.default_rng(seed)`` exactly like Omniglot's characters;
* ``DIR/{train,val,test}/<class>/<image>``: the user's own split, kept.

Images are ``.png .jpg .jpeg .bmp .gif .webp`` files of any size and mode; every one goes through
:func:`metalearn.data.images.preprocess` (``--size``, ``--channels``). Hidden files (``.DS_Store``) are
ignored. Files of other types and files that cannot be decoded are listed and skipped (or refused
with ``--strict``); class folders with fewer than ``--min_per_class`` usable images are named and
left out (or refused with ``--strict``).

Output (in ``--out``), for a set called NAME:

* ``NAME_{train,val,test}.npy``: uint8 ``(images, channels, size, size)``, the classes one after
  another (rows sorted by class folder name, images by file name);
* ``NAME_{train,val,test}_offsets.npy``: int64 ``(classes + 1,)``, class ``c`` is rows
  ``offsets[c]:offsets[c + 1]`` (classes may have different numbers of images);
* ``NAME_manifest.json``: the preprocessing settings, which file is which row, what was skipped
  and why, and the sha256 of every array, which loading checks.

uint8 keeps a miniImageNet-sized set (100 classes x 600 images x 3 x 84 x 84) at 1.27 GB in
memory; tasks are converted to float32 (v / 255) as they are sampled. The set is written and
committed as a whole by :func:`metalearn.data.packing.replace_set`, as Omniglot is.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from metalearn.data import images, packing
from metalearn.data.omniglot import (
    SPLITS,
    check_seed,
    check_workers,
    check_writable_folder,
    split_characters,
)
from metalearn.data.tasks import ClassImages
from metalearn.errors import UserError

FORMAT_VERSION = 1
DEFAULT_SIZE = 84
DEFAULT_CHANNELS = 3
DEFAULT_SPLIT = "0.6,0.2,0.2"
DEFAULT_MIN_PER_CLASS = 20
SHOWN = 5
"""How many paths a message lists before '...'."""
MAX_CLASSES = 1_000_000
"""Upper bound of the classes a packed split may claim (its offsets array is checked against it)."""
CHUNK = 64
"""Images per decoding job: large enough to amortise the inter-process transfer."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED = ("omniglot", "sinusoid", "folder")


@dataclass(frozen=True)
class ClassFolder:
    """One class: its folder name, the user's split (or None) and its image files (relative)."""

    name: str
    split: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    """What :func:`list_folder` found: the classes and the files that are not images."""

    root: Path
    classes: tuple[ClassFolder, ...]
    not_images: tuple[str, ...]
    user_split: bool


def check_name(name: str) -> None:
    """A set's name becomes file names: letters, digits, ``_.-``, at most 64, not a dataset's."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.lower() in _RESERVED:
        raise UserError(
            f"--name / --data {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting "
            f"with a letter or digit, and not one of {', '.join(_RESERVED)}"
        )


def manifest_name(name: str) -> str:
    return f"{name}_manifest.json"


def array_names(name: str, split: str) -> tuple[str, str]:
    """File names of a split's images and class offsets, e.g. ``fonts_train.npy``."""
    return f"{name}_{split}.npy", f"{name}_{split}_offsets.npy"


def shown(paths: Sequence[str]) -> str:
    """The first few of ``paths`` for a one-line message."""
    head = ", ".join(paths[:SHOWN])
    return head + (", ..." if len(paths) > SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Listing and layout


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_folder(root: Path) -> Listing:
    """Find the class folders and their image files, refusing a layout we cannot read."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--images {root} is not a folder")
    entries = _visible(root)
    _refuse_loose_files(root, entries)
    split_dirs = [p.name for p in entries if p.name in SPLITS]
    if split_dirs:
        others = [p.name for p in entries if p.name not in SPLITS]
        if others:
            raise UserError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
                f"({shown(others)}); use DIR/<class>/<image> or DIR/{{train,val,test}}/<class>/"
            )
        missing = [s for s in SPLITS if s not in split_dirs]
        if missing:
            raise UserError(
                f"{root} has {'/, '.join(split_dirs)}/ but no {'/, '.join(missing)}/ folder: a "
                "split of your own needs DIR/train, DIR/val and DIR/test"
            )
        folders = []
        for split in SPLITS:
            inside = _visible(root / split)
            _refuse_loose_files(root / split, inside)
            folders += [(split, p) for p in inside]
    else:
        folders = [(None, p) for p in entries]
    if not folders:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image>")
    classes, not_images = [], []
    for split, folder in folders:
        files = []
        for path in _visible(folder):
            relative = path.relative_to(root).as_posix()
            if path.is_dir():
                raise UserError(
                    f"{relative} is a folder inside a class folder (nested too deep); expected "
                    "images directly in each class folder: DIR/<class>/<image>"
                )
            if path.suffix.lower() in images.IMAGE_SUFFIXES:
                files.append(relative)
            else:
                not_images.append(relative)
        classes.append(ClassFolder(folder.name, split, tuple(files)))
    _refuse_duplicate_classes(classes)
    return Listing(root, tuple(classes), tuple(not_images), bool(split_dirs))


def _refuse_loose_files(folder: Path, entries: Sequence[Path]) -> None:
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        raise UserError(
            f"{folder} has {len(loose)} files directly in it ({shown(loose)}); put each class's "
            "images in a folder of its own: DIR/<class>/<image>"
        )


def _refuse_duplicate_classes(classes: Sequence[ClassFolder]) -> None:
    seen: dict[str, str | None] = {}
    for folder in classes:
        if folder.name in seen:
            raise UserError(
                f"class {folder.name!r} is in both {seen[folder.name]}/ and {folder.split}/: "
                "held-out classes must be new classes"
            )
        seen[folder.name] = folder.split


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_files(
    root: Path, files: Sequence[str], size: int, channels: int, workers: int = 1
) -> tuple[np.ndarray, dict[int, str]]:
    """Preprocess every file into one preallocated uint8 array, with a progress bar.

    Returns the array ``(len(files), channels, size, size)`` and ``{index: reason}`` of the files
    that could not be decoded (their rows are left zero). ``workers > 1`` decodes chunks of
    :data:`CHUNK` files in that many processes; results stream into the array in order.
    """
    from tqdm import tqdm

    pixels = np.zeros((len(files), channels, size, size), np.uint8)
    failures: dict[int, str] = {}
    starts = range(0, len(files), CHUNK)
    chunks = [[str(root / f) for f in files[s : s + CHUNK]] for s in starts]
    decode = partial(_decode_chunk, size=size, channels=channels)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(chunks) > 1 else None
    try:
        results = pool.map(decode, chunks) if pool else map(decode, chunks)
        with tqdm(total=len(files), unit="img", desc="decoding", dynamic_ncols=True) as bar:
            for start, (block, errors) in zip(starts, results):
                pixels[start : start + len(block)] = block
                failures.update({start + i: reason for i, reason in errors.items()})
                bar.update(len(block))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return pixels, failures


def _decode_chunk(paths: list[str], size: int, channels: int) -> tuple[np.ndarray, dict]:
    """Decode a few files (in a worker process when parallel); failures are reported, not raised."""
    block = np.zeros((len(paths), channels, size, size), np.uint8)
    errors = {}
    for i, path in enumerate(paths):
        try:
            block[i] = images.preprocess(path, size, channels, name=path)
        except UserError as error:
            errors[i] = str(error).removeprefix(f"cannot decode {path}: ")
        except OSError as error:
            errors[i] = str(error)
    return block, errors


# ---------------------------------------------------------------------------------------------
# Splitting


def plan_split(text: str, classes: int) -> tuple[int, int, int]:
    """``--split``: three fractions summing to 1 or three class counts summing to ``classes``.

    Every split needs at least one class (validation and test tasks are drawn from them).
    """
    parts = text.split(",")
    try:
        counts = tuple(int(part) for part in parts)
    except ValueError:
        counts = None
    if counts is None:
        try:
            fractions = [float(part) for part in parts]
        except ValueError:
            fractions = []
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise UserError(
                f"--split must be three fractions summing to 1 (e.g. {DEFAULT_SPLIT}) or three "
                f"class counts, got {text!r}"
            )
        val, test = (round(f * classes) for f in fractions[1:])
        counts = (classes - val - test, val, test)
    if len(counts) != 3 or min(counts) < 0 or sum(counts) != classes:
        raise UserError(
            f"--split {text}: class counts must be three non-negative numbers summing to the "
            f"{classes} usable classes"
        )
    if min(counts) < 1:
        raise UserError(
            f"too few classes for the split: {classes} usable classes give train/val/test "
            f"{'/'.join(map(str, counts))} with --split {text}; every split needs at least one "
            "class (N-way tasks need N)"
        )
    return counts  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass(frozen=True)
class PackOptions:
    """The settings of one ``make_data.py --images`` run (recorded in the manifest)."""

    size: int = DEFAULT_SIZE
    channels: int = DEFAULT_CHANNELS
    split: str | None = None
    min_per_class: int = DEFAULT_MIN_PER_CLASS
    strict: bool = False
    seed: int = 0
    workers: int = 1


def check_options(options: PackOptions) -> None:
    images.check_shape(options.size, options.channels)
    check_seed(options.seed)
    check_workers(options.workers)
    if options.min_per_class < 1:
        raise UserError(f"--min_per_class must be a positive integer, got {options.min_per_class}")


def pack(
    root: Path,
    name: str,
    out_dir: Path,
    options: PackOptions,
    log: Callable[[str], object] = print,
    warn: Callable[[str], object] = print,
) -> dict[str, object]:
    """List, validate and decode ``root``, then write NAME's three splits and its manifest.

    Problems that cost data (non-images, unreadable files, small classes) are one ``warn`` line
    each, or a :class:`UserError` with ``options.strict``. Nothing is written unless the whole
    set can be.
    """
    start = time.perf_counter()
    check_name(name)
    check_options(options)
    check_writable_folder(out_dir)
    listing = list_folder(root)
    if listing.user_split and options.split is not None:
        raise UserError(f"{root} already has train/val/test folders; leave out --split")
    report = partial(_problem, options.strict, warn)
    if listing.not_images:
        suffixes = " ".join(images.IMAGE_SUFFIXES)
        report(
            f"{len(listing.not_images)} files are not images ({suffixes}) and are skipped: "
            f"{shown(listing.not_images)}"
        )
    empty = [folder.name for folder in listing.classes if not folder.files]
    if empty:
        report(f"{len(empty)} class folders have no images and are left out: {shown(empty)}")
    files = [f for folder in listing.classes for f in folder.files]
    log(f"Found {len(listing.classes)} class folders with {len(files)} images in {root}")
    pixels, failures = decode_files(root, files, options.size, options.channels, options.workers)
    if failures:
        listed = [f"{files[i]} ({reason})" for i, reason in sorted(failures.items())]
        report(f"{len(failures)} files could not be decoded and are skipped: {shown(listed)}")
    kept, dropped = _usable_classes(listing.classes, files, failures, options.min_per_class)
    small = [(c, n) for c, n in dropped if c.files]  # empty folders were reported above
    if small:
        named = [f"{c.name} ({n})" for c, n in small]
        report(
            f"{len(small)} classes have fewer than --min_per_class {options.min_per_class} "
            f"usable images and are left out: {shown(named)}"
        )
    splits = _assign_splits(listing, kept, options)
    summary = _write(
        pixels, splits, name, Path(out_dir), listing, options, failures, files, dropped
    )
    summary.update(seconds=time.perf_counter() - start, images=len(files))
    return summary


def _problem(strict: bool, warn: Callable[[str], object], line: str) -> None:
    if strict:
        raise UserError(f"{line} (refused: --strict)")
    warn(f"warning: {line}")


def _usable_classes(
    classes: Sequence[ClassFolder], files: Sequence[str], failures: dict, minimum: int
) -> tuple[list[tuple[ClassFolder, list[int]]], list[tuple[ClassFolder, int]]]:
    """Each class with the rows of its decodable images; classes below ``minimum`` apart."""
    kept, dropped, row = [], [], 0
    for folder in classes:
        rows = [r for r in range(row, row + len(folder.files)) if r not in failures]
        row += len(folder.files)
        if len(rows) < minimum:
            dropped.append((folder, len(rows)))
        else:
            kept.append((folder, rows))
    return kept, dropped


def _assign_splits(
    listing: Listing, kept: list[tuple[ClassFolder, list[int]]], options: PackOptions
) -> dict[str, list[tuple[ClassFolder, list[int]]]]:
    if listing.user_split:
        splits = {s: [(c, rows) for c, rows in kept if c.split == s] for s in SPLITS}
        empty = [s for s, classes in splits.items() if not classes]
        if empty:
            raise UserError(
                f"too few classes for the split: {', '.join(empty)}/ has no class with at least "
                f"--min_per_class {options.min_per_class} usable images"
            )
        return splits
    counts = plan_split(options.split or DEFAULT_SPLIT, len(kept))
    chosen = split_characters(kept, counts, options.seed)  # the same rule as Omniglot's
    return {s: [kept[i] for i in chosen[s]] for s in SPLITS}


def _write(
    pixels: np.ndarray,
    splits: dict[str, list[tuple[ClassFolder, list[int]]]],
    name: str,
    out_dir: Path,
    listing: Listing,
    options: PackOptions,
    failures: dict[int, str],
    files: Sequence[str],
    dropped: Sequence[tuple[ClassFolder, int]],
) -> dict[str, object]:
    """Write the splits and the manifest as one set.

    A split's array is gathered from ``pixels`` once to hash it and again when it is written, so
    at most one split's copy exists besides ``pixels`` (peak memory ~1.6x the images).
    """
    writers, described, rows = {}, {}, {}
    for split, classes in splits.items():
        order = [r for _, class_rows in classes for r in class_rows]
        offsets = np.cumsum([0, *(len(r) for _, r in classes)]).astype("<i8")
        image_file, offsets_file = array_names(name, split)
        writers[image_file] = lambda handle, order=order: packing.write_npy(handle, pixels[order])
        writers[offsets_file] = partial(packing.write_npy, array=offsets)
        described[split] = {
            "file": image_file,
            "shape": [len(order), *pixels.shape[1:]],
            "dtype": "uint8",
            "sha256": packing.npy_sha256(pixels[order]),
            "offsets_file": offsets_file,
            "offsets_sha256": packing.npy_sha256(offsets),
            "classes": len(classes),
        }
        rows[split] = [
            {"class": c.name, "start": int(o), "files": [files[r] for r in class_rows]}
            for (c, class_rows), o in zip(classes, offsets)
        ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "source": str(listing.root.resolve()),
        "layout": "DIR/{train,val,test}/<class>/<image> (the user's split)"
        if listing.user_split
        else "DIR/<class>/<image>",
        "preprocessing": {
            "function": "metalearn.data.images.preprocess",
            "size": options.size,
            "channels": options.channels,
            "mode": images.CHANNELS[options.channels],
            "resize": f"centred square crop of side min(w, h), PIL {images.RESIZE_FILTER}",
            "pixels": "uint8 0..255; networks see float32 v / 255",
        },
        "split": options.split or DEFAULT_SPLIT,
        "split_seed": options.seed,
        "split_rng": "numpy.random.default_rng(split_seed).permutation(n_classes), cut in order",
        "min_per_class": options.min_per_class,
        "array_layout": "(images, channels, size, size); class c = rows offsets[c]:offsets[c+1]",
        "row_order": "classes sorted by folder name, images by file name",
        "files": described,
        "splits": rows,
        "skipped": {
            "undecodable": [{"file": files[i], "reason": r} for i, r in sorted(failures.items())],
            "classes": [{"class": c.name, "usable_images": n} for c, n in dropped],
        },
    }
    text = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    writers[manifest_name(name)] = lambda handle: handle.write(text)
    packing.replace_set(out_dir, name, writers, manifest_name(name))
    return {"files": described, "manifest_sha256": hashlib.sha256(text).hexdigest()}


# ---------------------------------------------------------------------------------------------
# Loading


def read_manifest(data_dir: Path, name: str) -> dict:
    """NAME's manifest, after finishing a move an interrupted make_data.py left (see packing)."""
    check_name(name)
    path = Path(data_dir) / manifest_name(name)
    hint = _hint(data_dir, name)
    try:
        packing.finish_interrupted_pack(Path(data_dir), name, manifest_name(name))
    except OSError as error:
        raise UserError(
            f"cannot finish moving the new {name} set into {data_dir} ({error})"
        ) from None
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); {hint}") from None
    try:
        settings = manifest["preprocessing"]
        images.check_shape(settings["size"], settings["channels"])
        for split in SPLITS:
            entry = manifest["files"][split]
            if not all(isinstance(entry[k], str) for k in ("sha256", "offsets_sha256")):
                raise TypeError
    except (KeyError, TypeError, UserError):
        raise UserError(f"{path} is not an image-folder manifest (or was edited); {hint}") from None
    return manifest


def _hint(data_dir: Path, name: str) -> str:
    return f"run `python make_data.py --images DIR --name {name} --out {data_dir}` to create it"


def load_split(data_dir: Path, name: str, split: str) -> ClassImages:
    """NAME's packed ``split`` as ragged classes, every file checked against the manifest."""
    manifest = read_manifest(data_dir, name)
    size, channels = manifest["preprocessing"]["size"], manifest["preprocessing"]["channels"]
    entry, hint = manifest["files"][split], _hint(data_dir, name)
    image_file, offsets_file = array_names(name, split)

    def check_images(shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (channels, size, size):
            raise UserError(
                f"{data_dir}/{image_file} has shape {shape} {dtype}, expected "
                f"(N, {channels}, {size}, {size}) uint8; {hint}"
            )

    def check_offsets(shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype != np.dtype("<i8") or len(shape) != 1 or not 2 <= shape[0] <= MAX_CLASSES + 1:
            raise UserError(f"{data_dir}/{offsets_file} is not int64 class offsets; {hint}")

    pixels, pixels_sha = packing.load_npy(Path(data_dir) / image_file, check_images, hint)
    offsets, offsets_sha = packing.load_npy(Path(data_dir) / offsets_file, check_offsets, hint)
    if (pixels_sha, offsets_sha) != (entry["sha256"], entry["offsets_sha256"]):
        raise UserError(
            f"{data_dir}/{image_file} or its offsets do not match {manifest_name(name)} "
            f"(stale or edited); {hint}"
        )
    return ClassImages(pixels, offsets)
