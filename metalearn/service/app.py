"""The FastAPI application: pages, the runs API, jobs, live progress and the playground."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from metalearn.errors import UserError
from metalearn.service import runs as run_views
from metalearn.service.errors import ApiError, conflict, error_body, invalid, not_found, too_large
from metalearn.service.flags import describe_flags, field_of, validate_training
from metalearn.service.images import decode_image
from metalearn.service.jobs import JobQueue, script_argv
from metalearn.service.names import run_folder
from metalearn.service.playground import Busy, PlaygroundEngine, TestImages, playground_runs
from metalearn.service.schemas import AdaptRequest, EvaluateRequest, ResumeRequest
from metalearn.service.security import Guard
from metalearn.service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = {"/": "index.html", "/runs": "runs.html"}
EVENT_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
RETRY_AFTER_SECONDS = 1


def create_app(settings: Settings) -> FastAPI:
    """The whole service for one work_dir; jobs and the playground worker live on app.state."""
    queue = JobQueue(settings.jobs)
    engine = PlaygroundEngine(settings.adapt_waiting)
    test_images = TestImages(settings.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(queue.shutdown)
        engine.shutdown()

    app = FastAPI(
        title="MAML runs service and few-shot playground",
        description="Start, follow and compare train.py / evaluate.py runs; adapt a trained "
        "run to drawn few-shot tasks.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.queue, app.state.engine = settings, queue, engine
    _add_error_handlers(app)
    app.add_middleware(Guard, token=settings.token, max_body_bytes=settings.max_body_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    work_dir, data_dir = settings.work_dir, settings.data_dir

    # -- pages -----------------------------------------------------------------------------------
    def page(file: str) -> FileResponse:
        path = STATIC_DIR / file
        if not path.is_file():
            raise not_found(f"page {file} is not installed")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def playground_page() -> FileResponse:
        return page("index.html")

    @app.get("/runs", include_in_schema=False)
    def runs_page() -> FileResponse:
        return page("runs.html")

    @app.get("/runs/{name}", include_in_schema=False)
    def run_page(name: str) -> FileResponse:
        run_folder(work_dir, name, None)
        return page("run.html")

    # -- runs ------------------------------------------------------------------------------------
    def with_job(run: dict) -> dict:
        job = queue.active_for(run["name"])
        run["job"] = job.as_dict() if job else None
        return run

    @app.get("/api/runs", summary="Every recorded run, with runs.py list's columns")
    def list_runs() -> list[dict]:
        runs = [with_job(run) for run in run_views.list_runs(work_dir)]
        recorded = {run["name"] for run in runs}
        pending = [j for j in queue.all() if j.active and j.run not in recorded]
        return runs + [_pending_run(job) for job in pending]

    @app.get("/api/runs/{name}", summary="One run with its log, validations and evaluations")
    def get_run(name: str) -> dict:
        run_folder(work_dir, name, None)
        run = run_views.find_run(work_dir, name)
        if run is not None:
            return with_job(run)
        job = queue.active_for(name)
        if job is None:
            raise not_found(f"no run named {name!r}")
        return _pending_run(job)

    @app.get("/api/runs/{name}/files/{file}", summary="A run's PNG (curves, test steps, ...)")
    def run_file(name: str, file: str) -> FileResponse:
        folder = run_folder(work_dir, name, None)
        if file not in run_views.RUN_PNGS or not (folder / file).is_file():
            raise not_found(f"run {name!r} has no file {file[:64]!r}")
        return FileResponse(folder / file, media_type="image/png")

    @app.get("/api/flags", summary="train.py's flags: type, defaults, choices, help")
    def flags() -> dict:
        return {"flags": describe_flags()}

    def busy(name: str) -> str | None:
        """Why ``name`` cannot take another job now, or None."""
        job = queue.active_for(name)
        if job is not None:
            return f"run {name!r} already has a {job.status} {job.kind} job ({job.id})"
        if run_views.is_live(run_views.find_run(work_dir, name)):
            return f"run {name!r} is training or testing right now"
        return None

    def submit(kind: str, name: str, argv: list[str], log: str) -> dict:
        job = queue.submit(kind, name, argv, run_folder(work_dir, name, None) / log)
        if job is None:
            raise conflict(busy(name) or f"run {name!r} cannot take a job now")
        return {"name": name, "job": job.as_dict()}

    @app.post("/api/runs", status_code=202, summary="Start a training (body: train.py flags)")
    def start_training(
        body: Annotated[
            dict[str, Any], Body(examples=[{"n_way": 5, "epochs": 4, "run_name": "x"}])
        ],
    ) -> dict:
        config, argv = validate_training(body, str(work_dir), str(data_dir))
        name = config["run_name"]
        folder = run_folder(work_dir, name, "run_name")
        if (folder / "last.npz").exists():
            raise invalid(
                f"run {name!r} already exists: resume it or choose another run_name", "run_name"
            )
        if reason := busy(name):
            raise invalid(reason, "run_name")
        flags = [a for a in argv if not a.startswith("--run_name=")]
        return submit(
            "train",
            name,
            script_argv(
                "train.py",
                *flags,
                f"--run_name={name}",
                f"--work_dir={work_dir}",
                f"--data_dir={data_dir}",
            ),
            "train.log",
        )

    def existing_folder(name: str) -> Path:
        folder = run_folder(work_dir, name, None)
        if not folder.is_dir() and run_views.find_run(work_dir, name) is None:
            raise not_found(f"no run named {name!r}")
        return folder

    @app.post("/api/runs/{name}/evaluate", status_code=202, summary="Test a run's best.npz")
    def evaluate(name: str, body: EvaluateRequest | None = None) -> dict:
        folder = existing_folder(name)
        if not (folder / "best.npz").is_file():
            raise conflict(f"run {name!r} has no best.npz to evaluate yet")
        if reason := busy(name):
            raise conflict(reason)
        body = body or EvaluateRequest()
        options = [f"--{k}={v}" for k, v in body.model_dump().items() if v is not None]
        argv = script_argv("evaluate.py", f"--ckpt={folder}", f"--data_dir={data_dir}", *options)
        return submit("evaluate", name, argv, "evaluate.log")

    @app.post("/api/runs/{name}/resume", status_code=202, summary="Continue an interrupted run")
    def resume(name: str, body: ResumeRequest | None = None) -> dict:
        folder = existing_folder(name)
        if not (folder / "last.npz").is_file():
            raise conflict(f"run {name!r} has no last.npz to resume from")
        if reason := busy(name):
            raise conflict(reason)
        epochs = [f"--epochs={body.epochs}"] if body and body.epochs else []
        return submit(
            "resume", name, script_argv("train.py", f"--resume={folder}", *epochs), "train.log"
        )

    @app.post("/api/runs/{name}/cancel", summary="Stop a job like Ctrl-C (run stays resumable)")
    def cancel(name: str) -> dict:
        job = queue.active_for(name)
        if job is not None:
            queue.cancel(job)
            return {"name": name, "job": job.as_dict()}
        existing_folder(name)
        run = run_views.find_run(work_dir, name)
        if not run_views.is_live(run):
            raise conflict(f"run {name!r} has no queued or running job")
        os.kill(run["pid"], signal.SIGINT)  # a job of a previous server (or a terminal)
        return {"name": name, "job": None}

    @app.delete("/api/runs/{name}", summary="Delete a run's record and folder")
    def delete(name: str) -> dict:
        if queue.active_for(name) is not None:
            raise conflict(f"run {name!r} has a queued or running job; cancel it first")
        run_views.delete_run(work_dir, name)
        return {"deleted": name}

    @app.get("/api/attempts/{name}", summary="The attempt view: commands, losses, accuracy")
    def attempt(name: str) -> dict:
        run_folder(work_dir, name, None)
        return run_views.attempt(run_views.get_run(work_dir, name))

    # -- jobs and live progress ------------------------------------------------------------------
    @app.get("/api/jobs", summary="Queued, running and finished jobs")
    def jobs() -> list[dict]:
        own = [job.as_dict() for job in queue.all()]
        mine = {job["run"] for job in own if job["status"] in ("queued", "running")}
        others = [
            _outside_job(run)
            for run in run_views.list_runs(work_dir)
            if run["name"] not in mine and run_views.is_live(run)
        ]
        return others + own

    def snapshot(name: str) -> tuple[dict, bool]:
        """The run's progress now, and whether it has ended (no job, no live process)."""
        job = queue.latest_for(name)
        run = run_views.find_run(work_dir, name)
        running = job is not None and job.active
        progress = job.reader.progress if job is not None else None
        last_log = run["log"][-1] if run and run["log"] else {}
        last_validation = run["validation"][-1] if run and run["validation"] else {}
        status = (
            "queued"
            if job is not None and job.status == "queued"
            else (run["status"] if run else (job.status if job else "unknown"))
        )
        state = {
            "run": name,
            "status": status,
            "job": {"id": job.id, "status": job.status, "kind": job.kind} if job else None,
            "iteration": (progress.iteration if running and progress.iteration else None)
            or (run or {}).get("completed_iterations"),
            "planned": (progress.planned if running and progress.planned else None)
            or (run or {}).get("planned_iterations"),
            "eta_seconds": progress.eta_seconds if running else None,
            "loss": (progress.loss if running and progress.loss is not None else None)
            or last_log.get("loss"),
            "query_per_step": (progress.query_per_step if running else None)
            or last_log.get("query_per_step", []),
            "metric": (run or {}).get("metric") or (progress.metric if progress else None),
            "best_score": (run or {}).get("best_score"),
            "best_iteration": (run or {}).get("best_iteration"),
            "validation_score": (last_validation.get("per_step") or [None])[-1],
            "updated_at": (run or {}).get("updated_at"),
        }
        ended = not running and not run_views.is_live(run)
        return state, ended

    @app.get("/api/runs/{name}/events", summary="Server-sent events with live progress")
    async def events(name: str, request: Request) -> StreamingResponse:
        run_folder(work_dir, name, None)
        if queue.latest_for(name) is None and run_views.find_run(work_dir, name) is None:
            raise not_found(f"no run named {name!r}")

        async def stream() -> AsyncIterator[str]:
            last, quiet = None, 0.0
            while True:
                state, ended = await anyio.to_thread.run_sync(snapshot, name)
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
                await asyncio.sleep(EVENT_POLL_SECONDS)
                quiet += EVENT_POLL_SECONDS

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # -- playground ------------------------------------------------------------------------------
    @app.get("/api/playground/runs", summary="Runs the playground can use, and the default")
    def playground() -> dict:
        return playground_runs(work_dir)

    @app.get("/api/playground/random_task", summary="A real task from the packed test split")
    def random_task(
        run: str, seed: Annotated[int | None, Query(ge=0, le=2**32 - 1)] = None
    ) -> dict:
        record = run_views.get_run(work_dir, run_folder(work_dir, run, "run").name)
        config = record["config"]
        if record.get("dataset") != "omniglot":
            raise invalid(f"run {run!r} is not an Omniglot run", "run")
        task = test_images.random_task(int(config["n_way"]), int(config["k_spt"]), seed)
        return {"run": run, "n_way": config["n_way"], "k_spt": config["k_spt"], **task}

    @app.post("/api/adapt", summary="Adapt a run to a drawn task; probabilities after each step")
    def adapt(request: AdaptRequest) -> dict:
        if len(request.support) > settings.max_support:
            raise too_large(f"at most {settings.max_support} support images", "support")
        if len(request.query) > settings.max_query:
            raise too_large(f"at most {settings.max_query} query images", "query")
        if not request.support or not request.query:
            raise invalid("send at least one support and one query image", "query")
        best = run_folder(work_dir, request.run, "run") / "best.npz"
        if not best.is_file():
            raise not_found(f"run {request.run!r} has no best.npz")
        limits = (settings.max_image_bytes, settings.max_image_side)
        support_x = np.stack(
            [
                decode_image(s.image, f"support.{i}.image", *limits)
                for i, s in enumerate(request.support)
            ]
        )
        query_x = np.stack(
            [decode_image(image, f"query.{i}", *limits) for i, image in enumerate(request.query)]
        )
        support_y = np.array([s.label for s in request.support], dtype=np.int64)
        future = engine.submit(best, support_x, support_y, query_x, request.steps)
        result = future.result()
        inputs = {
            "support": np.round(support_x.astype(np.float64), 4).tolist(),
            "query": np.round(query_x.astype(np.float64), 4).tolist(),
        }
        return {"run": request.run, **result, "inputs": inputs}

    return app


def _pending_run(job) -> dict:
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


def _outside_job(run: dict) -> dict:
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


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"detail": [{"field", "message"}]}``; bad input is never a 500."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(error.message, error.field), error.status, headers=error.headers
        )

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(error), field_of(str(error))), 422)

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        return JSONResponse(
            error_body("the playground is busy; retry shortly"),
            503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": None, "message": f"malformed JSON: {item.get('ctx', {}).get('error', '')}"}
            if item["type"] == "json_invalid"
            else {
                "field": ".".join(str(part) for part in item["loc"][1:]) or None,
                "message": item["msg"],
            }
            for item in error.errors()
        ]
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(error.detail)),
            error.status_code,
            headers=getattr(error, "headers", None),
        )
