"""Networks as pure functions of an ordered dict of parameters: ``forward(x, params, step)``.

``builtin.py`` holds the paper's networks (the Omniglot ConvNet, the MiniImagenet PoolConvNet and
the sinusoid MLP), written with the exact operations of :mod:`metalearn.kernels.ops`.
``layer_net.py`` adapts any ``paddle.nn.Layer`` to the same protocol: ``functional.py`` calls a
Layer with substituted parameters, ``exact.py`` routes Paddle's wrong or missing double-grads to
exact ops, ``factory.py`` imports a user's ``module:function``. The package imports nothing until
a name is used (``factory.is_factory`` serves the flag checks, which must not load Paddle).
"""

import importlib

_BUILTIN = ("MLP", "ConvNet", "PoolConvNet", "build_network")
__all__ = list(_BUILTIN)


def __getattr__(name: str):
    if name not in _BUILTIN:
        raise AttributeError(f"module 'metalearn.nets' has no attribute {name!r}")
    return getattr(importlib.import_module("metalearn.nets.builtin"), name)
