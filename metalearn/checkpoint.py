"""Checkpoints as ``.npz`` read without pickle, written atomically, checked against the request.

A checkpoint holds θ (``param:<name>``), optionally the meta-optimiser state (``optim:<key>``),
and a JSON ``meta`` record (network config, algorithm, iteration, best score, history). The seed
project pickled a list of arrays; unpickling runs arbitrary code, so ``.pkl`` files are only read
through :func:`load_legacy_pkl`, which accepts numpy arrays and plain containers and nothing else.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from metalearn.errors import UserError
from metalearn.fileio import atomic_write

FORMAT_VERSION = 1
_PARAM, _OPTIM = "param:", "optim:"


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    meta: dict
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` (.npz) atomically."""
    arrays = {_PARAM + k: v for k, v in checkpoint.params.items()}
    arrays.update({_OPTIM + k: v for k, v in checkpoint.optimizer.items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT_VERSION, **checkpoint.meta}))
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; any damage is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".pkl":
        return _load_legacy_checkpoint(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            params = {k[len(_PARAM) :]: data[k] for k in data.files if k.startswith(_PARAM)}
            optimizer = {k[len(_OPTIM) :]: data[k] for k in data.files if k.startswith(_OPTIM)}
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        json.JSONDecodeError,
    ) as error:
        raise UserError(f"checkpoint {path} is unreadable or not one of ours ({error})") from None
    if meta.get("format") != FORMAT_VERSION or not params:
        raise UserError(f"checkpoint {path} has an unknown format or holds no parameters")
    return Checkpoint(params=params, meta=meta, optimizer=optimizer)


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
    if shapes != expected:
        raise UserError("checkpoint parameters do not match the network's parameter shapes")


def export_legacy_pkl(path: str | Path, params: dict[str, np.ndarray]) -> None:
    """Write θ as the seed's pickled list of numpy arrays (for old tools), atomically."""
    atomic_write(path, lambda handle: pickle.dump(list(params.values()), handle, protocol=4))


def _load_legacy_checkpoint(path: Path) -> Checkpoint:
    """A seed-style pickled list of arrays, named by its run's network (config.json beside it)."""
    from metalearn.nets import build_network  # only this reader needs the networks

    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} holds bare arrays: the config.json of its run must be beside it")
    config = json.loads(config_path.read_text())
    names = build_network(config["network"]).init_params(0)
    arrays = load_legacy_pkl(path)
    if [tuple(a.shape) for a in arrays] != [v.shape for v in names.values()]:
        raise UserError(f"{path} does not match the network described in {config_path}")
    meta = {"network": config["network"], "config": config, "algo": config["algo"]}
    return Checkpoint(params=dict(zip(names, arrays)), meta=meta)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and builtin containers; refuses every other global."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_legacy_pkl(path: str | Path) -> list[np.ndarray]:
    """Read a seed-style pickle of arrays without executing anything else it may contain."""
    try:
        data = _ArraysOnlyUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a plain pickle of numpy arrays: {error}") from None
    arrays = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(arrays, (list, tuple)) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise UserError(f"{path} does not hold a list of numpy arrays")
    return list(arrays)
