"""Omniglot: validate the original 105x105 PNGs, split characters, pack 28x28 float32 arrays.

Source: the official ``images_background.zip`` and ``images_evaluation.zip`` (Lake et al. 2015),
read directly with :mod:`zipfile`, or the same two folders already extracted. Layout:
``images_background/<Alphabet>/characterNN/NNNN_DD.png`` (NNNN = global character id, DD = drawer).

Packing:

* All 1623 characters of both halves are pooled and sorted by (set, alphabet, character folder),
  shuffled with ``numpy.random.default_rng(seed)`` (default :data:`SPLIT_SEED` = 0) and cut into
  train/val/test counts (default 973/325/325; the original MAML code used 1100/100/423). Rows within
  a split keep the pooled order; drawings within a character are ordered by drawer 01..20.
* Each image is converted to grayscale and resized 105 -> 28 with Pillow's LANCZOS filter.
* Pixel convention: float32, **ink (stroke) = 1.0, background = 0.0**, i.e. ``1 - gray / 255`` as
  in the paper's TF code, so a convolution's zero padding equals background.
* Output (in ``out_dir``): ``omniglot_{train,val,test}.npy`` of shape ``(N, 20, 1, 28, 28)`` and
  ``omniglot_manifest.json`` mapping every row to its set/alphabet/character/id, with the sha256 of
  each array. Training stores :func:`manifest_sha256` so every number traces back to characters.

Everything is validated and decoded before the first file is written. The new set (three arrays
and the manifest) is written into a hidden staging folder in ``out_dir`` and flushed to disk; renaming
that folder to ``.omniglot-pack-commit`` commits it, then its files are moved into place, manifest
last. A kill or a full disk before the commit leaves the old set untouched (the next run removes the
staging folder); after the commit, :func:`load_split` and the next run finish the move. Readers check
every array against the manifest's sha256, so whatever happens they see the old complete set or the
new one, never a mix.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from metalearn.data import images, packing
from metalearn.errors import UserError
from metalearn.fileio import atomic_write

SPLIT_SEED = 0
"""Default seed of ``numpy.random.default_rng`` for the character split (``--seed`` overrides)."""

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (973, 325, 325)
SETS = ("images_background", "images_evaluation")
EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}
"""(alphabets, characters) per set in the full Omniglot release."""
NUM_CHARACTERS = sum(chars for _, chars in EXPECTED.values())  # 1623
NUM_DRAWINGS = 20
ORIGINAL_SIZE = 105
IMAGE_SIZE = 28
RESIZE_FILTER = images.RESIZE_FILTER
FORMAT_VERSION = 1
MANIFEST_NAME = "omniglot_manifest.json"
DEFAULT_SOURCE = Path("data") / "omniglot"
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
MAX_WORKERS_PER_CPU = 2
"""``--workers`` beyond twice the CPUs only adds processes that wait for a core."""
SUPPORTED_ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
"""Compression methods Python's zipfile can read (Deflate64, say, it cannot)."""
PACK_TAG = "omniglot"
"""Names the staging and commit folders of :func:`metalearn.data.packing.replace_set`."""
PIXELS = "float32, ink (stroke) = 1.0, background = 0.0: x = 1 - gray / 255 after resizing"
LAYOUT_HINT = "<set>/<Alphabet>/characterNN/NNNN_DD.png"

_CHARACTER_DIR = re.compile(r"character\d+")
_DRAWING_FILE = re.compile(r"(\d{4})_(\d{2})\.png")


@dataclass(frozen=True)
class CharacterRef:
    """One character folder and its 20 drawings (archive member paths, in drawer order)."""

    set_name: str
    alphabet: str
    character: str
    id: str
    members: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"{self.set_name}/{self.alphabet}/{self.character}"

    def row(self, index: int) -> dict[str, object]:
        """The manifest entry for this character stored at row ``index`` of a split."""
        return {
            "row": index,
            "set": self.set_name,
            "alphabet": self.alphabet,
            "character": self.character,
            "id": self.id,
        }


def npy_name(split: str) -> str:
    """File name of a packed split, e.g. ``omniglot_train.npy``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"omniglot_{split}.npy"


# ---------------------------------------------------------------------------------------------
# Source discovery and download


def find_source(directory: Path) -> dict[str, Path]:
    """Map each set name to its zip (preferred) or extracted folder inside ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"Omniglot source folder {directory} does not exist (see --source)")
    found = {}
    for name in SETS:
        archive, folder = directory / f"{name}.zip", directory / name
        if archive.is_file():
            found[name] = archive
        elif folder.is_dir():
            found[name] = folder
        else:
            raise UserError(f"{directory} has neither {name}.zip nor an extracted {name}/ folder")
    return found


def missing_sets(directory: Path) -> list[str]:
    """Sets that have neither a zip nor an extracted folder in ``directory`` (to download)."""
    return [
        name
        for name in SETS
        if not (directory / f"{name}.zip").is_file() and not (directory / name).is_dir()
    ]


def download(directory: Path, names: Sequence[str] = SETS) -> None:
    """Download the official zips into ``directory``, checking their md5, with a progress bar."""
    for name in names:
        url = DOWNLOAD_URL.format(name=name)
        try:
            atomic_write(directory / f"{name}.zip", partial(_fetch, url, OFFICIAL_MD5[name]))
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise UserError(
                f"could not download {url} ({reason}); put images_background.zip and "
                f"images_evaluation.zip in {directory} yourself or pass --source DIR"
            ) from None


def _fetch(url: str, md5: str, handle: io.BufferedIOBase) -> None:
    """Stream ``url`` into ``handle``; fail (so the atomic write is discarded) on a wrong md5."""
    from tqdm import tqdm

    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 16):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != md5:
        raise UserError(f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5}")


# ---------------------------------------------------------------------------------------------
# Reading archives and folders


@contextmanager
def _open_set(path: Path) -> Iterator[Callable[[str], bytes]]:
    """Yield ``read(member) -> bytes`` for a set stored as a zip or an extracted folder."""
    if path.is_dir():

        def read_file(member: str) -> bytes:
            try:
                return (path.parent / member).read_bytes()
            except OSError as error:
                raise UserError(f"cannot read {path.parent / member}: {error}") from None

        yield read_file
        return
    with _open_zip(path) as archive:

        def read(member: str) -> bytes:
            try:
                return archive.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise UserError(f"{path.name}: cannot read {member}: {error}") from None

        yield read


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """Open a zip, turning 'not a zip' and I/O problems into one-line errors."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UserError(f"{path} is not a readable zip file ({error})") from None
    with archive:
        yield archive


def _list_members(path: Path) -> list[str]:
    """All file paths of a set, relative to the set's parent (``images_background/...``).

    Drawings in a zip must be readable by :mod:`zipfile`: not encrypted, a supported compression.
    """
    if path.is_dir():
        return [p.relative_to(path.parent).as_posix() for p in path.rglob("*") if p.is_file()]
    with _open_zip(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
    for info in filter(lambda info: _is_drawing(info.filename), members):
        _check_readable_member(path, info)
    return [info.filename for info in members]


def _check_readable_member(path: Path, info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise UserError(
            f"{path.name}: {info.filename} is password-protected; use the official unencrypted "
            "zips (or extract them and pass the folder as --source)"
        )
    if info.compress_type not in SUPPORTED_ZIP_METHODS:
        raise UserError(
            f"{path.name}: {info.filename} uses zip compression method {info.compress_type}, "
            f"which Python cannot read (supported: {', '.join(SUPPORTED_ZIP_METHODS.values())}); "
            "extract the zip with another tool and pass the folder as --source"
        )


def _is_drawing(member: str) -> bool:
    """PNG files count; everything else (Thumbs.db, macOS resource forks, folders) is ignored."""
    base = member.rsplit("/", 1)[-1]
    return base.lower().endswith(".png") and not base.startswith("._") and "__MACOSX" not in member


# ---------------------------------------------------------------------------------------------
# Listing and validation


def list_characters(sources: dict[str, Path]) -> list[CharacterRef]:
    """Find every character folder, checking the layout and 20 drawings each, in sorted order."""
    chars = []
    for set_name in SETS:
        groups = _group_drawings(set_name, sources[set_name])
        for (alphabet, character), files in sorted(groups.items()):
            chars.append(_character(set_name, alphabet, character, files))
    return chars


def _group_drawings(set_name: str, path: Path) -> dict[tuple[str, str], list[str]]:
    """Group a set's PNG file names by (alphabet, character folder), rejecting a wrong layout."""
    groups: dict[tuple[str, str], list[str]] = {}
    for member in filter(_is_drawing, _list_members(path)):
        parts = member.split("/")
        if len(parts) != 4 or parts[0] != set_name or not _CHARACTER_DIR.fullmatch(parts[2]):
            raise UserError(
                f"{path.name}: unexpected file {member!r}; expected the Omniglot layout "
                f"{LAYOUT_HINT.replace('<set>', set_name)}"
            )
        groups.setdefault((parts[1], parts[2]), []).append(parts[3])
    return groups


def _character(set_name: str, alphabet: str, character: str, files: list[str]) -> CharacterRef:
    """Check one character folder holds NNNN_01..NNNN_20.png and build its reference."""
    folder = f"{set_name}/{alphabet}/{character}"
    if len(files) != NUM_DRAWINGS:
        raise UserError(f"{folder} has {len(files)} drawings, expected {NUM_DRAWINGS}")
    matches = [_DRAWING_FILE.fullmatch(name) for name in sorted(files)]
    if not all(matches):
        bad = next(name for name, m in zip(sorted(files), matches) if not m)
        raise UserError(f"{folder}/{bad}: file name is not NNNN_DD.png")
    ids = {m.group(1) for m in matches if m}
    drawers = [m.group(2) for m in matches if m]
    if len(ids) != 1 or drawers != [f"{d:02d}" for d in range(1, NUM_DRAWINGS + 1)]:
        raise UserError(f"{folder}: expected files NNNN_01.png..NNNN_20.png for one id NNNN")
    members = tuple(f"{folder}/{name}" for name in sorted(files))
    return CharacterRef(set_name, alphabet, character, ids.pop(), members)


def validate(chars: Sequence[CharacterRef]) -> None:
    """Check the full release: 30 + 20 alphabets, 964 + 659 characters, unique character ids."""
    for set_name, (n_alphabets, n_chars) in EXPECTED.items():
        in_set = [c for c in chars if c.set_name == set_name]
        alphabets = {c.alphabet for c in in_set}
        if len(alphabets) != n_alphabets or len(in_set) != n_chars:
            raise UserError(
                f"{set_name}: found {len(alphabets)} alphabets with {len(in_set)} characters, "
                f"expected {n_alphabets} alphabets with {n_chars} characters (full Omniglot)"
            )
    seen: dict[str, str] = {}
    for char in chars:
        if char.id in seen:
            raise UserError(f"character id {char.id} is used by {seen[char.id]} and {char.folder}")
        seen[char.id] = char.folder


# ---------------------------------------------------------------------------------------------
# Decoding


def load_images(
    sources: dict[str, Path], chars: Sequence[CharacterRef], workers: int = 1
) -> np.ndarray:
    """Decode and resize every drawing into ``(len(chars), 20, 1, 28, 28)`` float32, ink = 1.

    ``workers > 1`` decodes chunks of characters in separate processes (each opens the zips itself).
    """
    chunk_size = max(1, -(-len(chars) // (4 * max(1, workers))))
    chunks = [list(chars[i : i + chunk_size]) for i in range(0, len(chars), chunk_size)]
    decode = partial(_decode_chunk, sources)
    if workers <= 1 or len(chunks) <= 1:
        parts = [decode(chunk) for chunk in chunks]
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            parts = list(pool.map(decode, chunks))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    shape = (0, NUM_DRAWINGS, 1, IMAGE_SIZE, IMAGE_SIZE)
    return np.concatenate(parts) if parts else np.zeros(shape, np.float32)


def _decode_chunk(sources: dict[str, Path], chars: Sequence[CharacterRef]) -> np.ndarray:
    """Decode the drawings of a few characters (runs in a worker process when parallel)."""
    out = np.empty((len(chars), NUM_DRAWINGS, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    with _open_set(sources[SETS[0]]) as read_bg, _open_set(sources[SETS[1]]) as read_eval:
        readers = {SETS[0]: read_bg, SETS[1]: read_eval}
        for i, char in enumerate(chars):
            read = readers[char.set_name]
            for j, member in enumerate(char.members):
                out[i, j, 0] = decode_drawing(read(member), member)
    return out


def decode_drawing(data: bytes, name: str = "image") -> np.ndarray:
    """One original 105x105 Omniglot PNG -> 28x28 float32 with ink = 1.0, background = 0.0."""
    return decode_ink(data, name, size=ORIGINAL_SIZE)


def decode_ink(
    data: bytes, name: str = "image", size: int | None = None, max_side: int | None = None
) -> np.ndarray:
    """Any drawing (dark ink on a light background) -> the 28x28 array the networks see.

    The one preprocessing of Omniglot packing and of drawings sent to the service:
    :func:`metalearn.data.images.preprocess` to 28x28 grayscale (transparent pixels count as white
    background: a browser canvas is transparent where nothing was drawn), then the paper's
    ink = 1 - gray / 255. ``size`` demands an exact square size; ``max_side`` bounds the size,
    checked before any pixel is decoded.
    """
    gray = images.preprocess(data, IMAGE_SIZE, 1, name, max_side=max_side, exact_side=size)[0]
    return 1.0 - images.to_float(gray)


# ---------------------------------------------------------------------------------------------
# Splitting and writing


def parse_split(text: str, total: int = NUM_CHARACTERS) -> tuple[int, int, int]:
    """Parse ``--split train,val,test``: three non-negative integers summing to ``total``."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0:
        raise UserError(
            f"--split must be three non-negative integers train,val,test (e.g. 973,325,325), "
            f"got {text!r}"
        )
    check_split(counts, total)
    return counts  # type: ignore[return-value]


def check_split(counts: Sequence[int], total: int) -> None:
    """Reject split counts that are negative, not three, or do not use every character once."""
    text = ",".join(map(str, counts))
    if len(counts) != 3 or min(counts) < 0:
        raise UserError(f"--split {text} must be three non-negative counts train,val,test")
    if sum(counts) != total:
        raise UserError(
            f"--split {text} sums to {sum(counts)}, but the counts must sum to {total} "
            "(every character in exactly one split)"
        )


def check_seed(seed: int) -> None:
    """``default_rng`` needs a non-negative integer seed; say so in one line.

    The one rule for every ``--seed`` (make_data.py, train.py, evaluate.py).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")


def check_workers(workers: int) -> None:
    """``--workers`` from 1 to twice the CPU count (more would only queue for a core)."""
    limit = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    if not 1 <= workers <= limit:
        raise UserError(
            f"--workers must be between 1 and {limit} ({MAX_WORKERS_PER_CPU} per CPU), got {workers}"
        )


def check_writable_folder(folder: Path, flag: str = "--out") -> None:
    """Fail before any slow work if ``folder`` cannot be (created as) a folder we may write in."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: no permission to write in {existing}")


def split_characters(
    chars: Sequence[CharacterRef], counts: Sequence[int], seed: int = SPLIT_SEED
) -> dict[str, list[int]]:
    """Shuffle character indices with ``default_rng(seed)`` and cut them into train/val/test.

    Returns sorted indices into ``chars`` per split, so rows keep the pooled (set, alphabet,
    character) order and the split depends only on the seed and the counts.
    """
    check_split(counts, len(chars))
    check_seed(seed)
    order = np.random.default_rng(seed).permutation(len(chars))
    bounds = np.cumsum([0, *counts])
    return {
        split: sorted(int(i) for i in order[bounds[k] : bounds[k + 1]])
        for k, split in enumerate(SPLITS)
    }


def write_pack(
    images: np.ndarray,
    chars: Sequence[CharacterRef],
    out_dir: Path,
    counts: Sequence[int],
    seed: int = SPLIT_SEED,
) -> dict[str, object]:
    """Split decoded ``images`` (rows aligned with ``chars``), write the arrays and the manifest.

    The set replaces any previous one as a whole (see the module docstring).
    """
    splits = split_characters(chars, counts, seed)
    writers, files, rows = {}, {}, {}
    for split, indices in splits.items():
        array = np.ascontiguousarray(images[indices], dtype=np.float32)
        writers[npy_name(split)] = partial(packing.write_npy, array=array)
        files[split] = {
            "file": npy_name(split),
            "shape": list(array.shape),
            "dtype": "float32",
            "sha256": packing.npy_sha256(array),
        }
        rows[split] = [chars[i].row(r) for r, i in enumerate(indices)]
    manifest = (json.dumps(_manifest(seed, counts, files, rows), indent=2) + "\n").encode("utf-8")
    writers[MANIFEST_NAME] = lambda handle: handle.write(manifest)
    packing.replace_set(Path(out_dir), PACK_TAG, writers, MANIFEST_NAME)
    return {"files": files, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def _manifest(seed: int, counts: Sequence[int], files: dict, rows: dict) -> dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": "Omniglot (Lake et al. 2015), images_background + images_evaluation pooled",
        "split_seed": seed,
        "split_rng": "numpy.random.default_rng(split_seed).permutation(n_characters), cut in order",
        "split_counts": dict(zip(SPLITS, map(int, counts))),
        "pixel_convention": PIXELS,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "original_size": [ORIGINAL_SIZE, ORIGINAL_SIZE],
        "resize_filter": f"PIL.Image.Resampling.{RESIZE_FILTER} on the grayscale (mode L) image",
        "array_layout": "(characters, 20 drawings by drawer 01..20, 1 channel, 28, 28)",
        "row_order": "within a split: sorted by (set, alphabet, character folder)",
        "files": files,
        "splits": rows,
    }


def pack(
    source: Path,
    out_dir: Path,
    counts: Sequence[int] = DEFAULT_SPLIT,
    seed: int = SPLIT_SEED,
    workers: int = 1,
    log: Callable[[str], object] = lambda _: None,
) -> dict[str, object]:
    """Validate ``source``, decode all 32,460 drawings, then write the three splits + manifest.

    Nothing is written unless the whole source is valid. Returns a summary for printing.
    """
    start = time.perf_counter()
    check_split(counts, NUM_CHARACTERS)
    check_seed(seed)
    check_workers(workers)
    check_writable_folder(out_dir)
    sources = find_source(source)
    chars = list_characters(sources)
    validate(chars)
    per_set = ", ".join(f"{sum(c.set_name == s for c in chars)} in {s}" for s in SETS)
    log(f"Found {len(chars)} character folders ({per_set})")
    images = load_images(sources, chars, workers)
    decode_seconds = time.perf_counter() - start
    log(f"Decoded {images.shape[0] * NUM_DRAWINGS} drawings in {decode_seconds:.1f} s")
    summary = write_pack(images, chars, out_dir, counts, seed)
    summary.update(characters=len(chars), seconds=time.perf_counter() - start)
    return summary


# ---------------------------------------------------------------------------------------------
# Loading packed data


def load_split(data_dir: Path, split: str) -> np.ndarray:
    """Load a packed split ``(N, 20, 1, 28, 28)`` float32, failing clearly if missing or stale.

    The header is checked before the data is read, so a forged shape cannot make us allocate more
    than the file holds. If the manifest is present, the file's sha256 must match it, so results
    stay traceable. A set committed by a make_data.py that was killed is moved into place first.
    """
    path = Path(data_dir) / npy_name(split)
    hint = f"run `python make_data.py --out {data_dir}` to create it"
    try:
        packing.finish_interrupted_pack(Path(data_dir), PACK_TAG, MANIFEST_NAME)
    except OSError as error:
        raise UserError(
            f"{data_dir} holds a new packed set that an interrupted make_data.py did not move into "
            f"place, and it cannot be moved from here ({error}); {hint}"
        ) from None
    array, sha256 = packing.load_npy(path, partial(_check_header, path, hint), hint)
    _check_against_manifest(path, sha256, hint)
    return array


def _check_header(path: Path, hint: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A packed split is ``(N, 20, 1, 28, 28)`` little-endian float32 with N <= 1623."""
    expected = (NUM_DRAWINGS, 1, IMAGE_SIZE, IMAGE_SIZE)
    if dtype != np.dtype("<f4") or len(shape) != 5 or tuple(shape[1:]) != expected:
        raise UserError(
            f"{path} has shape {shape} {dtype}, expected (N, 20, 1, 28, 28) float32; {hint}"
        )
    if not 0 <= shape[0] <= NUM_CHARACTERS:
        raise UserError(
            f"{path} claims {shape[0]} characters, Omniglot has {NUM_CHARACTERS}; {hint}"
        )


def _check_against_manifest(path: Path, sha256: str, hint: str) -> None:
    """If a manifest sits beside ``path``, its recorded sha256 must match the file's."""
    manifest = _read_manifest(path.parent)
    if manifest is None:
        return
    split = path.stem.removeprefix("omniglot_")
    files = manifest.get("files")
    entry = files.get(split) if isinstance(files, dict) else None
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(recorded, str):
        raise UserError(
            f"{path.parent / MANIFEST_NAME} records no sha256 for {split} (not an Omniglot "
            "manifest, or edited); re-run make_data.py"
        )
    if recorded != sha256:
        raise UserError(f"{path} does not match {MANIFEST_NAME} (stale or edited); {hint}")


def _read_manifest(data_dir: Path) -> dict | None:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); re-run make_data.py") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not an Omniglot manifest; re-run make_data.py")
    return manifest


def manifest_sha256(data_dir: Path) -> str | None:
    """sha256 of ``omniglot_manifest.json`` (None if absent): pins exactly which data was used."""
    path = Path(data_dir) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
