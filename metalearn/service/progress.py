"""Live progress of a train.py / evaluate.py child, read from its output as it is written.

tqdm redraws its bar with ``\\r`` (``name:  40%|████  | 4/10 [00:02<00:03, 1.5it/s]``); the
trainer prints ``it N: meta-loss L  query accuracy per inner step [...]`` and ``validation at it
N: accuracy S after K steps`` lines. Everything else is kept as plain output lines.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import deque
from dataclasses import asdict, dataclass, field

_BAR = re.compile(r"(\d+)/(\d+) \[[^<\]]*<([^,\]]+)")
_LOG = re.compile(r"^it (\d+): meta-loss (\S+)\s+query (\w+) per inner step (\[.*\])")
_VALIDATION = re.compile(r"^validation at it (\d+): (\w+) (\S+) after")


@dataclass
class Progress:
    """What the output has told so far."""

    iteration: int | None = None
    planned: int | None = None
    eta_seconds: float | None = None
    loss: float | None = None
    query_per_step: list[float] = field(default_factory=list)
    metric: str | None = None
    validation_score: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def eta_seconds(text: str) -> float | None:
    """tqdm's remaining time (``05:03``, ``1:02:03``, ``?``) in seconds."""
    parts = text.strip().split(":")
    if not all(part.isdigit() for part in parts) or not 2 <= len(parts) <= 3:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class OutputReader:
    """Feeds on raw output chunks; keeps the last ``keep`` lines and the latest progress."""

    def __init__(self, keep: int = 200):
        self.lines: deque[str] = deque(maxlen=keep)
        self.progress = Progress()
        self.error: str | None = None
        self._partial = ""

    def feed(self, text: str) -> None:
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            segments = [s for s in line.split("\r") if s.strip()]
            for segment in segments:
                self._parse(segment.strip())
            if segments:
                self.lines.append(segments[-1].rstrip())
        for segment in self._partial.split("\r"):  # the bar being redrawn right now
            self._parse(segment.strip())
        self._partial = self._partial[-4096:]  # a line without end cannot grow without bound

    def _parse(self, text: str) -> None:
        progress = self.progress
        if match := _LOG.match(text):
            progress.iteration = int(match.group(1))
            progress.loss = _number(match.group(2))
            progress.metric = match.group(3)
            with contextlib.suppress(ValueError, TypeError):
                progress.query_per_step = [float(v) for v in json.loads(match.group(4))]
        elif match := _VALIDATION.match(text):
            progress.metric = match.group(2)
            progress.validation_score = _number(match.group(3))
        elif text.startswith("error:"):
            self.error = text[len("error:") :].strip()
        elif match := _BAR.search(text):
            progress.iteration, progress.planned = int(match.group(1)), int(match.group(2))
            progress.eta_seconds = eta_seconds(match.group(3))
