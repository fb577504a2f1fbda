"""MAML, FOMAML and Reptile on PaddlePaddle with exact second-order meta-gradients.

Sub-packages follow the data flow (docs/design.md): ``data`` (datasets → tasks) → ``nets``
(networks as functions of their parameters) over ``kernels`` (exact operations, oneDNN) →
``learning`` (the meta-learner) → ``training`` (train, evaluate, distribute) → ``runs``
(checkpoints, records, curves) → ``service`` (the runs pages and the playground).

Meta-learning any ``paddle.nn.Layer``: ``metalearn.MAML(model, inner_lr, ...)`` (learning/api.py),
``metalearn.LayerNet`` (nets/layer_net.py), ``metalearn.functional_call`` (nets/functional.py),
``python -m metalearn.audit`` (audit/). They load on first use (PEP 562): entry points import
``metalearn.runtime`` before Paddle may load.
"""

import importlib
import warnings

# `import paddle` warns that ccache is missing: a hint for rebuilding C++ sources, printed on every
# start of every entry point, the notebook and each job. Only the build in kernels/onednn.py
# compiles anything, and it builds once per machine; every other warning still shows.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

_LAZY = {
    "MAML": "metalearn.learning.api",
    "Learner": "metalearn.learning.api",
    "LayerNet": "metalearn.nets.layer_net",
    "functional_call": "metalearn.nets.functional",
}


def __getattr__(name: str):
    """The public names above, imported on first access (``metalearn.audit`` is a
    sub-package: Python imports it on ``import metalearn.audit``)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'metalearn' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
