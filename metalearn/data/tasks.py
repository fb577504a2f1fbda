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

from metalearn.data.images import to_float
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


AUGMENTATIONS = ("rot90", "flip", "crop", "jitter")
"""Training augmentations, each drawn once per class of a task (in this order):

* ``rot90``: rotate by a random multiple of 90° (the paper's Omniglot augmentation: every
  character becomes four classes);
* ``flip``: mirror left-right with probability 1/2;
* ``crop``: shift by up to ``size // 8`` pixels each way (a random crop of the image padded by
  reflection), so the network cannot rely on exact positions;
* ``jitter``: brightness and contrast (and, for RGB, saturation) factors from U[0.6, 1.4], as
  torchvision's ColorJitter(0.4, 0.4, 0.4), clipped to [0, 1].

Drawing them per class (not per image) keeps a class's images consistent with each other, as
rot90 does, while every task sees its classes in a new variant."""


def parse_augment(text: str) -> tuple[str, ...]:
    """``--augment``: ``none`` or a comma-separated subset of :data:`AUGMENTATIONS`."""
    names = [] if text in ("", "none") else [part.strip() for part in str(text).split(",")]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise UserError(
            f"unknown augmentation {unknown[0]!r} in --augment {text}; choose none or a "
            f"comma-separated list of {', '.join(AUGMENTATIONS)}"
        )
    return tuple(name for name in AUGMENTATIONS if name in names)


@dataclass(frozen=True)
class ClassImages:
    """Images of several classes, ragged: class ``c`` is ``pixels[offsets[c]:offsets[c + 1]]``.

    ``pixels`` is ``(images, channels, height, width)``: uint8 (image folders, seen as v / 255)
    or float32 (Omniglot, already in the network's convention).
    """

    pixels: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = self.offsets
        if (
            offsets.ndim != 1
            or len(offsets) < 2
            or offsets[0] != 0
            or offsets[-1] != len(self.pixels)
            or np.any(np.diff(offsets) <= 0)
        ):
            raise UserError(
                "class offsets must rise from 0 to the number of images, every class non-empty"
            )

    @classmethod
    def from_grid(cls, images: np.ndarray) -> ClassImages:
        """``(classes, drawings, C, H, W)``, every class the same size (Omniglot)."""
        classes, drawings = images.shape[:2]
        return cls(images.reshape(-1, *images.shape[2:]), np.arange(classes + 1) * drawings)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, label: int, rows: np.ndarray) -> np.ndarray:
        """Images ``rows`` of class ``label`` as float32 in the network's convention."""
        chosen = self.pixels[self.offsets[label] + rows]
        return to_float(chosen) if chosen.dtype == np.uint8 else chosen


class ImageTasks:
    """N-way K-shot tasks from images grouped by class (:class:`ClassImages`, or an Omniglot
    array of characters × drawings × image).

    ``augment`` (see :data:`AUGMENTATIONS`) transforms each class of a task; ``where`` names the
    split in messages.
    """

    def __init__(
        self,
        images: np.ndarray | ClassImages,
        n_way: int,
        k_spt: int,
        k_query: int,
        augment: str = "none",
        where: str = "this split",
    ):
        self.classes = images if isinstance(images, ClassImages) else ClassImages.from_grid(images)
        counts = self.classes.counts()
        if n_way > len(self.classes):
            raise UserError(
                f"n_way={n_way} is larger than the {len(self.classes)} classes of {where}"
            )
        if k_spt + k_query > counts.min():
            raise UserError(
                f"k_spt + k_query = {k_spt + k_query} exceeds the {counts.min()} images of the "
                f"smallest class of {where}"
            )
        self.n_way, self.k_spt, self.k_query = n_way, k_spt, k_query
        self.augment = parse_augment(augment)

    def sample(self, seed: int, stream: str, iteration: int, index: int) -> Task:
        rng = task_rng(seed, stream, iteration, index)
        classes = rng.choice(len(self.classes), size=self.n_way, replace=False)
        counts = self.classes.counts()
        per_class = self.k_spt + self.k_query
        support, query = [], []
        for char in classes:
            drawings = self.classes.take(char, rng.choice(counts[char], per_class, replace=False))
            drawings = augment_class(drawings, self.augment, rng)
            support.append(drawings[: self.k_spt])
            query.append(drawings[self.k_spt :])
        labels = np.arange(self.n_way, dtype=np.int64)
        return Task(
            x_support=np.ascontiguousarray(np.concatenate(support), dtype=np.float32),
            y_support=np.repeat(labels, self.k_spt),
            x_query=np.ascontiguousarray(np.concatenate(query), dtype=np.float32),
            y_query=np.repeat(labels, self.k_query),
        )


_LUMA = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)


def augment_class(
    images: np.ndarray, augment: tuple[str, ...], rng: np.random.Generator
) -> np.ndarray:
    """Apply :data:`AUGMENTATIONS` (parameters drawn once) to one class's images [n, C, H, W]."""
    if "rot90" in augment:
        images = np.rot90(images, k=int(rng.integers(4)), axes=(-2, -1))
    if "flip" in augment and rng.random() < 0.5:
        images = images[..., ::-1]
    if "crop" in augment:
        height, width = images.shape[-2:]
        pad = max(1, min(height, width) // 8)
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        images = padded[..., dy : dy + height, dx : dx + width]
    if "jitter" in augment:
        brightness, contrast, saturation = rng.uniform(0.6, 1.4, size=3).astype(np.float32)
        images = images * brightness
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        images = (images - mean) * contrast + mean
        if images.shape[1] == 3:
            gray = (images * _LUMA).sum(axis=1, keepdims=True)
            images = (images - gray) * saturation + gray
        images = np.clip(images, 0.0, 1.0)
    return images


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
