"""Side-by-side speed of our training step and a minimal PyTorch reference doing the same math.

    python bench/speed.py [--quick] [--json FILE] [--configs NAME ...]

With several configurations each runs in a fresh process of its own (see measure_in_child).

For each configuration the sides run in this one process, in turns (so machine noise hits all of
them): a turn is a block of back-to-back meta-iterations lasting at least BLOCK_SECONDS, after an
idle SETTLE_SECONDS. The pause matters: PyTorch's OpenMP threads spin for a while after its work
(and ours after oneDNN's), and a side run straight after another shared the CPU with those
spinning threads, which no user running one framework sees (measured on the sinusoid row:
ours ~15% slower, PyTorch ~15% faster than alone). After a warm-up block the table gives the
median ms per task over all blocks' meta-iterations, meta-iterations per second, the peak
resident memory seen while each side ran, and the ratios ours / reference. "Ours" is the exact
code path of train.py (``MetaLearner.meta_update``: directions, averaging, NaN check, Adam) on
random data of the right shapes. Two references (``torch`` from requirements-bench.txt) are written
here, both with the same network, loss, inner steps, order and meta-batch: "loop", PyTorch eager
autograd one task at a time, and "vmap", ``torch.func`` (``grad`` inside, ``vmap`` over the tasks
of the meta-batch, one ``grad`` of the summed query losses).

The ``pool84`` row is the paper's MiniImagenet setting: the max-pool network (PoolConvNet) on
84×84×3 images, 5-way 1-shot with 15 queries per class, 5 inner steps at α = 0.01, meta-batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn.runtime import tune_allocator

tune_allocator()  # as train.py does, before Paddle loads (re-executes this script once)

import paddle

from metalearn.data.tasks import ImageTasks, SinusoidTasks
from metalearn.kernels import onednn
from metalearn.learning.learner import MetaLearner, make_parameters
from metalearn.nets.builtin import MLP, ConvNet, PoolConvNet
from metalearn.nets.layer_net import LayerNet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from user_models import OmniglotNet, as_user_arrays  # the user-written copy of ConvNet

try:
    import torch
    import torch.nn.functional as TF
    from torch.func import grad, vmap
except ImportError:  # the table still shows our side
    torch = None


@dataclass(frozen=True)
class Config:
    name: str
    algo: str = "maml"
    n_way: int = 5
    steps: int = 1
    batch: int = 32
    inner_lr: float = 0.4
    dataset: str = "omniglot"
    evaluation: bool = False
    net: str = "conv"  # "pool": the MiniImagenet network on 84x84x3 images; "layer": ConvNet
    # written as a user's paddle.nn.Layer (tests/user_models.py), run through LayerNet

    def image_shape(self) -> tuple[int, int, int]:
        return (3, 84, 84) if self.net == "pool" else (1, 28, 28)

    adapt: str = "all"  # "head": ANIL (ours only: the reference adapts every weight)
    meta_lr: float = 1e-3  # the references' Adam (ours: train.py's --glob_meta_lr default)


CONFIGS = [
    Config("maml 5w1s 1 step mb32", steps=1),
    Config("maml 5w1s 5 steps mb32", steps=5),
    Config("maml 20w1s 5 steps mb16", n_way=20, steps=5, batch=16),
    Config("fomaml 5w1s 5 steps mb32", algo="fomaml", steps=5),
    Config("reptile 5w1s 5 steps mb32", algo="reptile", steps=5),
    Config("eval 5w1s 5 steps", steps=5, batch=1, evaluation=True),
    # Test-time adaptation, MAML (every weight) against ANIL (head only, body features once).
    Config("eval maml 5w1s 10 steps", steps=10, batch=4, evaluation=True),
    Config("eval anil 5w1s 10 steps", steps=10, batch=4, evaluation=True, adapt="head"),
    Config("eval maml 20w1s 10 steps", n_way=20, steps=10, batch=4, evaluation=True),
    Config("eval anil 20w1s 10 steps", n_way=20, steps=10, batch=4, evaluation=True, adapt="head"),
    Config("sinusoid maml K10 mb25", dataset="sinusoid", batch=25, inner_lr=0.01),
    Config("maml 5w1s pool84 5 steps mb4", steps=5, batch=4, inner_lr=0.01, net="pool"),
    # The same network as the first two rows, as a user's nn.Layer (stacked tasks too).
    Config("maml 5w1s 1 step mb32 user Layer", steps=1, net="layer"),
    Config("maml 5w1s 5 steps mb32 user Layer", steps=5, net="layer"),
]


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the max since ``reset``."""

    def __init__(self) -> None:
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._current())
            time.sleep(0.002)

    def reset(self) -> None:
        self.peak = self._current()


# -- ours: the train.py code path ------------------------------------------------------------------
def make_tasks(config: Config, iteration: int):
    if config.dataset == "sinusoid":
        sampler = SinusoidTasks(10, 10)
    else:
        shape = (max(40, config.n_way), 20, *config.image_shape())
        images = np.random.default_rng(0).random(shape, dtype=np.float32)
        sampler = ImageTasks(images, config.n_way, 1, 15)
    return [sampler.sample(0, "bench", iteration, i) for i in range(config.batch)]


class Ours:
    def __init__(self, config: Config, task_chunk: int | None = None):
        self.config = config
        if config.dataset == "sinusoid":
            self.net = MLP()
        elif config.net == "pool":
            self.net = PoolConvNet(n_way=config.n_way)
        else:
            self.net = ConvNet(n_way=config.n_way)
        self.reference_arrays = arrays = self.net.init_params(0)  # the references' names
        if config.net == "layer":
            model = OmniglotNet(config.n_way)
            self.net = LayerNet(model, config.n_way, config.image_shape())
            self.net.check_sample(paddle.rand([config.n_way, *config.image_shape()]))
            arrays = as_user_arrays(model, arrays)
        self.params = make_parameters(arrays)
        self.learner = MetaLearner(
            self.net,
            self.params,
            config.algo,
            config.inner_lr,
            config.steps,
            adapt=config.adapt,
            task_chunk=task_chunk,
        )
        self.optimizer = self.learner.make_optimizer()  # Adam 1e-3, or Reptile's SGD with ε = 1

    def step(self, tasks) -> None:
        if self.config.evaluation:
            self.learner.evaluate(tasks, self.config.steps)
        else:
            self.learner.meta_update(tasks, self.optimizer, len(tasks))


# -- reference: the same mathematics in PyTorch eager ---------------------------------------------
class Reference:
    def __init__(self, config: Config, arrays: dict[str, np.ndarray]):
        self.config = config
        self.params = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
        values = list(self.params.values())
        self.optimizer = (
            torch.optim.SGD(values, lr=1.0)
            if config.algo == "reptile"
            else torch.optim.Adam(values, lr=config.meta_lr)
        )

    def forward(self, x, p):
        if self.config.dataset == "sinusoid":
            for layer in range(3):
                bias = p[f"fc{layer}.bias"]
                x = torch.matmul(x, p[f"fc{layer}.weight"]) + (
                    bias.unsqueeze(1) if x.dim() == 3 else bias
                )
                if layer < 2:
                    x = torch.relu(x)
            return x
        pool = self.config.net == "pool"
        for block in range(4):
            x = TF.conv2d(x, p[f"conv{block}.weight"], stride=1 if pool else 2, padding=1)
            x = self.batch_norm(x, p[f"bn{block}.scale"], p[f"bn{block}.shift"])
            x = torch.relu(x)
            if pool:
                x = TF.max_pool2d(x, 2)
        features = torch.flatten(x, 1) if pool else x.mean(dim=(2, 3))
        return features @ p["head.weight"] + p["head.bias"]

    @staticmethod
    def batch_norm(x, scale, shift):
        return TF.batch_norm(x, None, None, scale, shift, True, eps=1e-3)

    def loss(self, out, y):
        if self.config.dataset == "sinusoid":
            return ((out - y) ** 2).mean(dim=(-2, -1)).sum()
        return TF.cross_entropy(out, y)

    def metric(self, out, y):
        if self.config.dataset == "sinusoid":
            return ((out - y) ** 2).mean(dim=(-2, -1))
        return (out.argmax(1) == y).float().mean()

    def adapt(self, p, x, y, create_graph, steps=None):
        trajectory = [p]
        for _ in range(self.config.steps if steps is None else steps):
            grads = torch.autograd.grad(
                self.loss(self.forward(x, p), y), list(p.values()), create_graph=create_graph
            )
            p = {k: w - self.config.inner_lr * g for (k, w), g in zip(p.items(), grads)}
            if not create_graph:
                p = {k: w.detach().requires_grad_() for k, w in p.items()}
            trajectory.append(p)
        return trajectory

    def chunks(self, tasks):
        if self.config.dataset == "sinusoid":
            stack = lambda f: torch.tensor(np.stack([getattr(t, f) for t in tasks]))  # noqa: E731
            return [
                (
                    stack("x_support"),
                    stack("y_support"),
                    stack("x_query"),
                    stack("y_query"),
                    len(tasks),
                )
            ]
        return [
            (
                torch.tensor(t.x_support),
                torch.tensor(t.y_support),
                torch.tensor(t.x_query),
                torch.tensor(t.y_query),
                1,
            )
            for t in tasks
        ]

    def start(self, count, differentiable):
        p = self.params
        if count > 1:
            p = {k: w.unsqueeze(0).expand(count, *w.shape) for k, w in p.items()}
        return (
            p if differentiable else {k: w.detach().clone().requires_grad_() for k, w in p.items()}
        )

    def evaluate(self, tasks, steps: int) -> np.ndarray:
        """Each task's query metric after 0..``steps`` inner steps, [tasks, steps + 1], as
        ``MetaLearner.evaluate``."""
        rows = []
        for x_s, y_s, x_q, y_q, count in self.chunks(tasks):
            trajectory = self.adapt(self.start(count, False), x_s, y_s, False, steps)
            with torch.no_grad():
                scores = [self.metric(self.forward(x_q, w), y_q) for w in trajectory]
            rows.append(torch.stack(scores, dim=-1).reshape(count, -1).numpy())
        return np.concatenate(rows)

    def step(self, tasks) -> None:
        algo = self.config.algo
        if self.config.evaluation:
            self.evaluate(tasks, self.config.steps)
            return
        total = {k: torch.zeros_like(w) for k, w in self.params.items()}
        for x_s, y_s, x_q, y_q, count in self.chunks(tasks):
            second = algo == "maml"
            adapted = self.adapt(self.start(count, second), x_s, y_s, second)[-1]
            loss = self.loss(self.forward(x_q, adapted), y_q)
            if algo == "reptile":
                for k in total:
                    diff = self.params[k].detach() - adapted[k].detach()
                    total[k] += diff.sum(0) if count > 1 else diff
                continue
            wrt = self.params if second else adapted
            grads = torch.autograd.grad(loss, list(wrt.values()))
            for k, g in zip(total, grads):
                total[k] += g if (second or count == 1) else g.sum(0)
        for k, w in self.params.items():
            w.grad = total[k] / len(tasks)
        self.optimizer.step()


class VmapReference(Reference):
    """The same mathematics written the fastest way PyTorch offers today: ``torch.func``.

    One task's query loss after its inner loop is a pure function of θ (``torch.func.grad`` for
    the inner gradients), ``vmap`` maps it over the stacked tasks of the meta-batch, and one
    ``grad`` of the summed query losses gives the meta-gradient. The network is already a pure
    function of its weight dict, so ``functional_call`` (which turns an ``nn.Module`` into one)
    would only add its own overhead here.

    Batch norm is written out: PyTorch's fused ``F.batch_norm`` under ``vmap`` gives a wrong
    second-order meta-gradient for the convolution weights (measured with torch 2.13, float64:
    2-5% off the per-task autograd result, which agrees with ours to 1e-14; without ``vmap`` it is
    right), so the benchmark would otherwise time a wrong computation.
    """

    @staticmethod
    def batch_norm(x, scale, shift):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=(0, 2, 3), keepdim=True)
        return centred * (torch.rsqrt(var + 1e-3) * scale.view(1, -1, 1, 1)) + shift.view(
            1, -1, 1, 1
        )

    def adapt_task(self, p, x, y, first_order):
        trajectory = [p]
        for _ in range(self.config.steps):
            grads = grad(lambda q: self.loss(self.forward(x, q), y))(p)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            p = {k: w - self.config.inner_lr * grads[k] for k, w in p.items()}
            trajectory.append(p)
        return trajectory

    def query_loss(self, p, x_s, y_s, x_q, y_q):
        adapted = self.adapt_task(p, x_s, y_s, self.config.algo != "maml")[-1]
        return self.loss(self.forward(x_q, adapted), y_q)

    def metrics(self, p, x_s, y_s, x_q, y_q):
        trajectory = self.adapt_task(p, x_s, y_s, True)
        return torch.stack([self.metric(self.forward(x_q, w), y_q) for w in trajectory])

    def step(self, tasks) -> None:
        data = [torch.tensor(np.stack([getattr(t, f) for t in tasks])) for f in FIELDS]
        p = {k: w.detach() for k, w in self.params.items()}
        per_task = (None, 0, 0, 0, 0)
        if self.config.evaluation:
            with torch.no_grad():
                [float(m) for m in vmap(self.metrics, in_dims=per_task)(p, *data).sum(0)]
            return
        if self.config.algo == "reptile":
            adapted = vmap(lambda q, x, y: self.adapt_task(q, x, y, True)[-1], (None, 0, 0))
            final = adapted(p, data[0], data[1])
            total = {k: (w - final[k]).sum(0) for k, w in p.items()}
        else:
            summed = lambda q: vmap(self.query_loss, in_dims=per_task)(q, *data).sum()  # noqa: E731
            total = grad(summed)(p)
        for k, w in self.params.items():
            w.grad = total[k] / len(tasks)
        self.optimizer.step()


FIELDS = ("x_support", "y_support", "x_query", "y_query")


SIDES = ("ours", "ref", "vmap")


BLOCK_SECONDS = 0.5  # each side runs back to back for at least this long, as a user's run does
SETTLE_SECONDS = 0.3  # idle before each block: the other side's OpenMP threads stop spinning


def run_block(runner, config: Config) -> list[float]:
    """Seconds of each step of one block: steps on fresh tasks until BLOCK_SECONDS have passed."""
    elapsed: list[float] = []
    while not elapsed or sum(elapsed) < BLOCK_SECONDS:
        tasks = make_tasks(config, len(elapsed))
        start = time.perf_counter()
        runner.step(tasks)
        elapsed.append(time.perf_counter() - start)
    return elapsed


def measure(
    config: Config,
    repeats: int,
    warmup: int,
    rss: PeakRSS,
    task_chunk: int | None = None,
    ours_only: bool = False,
) -> dict:
    ours = Ours(config, task_chunk)
    same_math = torch is not None and config.adapt == "all" and not ours_only
    arrays = ours.reference_arrays
    runners = {
        "ours": ours,
        "ref": Reference(config, arrays) if same_math else None,
        "vmap": VmapReference(config, arrays) if same_math else None,
    }
    times = {side: [] for side in SIDES}
    peaks = dict.fromkeys(SIDES, 0)
    for block in range(warmup + repeats):
        for side, runner in runners.items():
            if runner is None:
                continue
            time.sleep(SETTLE_SECONDS)
            rss.reset()
            elapsed = run_block(runner, config)
            if block >= warmup:
                times[side].extend(elapsed)
                peaks[side] = max(peaks[side], rss.peak)
    ms = {
        side: statistics.median(times[side]) * 1e3 / config.batch if times[side] else None
        for side in SIDES
    }
    row = {"config": config.name}
    for side in SIDES:
        row[f"{side}_ms_per_task"] = None if ms[side] is None else round(ms[side], 2)
        row[f"{side}_it_per_s"] = (
            None if ms[side] is None else round(1e3 / (ms[side] * config.batch), 2)
        )
        row[f"{side}_peak_rss_mb"] = round(peaks[side] / 2**20) if ms[side] else None
    for side in ("ref", "vmap"):
        row[f"ratio_{side}"] = None if ms[side] is None else round(ms["ours"] / ms[side], 2)
    return row


COLUMNS = (  # (heading, key)
    ("configuration", "config"),
    ("ours ms/task", "ours_ms_per_task"),
    ("loop ms/task", "ref_ms_per_task"),
    ("vmap ms/task", "vmap_ms_per_task"),
    ("vs loop", "ratio_ref"),
    ("vs vmap", "ratio_vmap"),
    ("ours it/s", "ours_it_per_s"),
    ("loop it/s", "ref_it_per_s"),
    ("vmap it/s", "vmap_it_per_s"),
    ("RSS ours MB", "ours_peak_rss_mb"),
    ("RSS loop MB", "ref_peak_rss_mb"),
    ("RSS vmap MB", "vmap_peak_rss_mb"),
)


def print_table(rows: list[dict]) -> None:
    widths = [28] + [max(len(heading), 7) for heading, _ in COLUMNS[1:]]
    cells = lambda values: " ".join(  # noqa: E731
        f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(values, widths))
    )
    header = cells([heading for heading, _ in COLUMNS])
    print(header)
    print("-" * len(header))
    for r in rows:
        print(cells(["-" if r[key] is None else r[key] for _, key in COLUMNS]))


def selects(wanted: str, name: str) -> bool:
    """A configuration's full name selects only it; any other string every name containing it."""
    exact = any(wanted == config.name for config in CONFIGS)
    return wanted == name if exact else wanted in name


def measure_here(config: Config, args: argparse.Namespace) -> dict:
    if args.quick:
        config = Config(**{**config.__dict__, "batch": min(config.batch, 2)})
    repeats = 1 if args.quick else args.repeats
    row = measure(config, repeats, 1, PeakRSS(), args.task_chunk, args.ours_only)
    print(f"measured {config.name}", file=sys.stderr)
    return row


def measure_in_child(config: Config, argv: list[str]) -> dict:
    """One configuration in a fresh process: rows measured one after another in one process
    ran in the heap and caches the earlier, bigger rows left (measured: the sinusoid row at
    0.15 ms/task there against 0.11 alone, PyTorch's 0.14 against 0.12)."""
    passed = _without_options(argv, ("--json", "--configs"))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        command = [sys.executable, __file__, *passed, "--configs", config.name, "--json", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[0]


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (the child gets its own)."""
    kept: list[str] = []
    dropping = False
    for item in argv:
        if item.startswith("--"):
            dropping = item.split("=", 1)[0] in options
        if not dropping:
            kept.append(item)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 tasks per batch, 1 repeat")
    parser.add_argument("--json", help="also write the table here as a JSON list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--configs", nargs="*", help="configuration names, or substrings selecting several"
    )
    parser.add_argument(
        "--kernels",
        choices=("fast", "native"),
        default="fast",
        help="our convolution kernels, as train.py's flag (default fast)",
    )
    parser.add_argument(
        "--task-chunk",
        type=int,
        help="tasks we stack per computation, as train.py's --task_chunk (1: one at a time)",
    )
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="skip the references: with one --configs row, RSS is then our own peak memory",
    )
    parser.add_argument(
        "--ref-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="PyTorch threads (default: all CPUs; on a busy machine 1 can be several times faster)",
    )
    args = parser.parse_args()
    if torch is None:
        print("torch is not installed (pip install -r requirements-bench.txt): ours only")
    else:
        torch.set_num_threads(args.ref_threads)
        print(f"reference threads: {args.ref_threads}")
    print(f"convolution kernels: {onednn.use_kernels(args.kernels)}")
    selected = [
        config
        for config in CONFIGS
        if not args.configs or any(selects(s, config.name) for s in args.configs)
    ]
    if len(selected) == 1:
        rows = [measure_here(selected[0], args)]
    else:
        rows = [measure_in_child(config, sys.argv[1:]) for config in selected]
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
