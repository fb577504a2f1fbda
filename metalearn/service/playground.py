"""The playground engine: adapt a trained run's θ to a drawn task and report every inner step.

Paddle is not thread-safe, so every model load and adaptation runs on one worker thread; at
most ``waiting`` requests queue behind the running one and the rest are refused at once
(:class:`Busy`, HTTP 503 with Retry-After) instead of piling up. Loaded runs stay in a small
LRU cache keyed by the checkpoint's path and modification time.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalearn import omniglot
from metalearn.checkpoint import check_compatible, load_checkpoint
from metalearn.errors import UserError
from metalearn.service.runs import list_runs

MAX_WAY = 1000
MAX_CHECKPOINT_BYTES = 100 * 1024 * 1024


class Busy(Exception):
    """Too many adaptation requests are waiting already."""


@dataclass
class LoadedRun:
    learner: object
    n_way: int
    k_spt: int
    inner_lr: float


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def load_run(best: Path) -> LoadedRun:
    """A run's best θ as a MetaLearner with the run's inner learning rate (hostile-file checks)."""
    from metalearn.algorithms import MetaLearner, make_parameters
    from metalearn.nets import ConvNet

    if best.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{best} is larger than {MAX_CHECKPOINT_BYTES} bytes")
    checkpoint = load_checkpoint(best)
    network = checkpoint.meta.get("network")
    config = checkpoint.meta.get("config")
    n_way = network.get("n_way") if isinstance(network, dict) else None
    # Only the standard architecture: a file must not make this process build any network it likes.
    if not (isinstance(n_way, int) and 1 <= n_way <= MAX_WAY) or network != ConvNet(n_way).config():
        raise UserError(f"{best.parent.name} is not a run of the Omniglot network")
    if not isinstance(config, dict):
        raise UserError(f"{best} holds no run configuration")
    net = ConvNet(n_way)
    fresh = net.init_params(0)
    check_compatible(checkpoint, net.config(), {k: tuple(v.shape) for k, v in fresh.items()})
    if any(v.dtype != np.float32 or not np.isfinite(v).all() for v in checkpoint.params.values()):
        raise UserError(f"{best} holds parameters that are not finite float32 numbers")
    inner_lr, k_spt = config.get("glob_base_lr"), config.get("k_spt", 1)
    if not (_number(inner_lr) and math.isfinite(inner_lr) and inner_lr > 0):
        raise UserError(f"{best} has no usable inner learning rate")
    if not (_number(k_spt) and isinstance(k_spt, int) and k_spt >= 1):
        raise UserError(f"{best} has no usable k_spt")
    learner = MetaLearner(net, make_parameters(checkpoint.params), "maml", float(inner_lr), 1)
    return LoadedRun(learner, net.n_way, k_spt, float(inner_lr))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PlaygroundEngine:
    """One worker thread for all Paddle work, a bounded wait line, an LRU of loaded runs."""

    def __init__(self, waiting: int = 8, cache_size: int = 4):
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playground")
        self._slots = threading.BoundedSemaphore(waiting + 1)
        self._cache: OrderedDict[tuple, LoadedRun] = OrderedDict()
        self._cache_size = cache_size

    def submit(self, best: Path, support_x, support_y, query_x, steps: int) -> Future:
        """Queue one adaptation; raises :class:`Busy` when the wait line is full."""
        if not self._slots.acquire(blocking=False):
            raise Busy
        try:
            future = self._worker.submit(self._adapt, best, support_x, support_y, query_x, steps)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _load(self, best: Path) -> LoadedRun:
        key = (str(best), best.stat().st_mtime_ns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        loaded = load_run(best)
        self._cache[key] = loaded
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return loaded

    def _adapt(self, best: Path, support_x, support_y, query_x, steps: int) -> dict:
        from metalearn import ops
        from metalearn.tasks import Task

        # The oneDNN operator crashes when a thread other than the one that first used it calls
        # it (measured: SIGSEGV in the OpenMP runtime); Paddle's own kernels compute the same
        # function and are safe here. Set per call: an in-process training may switch back.
        ops.use_kernels("native")
        run = self._load(best)
        labels = sorted(set(support_y.tolist()))
        if labels != list(range(run.n_way)):
            raise UserError(
                f"support labels must be exactly 0..{run.n_way - 1} (each at least once) for "
                f"this {run.n_way}-way run, got {labels}"
            )
        task = Task(
            x_support=support_x[:, None],
            y_support=support_y,
            x_query=query_x[:, None],
            y_query=np.zeros(len(query_x), np.int64),
        )
        logits = run.learner.predict_after_steps(task, query_x[:, None], range(steps + 1))
        probabilities = np.stack([softmax(logits[k]) for k in range(steps + 1)], axis=1)
        return {
            "n_way": run.n_way,
            "k_spt": run.k_spt,
            "steps": steps,
            "inner_lr": run.inner_lr,
            "probabilities": probabilities.tolist(),
            "predictions": probabilities.argmax(axis=-1).tolist(),
        }


def playground_runs(work_dir: Path) -> dict:
    """Completed Omniglot runs with a best.npz; the default is the best tested one (else newest)."""
    runs = []
    for run in list_runs(work_dir):
        config = run["config"]
        if run["status"] != "complete" or run.get("dataset") != "omniglot":
            continue
        if not (work_dir / run["name"] / "best.npz").is_file():
            continue
        test = run["test"]
        runs.append(
            {
                "name": run["name"],
                "algo": run.get("algo"),
                "n_way": run.get("n_way"),
                "k_spt": run.get("k_spt"),
                "inner_lr": config.get("glob_base_lr"),
                "steps_test": config.get("glob_update_step_test"),
                "test_accuracy": test["mean"][-1] if test and test["mean"] else None,
            }
        )
    tested = [r for r in runs if r["test_accuracy"] is not None]
    default = max(tested, key=lambda r: r["test_accuracy"]) if tested else (runs or [None])[-1]
    return {"runs": runs, "default": default["name"] if default else None}


class TestImages:
    """The packed test split (loaded once), for showing a real task."""

    __test__ = False  # not a pytest class

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._images: np.ndarray | None = None
        self._lock = threading.Lock()

    def images(self) -> np.ndarray:
        with self._lock:
            if self._images is None:
                self._images = omniglot.load_split(self.data_dir, "test")
            return self._images

    def random_task(self, n_way: int, k_spt: int, seed: int | None) -> dict:
        images = self.images()
        if n_way > len(images) or k_spt + 1 > images.shape[1]:
            raise UserError(f"the test split cannot make a {n_way}-way {k_spt}-shot task")
        rng = np.random.default_rng(seed)
        support, query = [], []
        for label, char in enumerate(rng.choice(len(images), n_way, replace=False)):
            drawings = images[char, rng.choice(images.shape[1], k_spt + 1, replace=False), 0]
            support += [{"image": _rounded(d), "label": label} for d in drawings[:k_spt]]
            query.append({"image": _rounded(drawings[k_spt]), "label": label})
        order = rng.permutation(len(query))
        return {"support": support, "query": [query[i] for i in order]}


def _rounded(image: np.ndarray) -> list:
    return np.round(image.astype(np.float64), 4).tolist()
