"""Device choice: the GPU when asked for and available, otherwise the CPU with one warning."""

from __future__ import annotations

import sys

import paddle


def select_device(use_gpu: bool) -> str:
    """Set and return Paddle's device; ``--use_gpu`` on a CPU-only Paddle falls back with a warning."""
    if use_gpu and paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        device = f"gpu:{paddle.distributed.ParallelEnv().device_id}"
    else:
        if use_gpu:
            print(
                "warning: --use_gpu: this Paddle has no CUDA (or sees no GPU); running on the CPU",
                file=sys.stderr,
            )
        device = "cpu"
    paddle.set_device(device)
    return device
