"""The playground engine: adapt a trained run's θ to a task and report every inner step.

An Omniglot run adapts to drawings (28x28, ink = 1); a run trained on an image-folder set
(``make_data.py --images``) to uploaded images, preprocessed for the network exactly as that set
was packed (:class:`ImageSpec`, from the set's manifest). Any learner ``train.py`` makes works:
it is rebuilt from the run's config like ``evaluate.py`` does, learned inner rates included.

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

from metalearn.data import folders, omniglot
from metalearn.data.tasks import ClassImages
from metalearn.errors import UserError
from metalearn.runs.checkpoint import read_checkpoint_meta
from metalearn.service.errors import Busy
from metalearn.service.images import png_data_url
from metalearn.service.runs import list_runs

MAX_WAY = 1000
MAX_CHECKPOINT_BYTES = 100 * 1024 * 1024
IMAGE_DATASETS = ("omniglot", "folder")


@dataclass(frozen=True)
class ImageSpec:
    """What a run's network sees: Omniglot drawings, or images of folder set ``data``.

    ``size`` and ``channels`` come from the set's manifest: the arguments of
    :func:`metalearn.data.images.preprocess` that packed it, so an upload is preprocessed the same way.
    """

    data: str | None
    size: int = omniglot.IMAGE_SIZE
    channels: int = 1

    @property
    def drawn(self) -> bool:
        return self.data is None

    def label(self) -> str:
        if self.drawn:
            return "Omniglot"
        return f"{self.data} ({self.channels}x{self.size}x{self.size})"


@dataclass
class LoadedRun:
    learner: object
    n_way: int
    k_spt: int
    inner_lr: float
    spec: ImageSpec


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def image_spec(config: object, data_dir: Path, source: str) -> ImageSpec:
    """The images of the run configured by ``config`` (from ``source``): drawings or a folder set.

    A folder set is looked up by name in the server's ``data_dir`` (as ``evaluate.py`` does with
    its ``--data_dir``); its manifest gives the preprocessing.
    """
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if dataset not in IMAGE_DATASETS:
        raise UserError(f"{source} is not a run on images (Omniglot or an image folder)")
    if dataset == "omniglot":
        return ImageSpec(None)
    name = config.get("data")
    if not isinstance(name, str):
        raise UserError(f"{source} names no image-folder set (--data)")
    settings = folders.read_manifest(data_dir, name)["preprocessing"]
    return ImageSpec(name, int(settings["size"]), int(settings["channels"]))


def run_image_spec(best: Path, data_dir: Path) -> ImageSpec:
    """:func:`image_spec` of a run's best.npz, reading only its meta record (no arrays)."""
    _check_file_size(best)
    return image_spec(read_checkpoint_meta(best).get("config"), data_dir, best.parent.name)


class ImageSpecs:
    """:func:`run_image_spec` per best.npz, kept while neither it nor its set's manifest changes.

    Every request needs it before decoding its images, and a folder set's manifest lists every
    packed file: too large to parse again each time.
    """

    def __init__(self, data_dir: Path, size: int = 64):
        self._data_dir, self._size = data_dir, size
        self._known: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, best: Path) -> ImageSpec:
        stamp = best.stat().st_mtime_ns
        with self._lock:
            known = self._known.get(str(best))
        if known and known[:2] == (stamp, self._manifest_stamp(known[2])):
            return known[2]
        spec = run_image_spec(best, self._data_dir)
        with self._lock:
            self._known[str(best)] = (stamp, self._manifest_stamp(spec), spec)
            while len(self._known) > self._size:
                self._known.popitem(last=False)
        return spec

    def _manifest_stamp(self, spec: ImageSpec) -> int | None:
        if spec.drawn:
            return None
        manifest = self._data_dir / folders.manifest_name(spec.data)
        return manifest.stat().st_mtime_ns if manifest.is_file() else None


def _check_file_size(best: Path) -> None:
    if best.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{best} is larger than {MAX_CHECKPOINT_BYTES} bytes")


def load_run(best: Path, data_dir: Path) -> LoadedRun:
    """A run's best θ as the MetaLearner its config trained (hostile-file checks).

    The network is built from the run's flags and its data's shape, never from the file's own
    description, and must then equal what the file says it holds.
    """
    from metalearn.learning.learner import MetaLearner, make_parameters
    from metalearn.training.config import check_saved_config
    from metalearn.training.evaluation import trained_arrays
    from metalearn.training.problems import image_network

    _check_file_size(best)
    meta = read_checkpoint_meta(best)
    config, name = meta.get("config"), best.parent.name
    if not isinstance(config, dict):
        raise UserError(f"{best} holds no run configuration")
    spec = image_spec(config, data_dir, name)
    inner_lr, k_spt, n_way = config.get("glob_base_lr"), config.get("k_spt", 1), config.get("n_way")
    if not (_number(inner_lr) and math.isfinite(inner_lr) and inner_lr > 0):
        raise UserError(f"{best} has no usable inner learning rate")
    if not (_number(k_spt) and isinstance(k_spt, int) and k_spt >= 1):
        raise UserError(f"{best} has no usable k_spt")
    if not (isinstance(n_way, int) and 1 <= n_way <= MAX_WAY):
        raise UserError(f"{best} has no usable n_way")
    config = check_saved_config(config, f"checkpoint {best}", fill_defaults=True)
    net = image_network(config, spec.channels, spec.size)
    if meta.get("network") != net.config():
        raise UserError(f"{name} is not a run of the {spec.label()} network its flags describe")
    arrays = trained_arrays(net, config, best)
    if any(v.dtype != np.float32 or not np.isfinite(v).all() for v in arrays.values()):
        raise UserError(f"{best} holds parameters that are not finite float32 numbers")
    learner = MetaLearner.from_config(net, make_parameters(arrays), config, 1)
    return LoadedRun(learner, n_way, k_spt, float(inner_lr), spec)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PlaygroundEngine:
    """One worker thread for all Paddle work, a bounded wait line, an LRU of loaded runs."""

    def __init__(self, data_dir: Path, waiting: int = 8, cache_size: int = 4):
        self._data_dir = data_dir
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playground")
        self._slots = threading.BoundedSemaphore(waiting + 1)
        self._cache: OrderedDict[tuple, LoadedRun] = OrderedDict()
        self._cache_size = cache_size

    def submit(
        self, best: Path, spec: ImageSpec, support_x, support_y, query_x, steps: int
    ) -> Future:
        """Queue one adaptation of images made for ``spec`` ([N, C, H, W] float32).

        Raises :class:`Busy` when the wait line is full.
        """
        return self.call(self._adapt, best, spec, support_x, support_y, query_x, steps)

    def call(self, function, *args) -> Future:
        """Queue ``function(*args)`` on the worker thread; :class:`Busy` if the line is full."""
        if not self._slots.acquire(blocking=False):
            raise Busy
        try:
            future = self._worker.submit(function, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _load(self, best: Path, spec: ImageSpec) -> LoadedRun:
        """The run for images made for ``spec`` (a re-packed set is a new key)."""
        key = (str(best), best.stat().st_mtime_ns, spec)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        loaded = load_run(best, self._data_dir)
        if loaded.spec != spec:  # the run or its set changed since the images were decoded
            raise UserError(f"{best.parent.name} changed while its images were read; try again")
        self._cache[key] = loaded
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return loaded

    def _adapt(self, best: Path, spec: ImageSpec, support_x, support_y, query_x, steps: int):
        from metalearn.data.tasks import Task
        from metalearn.kernels import onednn

        # The oneDNN kernels, as evaluate.py uses (Paddle's own where they cannot be built); they
        # run on this worker thread as on any other (tests/test_fastconv.py). Set per call: an
        # in-process training may have installed others.
        onednn.use_kernels("fast")
        run = self._load(best, spec)
        labels = sorted(set(support_y.tolist()))
        if labels != list(range(run.n_way)):
            raise UserError(
                f"support labels must be exactly 0..{run.n_way - 1} (each at least once) for "
                f"this {run.n_way}-way run, got {labels}"
            )
        task = Task(
            x_support=support_x,
            y_support=support_y,
            x_query=query_x,
            y_query=np.zeros(len(query_x), np.int64),
        )
        logits = run.learner.predict_after_steps(task, query_x, range(steps + 1))
        probabilities = np.stack([softmax(logits[k]) for k in range(steps + 1)], axis=1)
        return {
            "n_way": run.n_way,
            "k_spt": run.k_spt,
            "steps": steps,
            "inner_lr": run.inner_lr,
            "probabilities": probabilities.tolist(),
            "predictions": probabilities.argmax(axis=-1).tolist(),
        }


def playground_runs(work_dir: Path, specs: ImageSpecs) -> dict:
    """Completed image runs with a best.npz; the default is the best tested Omniglot run (else
    the best tested run, else the newest). A run whose images cannot be made (its folder set is
    not in the server's data_dir, say) is listed with the ``problem``."""
    runs = []
    for run in list_runs(work_dir):
        config = run["config"]
        best = work_dir / run["name"] / "best.npz"
        if run["status"] != "complete" or run.get("dataset") not in IMAGE_DATASETS:
            continue
        if not best.is_file():
            continue
        try:
            spec, problem = specs.get(best), None
        except UserError as error:
            spec, problem = None, str(error)
        test = run["test"]
        runs.append(
            {
                "name": run["name"],
                "algo": run.get("algo"),
                "dataset": run.get("dataset"),
                "data": config.get("data") if run.get("dataset") == "folder" else None,
                "input": "drawing" if run.get("dataset") == "omniglot" else "upload",
                "net": config.get("net"),
                "image_size": spec.size if spec else None,
                "channels": spec.channels if spec else None,
                "problem": problem,
                "n_way": run.get("n_way"),
                "k_spt": run.get("k_spt"),
                "inner_lr": config.get("glob_base_lr"),
                "steps_test": config.get("glob_update_step_test"),
                "test_accuracy": test["mean"][-1] if test and test["mean"] else None,
            }
        )
    default = _best(r for r in runs if r["dataset"] == "omniglot") or _best(runs)
    return {"runs": runs, "default": default["name"] if default else None}


def _best(runs) -> dict | None:
    """The best tested of ``runs``, else the newest, else None."""
    runs = list(runs)
    tested = [r for r in runs if r["test_accuracy"] is not None]
    return max(tested, key=lambda r: r["test_accuracy"]) if tested else (runs or [None])[-1]


class TestImages:
    """The packed test splits (each loaded once, the last few kept), for showing a real task."""

    __test__ = False  # not a pytest class

    def __init__(self, data_dir: Path, cache_size: int = 2):
        self.data_dir = data_dir
        self._splits: OrderedDict[str | None, ClassImages] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def images(self, data: str | None) -> ClassImages:
        """Omniglot's test split (``data`` None) or folder set ``data``'s."""
        with self._lock:
            if data not in self._splits:
                self._splits[data] = (
                    ClassImages.from_grid(omniglot.load_split(self.data_dir, "test"))
                    if data is None
                    else folders.load_split(self.data_dir, data, "test")
                )
                while len(self._splits) > self._cache_size:
                    self._splits.popitem(last=False)
            self._splits.move_to_end(data)
            return self._splits[data]

    def random_task(self, spec: ImageSpec, n_way: int, k_spt: int, seed: int | None) -> dict:
        """N x K support images and one query per class, as the adapt endpoint takes them:
        drawings as 28x28 arrays, folder images as PNG data URLs of the packed pixels."""
        classes = self.images(spec.data)
        usable = np.flatnonzero(classes.counts() >= k_spt + 1)
        if n_way > len(usable):
            raise UserError(f"the test split cannot make a {n_way}-way {k_spt}-shot task")
        encode = _rounded if spec.drawn else png_data_url
        rng = np.random.default_rng(seed)
        support, query = [], []
        for label, char in enumerate(rng.choice(usable, n_way, replace=False)):
            rows = rng.choice(classes.counts()[char], k_spt + 1, replace=False)
            chosen = classes.pixels[classes.offsets[char] + rows]
            support += [{"image": encode(image), "label": label} for image in chosen[:k_spt]]
            query.append({"image": encode(chosen[k_spt]), "label": label})
        order = rng.permutation(len(query))
        return {"support": support, "query": [query[i] for i in order]}


def _rounded(image: np.ndarray) -> list:
    """A drawing [1, 28, 28] (ink = 1) as the nested list the page paints."""
    return np.round(image[0].astype(np.float64), 4).tolist()
