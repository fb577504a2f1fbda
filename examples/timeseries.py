"""Few-shot classification of time series: a 1-D convolutional network meta-learned with
``metalearn.MAML`` on a generated family of tasks, evaluated on held-out tasks.

    python examples/timeseries.py [--iterations 600 --meta-batch 4 --inner-lr 0.4 --steps 1
                                   --order second|first|reptile --seed 0 --test-tasks 600
                                   --out work/timeseries]
    python -m metalearn.audit examples.timeseries:make_model --input-shape 1,128 --n-way 5

A task is N-way K-shot: its classes are fresh random waveforms, sums of sinusoids of the same
frequencies with other amplitudes and phases, and each example is its class's waveform shifted
in time, scaled and noisy, so only the support set tells the classes apart. Training and test
tasks come from disjoint seeded streams (metalearn.data.tasks.task_rng). The table compares the
meta-learned network after 0..--test-steps inner steps with the same network adapted from its
random initialisation, and with the nearest class mean of the raw signals and of their magnitude
spectra (no learning); the numbers are also written to ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from metalearn.runtime import tune_allocator

if __name__ == "__main__":
    tune_allocator()  # as train.py does, before Paddle loads (re-executes this script once)

import paddle
import paddle.nn as nn

import metalearn
from metalearn.data.tasks import Task, task_rng
from metalearn.errors import UserError, run_cli
from metalearn.fileio import write_json
from metalearn.learning.learner import to_tensors
from metalearn.training.evaluation import summarise

BLOCKS = 4
"""Convolution blocks, each halving the length: signals need at least 2**BLOCKS samples."""
TRAIN, TEST = "train", "test"
"""The task streams: disjoint seeded generators (task_rng), so test tasks are never trained on."""


class SignalTasks:
    """N-way K-shot tasks of 1-D signals of ``length`` samples, drawn like the project's image
    tasks: ``sample(seed, stream, iteration, index)`` depends on its arguments only.

    The classes of a task share their frequencies (a sum of ``COMPONENTS`` sinusoids of 1-10
    cycles per window) and differ in the amplitudes and phases of those components: their
    spread tells them apart no better than chance, their dominant frequency only partly
    (tests/test_example_timeseries.py). Each example is its class's waveform shifted by up to a
    quarter of the window, scaled by 0.6-1.4, plus Gaussian noise.
    """

    COMPONENTS = 3

    def __init__(self, n_way: int, k_shot: int, k_query: int, length: int = 128, noise=0.5):
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.length, self.noise = length, noise

    def sample(self, seed: int, stream: str, iteration: int, index: int) -> Task:
        rng = task_rng(seed, stream, iteration, index)
        frequency = rng.uniform(1.0, 10.0, self.COMPONENTS)
        amplitude = rng.uniform(0.5, 1.5, (self.n_way, self.COMPONENTS))
        phase = rng.uniform(0.0, 2 * np.pi, (self.n_way, self.COMPONENTS))
        waveforms = frequency, amplitude, phase
        x_support, y_support = self._examples(rng, waveforms, self.k_shot)
        x_query, y_query = self._examples(rng, waveforms, self.k_query)
        return Task(x_support, y_support, x_query, y_query)

    def _examples(self, rng: np.random.Generator, waveforms, shots: int):
        """``shots`` examples per class: x [N·shots, 1, length] float32, labels in class order."""
        frequency, amplitude, phase = (w[..., None] for w in waveforms)  # [..., components, 1]
        time = np.arange(self.length) / self.length
        signals = []
        for label in range(self.n_way):
            shift = rng.uniform(0.0, 0.25, (shots, 1, 1))
            angle = 2 * np.pi * frequency * (time + shift) + phase[label]
            waves = (amplitude[label] * np.sin(angle)).sum(axis=1)  # [shots, length]
            waves /= np.sqrt((amplitude[label] ** 2).sum() / 2)  # unit RMS on average
            scale = rng.uniform(0.6, 1.4, (shots, 1))
            signals.append(scale * waves + self.noise * rng.standard_normal(waves.shape))
        x = np.concatenate(signals)[:, None, :].astype("float32")
        return x, np.arange(self.n_way).repeat(shots).astype("int64")


def make_model(input_shape: Sequence[int], n_way: int, hidden: int = 32) -> nn.Layer:
    """``BLOCKS`` × [Conv1D (3 taps), BatchNorm1D, ReLU, MaxPool1D (2)], the mean over time and
    a linear head: the paper's four-block network in one dimension. ``input_shape`` is (C, L)."""
    if len(input_shape) != 2 or input_shape[1] < 2**BLOCKS:
        raise ValueError(f"expected (channels, length >= {2**BLOCKS}), got {tuple(input_shape)}")
    widths = [input_shape[0]] + [hidden] * BLOCKS
    blocks = [
        layer
        for width_in, width in zip(widths, widths[1:])
        for layer in (
            nn.Conv1D(width_in, width, 3, padding=1),
            nn.BatchNorm1D(width),
            nn.ReLU(),
            nn.MaxPool1D(2),
        )
    ]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool1D(1), nn.Flatten(), nn.Linear(hidden, n_way))


def held_out_tasks(family: SignalTasks, seed: int, count: int) -> list[Task]:
    """The test tasks: the test stream's first ``count`` tasks."""
    return [family.sample(seed, TEST, 0, index) for index in range(count)]


def nearest_class_mean(task: Task, features: Callable[[np.ndarray], np.ndarray]) -> float:
    """Query accuracy of the nearest support-class mean of ``features`` of the signals: no
    learning at all."""
    support, query = features(task.x_support[:, 0]), features(task.x_query[:, 0])
    labels = range(task.y_support.max() + 1)
    means = np.stack([support[task.y_support == label].mean(axis=0) for label in labels])
    distances = ((query[:, None] - means[None]) ** 2).sum(axis=2)
    return float((distances.argmin(axis=1) == task.y_query).mean())


def magnitude_spectrum(signals: np.ndarray) -> np.ndarray:
    """|FFT| per signal: blind to time shifts, the hand-made feature for periodic signals."""
    return np.abs(np.fft.rfft(signals, axis=-1))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--n-way", type=int, default=5, help="classes per task (5)")
    add("--k-shot", type=int, default=5, help="support examples per class (5)")
    add("--k-query", type=int, default=15, help="query examples per class (15)")
    add("--length", type=int, default=128, help="samples per signal (128)")
    add("--iterations", type=int, default=600, help="meta-iterations (600)")
    add("--meta-batch", type=int, default=4, help="tasks per meta-iteration (4)")
    add("--meta-lr", type=float, default=3e-3, help="Adam's learning rate (0.003)")
    add("--inner-lr", type=float, default=0.4, help="inner step size (0.4)")
    add("--steps", type=int, default=1, help="inner steps in training (1)")
    add("--test-steps", type=int, default=5, help="inner steps at test time (5)")
    add("--order", choices=("second", "first", "reptile"), default="second")
    add("--seed", type=int, default=0)
    add("--test-tasks", type=int, default=600, help="held-out tasks (600)")
    add("--log-every", type=int, default=100, help="iterations between progress lines (100)")
    add("--out", default="work/timeseries", help="folder of results.json (work/timeseries)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Impossible settings as one UserError, before any work."""
    counts = {
        "--n-way": (args.n_way, 2, 100),
        "--k-shot": (args.k_shot, 1, 100),
        "--k-query": (args.k_query, 1, 100),
        "--length": (args.length, 2**BLOCKS, 10_000),
        "--iterations": (args.iterations, 1, 10**7),
        "--meta-batch": (args.meta_batch, 1, 1000),
        "--steps": (args.steps, 1, 100),
        "--test-steps": (args.test_steps, 1, 100),
        "--test-tasks": (args.test_tasks, 1, 100_000),
        "--log-every": (args.log_every, 1, 10**7),
    }
    for flag, (value, low, high) in counts.items():
        if not low <= value <= high:
            raise UserError(f"{flag} {value}: must be an integer from {low} to {high}")
    for flag, value in (("--meta-lr", args.meta_lr), ("--inner-lr", args.inner_lr)):
        if not 0 < value < 100:  # also refuses NaN
            raise UserError(f"{flag} {value}: must be a positive number below 100")


def meta_train(maml: metalearn.MAML, family: SignalTasks, args: argparse.Namespace) -> list:
    """Adam on the meta-batch mean of ``learner.loss``; returns [iteration, mean query loss]
    per ``--log-every`` iterations. A loss that is not finite stops it (one UserError)."""
    optimizer = paddle.optimizer.Adam(learning_rate=args.meta_lr, parameters=maml.parameters())
    curve, total, start = [], 0.0, time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        batch_loss = 0.0
        for index in range(args.meta_batch):
            task = family.sample(args.seed, TRAIN, iteration, index)
            x_s, y_s, x_q, y_q = to_tensors([task])
            loss = maml.clone().adapt(x_s, y_s).loss(x_q, y_q) / args.meta_batch
            loss.backward()
            batch_loss += float(loss)
        if not np.isfinite(batch_loss):
            raise UserError(
                f"the query loss is {batch_loss} at iteration {iteration}: lower --meta-lr or "
                "--inner-lr"
            )
        total += batch_loss
        optimizer.step()
        optimizer.clear_grad()
        if iteration % args.log_every == 0 or iteration == args.iterations:
            done = iteration - (curve[-1][0] if curve else 0)
            curve.append([iteration, total / done])
            elapsed = time.perf_counter() - start
            print(f"iteration {iteration}: query loss {total / done:.4f} ({elapsed:.0f} s)")
            total = 0.0
    return curve


def evaluate(model: nn.Layer, tasks: list[Task], args: argparse.Namespace) -> dict:
    """Accuracy after 0..--test-steps inner steps from the model's weights: mean and 95% CI."""
    learner = metalearn.MAML(model, inner_lr=args.inner_lr, steps=args.steps).learner
    mean, ci95 = summarise(learner.evaluate(tasks, args.test_steps))
    return {"mean": mean.tolist(), "ci95": ci95.tolist()}


def format_table(results: dict[str, dict]) -> str:
    """One row per method, one column per inner step: accuracy ± 95% CI."""
    width = max(map(len, results))
    steps = max(len(r["mean"]) for r in results.values())
    lines = [" ".join([" " * width, *(f"{f'step {s}':>15}" for s in range(steps))])]
    for name, row in results.items():
        cells = [f"{m:.3f} ± {c:.3f}".rjust(15) for m, c in zip(row["mean"], row["ci95"])]
        lines.append(" ".join([name.ljust(width), *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    family = SignalTasks(args.n_way, args.k_shot, args.k_query, args.length)
    test_tasks = held_out_tasks(family, args.seed, args.test_tasks)
    paddle.seed(args.seed)
    model = make_model((1, args.length), args.n_way)
    initial = copy.deepcopy(model)  # the no-meta-learning baseline starts here
    maml = metalearn.MAML(model, inner_lr=args.inner_lr, steps=args.steps, order=args.order)
    started = time.perf_counter()
    curve = meta_train(maml, family, args)
    trained = time.perf_counter()
    results = {
        f"MAML ({args.order} order)": evaluate(model, test_tasks, args),
        "same network, random init": evaluate(initial, test_tasks, args),
    }
    for name, features in (("raw", np.asarray), ("magnitude spectrum", magnitude_spectrum)):
        scores = [[nearest_class_mean(task, features)] for task in test_tasks]
        mean, ci95 = summarise(np.array(scores))
        results[f"nearest class mean, {name}"] = {"mean": mean.tolist(), "ci95": ci95.tolist()}
    summary = {
        "settings": vars(args),
        "train_seconds": round(trained - started, 1),
        "evaluate_seconds": round(time.perf_counter() - trained, 1),
        "train_curve": curve,
        "accuracy": results,
    }
    write_json(Path(args.out) / "results.json", summary)
    print(
        f"{args.test_tasks} held-out {args.n_way}-way {args.k_shot}-shot tasks, "
        f"{args.k_query} queries per class: accuracy ± 95% CI after each inner step"
    )
    print(format_table(results))
    print(f"results: {Path(args.out) / 'results.json'}")
    return summary


if __name__ == "__main__":
    run_cli(main)
