"""Sharding a meta-batch over the processes of ``python -m paddle.distributed.launch``.

Each process takes a contiguous share of the meta-batch's task indices; the *sums* of their
directions and statistics are added with one all-reduce, and every process divides by the whole
meta-batch size, so θ stays identical everywhere and uneven shares are weighted correctly. Task
sampling is keyed by (iteration, index), so the tasks of an iteration do not depend on how many
processes there are. Outside the launcher everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from functools import cache

import numpy as np
import paddle
import paddle.distributed as dist

from metalearn.errors import UserError


def world_size() -> int:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def is_main() -> bool:
    """Only the first process prints progress and writes checkpoints, records and plots."""
    return rank() == 0


@cache
def init() -> None:
    """Join the launcher's process group (once); nothing to do for a single process.

    When one process dies the launcher stops the others with SIGTERM; turning that into a
    UserError gives the survivors one clear line (and a ``failed`` run record) instead of a
    C++ stack dump.
    """
    if world_size() > 1:
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
        dist.init_parallel_env()


def _stopped_by_launcher(signum, frame) -> None:
    raise UserError(
        f"process {rank()} was stopped by the launcher: another process of the job ended "
        "(see its workerlog)"
    )


def my_share(count: int) -> range:
    """This process's contiguous block of ``range(count)``; blocks differ by at most one."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return range(start, start + size + (rank() < extra))


def _collective(action: Callable[[], object]):
    try:
        return action()
    except RuntimeError as error:
        raise UserError(
            f"process {rank()} lost contact with the other processes of the job (one of them "
            f"probably stopped; see its log): {str(error).splitlines()[0][:200]}"
        ) from None


def sum_over_processes(tensors: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
    """Add each tensor over all processes with a single all-reduce of one flat buffer."""
    if world_size() == 1:
        return tensors
    names = list(tensors)
    flat = paddle.concat([tensors[k].reshape([-1]) for k in names])
    _collective(lambda: dist.all_reduce(flat))
    pieces = paddle.split(flat, [int(np.prod(tensors[k].shape)) for k in names])
    return {k: piece.reshape(tensors[k].shape) for k, piece in zip(names, pieces)}


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenate each process's rows in rank order (shares are contiguous, so order is kept)."""
    if world_size() == 1:
        return rows
    gathered: list = []
    _collective(lambda: dist.all_gather_object(gathered, rows))
    return np.concatenate(gathered)
