"""ResNet-12, the standard few-shot backbone, meta-trained with ``metalearn.MAML`` on a packed
image-folder set (docs/examples.md).

    python examples/resnet12.py --omniglot-zips ZIPS --folder FOLDER   # Omniglot -> DIR/<class>/
    python make_data.py --images FOLDER --name NAME --size 28 --channels 1 --out DATA
    python examples/resnet12.py --data NAME --data_dir DATA --widths 16,32,64,128 --out OUT

The network is plain ``paddle.nn`` layers, so MAML differentiates through it exactly (second
order) via LayerNet's routing; tasks come from the project's samplers (metalearn/data), and the
loop is the one docs/models.md shows: ``maml.clone().adapt(support)`` then ``loss(query)``.
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's metalearn

from metalearn.runtime import tune_allocator

if __name__ == "__main__":
    tune_allocator()  # before Paddle loads, as train.py does (re-executes this script once)

import paddle
from paddle import nn

from metalearn.data import folders, omniglot
from metalearn.data.tasks import ImageTasks, Task
from metalearn.errors import UserError, run_cli
from metalearn.fileio import write_json
from metalearn.learning.api import MAML
from metalearn.learning.learner import to_tensors
from metalearn.runs.checkpoint import Checkpoint, save_checkpoint
from metalearn.training.evaluation import summarise

FULL_WIDTHS = (64, 160, 320, 640)
"""The usual ResNet-12 (Lee et al. 2019, MetaOptNet): ~12.4M parameters on RGB."""
DEFAULT_WIDTHS = (16, 32, 64, 128)
"""This script's default: the widths a 2-core CPU meta-trains in second order in ~20 minutes."""
TINY_WIDTHS = (2, 3, 3, 4)
"""Small enough for the float64 finite-difference audit in seconds."""
MIN_SIDE = 16
"""Four 2x2 max-pools need at least 16 pixels a side."""
SLOPE = 0.1


# -- the network -------------------------------------------------------------------------------
def conv_bn(in_channels: int, out_channels: int, kernel: int) -> list[nn.Layer]:
    """A bias-free convolution and its batch norm (the norm's shift is the bias)."""
    conv = nn.Conv2D(in_channels, out_channels, kernel, padding=kernel // 2, bias_attr=False)
    return [conv, nn.BatchNorm2D(out_channels)]


class ResidualBlock(nn.Layer):
    """Three 3x3 conv-BN (LeakyReLU 0.1 after the first two), plus a 1x1 conv-BN shortcut,
    then LeakyReLU and a 2x2 max-pool: ResNet-12's block as in MetaOptNet."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(in_channels, out_channels, 3),
            nn.LeakyReLU(SLOPE),
            *conv_bn(out_channels, out_channels, 3),
            nn.LeakyReLU(SLOPE),
            *conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1))
        self.out = nn.Sequential(nn.LeakyReLU(SLOPE), nn.MaxPool2D(2))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Layer):
    """Four residual blocks of ``widths`` channels, global average pooling, a linear head."""

    def __init__(self, n_way: int, channels: int, widths: Sequence[int] = FULL_WIDTHS):
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet-12 needs four positive widths, got {tuple(widths)}")
        ins = (channels, *widths[:3])
        self.blocks = nn.Sequential(*(ResidualBlock(i, o) for i, o in zip(ins, widths)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2D(1), nn.Flatten())
        self.head = nn.Linear(widths[-1], n_way)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.pool(self.blocks(x)))


def make_model(
    input_shape: Sequence[int], n_way: int, widths: Sequence[int] = FULL_WIDTHS
) -> ResNet12:
    """``train.py --net examples.resnet12:make_model`` / the audit: ResNet-12 for (C, H, W)."""
    channels, height, width = input_shape
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"ResNet-12 pools four times: images need {MIN_SIDE}+ pixels a side")
    return ResNet12(n_way, channels, widths)


def make_tiny_model(input_shape: Sequence[int], n_way: int) -> ResNet12:
    """The same network at :data:`TINY_WIDTHS`, for ``python -m metalearn.audit``."""
    return make_model(input_shape, n_way, TINY_WIDTHS)


# -- Omniglot's zips as an image folder ----------------------------------------------------------
def omniglot_to_folder(source: Path, folder: Path) -> int:
    """Write Omniglot's drawings (the official zips in ``source``, or their extracted folders)
    as ``folder/<alphabet>_<character>/<drawing>.png``, the layout ``make_data.py --images``
    packs; returns the number of classes.

    The layout is checked by the project's Omniglot reader; the PNGs are copied unchanged.
    """
    sources = omniglot.find_source(source)
    characters = omniglot.list_characters(sources)
    names = [f"{c.alphabet}_{c.character}" for c in characters]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: two alphabets give the same class folder name")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--folder {folder} is not empty; give a new folder")
    archives = {name: zipfile.ZipFile(path) for name, path in sources.items() if path.is_file()}
    try:
        for name, character in zip(names, characters):
            (folder / name).mkdir(parents=True)
            for member in character.members:
                archive = archives.get(character.set_name)
                data = archive.read(member) if archive else (source / member).read_bytes()
                (folder / name / member.rsplit("/", 1)[-1]).write_bytes(data)
    finally:
        for archive in archives.values():
            archive.close()
    return len(characters)


# -- meta-training -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="an image set packed by make_data.py --images DIR --name NAME")
    data.add_argument("--data_dir", "--data-dir", type=Path, default=Path("."), help="its folder")
    data.add_argument("--omniglot-zips", type=Path, help="convert Omniglot's zips in this folder")
    data.add_argument("--folder", type=Path, help="... into this new folder, then stop")
    net = parser.add_argument_group("network and tasks")
    net.add_argument(
        "--widths",
        default=",".join(map(str, DEFAULT_WIDTHS)),
        help="the four blocks' channels (default %(default)s; the usual ResNet-12: "
        f"{','.join(map(str, FULL_WIDTHS))})",
    )
    net.add_argument("--n-way", type=int, default=5)
    net.add_argument("--k-shot", type=int, default=1)
    net.add_argument("--k-query", type=int, default=15, help="query images per class (15)")
    learn = parser.add_argument_group("meta-learning")
    learn.add_argument("--order", choices=("second", "first"), default="second")
    learn.add_argument("--iterations", type=int, default=1000, help="meta-updates (1000)")
    learn.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-update (4)")
    learn.add_argument("--meta-lr", type=float, default=1e-3, help="Adam's rate (0.001)")
    learn.add_argument(
        "--inner-lr", type=float, default=0.1, help="inner SGD step size (0.1; 0.4 diverged)"
    )
    learn.add_argument("--steps", type=int, default=1, help="inner steps in training (1)")
    learn.add_argument("--steps-test", type=int, default=3, help="inner steps when scoring (3)")
    learn.add_argument("--val-every", type=int, default=100, help="iterations between scores")
    learn.add_argument("--val-tasks", type=int, default=100, help="validation tasks (100)")
    learn.add_argument("--test-tasks", type=int, default=600, help="test tasks (600)")
    learn.add_argument(
        "--minutes",
        type=float,
        default=0,
        help="stop meta-training after this much wall time (0: run all --iterations)",
    )
    learn.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/resnet12"), help="results folder")
    return parser.parse_args(argv)


LIMITS = {  # flag -> (lowest, highest) accepted value
    "n_way": (2, 100),
    "k_shot": (1, 100),
    "k_query": (1, 100),
    "iterations": (1, 1_000_000),
    "meta_batch": (1, 1000),
    "steps": (1, 20),
    "steps_test": (1, 100),
    "val_every": (1, 1_000_000),
    "val_tasks": (1, 100_000),
    "test_tasks": (1, 100_000),
    "seed": (0, 2**32 - 1),
}


def check_args(args: argparse.Namespace) -> tuple[int, ...]:
    """Refuse impossible settings before any work; returns the widths."""
    for name, (low, high) in LIMITS.items():
        if not low <= getattr(args, name) <= high:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be {low}..{high}, got {getattr(args, name)}")
    for flag, rate in (("--meta-lr", args.meta_lr), ("--inner-lr", args.inner_lr)):
        if not 0 < rate < 100:
            raise UserError(f"{flag} must be a positive number below 100, got {rate}")
    if not 0 <= args.minutes <= 10_000:
        raise UserError(f"--minutes must be 0..10000, got {args.minutes}")
    if args.data is None:
        raise UserError("--data NAME is missing (a set packed by make_data.py --images)")
    omniglot.check_writable_folder(args.out)
    return parse_widths(args.widths)


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 4 or not all(1 <= w <= 1024 for w in widths):
        raise UserError(
            f"--widths {text!r:.40}: expected four channel counts 1..1024, like 16,32,64,128"
        )
    return widths


def load_samplers(args: argparse.Namespace) -> dict[str, ImageTasks]:
    """The packed set's splits as N-way K-shot task samplers (the project's)."""
    samplers = {}
    for split in omniglot.SPLITS:
        images = folders.load_split(args.data_dir, args.data, split)
        where = f"the {split} split of {args.data}"
        samplers[split] = ImageTasks(images, args.n_way, args.k_shot, args.k_query, where=where)
    side = samplers["train"].classes.pixels.shape[-1]
    if side < MIN_SIDE:
        raise UserError(f"{args.data} has {side}x{side} images; ResNet-12 needs {MIN_SIDE}+")
    return samplers


def meta_step(maml: MAML, optimizer: paddle.optimizer.Optimizer, tasks: Sequence[Task]) -> float:
    """One meta-update on ``tasks`` through the library API; returns the mean query loss."""
    total = 0.0
    for task in tasks:
        x_s, y_s, x_q, y_q = to_tensors([task])
        loss = maml.clone().adapt(x_s, y_s).loss(x_q, y_q) / len(tasks)
        loss.backward()  # the task's meta-gradient accumulates in the model's .grad
        total += float(loss)
    if not np.isfinite(total):
        raise UserError(f"the meta-loss is {total}; lower --inner-lr or --meta-lr")
    optimizer.step()
    optimizer.clear_grad()
    return total


def score(maml: MAML, tasks: Sequence[Task], steps: int) -> dict[str, list[float]]:
    """Query accuracy after 0..steps inner steps (no meta-gradient): mean and 95% interval."""
    mean, ci95 = summarise(maml.learner.evaluate(tasks, steps))
    return {"acc_mean": mean.tolist(), "acc_ci95": ci95.tolist()}


def weights_of(model: nn.Layer) -> dict[str, np.ndarray]:
    return {name: p.numpy().copy() for name, p in model.named_parameters() if not p.stop_gradient}


def meta_train(
    maml: MAML, samplers: dict[str, ImageTasks], args: argparse.Namespace
) -> dict[str, object]:
    """Meta-train for ``--iterations`` (or ``--minutes``), scoring validation tasks every
    ``--val-every`` and at the end; the model ends at the best-scoring weights (accuracy after
    the last test-time step)."""
    optimizer = paddle.optimizer.Adam(learning_rate=args.meta_lr, parameters=maml.parameters())
    val_tasks = [samplers["val"].sample(args.seed, "val", 0, i) for i in range(args.val_tasks)]
    losses, validation, best = [], [], None
    start = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        tasks = [
            samplers["train"].sample(args.seed, "train", iteration, i)
            for i in range(args.meta_batch)
        ]
        losses.append(meta_step(maml, optimizer, tasks))
        out_of_time = 0 < args.minutes * 60 < time.perf_counter() - start
        if iteration % args.val_every and iteration != args.iterations and not out_of_time:
            continue
        scored = {"iteration": iteration, **score(maml, val_tasks, args.steps_test)}
        validation.append(scored)
        if best is None or scored["acc_mean"][-1] > best[0]["acc_mean"][-1]:
            best = (scored, weights_of(maml.model))
        print(
            f"iteration {iteration}: loss {np.mean(losses[-args.val_every :]):.4f}, validation "
            f"accuracy {scored['acc_mean'][-1]:.4f} ± {scored['acc_ci95'][-1]:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if out_of_time:
            break
    scored, weights = best
    for name, parameter in maml.model.named_parameters():
        if name in weights:
            parameter.set_value(weights[name])
    return {
        "iterations": len(losses),
        "train_seconds": time.perf_counter() - start,
        "query_loss": losses,
        "validation": validation,
        "best_iteration": scored["iteration"],
    }


def train_and_test(args: argparse.Namespace) -> dict[str, object]:
    """Build ResNet-12 for the set, meta-train it, score the test split; write the results and
    the best weights (atomically) under ``--out``."""
    widths = check_args(args)
    samplers = load_samplers(args)
    input_shape = samplers["train"].classes.pixels.shape[1:]
    paddle.seed(args.seed)
    model = make_model(input_shape, args.n_way, widths)
    maml = MAML(model, inner_lr=args.inner_lr, steps=args.steps, order=args.order)
    count = sum(int(np.prod(p.shape)) for p in maml.parameters())
    print(f"ResNet-12 {widths}: {count} parameters, {args.order} order, {args.data} {input_shape}")
    trained = meta_train(maml, samplers, args)
    start = time.perf_counter()
    tasks = [samplers["test"].sample(args.seed, "test", 0, i) for i in range(args.test_tasks)]
    test = {
        "tasks": args.test_tasks,
        "steps": args.steps_test,
        **score(maml, tasks, args.steps_test),
    }
    test["seconds"] = time.perf_counter() - start
    for step, (mean, ci95) in enumerate(zip(test["acc_mean"], test["acc_ci95"])):
        print(f"test accuracy after {step} steps: {mean:.4f} ± {ci95:.4f}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"settings": settings, "widths": widths, "parameters": count, **trained, "test": test}
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"widths": widths, "input_shape": list(input_shape), "n_way": args.n_way}
    save_checkpoint(args.out / "best.npz", Checkpoint(weights_of(model), meta))
    write_json(args.out / "results.json", results)
    print(f"results and weights written to {args.out}")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.omniglot_zips is None:
        train_and_test(args)
        return
    if args.folder is None:
        raise UserError("--omniglot-zips needs --folder (the image folder to write)")
    print(f"{omniglot_to_folder(args.omniglot_zips, args.folder)} classes written to {args.folder}")


if __name__ == "__main__":
    run_cli(main)
