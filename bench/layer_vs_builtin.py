"""The Omniglot ConvNet as a user's ``paddle.nn.Layer`` (LayerNet) against the built-in network,
interleaved in one process so that machine noise hits all sides alike.

    python bench/layer_vs_builtin.py [--steps 1 5] [--rounds 8] [--batch 32]

Sides, each a train.py meta-iteration (``MetaLearner.meta_update``, fast kernels, MAML 5-way
1-shot, 15 queries, second order) on the same tasks: the built-in ConvNet as train.py runs it
(8 tasks stacked per computation), the built-in one task at a time (``--task_chunk 1``), and the
user-Layer copy (``tests/user_models.py``), which stacks tasks like the built-in once its sample
batch showed that its ``forward`` computes them (LayerNet.check_sample). Every round
runs each side once, in a rotated order, after an idle pause; the table gives the median ms per
task and the ratios to the built-in sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

from speed import SETTLE_SECONDS, Config, Ours, make_tasks  # tunes the allocator first

from metalearn.kernels import onednn

SIDES = {
    "built-in (stacked, train.py's default)": ("conv", None),
    "built-in, one task at a time": ("conv", 1),
    "user Layer (LayerNet)": ("layer", None),
}


def measure(steps: int, rounds: int, batch: int) -> dict[str, float]:
    runners = {
        side: Ours(Config(f"{net} {steps}", steps=steps, batch=batch, net=net), chunk)
        for side, (net, chunk) in SIDES.items()
    }
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    names = list(SIDES)
    for round_ in range(rounds + 1):  # round 0 warms up
        tasks = make_tasks(next(iter(runners.values())).config, round_)
        for side in names[round_ % len(names) :] + names[: round_ % len(names)]:
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            runners[side].step(tasks)
            if round_:
                times[side].append((time.perf_counter() - start) * 1e3 / batch)
    return {side: statistics.median(values) for side, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"convolution kernels: {onednn.use_kernels('fast')}")
    for steps in args.steps:
        ms = measure(steps, args.rounds, args.batch)
        stacked, single, layer = ms.values()
        print(f"MAML 5-way 1-shot, {steps} inner step(s), meta-batch {args.batch}, median ms/task:")
        for side, value in ms.items():
            print(f"  {side:40s} {value:8.1f}")
        print(f"  user Layer / built-in stacked: {layer / stacked:.2f}; "
              f"/ built-in one at a time: {layer / single:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
