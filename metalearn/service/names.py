"""Run names from clients: a plain folder name that stays inside the work_dir."""

from __future__ import annotations

from pathlib import Path

from metalearn.errors import UserError
from metalearn.runs.names import check_run_name as check_cli_run_name
from metalearn.service.errors import invalid


def check_run_name(name: str, field: str | None = "run_name") -> str:
    """``name`` if it is a valid run name (the command line's rule), else a 422 naming ``field``."""
    try:
        return check_cli_run_name(name)
    except UserError as error:
        raise invalid(str(error), field) from None


def run_folder(work_dir: Path, name: str, field: str | None = "run_name") -> Path:
    """The folder of run ``name``, checked to be a direct child of ``work_dir`` after resolving."""
    folder = (work_dir / check_run_name(name, field)).resolve()
    if folder.parent != work_dir.resolve():
        raise invalid(f"run name {name!r} leaves the work folder", field)
    return folder
