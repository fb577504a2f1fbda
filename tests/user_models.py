"""Models written as a user would, for tests/test_layer_net.py, test_audit.py and the train.py
tests (``--net tests.user_models:omniglot_net``): factories take ((C, H, W), n_way)."""

from __future__ import annotations

import paddle
import paddle.nn as nn


class OmniglotNet(nn.Layer):
    """The built-in ConvNet written with Paddle's layers: 4 × [3×3 conv (stride 2, padding 1,
    no bias), batch norm, activation], spatial mean, linear (the ReLU may be swapped)."""

    def __init__(self, n_way: int, channels: int = 1, hidden: int = 64, blocks: int = 4,
                 activation: type = nn.ReLU):  # fmt: skip
        super().__init__()
        layers = []
        for block in range(blocks):
            layers += [
                nn.Conv2D(channels if block == 0 else hidden, hidden, 3, 2, 1, bias_attr=False),
                nn.BatchNorm2D(hidden, epsilon=1e-3),
                activation(),
            ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, n_way)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.body(x).mean(axis=[2, 3]))


def as_user_arrays(model: nn.Layer, builtin: dict) -> dict:
    """The built-in ConvNet's θ (``init_params``) under ``model``'s trainable parameter names:
    both list the same shapes in the same order."""
    names = [name for name, p in model.named_parameters() if not p.stop_gradient]
    shapes = [tuple(p.shape) for p in model.parameters() if not p.stop_gradient]
    assert shapes == [tuple(v.shape) for v in builtin.values()]
    return dict(zip(names, builtin.values()))


def omniglot_net(input_shape, n_way):
    return OmniglotNet(n_way, channels=input_shape[0], hidden=8)


def tanh_omniglot_net(input_shape, n_way):
    return OmniglotNet(n_way, channels=input_shape[0], hidden=4, activation=nn.Tanh)


def not_a_layer(input_shape, n_way):
    return "a string"


def no_parameters(input_shape, n_way):
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def wrong_output(input_shape, n_way):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] ** 2, n_way + 1))


def raises(input_shape, n_way):
    raise ValueError("no model today")


def recurrent(input_shape, n_way):
    """A GRU reads its own copies of its weights: substituted parameters never reach it."""

    class Rows(nn.Layer):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(input_shape[2], 8)
            self.head = nn.Linear(8, n_way)

        def forward(self, x):
            out, _ = self.gru(x.reshape([x.shape[0], -1, input_shape[2]]))
            return self.head(out[:, -1])

    return Rows()
