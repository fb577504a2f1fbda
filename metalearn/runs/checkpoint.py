"""Checkpoints as ``.npz`` read without pickle, written atomically, checked against the request.

A checkpoint holds θ (``param:<name>``), optionally the meta-optimiser state (``optim:<key>``),
and a JSON ``meta`` record (network config, algorithm, iteration, best score, history). The seed
project pickled a list of arrays (``.pkl``, beside its run's config.json).

Checkpoint files are hostile until checked: a reader accepts only what a genuine checkpoint needs
(floating-point arrays in a list or dict, a JSON object as meta), checks every size and shape
against the file and the network before allocating, and reports anything else as one
:class:`UserError`. Neither numpy's pickle machinery nor ``np.load`` ever sees the bytes: both
trust sizes and dtypes the file states (a forged dtype state makes numpy read raw bytes as object
pointers and crash).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metalearn.errors import UserError
from metalearn.fileio import atomic_write

FORMAT_VERSION = 1
_PARAM, _OPTIM, _META = "param:", "optim:", "meta"

# Weights and optimiser moments are floating point; anything else is not one of ours.
_FLOAT_DTYPES = frozenset(f"{order}f{size}" for order in "<>" for size in (2, 4, 8))
# Far above any genuine checkpoint (the Omniglot network with Adam state is about 1.5 MB).
MAX_CHECKPOINT_BYTES = 64 << 20
_MAX_META_BYTES = 16 << 20
_MAX_ZIP_DIRECTORY_BYTES = 1 << 20  # a genuine checkpoint's is a few kB (one entry per array)
_MAX_NPY_HEADER = 10_000
# A pickled array carries a few hundred bytes besides its data, which protocol 2 stores as
# latin-1 text in UTF-8 (up to two bytes per byte); Adam keeps two moments per weight.
_PICKLE_OVERHEAD_PER_ARRAY, _PICKLE_BYTES_PER_FLOAT64, _OPTIMIZER_FACTOR = 1024, 16, 3


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    meta: dict
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` (.npz) atomically."""
    arrays = {_PARAM + k: v for k, v in checkpoint.params.items()}
    arrays.update({_OPTIM + k: v for k, v in checkpoint.optimizer.items()})
    arrays[_META] = np.array(json.dumps({"format": FORMAT_VERSION, **checkpoint.meta}))
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_checkpoint(path: str | Path, expected: dict[str, tuple] | None = None) -> Checkpoint:
    """Read a checkpoint (``.npz``, or a seed-style ``.pkl``); any damage is one UserError.

    ``expected`` (parameter name -> shape) is checked against the file's headers before any
    array is read, so a file cannot make us allocate more than the network needs.
    """
    path = _existing(path)
    if path.suffix == ".pkl":
        return _load_legacy_checkpoint(path, expected)
    with _open_zip(path) as archive:
        members = _array_members(path, archive)
        meta = _read_meta(path, archive, members.pop(_META, None))
        params = {k[len(_PARAM) :]: m for k, m in members.items() if k.startswith(_PARAM)}
        optimizer = {k[len(_OPTIM) :]: m for k, m in members.items() if k.startswith(_OPTIM)}
        if not params:
            raise UserError(f"checkpoint {path} holds no parameters")
        if expected is not None:
            _check_shapes(path, {k: m.shape for k, m in params.items()}, expected)
            budget = _OPTIMIZER_FACTOR * sum(math.prod(s) * 8 for s in expected.values())
            if sum(m.nbytes for m in optimizer.values()) > budget:
                raise UserError(f"checkpoint {path}: optimiser state larger than the network's")
        return Checkpoint(
            params={k: _read_array(path, archive, m) for k, m in params.items()},
            meta=meta,
            optimizer={k: _read_array(path, archive, m) for k, m in optimizer.items()},
        )


def read_checkpoint_meta(path: str | Path) -> dict:
    """Only the meta record (for a ``.pkl``: built from its run's config.json), no arrays read."""
    path = _existing(path)
    if path.suffix == ".pkl":
        return _legacy_meta(path)[0]
    with _open_zip(path) as archive:
        return _read_meta(path, archive, _array_members(path, archive).get(_META))


def check_compatible(
    checkpoint: Checkpoint, network_config: dict, expected: dict[str, tuple]
) -> None:
    """Refuse a checkpoint whose architecture (n_way, layers, shapes) differs from the request."""
    saved = checkpoint.meta.get("network", {})
    for key, value in network_config.items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint was trained with {key}={saved.get(key)!r} but {key}={value!r} was "
                "requested"
            )
    shapes = {k: tuple(v.shape) for k, v in checkpoint.params.items()}
    if shapes != {k: tuple(v) for k, v in expected.items()}:
        raise UserError("checkpoint parameters do not match the network's parameter shapes")


def export_legacy_pkl(path: str | Path, params: dict[str, np.ndarray]) -> None:
    """Write θ as the seed's pickled list of numpy arrays (for old tools), atomically."""
    atomic_write(path, lambda handle: pickle.dump(list(params.values()), handle, protocol=4))


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"checkpoint {path} is larger than any checkpoint of ours")
    return path


def _check_shapes(path: Path, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Name the first parameter that differs (an n_way or architecture mismatch shows there)."""
    for name in sorted(set(found) | set(expected)):
        have, need = found.get(name), expected.get(name)
        if have is None or need is None or tuple(have) != tuple(need):
            raise UserError(
                f"checkpoint {path} does not match the network's parameter shapes "
                f"({name}: {have if have is not None else 'missing'} in the file, "
                f"{tuple(need) if need is not None else 'none'} in the network)"
            )


# -- .npz: a zip of .npy members, every header checked before any data is read --------------------

# What damaged or hostile zip/npy bytes raise in zipfile, zlib, struct, numpy's header parser and
# json; nothing else is caught, so a bug of ours still shows its traceback.
_ZIP_DAMAGE = (
    OSError,  # reading the file
    EOFError,
    ValueError,  # includes json.JSONDecodeError, UnicodeDecodeError
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,  # an unsupported compression method
    tokenize.TokenError,  # numpy's fallback parser for headers written by Python 2
    RecursionError,  # deeply nested JSON or header literal
    MemoryError,
    OverflowError,
)


@dataclass(frozen=True)
class _Member:
    """One ``.npy`` member whose header was read and checked; its data is not read yet."""

    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    offset: int  # bytes of magic and header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """A ZipFile whose directory is small; damage inside the block becomes one UserError."""
    try:
        _check_zip_directory(path)
        with zipfile.ZipFile(path) as archive:
            yield archive
    except _ZIP_DAMAGE as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: BaseException) -> UserError:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return UserError(f"checkpoint {path} is unreadable or not one of ours ({reason})")


def _check_zip_directory(path: Path) -> None:
    """The zip's end record must be the file's last 22 bytes (np.savez writes no comment and no
    ZIP64 end record for files this small) and name a small central directory: zipfile builds an
    object per directory entry, however many the file packs in, before any member is checked."""
    with open(path, "rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        handle.seek(max(size - 42, 0))
        tail = handle.read(42)
    end = tail[-22:]
    if len(end) < 22 or end[:4] != b"PK\x05\x06" or end[20:22] != b"\0\0":
        raise UserError(f"checkpoint {path} is unreadable or not one of ours (not a zip file)")
    directory_size = struct.unpack("<I", end[12:16])[0]
    zip64 = tail[:4] == b"PK\x06\x07"  # zipfile would take the directory size from there
    if directory_size > _MAX_ZIP_DIRECTORY_BYTES or zip64:
        raise UserError(f"checkpoint {path} has a zip directory unlike any checkpoint of ours")


def _array_members(path: Path, archive: zipfile.ZipFile) -> dict[str, _Member]:
    """Every member by key (``meta``, ``param:x``, ``optim:y``), headers checked."""
    members: dict[str, _Member] = {}
    total = 0
    for info in archive.infolist():
        key = info.filename[: -len(".npy")]
        known = key == _META or key.startswith((_PARAM, _OPTIM))
        if not info.filename.endswith(".npy") or not known or key in members:
            raise UserError(f"checkpoint {path} has an unexpected member {info.filename!r:.80}")
        members[key] = _read_header(path, archive, info)
        total += info.file_size
        if total > MAX_CHECKPOINT_BYTES:
            raise UserError(f"checkpoint {path} unpacks to more than any checkpoint of ours")
    return members


def _read_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    """Parse one member's ``.npy`` header from a bounded prefix and check it against the zip."""
    where = f"checkpoint {path}, member {info.filename!r:.80}"
    if info.flag_bits & 0x1:
        raise UserError(f"{where} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserError(f"{where} uses a compression method checkpoints never use")
    with archive.open(info) as handle:
        magic = handle.read(np.lib.format.MAGIC_LEN)
        version = np.lib.format.read_magic(io.BytesIO(magic))
        if version not in ((1, 0), (2, 0)):
            raise UserError(f"{where} has an unsupported .npy version {version}")
        length_format = "<H" if version == (1, 0) else "<I"
        length_bytes = handle.read(struct.calcsize(length_format))
        (length,) = struct.unpack(length_format, length_bytes)
        if length > _MAX_NPY_HEADER:
            raise UserError(f"{where} has an oversized .npy header")
        header = io.BytesIO(length_bytes + handle.read(length))
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(header, max_header_size=_MAX_NPY_HEADER)
    member = _Member(info, dtype, shape, fortran, len(magic) + len(length_bytes) + length)
    if info.filename != _META + ".npy" and dtype.str not in _FLOAT_DTYPES:
        raise UserError(f"{where} is not a floating-point array (dtype {dtype.str!r:.40})")
    if any(n < 0 for n in shape):
        raise UserError(f"{where} has a negative dimension")
    if member.offset + member.nbytes != info.file_size:
        raise UserError(f"{where}: its header's shape and dtype do not match its size")
    return member


def _read_bytes(path: Path, archive: zipfile.ZipFile, member: _Member) -> bytes:
    """The member's data; never inflates more than the (checked) size the directory states."""
    with archive.open(member.info) as handle:
        handle.read(member.offset)
        data = handle.read(member.nbytes)
    if len(data) != member.nbytes:
        raise UserError(f"checkpoint {path}, member {member.info.filename!r} is truncated")
    return data


def _read_array(path: Path, archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    return _array_from_bytes(
        _read_bytes(path, archive, member), member.dtype, member.shape, member.fortran
    )


def _array_from_bytes(data: bytes, dtype: np.dtype, shape: tuple, fortran: bool) -> np.ndarray:
    """A writable native-order copy of ``data`` (its size already checked against the shape)."""
    flat = np.frombuffer(data, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="))


def _read_meta(path: Path, archive: zipfile.ZipFile, member: _Member | None) -> dict:
    """``meta``: a 0-d unicode array holding a JSON object with our format number and network."""
    if (
        member is None
        or member.dtype.kind != "U"
        or member.shape != ()
        or member.nbytes > _MAX_META_BYTES
    ):
        raise UserError(f"checkpoint {path} has no readable meta record (not one of ours?)")
    data = _read_bytes(path, archive, member)
    text = data.decode("utf-32-le" if member.dtype.byteorder != ">" else "utf-32-be")
    meta = json.loads(text.rstrip("\x00"))
    if not isinstance(meta, dict) or not isinstance(meta.get("network"), dict):
        raise UserError(f"checkpoint {path}: its meta record is not one of ours")
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format {meta.get('format')!r:.20}, this version reads "
            f"format {FORMAT_VERSION} (written by another version of this code?)"
        )
    return meta


# -- .pkl: the seed's pickled list of arrays, read without numpy's reconstructors -----------------


def _legacy_meta(path: Path) -> tuple[dict, dict[str, tuple]]:
    """The meta record of a ``.pkl`` (from the config.json beside it) and its network's shapes."""
    from metalearn.nets.builtin import MLP, ConvNet
    from metalearn.training.config import (
        read_run_config,  # only this reader needs configs and networks
    )

    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} holds bare arrays: the config.json of its run must be beside it")
    config = read_run_config(config_path)
    net = ConvNet(n_way=config["n_way"]) if config["dataset"] == "omniglot" else MLP()
    if config.get("network") != net.config():
        raise UserError(f"{config_path} describes a network this version does not build")
    shapes = {k: tuple(v.shape) for k, v in net.init_params(0).items()}
    return {"network": net.config(), "config": config, "algo": config["algo"]}, shapes


def _load_legacy_checkpoint(path: Path, expected: dict[str, tuple] | None) -> Checkpoint:
    """A seed-style pickled list of arrays, named by its run's network (config.json beside it)."""
    meta, shapes = _legacy_meta(path)
    expected = {k: tuple(v) for k, v in (expected or shapes).items()}
    arrays = load_legacy_pkl(path, list(expected.values()))
    return Checkpoint(params=dict(zip(expected, arrays)), meta=meta)


def load_legacy_pkl(path: str | Path, expected: list[tuple]) -> list[np.ndarray]:
    """Read a seed-style pickle of float arrays of the ``expected`` shapes (in order) without
    executing anything it may contain.

    The file may not be larger than those arrays pickled as float64 (the pure-Python unpickler
    builds an object per opcode, so the file size bounds its memory), and the shapes are checked
    before any array is built.
    """
    path = _existing(path)
    limit = sum(
        math.prod(s) * _PICKLE_BYTES_PER_FLOAT64 + _PICKLE_OVERHEAD_PER_ARRAY for s in expected
    )
    if path.stat().st_size > limit:
        raise UserError(f"{path} is larger than the network's parameters")
    recipes = _unpickle_recipes(path)
    shapes = [recipe.shape for recipe in recipes]
    if shapes != [tuple(s) for s in expected]:
        raise UserError(f"{path} does not match the network's parameter shapes")
    return [recipe.build() for recipe in recipes]


# What hostile bytes raise inside the pure-Python unpickler (a missing memo key, a non-callable
# REDUCE, APPEND to a non-list, an empty stack, a bad integer...); our stand-ins raise
# UnpicklingError. Nothing else is caught, so a bug of ours still shows its traceback.
_PICKLE_DAMAGE = (
    OSError,  # reading the file
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    RecursionError,
    MemoryError,
    OverflowError,
)


def _unpickle_recipes(path: Path) -> list[_ArrayRecipe]:
    """The pickle's arrays as unchecked recipes (list, tuple or dict of arrays at the top)."""
    try:
        data = _RecipeUnpickler(io.BytesIO(path.read_bytes())).load()
    except _PICKLE_DAMAGE as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a plain pickle of numpy arrays ({reason})") from None
    items = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(item, _ArrayRecipe) for item in items
    ):
        raise UserError(f"{path} does not hold a list of numpy arrays")
    for item in items:
        item.check(path)
    return items


class _DtypeRecipe:
    """What ``numpy.dtype(code, align, copy)`` plus its BUILD state claims; never a real dtype
    until :meth:`dtype` accepts it as one of the plain float types."""

    def __init__(self, code: object, *_flags: object):
        self.code, self.state = code, None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def dtype(self) -> np.dtype | None:
        if not isinstance(self.code, str) or self.code not in ("f2", "f4", "f8"):
            return None
        # (version, byte order, subarray, names, fields, elsize, alignment, flags) of a float.
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
            return None
        if state[1] not in ("<", ">", "=") or state[2:] != (None, None, None, -1, -1, 0):
            return None
        return np.dtype(state[1] + self.code)


class _ArrayRecipe:
    """What a pickled ndarray claims (shape, dtype, order, raw bytes); checked, then built."""

    def __init__(self, state: object = None):
        self.state = state
        self.shape: tuple[int, ...] = ()

    def __setstate__(self, state: object) -> None:  # BUILD after numpy's _reconstruct
        self.state = state

    def check(self, path: Path) -> None:
        state = self.state
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        ok = isinstance(state, tuple) and len(state) == 4
        shape, dtype_recipe, fortran, data = state if ok else (None, None, None, None)
        dtype = dtype_recipe.dtype() if isinstance(dtype_recipe, _DtypeRecipe) else None
        ok = (
            dtype is not None
            and isinstance(shape, tuple)
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(fortran, bool)
            and isinstance(data, (bytes, bytearray))
            and math.prod(shape) * dtype.itemsize == len(data)
        )
        if not ok:
            raise UserError(f"{path} holds something other than plain floating-point arrays")
        self.shape, self._parts = shape, (bytes(data), dtype, fortran)

    def build(self) -> np.ndarray:
        data, dtype, fortran = self._parts
        return _array_from_bytes(data, dtype, self.shape, fortran)


def _reconstruct(cls: object, *_args: object) -> _ArrayRecipe:
    if cls is not _ndarray:
        raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
    return _ArrayRecipe()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> _ArrayRecipe:
    """numpy's protocol-5 form: ``_frombuffer(bytes, dtype, shape, order)``."""
    if order not in ("C", "F"):
        raise pickle.UnpicklingError("bad array order")
    return _ArrayRecipe((shape, dtype, order == "F", buffer))


def _ndarray(*_args: object) -> None:
    raise pickle.UnpicklingError("numpy.ndarray may only be passed to _reconstruct")


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocol 2 stores an array's bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only admitted for latin1 array data")
    return text.encode("latin1")


def _bytes(*args: object) -> bytes:
    if args and not (len(args) == 1 and isinstance(args[0], bytes)):
        raise pickle.UnpicklingError("bytes() is only admitted empty")
    return bytes(*args)


def _ordered_dict() -> dict:
    return {}


_STAND_INS: dict[tuple[str, str], Callable[..., Any]] = {
    **{
        (m, "_reconstruct"): _reconstruct
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _DtypeRecipe,
    ("_codecs", "encode"): _encode,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
    ("collections", "OrderedDict"): _ordered_dict,
}

# The opcodes numpy arrays in lists, tuples and dicts need with protocols 2 to 5; no INST, OBJ,
# NEWOBJ, EXT*, PERSID or text opcodes.
_OPCODES = (
    pickle.PROTO,
    pickle.FRAME,
    pickle.STOP,
    pickle.MARK,
    pickle.EMPTY_LIST,
    pickle.EMPTY_DICT,
    pickle.EMPTY_TUPLE,
    pickle.APPEND,
    pickle.APPENDS,
    pickle.SETITEM,
    pickle.SETITEMS,
    pickle.LIST,
    pickle.DICT,
    pickle.TUPLE,
    pickle.TUPLE1,
    pickle.TUPLE2,
    pickle.TUPLE3,
    pickle.NONE,
    pickle.NEWTRUE,
    pickle.NEWFALSE,
    pickle.BININT,
    pickle.BININT1,
    pickle.BININT2,
    pickle.LONG1,
    pickle.BINUNICODE,
    pickle.SHORT_BINUNICODE,
    pickle.BINUNICODE8,
    pickle.BINBYTES,
    pickle.SHORT_BINBYTES,
    pickle.BINBYTES8,
    pickle.BYTEARRAY8,
    pickle.GLOBAL,
    pickle.STACK_GLOBAL,
    pickle.REDUCE,
    pickle.BUILD,
    pickle.BINPUT,
    pickle.LONG_BINPUT,
    pickle.MEMOIZE,
    pickle.BINGET,
    pickle.LONG_BINGET,
)
_MAX_MARK_DEPTH = 16  # a genuine pickle nests three deep; each MARK costs a list


class _RefusingDispatch(dict):
    def __missing__(self, opcode: int):
        raise pickle.UnpicklingError(f"refusing pickle opcode {bytes([opcode])!r}")


class _RecipeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler (its memo is a dict: a forged index of 2**31 costs one entry, where
    the C unpickler allocates an array that large) that knows a few opcodes and whose only
    globals are stand-ins recording what an array claims to be."""

    dispatch: ClassVar[dict] = _RefusingDispatch(
        {code[0]: pickle._Unpickler.dispatch[code[0]] for code in _OPCODES}  # type: ignore[attr-defined]
    )

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is None:
            raise pickle.UnpicklingError(f"refusing to load {module:.60}.{name:.60}")
        return stand_in

    def load_mark(self) -> None:
        if len(self.metastack) >= _MAX_MARK_DEPTH:
            raise pickle.UnpicklingError("pickle nested deeper than arrays in a list")
        super().load_mark()

    def load_reduce(self) -> None:
        if self.stack[-2] not in _STAND_INS.values():
            raise pickle.UnpicklingError("REDUCE of something not admitted")
        super().load_reduce()

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], (_ArrayRecipe, _DtypeRecipe)):
            raise pickle.UnpicklingError("BUILD of something other than an array or dtype")
        super().load_build()

    dispatch[pickle.MARK[0]] = load_mark
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
