"""A user's model named on the command line: ``--net my_module:make_model``.

The factory is called as ``make_model(input_shape, n_way)`` with the data's (C, H, W) and the
number of classes, and returns a ``paddle.nn.Layer`` whose output on a batch [B, C, H, W] is
[B, n_way]. Its module is imported from the working directory only (its file must lie there),
because the string also comes back from a run's saved config: ``evaluate.py``, ``--resume`` and
the playground rebuild the model from it, and a checkpoint must not name any module installed
on the machine. The service never accepts a factory from a client (service/flags.py).

Every mistake (the module or function is missing, the import or the call raises, the result is
not a Layer, has no parameters, or gives the wrong output shape on a sample batch) is one
:class:`UserError` naming the factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metalearn.errors import UserError

if TYPE_CHECKING:
    import paddle

FACTORY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
MAX_FACTORY_LENGTH = 200


def is_factory(text: object) -> bool:
    """Whether ``text`` has the form ``module.path:function``."""
    return (
        isinstance(text, str)
        and len(text) <= MAX_FACTORY_LENGTH
        and FACTORY_PATTERN.fullmatch(text) is not None
    )


def load_factory(spec: str) -> Callable:
    """The function ``spec`` (``module:function``) names, imported from the working directory."""
    if not is_factory(spec):
        raise UserError(f"model factory {spec!r:.80}: expected MODULE:FUNCTION")
    module_name, function_name = spec.split(":")
    where = Path.cwd().resolve()
    if str(where) not in sys.path:  # `python train.py` puts the script's folder there, not ours
        sys.path.append(str(where))
    try:
        _check_under(module_name, where)
        module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:  # the user's module: any failure is theirs to fix
        raise UserError(
            f"model factory {spec}: cannot import {module_name} ({_reason(error)}); the module must be "
            f"importable from the working directory {where}"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UserError(f"model factory {spec}: {module_name} has no function {function_name}")
    return factory


def _check_under(module_name: str, where: Path) -> None:
    """Refuse a module (or any package on its path) that is not a file under ``where``."""
    parts = module_name.split(".")
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {name}")
        places = [spec.origin] if spec.has_location else list(spec.submodule_search_locations or [])
        if not places or not all(Path(p).resolve().is_relative_to(where) for p in places):
            raise UserError(
                f"model factory module {module_name}: {name} is not a file under the working "
                f"directory {where} "
                "(factories are imported only from there)"
            )


def build_layer(spec: str, input_shape: Sequence[int], n_way: int) -> paddle.nn.Layer:
    """``factory(input_shape, n_way)`` for the factory ``spec``, checked to be a Layer with
    parameters."""
    import paddle  # here: the flag checks import this module and must not load Paddle

    factory = load_factory(spec)
    shape = tuple(int(n) for n in input_shape)
    try:
        layer = factory(shape, n_way)
    except Exception as error:
        raise UserError(
            f"model factory {spec}: {spec.split(':')[1]}({shape}, {n_way}) raised {_reason(error)}"
        ) from None
    if not isinstance(layer, paddle.nn.Layer):
        raise UserError(
            f"model factory {spec} returned {type(layer).__name__}, not a paddle.nn.Layer"
        )
    if not any(not p.stop_gradient for p in layer.parameters()):
        raise UserError(
            f"model factory {spec} returned a {type(layer).__name__} without parameters"
        )
    return layer


def sample_batch(input_shape: Sequence[int], size: int = 2, seed: int = 0) -> paddle.Tensor:
    """Random inputs [size, *input_shape] to try a model on."""
    import paddle

    rng = np.random.default_rng(seed)
    values = rng.random((size, *input_shape)).astype(paddle.get_default_dtype())
    return paddle.to_tensor(values)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
