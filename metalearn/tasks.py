"""Task samplers: N-way K-shot image classification and the paper's sinusoid regression.

Every task is drawn from its own random generator seeded by (seed, stream, iteration, index), so
the tasks of iteration i are the same whether training runs in one process or several, starts
fresh or resumes: no sampler state needs to be saved. Streams keep training, validation and test
tasks apart.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from metalearn.errors import UserError


@dataclass(frozen=True)
class Task:
    """One few-shot problem: adapt on the support set, score on the query set."""

    x_support: np.ndarray
    y_support: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray


def task_rng(seed: int, stream: str, iteration: int, index: int) -> np.random.Generator:
    """The generator for one task, independent of how tasks are spread over processes."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), iteration, index])


class ImageTasks:
    """N-way K-shot tasks from an array of characters × drawings × image.

    With ``augment="rot90"`` each class of a task is rotated by a random multiple of 90°, which
    the paper uses to turn every character into four classes.
    """

    def __init__(
        self, images: np.ndarray, n_way: int, k_spt: int, k_query: int, augment: str = "none"
    ):
        classes, drawings = images.shape[:2]
        if n_way > classes:
            raise UserError(f"n_way={n_way} is larger than the {classes} characters of this split")
        if k_spt + k_query > drawings:
            raise UserError(
                f"k_spt + k_query = {k_spt + k_query} exceeds the {drawings} drawings per character"
            )
        if augment not in ("none", "rot90"):
            raise UserError(f"unknown augmentation {augment!r} (choose none or rot90)")
        self.images, self.n_way, self.k_spt, self.k_query = images, n_way, k_spt, k_query
        self.augment = augment

    def sample(self, seed: int, stream: str, iteration: int, index: int) -> Task:
        rng = task_rng(seed, stream, iteration, index)
        classes = rng.choice(len(self.images), size=self.n_way, replace=False)
        per_class = self.k_spt + self.k_query
        support, query = [], []
        for char in classes:
            drawings = self.images[char, rng.choice(self.images.shape[1], per_class, replace=False)]
            if self.augment == "rot90":
                drawings = np.rot90(drawings, k=int(rng.integers(4)), axes=(-2, -1))
            support.append(drawings[: self.k_spt])
            query.append(drawings[self.k_spt :])
        labels = np.arange(self.n_way, dtype=np.int64)
        return Task(
            x_support=np.ascontiguousarray(np.concatenate(support), dtype=np.float32),
            y_support=np.repeat(labels, self.k_spt),
            x_query=np.ascontiguousarray(np.concatenate(query), dtype=np.float32),
            y_query=np.repeat(labels, self.k_query),
        )


class SinusoidTasks:
    """Regress y = A sin(x − φ) from K points: A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (paper §5.1)."""

    def __init__(
        self,
        k_spt: int,
        k_query: int,
        amplitude=(0.1, 5.0),
        phase=(0.0, np.pi),
        x_range=(-5.0, 5.0),
    ):
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x", x_range)):
            if not low <= high:
                raise UserError(f"{name} range must have low <= high, got [{low}, {high}]")
        if amplitude[0] < 0:
            raise UserError(f"amplitude range must be non-negative, got {list(amplitude)}")
        self.k_spt, self.k_query = k_spt, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample_function(self, rng: np.random.Generator) -> tuple[float, float]:
        return float(rng.uniform(*self.amplitude)), float(rng.uniform(*self.phase))

    def sample(self, seed: int, stream: str, iteration: int, index: int) -> Task:
        rng = task_rng(seed, stream, iteration, index)
        amplitude, phase = self.sample_function(rng)
        x = rng.uniform(*self.x_range, size=(self.k_spt + self.k_query, 1)).astype(np.float32)
        y = (amplitude * np.sin(x - phase)).astype(np.float32)
        return Task(x[: self.k_spt], y[: self.k_spt], x[self.k_spt :], y[self.k_spt :])
