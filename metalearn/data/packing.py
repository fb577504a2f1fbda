"""Packed datasets on disk: checked .npy reading and all-or-nothing replacement of a set of files.

Shared by Omniglot (:mod:`metalearn.data.omniglot`) and image-folder sets (:mod:`metalearn.data.folders`).

Reading: an .npy header is parsed (no pickle, bounded header) and checked before any data is read,
and the file's size must match it exactly, so a forged shape cannot make us allocate more than the
file holds. The data is read straight into the final array while its sha256 is computed.

Writing: a set (its arrays and its manifest) is written into a hidden staging folder in the output
folder and flushed to disk; renaming that folder to ``.<tag>-pack-commit`` commits it, then its files
are moved into place, manifest last. A kill or a full disk before the commit leaves the old set
untouched (the next writer removes the staging folder); after the commit, readers and the next writer
finish the move (:func:`finish_interrupted_pack`). Readers check every array against the manifest's
sha256, so they see the old complete set or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO

import numpy as np

from metalearn.errors import UserError
from metalearn.fileio import atomic_write, file_lock, fsync_dir

Writer = Callable[[IO[bytes]], object]


def read_npy_header(
    handle: IO[bytes], path: Path, hint: str
) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of an .npy header (version 1 or 2); else refused.

    Leaves ``handle`` at the first data byte.
    """
    try:
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(handle)  # bounded header size, no pickle
    except (ValueError, SyntaxError, TypeError, EOFError) as error:
        raise UserError(f"{path} is not a valid .npy file ({error}); {hint}") from None
    return tuple(shape), fortran, dtype


def load_npy(
    path: Path, check_header: Callable[[tuple[int, ...], np.dtype], None], hint: str
) -> tuple[np.ndarray, str]:
    """Read ``path`` after ``check_header(shape, dtype)`` accepted it; return (array, sha256).

    ``check_header`` raises :class:`UserError` for a shape or dtype the caller does not expect.
    """
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype = read_npy_header(handle, path, hint)
            check_header(shape, dtype)  # refuses object arrays: no expected dtype is one
            if fortran:
                raise UserError(f"{path} is stored in Fortran order, not as written; {hint}")
            offset = handle.tell()
            if os.fstat(handle.fileno()).st_size != offset + dtype.itemsize * int(np.prod(shape)):
                raise UserError(
                    f"{path} is truncated or has extra bytes (size does not match its header); "
                    f"{hint}"
                )
            array = np.empty(shape, dtype)
            handle.seek(0)
            digest = hashlib.sha256(handle.read(offset))
            raw = memoryview(array.reshape(-1).view(np.uint8))
            if handle.readinto(raw) != len(raw):
                raise UserError(f"{path} changed while it was read; {hint}")
            digest.update(raw)
    except OSError as error:
        raise UserError(f"cannot read {path} ({error}); {hint}") from None
    return array, digest.hexdigest()


class _HashSink(io.RawIOBase):
    """A write-only file that only hashes what is written to it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return memoryview(data).nbytes


def write_npy(handle: IO[bytes], array: np.ndarray) -> None:
    """Write ``array`` as .npy (no pickle) in bounded chunks, without a copy of the whole array."""
    np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def npy_sha256(array: np.ndarray) -> str:
    """sha256 of the exact bytes :func:`write_npy` writes for ``array`` (for the manifest)."""
    sink = _HashSink()
    write_npy(sink, array)
    return sink.digest.hexdigest()


def _commit_name(tag: str) -> str:
    return f".{tag}-pack-commit"


def _staging_prefix(tag: str) -> str:
    return f".{tag}-staging-"


def replace_set(out_dir: Path, tag: str, writers: dict[str, Writer], manifest: str) -> None:
    """Stage the files ``writers`` write (name -> write(handle)), commit them with one rename,
    and move them into ``out_dir``, ``manifest`` last (see the module docstring).

    One writer at a time (a lock on ``out_dir``); leftovers of killed writers of the same ``tag``
    are finished (a committed set) or removed (a staging folder) first.
    """
    staging = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(out_dir, wait=False):
            finish_interrupted_pack(out_dir, tag, manifest)
            for stale in out_dir.glob(f"{_staging_prefix(tag)}*"):
                shutil.rmtree(stale)
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(tag), dir=out_dir))
            for name, write in writers.items():
                atomic_write(staging / name, write)
            fsync_dir(staging)
            os.replace(staging, out_dir / _commit_name(tag))  # the commit: the new set is decided
            staging = None
            finish_interrupted_pack(out_dir, tag, manifest)
    except BlockingIOError:
        raise UserError(f"another make_data.py is writing into {out_dir}; wait for it") from None
    except OSError as error:
        raise UserError(f"cannot write the packed data into {out_dir}: {error}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_pack(out_dir: Path, tag: str, manifest: str) -> None:
    """Move a committed set into place, ``manifest`` last (idempotent; processes may race)."""
    committed = Path(out_dir) / _commit_name(tag)
    if not committed.is_dir():
        return
    with suppress(FileNotFoundError):
        names = sorted(os.listdir(committed), key=lambda name: (name == manifest, name))
        for name in names:
            with suppress(FileNotFoundError):  # moved already (by us before a kill, or a reader)
                os.replace(committed / name, Path(out_dir) / name)
    fsync_dir(out_dir)
    with suppress(OSError):  # gone already, or (racing a new commit) not empty: leave it
        committed.rmdir()
