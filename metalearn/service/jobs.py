"""The job queue: train.py / evaluate.py as subprocesses, at most ``width`` at once.

A job is an argv list (never a shell). Its output goes to a log file in the run folder, which a
watcher thread follows for live progress and the last lines; because the child writes to a file
rather than to a pipe of this server, a training survives a server restart, and the next server
shows it from the run records. Cancelling sends SIGINT, which train.py handles like Ctrl-C
(stop between meta-iterations, keep last.npz, record ``interrupted``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from metalearn.runs.liveness import now
from metalearn.service.progress import OutputReader

PROJECT_DIR = Path(__file__).resolve().parents[2]
ACTIVE = ("queued", "running")
INTERRUPTED_EXIT = 130
FINISHED_KEPT = 100
POLL_SECONDS = 0.2


def script_argv(script: str, *args: str) -> list[str]:
    """``python <project>/<script> args``: how every job starts."""
    return [sys.executable, str(PROJECT_DIR / script), *args]


@dataclass
class Job:
    id: int
    kind: str  # train | resume | evaluate
    run: str
    argv: list[str]
    log_path: Path
    status: str = "queued"
    exit_code: int | None = None
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    ended_at: str | None = None
    reader: OutputReader = field(default_factory=OutputReader)
    process: subprocess.Popen | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "run": self.run,
            "argv": self.argv,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.reader.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "output": list(self.reader.lines),
            "progress": self.reader.progress.as_dict(),
            "pid": self.process.pid if self.process else None,
            "previous_server": False,
        }


def final_status(exit_code: int, cancelled: bool) -> str:
    if exit_code == 0:
        return "succeeded"
    if exit_code in (INTERRUPTED_EXIT, -signal.SIGINT) or cancelled:
        return "interrupted"
    return "failed"


class JobQueue:
    """Queued and running jobs of this server, and the finished ones (the last hundred)."""

    def __init__(self, width: int = 1):
        self.width = max(1, width)
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self._next_id = 1
        self._closed = False

    # -- reading ---------------------------------------------------------------------------------
    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def active_for(self, run: str) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.run == run and j.active), None)

    def latest_for(self, run: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.run == run), None)

    # -- changing --------------------------------------------------------------------------------
    def submit(self, kind: str, run: str, argv: list[str], log_path: Path) -> Job | None:
        """Queue a job, or return None if ``run`` already has a queued or running one."""
        with self._lock:
            if self._closed or any(j.run == run and j.active for j in self._jobs):
                return None
            job = Job(self._next_id, kind, run, argv, log_path)
            self._next_id += 1
            self._jobs.append(job)
            self._forget_old()
            self._dispatch()
            return job

    def cancel(self, job: Job) -> None:
        """Queued: dropped. Running: SIGINT (a second cancel sends it again: stop at once)."""
        with self._lock:
            if job.status == "queued":
                job.status, job.ended_at = "cancelled", now()
            elif job.status == "running" and job.process is not None:
                job.cancel_requested = True
                job.process.send_signal(signal.SIGINT)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, drop queued ones, interrupt running ones and wait for them."""
        with self._lock:
            self._closed = True
            running = [j for j in self._jobs if j.status == "running"]
        for job in self.all():
            if job.status == "queued":
                self.cancel(job)
        for job in running:
            self.cancel(job)
        deadline = time.monotonic() + timeout
        for job in running:
            try:
                job.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs if not j.active]
        for job in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            self._jobs.remove(job)

    def _dispatch(self) -> None:
        """Start queued jobs while fewer than ``width`` run (called with the lock held)."""
        if self._closed:
            return
        running = sum(j.status == "running" for j in self._jobs)
        for job in self._jobs:
            if running >= self.width:
                break
            if job.status == "queued":
                self._start(job)
                running += 1

    def _start(self, job: Job) -> None:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = job.log_path.stat().st_size if job.log_path.exists() else 0
        with open(job.log_path, "ab") as log:
            try:
                job.process = subprocess.Popen(
                    job.argv,
                    cwd=PROJECT_DIR,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,  # the terminal's Ctrl-C stops the server, not the job
                )
            except OSError as error:
                job.status, job.exit_code, job.ended_at = "failed", None, now()
                job.reader.error = f"could not start: {error}"
                return
        job.status, job.started_at = "running", now()
        threading.Thread(target=self._watch, args=(job, offset), daemon=True).start()

    def _watch(self, job: Job, offset: int) -> None:
        """Follow the job's log until the process ends, then record how it ended."""
        with open(job.log_path, "rb") as log:
            log.seek(offset)
            while True:
                exit_code = job.process.poll()
                chunk = log.read()
                if chunk:
                    job.reader.feed(chunk.decode("utf-8", errors="replace"))
                if exit_code is not None and not chunk:
                    break
                if not chunk:
                    time.sleep(POLL_SECONDS)
        with self._lock:
            job.exit_code = exit_code
            job.status = final_status(exit_code, job.cancel_requested)
            job.ended_at = now()
            self._dispatch()
