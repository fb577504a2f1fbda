"""The meta-learner: a hand-parameterised network and MAML / FOMAML / Reptile over it.

θ is an ordered dict of Paddle tensors and ``net.forward(x, params)`` is a pure function of it, so
the adapted weights θ' = θ − α∇L(θ) stay differentiable in θ and the query loss back-propagates
through every inner step (true second order). The code lives in the ``metalearn`` package; this
module gathers what users reach for::

    from MAML import ConvNet, MetaLearner, make_parameters
    net = ConvNet(n_way=5)
    learner = MetaLearner(net, make_parameters(net.init_params(seed=0)), "maml", 0.4, 1)
    direction, stats = learner.task_direction(task)

``python MAML.py`` proves the meta-gradient on this Paddle install: it compares the second-order
gradient with finite differences (float64, tanh networks) for 1 and 2 inner steps, for MAML on
the Omniglot network (stride-2 convolutions) and the MiniImagenet network (max-pooling, flatten),
for the learned inner loops (MAML++, Meta-SGD, ANIL), for a meta-batch of tasks stacked into
one computation (grouped convolutions: the path train.py takes with the fast kernels), and for a
network written as a ``paddle.nn.Layer`` (``metalearn.MAML``, ``train.py --net MODULE:FUNCTION``:
its Paddle ops routed to exact ones), parameter by parameter.
"""

from metalearn.learning.learner import ALGORITHMS, MetaLearner, make_parameters
from metalearn.nets.builtin import MLP, ConvNet, PoolConvNet

__all__ = [
    "ALGORITHMS",
    "MLP",
    "ConvNet",
    "MetaLearner",
    "PoolConvNet",
    "make_parameters",
]


def _self_check() -> None:
    from metalearn.learning.gradcheck import meta_gradient_error

    learners = {
        "maml, Omniglot conv net": ("conv", {}),
        "maml, max-pool net": ("pool", {}),
        "maml++ (lslr, per-step BN, multi-step loss)": (
            "conv",
            {"rule": "lslr", "per_step_bn": True, "multi_step_loss_for": 10, "iteration": 4},
        ),
        "metasgd": ("conv", {"rule": "metasgd"}),
        "anil": ("conv", {"adapt": "head"}),
        "maml, Omniglot conv net, 3 tasks stacked (train.py's path)": (
            "conv",
            {"stacked_tasks": 3},
        ),
        "maml, max-pool net, 3 tasks stacked": ("pool", {"stacked_tasks": 3}),
    }
    for name, (kind, options) in learners.items():
        for steps in (1, 2):
            error = meta_gradient_error(kind, steps, **options)
            verdict = "ok" if error < 1e-4 else "WRONG"
            print(
                f"{name}: second-order meta-gradient (θ and learned rates), {steps} inner "
                f"step(s): relative error {error:.2e} vs finite differences ({verdict})"
            )
    _layer_check()


def _layer_check() -> None:
    import paddle.nn as nn

    from metalearn.audit import audit

    def model() -> nn.Layer:
        return nn.Sequential(
            nn.Conv2D(1, 4, 3, stride=2, padding=1, bias_attr=False),
            nn.BatchNorm2D(4),
            nn.Tanh(),
            nn.Conv2D(4, 4, 3, stride=2, padding=1),
            nn.MaxPool2D(2, 2),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 3),
        )

    for report in audit(model, (1, 28, 28), 3):
        worst = max((check.error for check in report.checks), default=float("inf"))
        print(
            f"a paddle.nn.Layer (Conv2D, BatchNorm2D, Tanh, MaxPool2D, Flatten, Linear) through "
            f"LayerNet, {report.steps} inner step(s): largest relative error of a parameter "
            f"{worst:.2e} vs finite differences ({'ok' if report.passed else 'WRONG'})"
        )


if __name__ == "__main__":
    _self_check()
