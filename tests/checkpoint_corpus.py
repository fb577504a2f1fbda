"""Crafted and mutated checkpoint files for the fuzz test, generated from fixed seeds.

Every file is built here from scratch (no binary blobs in the repository): hand-assembled pickles
that forge numpy's dtype and array states, zip archives assembled byte by byte (bombs, lying
sizes, compression methods checkpoints never use), and seeded truncations and byte flips of
genuine checkpoints.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from metalearn.nets.builtin import ConvNet
from metalearn.runs.checkpoint import Checkpoint, export_legacy_pkl, save_checkpoint
from metalearn.training.config import resolve_defaults

N_WAY = 5
GIB = 1 << 30


def network() -> ConvNet:
    return ConvNet(n_way=N_WAY)


def run_config(data_dir: Path) -> dict:
    """A complete config.json of an Omniglot 5-way 1-shot run, as train.py writes it."""
    config = resolve_defaults({"dataset": "omniglot", "data_dir": str(data_dir)})
    return {**config, "run_name": "legacy", "network": network().config()}


def genuine_npz(path: Path, data_dir: Path) -> Path:
    params = network().init_params(0)
    meta = {"network": network().config(), "algo": "maml", "config": run_config(data_dir)}
    save_checkpoint(path, Checkpoint(params, meta))
    return path


def genuine_pkl(path: Path) -> Path:
    export_legacy_pkl(path, network().init_params(0))
    return path


# -- pickles assembled opcode by opcode --------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _dtype(code: str, state: bytes) -> bytes:
    """numpy.dtype(code, False, True) with a BUILD state given as opcodes."""
    return _global("numpy", "dtype") + _tuple(_str(code), b"\x89", b"\x88") + b"R" + state + b"b"


def _float_state(order: str = "<") -> bytes:
    return _tuple(_int(3), _str(order), b"N", b"N", b"N", _int(-1), _int(-1), _int(0))


def _array(shape: tuple, dtype: bytes, data: bytes, module: str = "numpy._core.multiarray"):
    """numpy's own layout: _reconstruct(ndarray, (0,), b'b') then BUILD (1, shape, dtype, F, data)."""
    reconstruct = _global(module, "_reconstruct") + _tuple(
        _global("numpy", "ndarray"), _tuple(_int(0)), _bytes(b"b")
    )
    state = _tuple(_int(1), _tuple(*(_int(n) for n in shape)), dtype, b"\x89", _bytes(data))
    return reconstruct + b"R" + state + b"b"


def _list_pickle(*items: bytes) -> bytes:
    return b"\x80\x03]" + b"(" + b"".join(items) + b"e."


def _object_dtype() -> bytes:
    """dtype('O') as its pickled state says: raw bytes then read as PyObject pointers."""
    state = _tuple(_int(3), _str("|"), b"N", b"N", b"N", _int(-1), _int(-1), _int(63))
    return _dtype("O8", state)


def _object_field_dtype() -> bytes:
    """A void dtype whose forged fields put an object at offset 0."""
    fields = b"}" + _str("a") + _tuple(_object_dtype(), _int(0)) + b"s"
    state = _tuple(_int(3), _str("|"), b"N", _tuple(_str("a")), fields, _int(8), _int(1), _int(0))
    return _dtype("V8", state)


def segfault_pickle() -> bytes:
    """The reported crash: admitted globals only, a forged object dtype over raw bytes."""
    return _list_pickle(_array((2,), _object_field_dtype(), b"\x41" * 16))


def _calls(module: str, name: str, *args: bytes) -> bytes:
    return b"\x80\x02" + _global(module, name) + _tuple(*args) + b"R."


def crafted_pickles() -> dict[str, bytes]:
    good = _dtype("f4", _float_state())
    params = network().init_params(0)
    shapes = [v.shape for v in params.values()]
    return {
        "segfault_object_fields.pkl": segfault_pickle(),
        "object_dtype.pkl": _list_pickle(_array((2,), _object_dtype(), b"\x41" * 16)),
        "object_dtype_numpy1.pkl": _list_pickle(
            _array((1,), _object_dtype(), b"\x41" * 8, module="numpy.core.multiarray")
        ),
        "frombuffer_object_dtype.pkl": b"\x80\x05]("
        + _global("numpy._core.numeric", "_frombuffer")
        + _tuple(_bytes(b"\x41" * 8), _object_dtype(), _tuple(_int(1)), _str("C"))
        + b"Re.",
        "unicode_dtype.pkl": _list_pickle(
            _array((2,), _dtype("U2", _float_state()), b"\x41\0\0\0" * 4)
        ),
        "huge_shape.pkl": _list_pickle(_array((2**40,), good, b"\0" * 16)),
        "huge_shape_product.pkl": _list_pickle(_array((2**31, 2**31, 0), good, b"")),
        "negative_shape.pkl": _list_pickle(_array((-4,), good, b"\0" * 16)),
        "huge_memo_put.pkl": b"\x80\x04]r" + struct.pack("<I", 2**31) + b".",
        "huge_memo_get.pkl": b"\x80\x04]j" + struct.pack("<I", 2**31) + b".",
        "huge_binbytes8.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"xx.",
        "os_system.pkl": _calls("os", "system", _str("echo pwned > pwned")),
        "posix_system.pkl": _calls("posix", "system", _str("echo pwned > pwned")),
        "builtins_eval.pkl": _calls("builtins", "eval", _str("open('pwned','w')")),
        "numpy_load.pkl": _calls("numpy", "load", _str("/dev/zero")),
        "reduce_on_dtype_class.pkl": _list_pickle(
            _global("numpy", "dtype") + _tuple(_str("O"), b"\x89", b"\x88") + b"R"
        ),
        "dict_of_strings.pkl": pickle.dumps({"a": "b", "c": "d"}, protocol=4),
        "an_int.pkl": pickle.dumps(12345, protocol=4),
        "nested_lists.pkl": b"\x80\x02" + b"]" * 10000 + b"a" * 9999 + b".",
        "nested_marks.pkl": b"\x80\x02" + b"(" * 10000 + b".",
        "flood_of_lists.pkl": b"\x80\x02" + b"]" * 4_000_000 + b".",
        "complex64.pkl": pickle.dumps([np.zeros(3, np.complex64)], protocol=4),
        "int8.pkl": pickle.dumps([np.zeros(3, np.int8)], protocol=4),
        "bool.pkl": pickle.dumps([np.zeros(3, bool)], protocol=4),
        "float_scalar.pkl": pickle.dumps([np.float32(1)], protocol=4),
        "wrong_shapes.pkl": pickle.dumps([np.zeros(3, np.float32)] * len(shapes), protocol=4),
        "one_array_too_many.pkl": pickle.dumps(
            [*params.values(), np.zeros(1, np.float32)], protocol=4
        ),
        "set_opcode.pkl": pickle.dumps([set()], protocol=4),
        "not_a_pickle.pkl": b"hello, world\n",
        "empty.pkl": b"",
    }


# -- zip archives assembled byte by byte --------------------------------------------------------


def npy_header(descr: str, shape: tuple, version: int = 1, pad_to: int = 0) -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text = text.ljust(max(pad_to, len(text) + 1)) + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=True)
    return out.getvalue()


def raw_zip(members: list[dict]) -> bytes:
    """Members as dicts: name, data (as stored), size (uncompressed, as the directory states),
    crc, method (0 stored, 8 deflate, 9 Deflate64, 12 bzip2), flags."""
    out, directory = io.BytesIO(), io.BytesIO()
    for m in members:
        name, data = m["name"].encode(), m["data"]
        fields = (
            20,
            m.get("flags", 0),
            m.get("method", 0),
            0,
            0x21,
            m.get("crc", zlib.crc32(data)),
            len(data),
            m.get("size", len(data)),
            len(name),
        )
        offset = out.tell()
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", *fields, 0) + name + data)
        directory.write(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, offset)
            + name
        )
    start, listing = out.tell(), directory.getvalue()
    count = len(members)
    out.write(listing)
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(listing), start, 0))
    return out.getvalue()


def stored(name: str, data: bytes, **extra) -> dict:
    return {"name": name, "data": data, **extra}


def deflated(name: str, data: bytes, **extra) -> dict:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(data) + compressor.flush()
    return {
        "name": name,
        "data": body,
        "size": len(data),
        "crc": zlib.crc32(data),
        "method": 8,
        **extra,
    }


def zeros_bomb(prefix: bytes, gib: int) -> tuple[bytes, int]:
    """A raw deflate stream inflating to ``prefix`` then ``gib`` GiB of zeros: 1 MiB of zeros,
    fully flushed, compresses to the same bytes every time, so the bomb costs no compression."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    chunk = compressor.compress(b"\0" * (1 << 20))
    chunk += compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()
    return head + chunk * (1024 * gib) + tail, len(prefix) + gib * GIB


def _meta_npy(meta: object) -> bytes:
    return npy(np.array(json.dumps(meta)))


def crafted_npzs(data_dir: Path) -> dict[str, bytes]:
    params = network().init_params(0)
    good_meta = {"format": 1, "network": network().config(), "config": run_config(data_dir)}
    meta = stored("meta.npy", _meta_npy(good_meta))
    genuine = [stored(f"param:{k}.npy", npy(v)) for k, v in params.items()]
    first = next(iter(params))

    def with_first(member: dict) -> bytes:
        return raw_zip([meta, member, *genuine[1:]])

    bomb, bomb_size = zeros_bomb(npy_header("<f4", (GIB // 4,)), 1)
    small_header = npy_header("<U10", ())
    liar, _ = zeros_bomb(small_header, 1)
    files = {
        "object_member.npz": with_first(
            stored(f"param:{first}.npy", npy(np.array([None, 1], dtype=object)))
        ),
        "unicode_member.npz": with_first(stored(f"param:{first}.npy", npy(np.array(["ab"])))),
        "complex_member.npz": with_first(
            stored(f"param:{first}.npy", npy(np.zeros(params[first].shape, np.complex64)))
        ),
        "int_member.npz": with_first(
            stored(f"param:{first}.npy", npy(np.zeros(params[first].shape, np.int32)))
        ),
        "bool_member.npz": with_first(
            stored(f"param:{first}.npy", npy(np.zeros(params[first].shape, bool)))
        ),
        "structured_member.npz": with_first(
            stored(f"param:{first}.npy", npy(np.zeros(2, [("a", "<f4"), ("b", "<f4")])))
        ),
        "huge_header_shape.npz": with_first(
            stored(f"param:{first}.npy", npy_header("<f4", (2**40,)) + b"\0" * 64)
        ),
        "huge_header_length.npz": with_first(
            stored(f"param:{first}.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{")
        ),
        "oversized_header.npz": with_first(
            stored(
                f"param:{first}.npy", npy_header("<f4", (1,), version=2, pad_to=60000) + b"\0" * 4
            )
        ),
        "garbage_header.npz": with_first(
            stored(f"param:{first}.npy", b"\x93NUMPY\x01\x00\x05\x00{{{{\n")
        ),
        "not_npy_member.npz": with_first(stored(f"param:{first}.npy", b"just some text")),
        "text_member.npz": raw_zip([meta, *genuine, stored("evil.txt", b"hello")]),
        "unknown_member.npz": raw_zip([meta, *genuine, stored("other.npy", npy(np.zeros(2)))]),
        "duplicate_member.npz": raw_zip([meta, *genuine, genuine[0]]),
        "missing_meta.npz": raw_zip(genuine),
        "meta_not_json.npz": raw_zip([stored("meta.npy", npy(np.array("{not json"))), *genuine]),
        "meta_a_list.npz": raw_zip([stored("meta.npy", _meta_npy([1, 2])), *genuine]),
        "meta_a_string.npz": raw_zip([stored("meta.npy", _meta_npy("x")), *genuine]),
        "meta_float_array.npz": raw_zip([stored("meta.npy", npy(np.zeros(3))), *genuine]),
        "meta_1d.npz": raw_zip(
            [stored("meta.npy", npy(np.array([json.dumps(good_meta)]))), *genuine]
        ),
        "meta_deep_json.npz": raw_zip(
            [stored("meta.npy", npy(np.array("[" * 100_000 + "]" * 100_000))), *genuine]
        ),
        "meta_other_format.npz": raw_zip(
            [stored("meta.npy", _meta_npy({**good_meta, "format": 2})), *genuine]
        ),
        "meta_network_not_dict.npz": raw_zip(
            [stored("meta.npy", _meta_npy({**good_meta, "network": [1]})), *genuine]
        ),
        "meta_config_junk.npz": raw_zip(
            [stored("meta.npy", _meta_npy({**good_meta, "config": {"n_way": "x"}})), *genuine]
        ),
        "meta_config_huge_n_way.npz": raw_zip(
            [
                stored(
                    "meta.npy",
                    _meta_npy({**good_meta, "config": {**run_config(data_dir), "n_way": 10**12}}),
                ),
                *genuine,
            ]
        ),
        "no_params.npz": raw_zip([meta]),
        "zip_bomb.npz": raw_zip(
            [
                meta,
                {
                    "name": f"param:{first}.npy",
                    "data": bomb,
                    "size": bomb_size,
                    "method": 8,
                    "crc": 0,
                },
                *genuine[1:],
            ]
        ),
        "zip_bomb_lying_size.npz": raw_zip(
            [
                {
                    "name": "meta.npy",
                    "data": liar,
                    "size": len(small_header) + 40,
                    "method": 8,
                    "crc": 0,
                },
                *genuine,
            ]
        ),
        "deflate64_member.npz": with_first(
            {**stored(f"param:{first}.npy", npy(params[first])), "method": 9}
        ),
        "bzip2_member.npz": with_first(
            {**stored(f"param:{first}.npy", npy(params[first])), "method": 12}
        ),
        "encrypted_member.npz": with_first(
            {**stored(f"param:{first}.npy", npy(params[first])), "flags": 1}
        ),
        "bad_crc.npz": with_first({**stored(f"param:{first}.npy", npy(params[first])), "crc": 1}),
        "many_members.npz": raw_zip(
            [meta, *genuine, *(stored(f"param:x{i}.npy", b"") for i in range(40_000))]
        ),
        "zip_comment.npz": raw_zip([meta, *genuine])[:-2] + b"\x05\x00hello",
        "not_a_zip.npz": b"this is not a zip file at all",
        "empty.npz": b"",
    }
    return files


# -- mutations of genuine files ---------------------------------------------------------------


def truncations(data: bytes) -> list[bytes]:
    """Every tenth prefix (10 % ... 90 %)."""
    return [data[: len(data) * tenth // 10] for tenth in range(1, 10)]


def byte_flips(data: bytes, seed: int, flips: int = 8, structure_only: bool = False) -> bytes:
    """``flips`` random bytes XOR-ed; ``structure_only`` keeps to the first 512 and last 1024
    bytes (pickle opcodes and the first array's header; npy headers and the zip directory)
    instead of hitting mostly float data."""
    rng = np.random.default_rng(seed)
    positions = np.arange(len(data))
    if structure_only:
        positions = np.concatenate([positions[:512], positions[-1024:]])
    mutated = bytearray(data)
    for position in rng.choice(positions, size=flips):
        mutated[position] ^= int(rng.integers(1, 256))
    return bytes(mutated)


def write_corpus(folder: Path, data_dir: Path) -> dict[str, list[Path]]:
    """Every file of the corpus by category. Pickles share a folder with a valid config.json
    (a .pkl is named by its run's config); .npz files sit in a folder without one."""
    legacy, archives = folder / "legacy_run", folder / "archives"
    legacy.mkdir(parents=True)
    archives.mkdir()
    (legacy / "config.json").write_text(json.dumps(run_config(data_dir)))
    pkl = genuine_pkl(folder / "genuine.pkl").read_bytes()
    npz = genuine_npz(folder / "genuine.npz", data_dir).read_bytes()

    def write(where: Path, files: dict[str, bytes]) -> list[Path]:
        for name, content in files.items():
            (where / name).write_bytes(content)
        return [where / name for name in files]

    def cut(data: bytes, suffix: str) -> dict[str, bytes]:
        return {f"truncated_{i + 1}0pct{suffix}": part for i, part in enumerate(truncations(data))}

    def flipped(data: bytes, suffix: str) -> dict[str, bytes]:
        anywhere = {f"flipped_{seed}{suffix}": byte_flips(data, seed) for seed in range(3)}
        return anywhere | {
            f"flipped_structure_{seed}{suffix}": byte_flips(data, seed, structure_only=True)
            for seed in range(6)
        }

    return {
        "crafted_pkl": write(legacy, crafted_pickles()),
        "crafted_npz": write(archives, crafted_npzs(data_dir)),
        "truncated": write(legacy, cut(pkl, ".pkl")) + write(archives, cut(npz, ".npz")),
        "flipped": write(legacy, flipped(pkl, ".pkl")) + write(archives, flipped(npz, ".npz")),
    }
