"""Call a ``paddle.nn.Layer`` as a pure function of its parameters: ``functional_call``.

MAML evaluates the same network at θ, θ_1 = θ − α∇L(θ), ..., and θ_k must stay a differentiable
function of θ, so the network cannot own its weights. A Layer does own them, as ``Parameter``
entries of each sublayer's ``_parameters`` dict (buffers: ``_buffers``), which the sublayers
read through ``self.weight`` (``Layer.__getattr__`` looks the name up in those dicts at every
access). :class:`FunctionalLayer` therefore puts the given tensors into those dict entries for
the duration of one call and puts the Parameters back in ``finally``: the Layer's own
``forward`` runs unchanged, and every op it records takes the given tensors as inputs, so
gradients flow to them (and through them to θ). Paddle 3.3 has no equivalent of
``torch.func.functional_call`` (searched: ``paddle.nn``, ``paddle.jit``, ``paddle.incubate``).

Tied weights (one Parameter under several sublayers) are substituted at every place that holds
it. Layers that do not read their parameters through ``_parameters`` at call time (``nn.GRU``,
``nn.LSTM`` and ``nn.SimpleRNN`` keep flattened copies) are not affected by the substitution:
``LayerNet.check_sample`` finds such parameters on a sample batch.

Thread safety: the substitution mutates the Layer, so calls on one Layer are serialised by its
lock; different Layers run concurrently.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import paddle

TensorDict = Mapping[str, paddle.Tensor]


class FunctionalLayer:
    """A Layer whose parameters and buffers can be replaced by tensors, one call at a time.

    Names are the Layer's own ``named_parameters()`` / ``named_buffers()`` names, so they are the
    keys checkpoints and optimisers see. ``parameter_names`` are the trainable ones: Paddle's
    batch norm keeps its running statistics as non-trainable parameters, which are state, not
    weights (like buffers, they can still be substituted by name).
    """

    def __init__(self, layer: paddle.nn.Layer):
        self.layer = layer
        self.parameter_names = [n for n, p in layer.named_parameters() if not p.stop_gradient]
        self._slots = _slots(layer, "_parameters") | _slots(layer, "_buffers")
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def substituted(self, tensors: TensorDict) -> Iterator[paddle.nn.Layer]:
        """The Layer with ``tensors`` (a subset of the parameter and buffer names) in place of
        its own, restored on exit (also after an exception)."""
        unknown = set(tensors) - set(self._slots)
        if unknown:
            raise KeyError(f"the layer has no parameter or buffer {sorted(unknown)}")
        with self._lock:
            saved = []
            try:
                for name, tensor in tensors.items():
                    for owner, key in self._slots[name]:
                        saved.append((owner, key, owner[key]))
                        owner[key] = tensor
                yield self.layer
            finally:
                for owner, key, original in reversed(saved):
                    owner[key] = original

    def __call__(self, tensors: TensorDict, *args, **kwargs):
        """``layer(*args, **kwargs)`` with ``tensors`` in place of its parameters/buffers."""
        with self.substituted(tensors) as layer:
            return layer(*args, **kwargs)

    def names_held_by(self, sublayer: paddle.nn.Layer) -> list[str]:
        """The parameter names whose tensors ``sublayer`` holds itself (not its sublayers)."""
        held = sublayer._parameters
        return [
            name
            for name in self.parameter_names
            if any(owner is held for owner, _ in self._slots[name])
        ]


def functional_call(layer: paddle.nn.Layer, tensors: TensorDict, *args, **kwargs):
    """``layer(*args, **kwargs)`` computed with ``tensors`` (parameter/buffer name -> tensor) in
    place of the Layer's own, which are back in place afterwards. Like
    ``torch.func.functional_call``; build a :class:`FunctionalLayer` once to call a Layer often."""
    return FunctionalLayer(layer)(tensors, *args, **kwargs)


def _slots(layer: paddle.nn.Layer, kind: str) -> dict[str, list[tuple[dict, str]]]:
    """For each named parameter (or buffer) every (owner's ``_parameters`` dict, key) that holds
    the same tensor: one for an ordinary weight, several for a tied one."""
    first_name: dict[int, str] = {}
    named = layer.named_parameters() if kind == "_parameters" else layer.named_buffers()
    for name, tensor in named:
        first_name.setdefault(id(tensor), name)
    slots: dict[str, list[tuple[dict, str]]] = {name: [] for name in first_name.values()}
    for _, sublayer in layer.named_sublayers(include_self=True):
        entries = getattr(sublayer, kind)
        for key, tensor in entries.items():
            if tensor is not None and id(tensor) in first_name:
                slots[first_name[id(tensor)]].append((entries, key))
    return slots
