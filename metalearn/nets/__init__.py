"""Networks as pure functions of an ordered dict of parameters: ``forward(x, params, step)``.

``builtin.py`` holds the paper's networks (the Omniglot ConvNet, the MiniImagenet PoolConvNet and
the sinusoid MLP), written with the exact operations of :mod:`metalearn.kernels.ops`.
"""

from metalearn.nets.builtin import MLP, ConvNet, PoolConvNet, build_network

__all__ = ["MLP", "ConvNet", "PoolConvNet", "build_network"]
