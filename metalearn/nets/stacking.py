"""The layout of stacked tasks, shared by the built-in networks and a user's Layer: T tasks'
inputs [T, N, C, ...] run as one batch [N, T·C, ...] (each task's channels side by side, so a
convolution is one grouped convolution and batch norm per channel is per task), and an output
[N, T·O] comes back as [T, N, O]."""

from __future__ import annotations

import paddle


def side_by_side(x: paddle.Tensor) -> paddle.Tensor:
    """Stacked tasks' inputs [T, N, C, ...] as one batch [N, T·C, ...]."""
    tasks, count, *rest = x.shape
    if not rest:
        return x.transpose([1, 0])
    return x.transpose([1, 0, *range(2, x.ndim)]).reshape([count, tasks * rest[0], *rest[1:]])


def one_per_task(out: paddle.Tensor, tasks: int) -> paddle.Tensor:
    """An output [N, T·O] of ``tasks`` stacked tasks as [T, N, O]."""
    count, width = out.shape
    return out.reshape([count, tasks, width // tasks]).transpose([1, 0, 2])
