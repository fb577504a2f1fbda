"""Live progress of a run: one snapshot from its job's output and its record, streamed as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from starlette.requests import Request

from metalearn.service import runs as run_views
from metalearn.service.jobs import Job, JobQueue

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def snapshot(queue: JobQueue, work_dir: Path, name: str) -> tuple[dict, bool]:
    """The run's progress now, and whether it has ended (no job, no live process).

    A running job's output is fresher than the record (which changes at log points only).
    """
    job = queue.latest_for(name)
    run = run_views.find_run(work_dir, name) or {}
    running = job is not None and job.active
    progress = job.reader.progress if running else None
    last_log = run["log"][-1] if run.get("log") else {}
    last_validation = run["validation"][-1] if run.get("validation") else {}
    if job is not None and job.status == "queued":
        status = "queued"
    else:
        status = run.get("status") or (job.status if job else "unknown")
    state = {
        "run": name,
        "status": status,
        "job": {"id": job.id, "status": job.status, "kind": job.kind} if job else None,
        "iteration": (progress and progress.iteration) or run.get("completed_iterations"),
        "planned": (progress and progress.planned) or run.get("planned_iterations"),
        "eta_seconds": progress.eta_seconds if progress else None,
        "loss": (progress.loss if progress else None) or last_log.get("loss"),
        "query_per_step": (progress.query_per_step if progress else None)
        or last_log.get("query_per_step", []),
        "metric": run.get("metric") or (job.reader.progress.metric if job else None),
        "best_score": run.get("best_score"),
        "best_iteration": run.get("best_iteration"),
        "validation_score": (last_validation.get("per_step") or [None])[-1],
        "updated_at": run.get("updated_at"),
    }
    return state, not running and not run_views.is_live(run or None)


async def event_stream(
    queue: JobQueue, work_dir: Path, name: str, request: Request
) -> AsyncIterator[str]:
    """``progress`` events whenever the snapshot changes, then one ``end`` event."""
    last, quiet = None, 0.0
    while True:
        state, ended = await anyio.to_thread.run_sync(snapshot, queue, work_dir, name)
        if state != last:
            yield f"event: progress\ndata: {json.dumps(state)}\n\n"
            last, quiet = state, 0.0
        if ended:
            job = queue.latest_for(name)
            end = {
                "run": name,
                "status": state["status"],
                "exit_code": job.exit_code if job else None,
            }
            yield f"event: end\ndata: {json.dumps(end)}\n\n"
            return
        if quiet >= KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            quiet = 0.0
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_SECONDS)
        quiet += POLL_SECONDS


def pending_run(job: Job) -> dict:
    """A run whose job has not written a record yet (queued, or its process is starting)."""
    return {
        "name": job.run,
        "status": "queued" if job.status == "queued" else "starting",
        "job": job.as_dict(),
        "config": {},
        "commands": [],
        "log": [],
        "validation": [],
        "evaluations": [],
        "test": None,
        "files": [],
        "has_best": False,
        "has_last": False,
    }


def outside_job(run: dict) -> dict:
    """A run trained or tested by a process this server did not start (previous server, terminal)."""
    command = run["commands"][-1]["argv"] if run["commands"] else []
    return {
        "id": None,
        "kind": "train" if run["status"] == "training" else "evaluate",
        "run": run["name"],
        "argv": command,
        "status": "running",
        "exit_code": None,
        "error": None,
        "created_at": run.get("started_at"),
        "started_at": run.get("started_at"),
        "ended_at": None,
        "output": [],
        "progress": {
            "iteration": run.get("completed_iterations"),
            "planned": run.get("planned_iterations"),
        },
        "pid": run.get("pid"),
        "previous_server": True,
    }
