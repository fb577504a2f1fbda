"""Run names from clients: a plain folder name that stays inside the work_dir."""

from __future__ import annotations

import re
from pathlib import Path

from metalearn.service.errors import invalid

# Not starting with "-": on a command line (runs.py show NAME) the name would read as a flag.
RUN_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
MAX_NAME_LENGTH = 128


def check_run_name(name: str, field: str | None = "run_name") -> str:
    """``name`` if it is a safe run folder name, else a 422 naming ``field``."""
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_LENGTH
        or not RUN_NAME.fullmatch(name)
        or name in (".", "..")
    ):
        raise invalid(
            f"run name {str(name)[:MAX_NAME_LENGTH]!r} is not allowed: use 1-{MAX_NAME_LENGTH} "
            "of A-Z a-z 0-9 . _ - (not . or .., not starting with -)",
            field,
        )
    return name


def run_folder(work_dir: Path, name: str, field: str | None = "run_name") -> Path:
    """The folder of run ``name``, checked to be a direct child of ``work_dir`` after resolving."""
    folder = (work_dir / check_run_name(name, field)).resolve()
    if folder.parent != work_dir.resolve():
        raise invalid(f"run name {name!r} leaves the work folder", field)
    return folder
