"""The rule for run names and the work folder: train.py, evaluate.py, runs.py and the service
all use it, because a run's name becomes a folder name inside work_dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

from metalearn.errors import UserError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_name(name: str) -> str:
    """``name`` if it can be a run's folder name directly inside work_dir, else a UserError.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so never ``.``,
    ``..``, a hidden folder, a path, or something that looks like a flag), at most 100
    characters. train.py, evaluate.py, runs.py and the HTTP service all use this rule.
    """
    if not isinstance(name, str) or RUN_NAME.fullmatch(name) is None:
        raise UserError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters"
        )
    return name


def check_work_dir(work_dir: str | os.PathLike[str]) -> Path:
    """``work_dir`` as a Path, or a UserError if it exists but is not a folder."""
    path = Path(work_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--work_dir {work_dir} is not a folder")
    return path
