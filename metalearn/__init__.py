"""MAML, FOMAML and Reptile on PaddlePaddle with exact second-order meta-gradients.

Sub-packages follow the data flow (docs/design.md): ``data`` (datasets → tasks) → ``nets``
(networks as functions of their parameters) over ``kernels`` (exact operations, oneDNN) →
``learning`` (the meta-learner) → ``training`` (train, evaluate, distribute) → ``runs``
(checkpoints, records, curves) → ``service`` (the runs pages and the playground).
"""

import warnings

# `import paddle` warns that ccache is missing: a hint for rebuilding C++ sources, printed on every
# start of every entry point, the notebook and each job. Only the build in kernels/onednn.py
# compiles anything, and it builds once per machine; every other warning still shows.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
