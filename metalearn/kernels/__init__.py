"""Operations with exact second derivatives, and the kernels that compute them.

``ops.py`` is what networks call (convolution, batch norm, max-pooling, cross-entropy, the fused
bodies) as Paddle ``PyLayer`` pairs whose double-backward is written out; ``registry.py`` says
which first-order kernels are in use (Paddle's own or oneDNN's); ``onednn.py`` builds and loads
the C++ operators of ``csrc/`` and installs them. ``ops`` and ``onednn`` meet only in the registry.
"""
