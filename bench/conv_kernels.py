"""Milliseconds per call of Paddle's native conv kernels vs the oneDNN fast path (metalearn.kernels.onednn).

Covers the convolutions of the Omniglot conv net (3x3, stride 2, padding 1, 64 channels) at the
batch sizes MAML uses. Median of ``--repeats`` timed calls after warm-up, float32, CPU.

    python bench/conv_kernels.py [--batches 5 25 75] [--repeats 20]

Thread count and layout of the fast path follow PADDLE_MAML_FASTCONV_THREADS / _LAYOUT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

warnings.simplefilter("ignore")

import numpy as np
import paddle
from paddle import _C_ops

from metalearn.kernels.onednn import load_kernels

# (input channels, spatial size) of each conv layer's input; 64 output channels, 3x3, s2, p1.
LAYERS = [(1, 28), (64, 14), (64, 7), (64, 4)]


def native_forward(x, w, stride, padding):
    return _C_ops.conv2d(x, w, [stride] * 2, [padding] * 2, "EXPLICIT", [1, 1], 1, "NCHW")


def native_backward(x, w, dy, stride, padding):
    return _C_ops.conv2d_grad(x, w, dy, [stride] * 2, [padding] * 2, "EXPLICIT", [1, 1], 1, "NCHW")


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[5, 25, 75])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    kernels = load_kernels()
    if kernels is None:
        sys.exit("fast path unavailable (see the warning above)")
    rng = np.random.default_rng(0)
    stride, padding, out_channels = 2, 1, 64
    header = f"{'input':>16} | {'fwd native':>10} {'fwd onednn':>10} {'x':>5} | "
    header += f"{'bwd native':>10} {'bwd onednn':>10} {'x':>5}"
    print(header)
    print("-" * len(header))
    totals = np.zeros(4)
    with paddle.no_grad():
        for batch in args.batches:
            for channels, size in LAYERS:
                x = paddle.to_tensor(rng.standard_normal([batch, channels, size, size]), "float32")
                w = paddle.to_tensor(rng.standard_normal([out_channels, channels, 3, 3]), "float32")
                y = native_forward(x, w, stride, padding)
                dy = paddle.to_tensor(rng.standard_normal(y.shape), "float32")
                calls = [
                    partial(native_forward, x, w, stride, padding),
                    partial(kernels.forward, x, w, stride, padding),
                    partial(native_backward, x, w, dy, stride, padding),
                    partial(kernels.backward, x, w, dy, stride, padding),
                ]
                times = [time_ms(call, args.repeats) for call in calls]
                totals += times
                shape = f"[{batch},{channels},{size},{size}]"
                print(
                    f"{shape:>16} | {times[0]:10.3f} {times[1]:10.3f} {times[0] / times[1]:5.1f} | "
                    f"{times[2]:10.3f} {times[3]:10.3f} {times[2] / times[3]:5.1f}"
                )
    print("-" * len(header))
    print(
        f"{'sum':>16} | {totals[0]:10.3f} {totals[1]:10.3f} {totals[0] / totals[1]:5.1f} | "
        f"{totals[2]:10.3f} {totals[3]:10.3f} {totals[2] / totals[3]:5.1f}"
    )


if __name__ == "__main__":
    main()
