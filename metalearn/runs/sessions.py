"""The writers of run records: :class:`Recorder` (a training) and :class:`TestSession` (an
evaluation). Both turn database trouble into one warning line and let the work go on; anything
else (a bug, Ctrl-C, the error the launcher's SIGTERM handler raises) passes through untouched.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from metalearn.errors import UserError
from metalearn.runs.db import (
    RecordsError,
    RunConflict,
    RunRecords,
    _existing,
    describe_failure,
)
from metalearn.runs.liveness import HEARTBEAT_INTERVAL_SECONDS

PROJECT_DIR = Path(__file__).resolve().parents[2]
# What a records call can really raise besides bugs: the database (RecordsError wraps
# sqlite3.Error and a work_dir that cannot be created) and the file system.
DATABASE_TROUBLE = (RecordsError, sqlite3.Error, OSError)
# What drawing a PNG can really raise: no matplotlib, a write that fails, matplotlib refusing.
PLOT_TROUBLE = (ImportError, OSError, ValueError, RuntimeError)


def git_commit(folder: str | os.PathLike[str] = PROJECT_DIR) -> str | None:
    """``git rev-parse HEAD`` in ``folder``, or None (not a checkout, no git, git hangs)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


class Recorder:
    """Keeps one training run's record and ``curves.png`` up to date; never stops training.

    :meth:`progress` runs after every iteration and writes (one small transaction) when there
    are new log or validation entries, or at least every ``HEARTBEAT_INTERVAL_SECONDS``: that
    write is the run's heartbeat and carries its counters. Database or plotting trouble prints
    one warning line on stderr (per kind) and training goes on; the record is caught up at the
    next write if the database recovers. Only a live run of the same name (:class:`RunConflict`)
    is raised, before training starts.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        name: str,
        curves: bool = True,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
    ):
        self.records = RunRecords(work_dir)
        self.name = name
        self.curves = curves
        self.heartbeat_interval = heartbeat_interval
        self.run_dir = Path(work_dir) / name
        self._warned: set[str] = set()
        self._start_args: dict | None = None
        self._started = False
        self._synced = (0, 0)
        self._written_at = time.monotonic()

    def warn(self, kind: str, error: BaseException) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        if kind == "database":
            message = f"run database {self.records.path} not updated ({error})"
        else:
            message = f"could not draw {self.run_dir / 'curves.png'} ({error})"
        print(f"warning: {message}; training goes on", file=sys.stderr, flush=True)

    def start(
        self,
        config: dict,
        state: Any,
        *,
        resumed: bool,
        metric: str,
        higher_is_better: bool,
        device: str | None = None,
        paddle_version: str | None = None,
        force: bool = False,
    ) -> None:
        """Record that the run (fresh or resumed, at ``state``) is training now."""
        self.metric = metric
        self._start_args = {
            "config": config,
            "resumed": resumed,
            "metric": metric,
            "higher_is_better": higher_is_better,
            "run_dir": self.run_dir,
            "device": device,
            "paddle_version": paddle_version,
            "commit": git_commit(),
            "force": force,
        }
        self._try_start(state)
        self._start_args["force"] = False  # a later re-creation must not override anything

    def _try_start(self, state: Any) -> bool:
        try:
            self.records.start_training(self.name, **self._start_args, **_state_fields(state))
        except RunConflict:
            raise
        except DATABASE_TROUBLE as error:
            self.warn("database", error)
            return False
        self._started = True
        self._synced = (len(state.log), len(state.validation))
        self._written_at = time.monotonic()
        return True

    def progress(self, state: Any, status: str | None = None, error: str | None = None) -> None:
        """After an iteration: new log/validation entries and the heartbeat (throttled);
        redraw the curves after a validation."""
        new_log = len(state.log) > self._synced[0]
        new_validation = len(state.validation) > self._synced[1]
        if new_validation or (status is not None and state.log):
            self._draw(state)
        beat_due = time.monotonic() - self._written_at >= self.heartbeat_interval
        if not (new_log or new_validation or status or beat_due):
            return
        if not self._started:
            if not self._try_start(state):
                return
            if status is None:
                return
        fields = _state_fields(state)
        self._written_at = time.monotonic()
        try:
            stored = self.records.record_progress(
                self.name,
                log=fields.pop("log")[self._synced[0] :],
                validation=fields.pop("validation")[self._synced[1] :],
                checkpoints={
                    kind: path
                    for kind in ("best", "last")
                    if (path := _existing(self.run_dir / f"{kind}.npz"))
                },
                status=status,
                error=error,
                **fields,
            )
        except DATABASE_TROUBLE as problem:
            self.warn("database", problem)
            return
        if not stored:  # the record vanished (database replaced?): write it again
            self._started = False
            self.progress(state, status, error)
            return
        self._synced = (len(state.log), len(state.validation))

    def finish(self, status: str, state: Any, error: str | None = None) -> None:
        """Final counters, checkpoints and curves, and status complete / failed / interrupted."""
        self.progress(state, status=status, error=error)

    def _draw(self, state: Any) -> None:
        if not self.curves:
            return
        try:
            from metalearn.runs import plots

            plots.training_curves(
                self.run_dir / "curves.png",
                state.log,
                state.validation,
                self.metric,
                title=self.name,
            )
        except PLOT_TROUBLE as error:
            self.warn("plot", error)


def _state_fields(state: Any) -> dict:
    return {
        "log": list(state.log),
        "validation": list(state.validation),
        "iteration": state.iteration,
        "elapsed_seconds": round(state.elapsed_seconds, 2),
        "best_score": state.best_score,
        "best_iteration": state.best_iteration,
    }


class _Heartbeat:
    """Calls ``beat`` every ``interval`` seconds from a daemon thread until stopped.

    An evaluation is one long call with no loop to beat from; the thread only touches the
    database, and signals still go to the main thread.
    """

    def __init__(self, beat: Callable[[], object], interval: float):
        self._beat = beat
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluation-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            with suppress(DATABASE_TROUBLE):  # the end of the evaluation reports it, once
                self._beat()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class TestSession:
    """evaluate.py on one checkpoint: an evaluation row (running → complete / failed /
    interrupted, with a heartbeat); the run's own status is never touched.

    Only checkpoints inside a run folder (one with config.json) are recorded, in the database of
    the folder above it. Database trouble is one warning line; the evaluation goes on.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        record: bool = True,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
    ):
        self.checkpoint = Path(checkpoint)
        self.run_dir = self.checkpoint.resolve().parent
        self.enabled = record and (self.run_dir / "config.json").is_file()
        self.records = RunRecords(self.run_dir.parent)
        self.name = self.run_dir.name
        self.heartbeat_interval = heartbeat_interval
        self.evaluation_id: int | None = None
        self._heartbeat: _Heartbeat | None = None
        self._warned = False

    def _warn(self, error: BaseException) -> None:
        if not self._warned:
            self._warned = True
            print(
                f"warning: run database {self.records.path} not updated ({error}); "
                "evaluation goes on",
                file=sys.stderr,
                flush=True,
            )

    def begin(self) -> None:
        if not self.enabled:
            return
        try:
            self.records.reap()
            if not self.records.has_run(self.name):
                meta = self._meta()
                if meta is None:
                    return
                self.records.import_run(self.name, meta, self.run_dir)
            self.evaluation_id = self.records.begin_evaluation(self.name, self.checkpoint)
        except DATABASE_TROUBLE as error:
            self._warn(error)
            return
        evaluation_id = self.evaluation_id
        self._heartbeat = _Heartbeat(
            lambda: self.records.evaluation_heartbeat(evaluation_id), self.heartbeat_interval
        )

    def _meta(self) -> dict | None:
        """The run's history from its checkpoint, to record a run trained without a record."""
        from metalearn.runs.checkpoint import load_checkpoint

        last = self.run_dir / "last.npz"
        try:
            return load_checkpoint(last if last.is_file() else self.checkpoint).meta
        except UserError as error:  # the evaluation itself reports a bad checkpoint
            self._warn(error)
            return None

    def end(self, results: dict) -> None:
        """Store the results of a finished evaluation."""
        self._end(results, "complete", None)

    def fail(self, error: BaseException) -> None:
        """Record why the evaluation stopped (failed, or interrupted by Ctrl-C)."""
        self._end(None, *describe_failure(error))

    def _end(self, results: dict | None, status: str, message: str | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.evaluation_id is None:
            return
        try:
            self.records.end_evaluation(self.evaluation_id, results, status, message)
        except DATABASE_TROUBLE as error:
            self._warn(error)
