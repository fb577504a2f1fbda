"""The run records as the API shows them: list, one run with its history, the attempt view."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
from pathlib import Path

from metalearn.errors import UserError
from metalearn.metrics import metric_named
from metalearn.runs.cli import LIST_HEADER, list_row
from metalearn.runs.records import RunRecords, remove_run
from metalearn.service.errors import conflict, not_found
from metalearn.service.names import run_folder

RUN_PNGS = (
    "curves.png",
    "test_steps.png",
    "sinusoid_fits.png",
    "sinusoid_steps.png",
    "trajectories.png",  # 2D navigation's paths before and after adaptation
)


def _records(work_dir: Path) -> RunRecords:
    return RunRecords(work_dir, create=False)


def list_runs(work_dir: Path) -> list[dict]:
    """Every record with ``runs.py list``'s cells under ``columns``; [] if nothing is recorded."""
    records = _records(work_dir)
    if not records.exists():
        return []
    runs = records.list_runs()
    for run in runs:
        _describe(run)
    return runs


def _describe(run: dict) -> None:
    """Add ``runs.py list``'s cells (``columns``) and the metric's description (``metric_info``:
    name, direction, key, label), so the pages know no metric of their own."""
    run["columns"] = dict(zip(LIST_HEADER, list_row(run)))
    metric = metric_named(run.get("metric"))
    run["metric_info"] = dataclasses.asdict(metric) if metric else None


def find_run(work_dir: Path, name: str) -> dict | None:
    """The record of ``name`` with its history and files, or None."""
    records = _records(work_dir)
    if not records.exists() or not records.has_run(name):
        return None
    run = records.get_run(name)
    run["test"] = run["evaluations"][-1] if run["evaluations"] else None
    _describe(run)
    folder = run_folder(work_dir, name, None)
    run["files"] = [png for png in RUN_PNGS if (folder / png).is_file()]
    run["has_best"] = (folder / "best.npz").is_file()
    run["has_last"] = (folder / "last.npz").is_file()
    return run


def get_run(work_dir: Path, name: str) -> dict:
    run = find_run(work_dir, name)
    if run is None:
        raise not_found(f"no run named {name!r}")
    return run


def is_live(run: dict | None) -> bool:
    """Whether a record says a process trains or tests this run right now (reading the records
    already marked runs whose owner is gone as interrupted)."""
    return run is not None and (run["status"] == "training" or bool(run.get("testing")))


def delete_run(work_dir: Path, name: str) -> None:
    """Remove the record and the run folder; refused while the run trains or tests."""
    folder = run_folder(work_dir, name, None)
    run = find_run(work_dir, name)
    if run is None and not folder.is_dir():
        raise not_found(f"no run named {name!r}")
    if is_live(run):
        raise conflict(f"run {name!r} is {run['status']} right now; cancel it first")
    if run is None:  # a folder whose job never wrote a record
        shutil.rmtree(folder)
        return
    try:
        remove_run(work_dir, name, files=True)
    except UserError as error:
        raise conflict(str(error)) from None


def _command(argv: list[str]) -> str:
    prefix = ["python"] if argv and argv[0].endswith(".py") else []
    return shlex.join(prefix + list(argv))


def attempt(run: dict) -> dict:
    """One training (+ testing) attempt: commands, losses per logged iteration, accuracy."""
    evaluation = run["evaluations"][-1] if run["evaluations"] else None
    testing = None
    if evaluation is not None:
        testing = _command(
            [
                "evaluate.py",
                f"--ckpt={evaluation['checkpoint']}",
                f"--tasks={evaluation['tasks']}",
                f"--seed={evaluation['seed']}",
                f"--glob_update_step_test={evaluation['steps']}",
            ]
        )
    return {
        "name": run["name"],
        "status": run["status"],
        "training_command": _command(run["commands"][0]["argv"]) if run["commands"] else None,
        "training_losses": [entry["loss"] for entry in run["log"]],
        "iterations": [entry["iteration"] for entry in run["log"]],
        "testing_command": testing,
        "accuracy": evaluation["mean"][-1] if evaluation and evaluation["mean"] else None,
        "metric": run.get("metric"),
    }
