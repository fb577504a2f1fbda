"""The FastAPI application: pages, the runs API, jobs, live progress and the playground."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from metalearn.data.images import to_float
from metalearn.nets.spec import SPEC_FILE, save_spec_file
from metalearn.service import runs as run_views
from metalearn.service.errors import add_error_handlers, conflict, invalid, not_found, too_large
from metalearn.service.flags import describe_flags, validate_training
from metalearn.service.images import decode_image, decode_upload, png_data_url
from metalearn.service.jobs import JobQueue, script_argv
from metalearn.service.live import event_stream, outside_job, pending_run
from metalearn.service.names import run_folder
from metalearn.service.navigation import NavigationRuns, navigate, navigation_runs
from metalearn.service.playground import (
    ImageSpec,
    ImageSpecs,
    PlaygroundEngine,
    TestImages,
    image_spec,
    playground_runs,
)
from metalearn.service.schemas import (
    AdaptRequest,
    EvaluateRequest,
    NavigateRequest,
    ResumeRequest,
)
from metalearn.service.security import Guard
from metalearn.service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
SPEC_EXAMPLE = {
    "n_way": 5,
    "run_name": "own_net",
    "model": {
        "layers": [
            {"name": "Conv2d", "out_channels": 32, "kernel_size": 3, "stride": 2, "padding": 1},
            {"name": "BatchNorm2d"},
            {"name": "ReLU"},
            {"name": "MaxPool2d", "kernel_size": 2},
            {"name": "Flatten"},
            {"name": "Linear", "out_features": "n_way"},
        ]
    },
}


def create_app(settings: Settings) -> FastAPI:
    """The whole service for one work_dir; jobs and the playground worker live on app.state."""
    queue = JobQueue(settings.jobs)
    engine = PlaygroundEngine(settings.data_dir, settings.adapt_waiting)
    test_images = TestImages(settings.data_dir)
    specs = ImageSpecs(settings.data_dir)
    navigation = NavigationRuns()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(queue.shutdown)
        engine.shutdown()

    app = FastAPI(
        title="MAML runs service and few-shot playground",
        description="Start, follow and compare train.py / evaluate.py runs; adapt a trained "
        "run to few-shot tasks drawn (Omniglot) or uploaded (image-folder sets).",
        lifespan=lifespan,
    )
    app.state.settings, app.state.queue, app.state.engine = settings, queue, engine
    add_error_handlers(app)
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

    @app.get("/navigate", include_in_schema=False)
    def navigate_page() -> FileResponse:
        return page("navigate.html")

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
        return runs + [pending_run(job) for job in pending]

    @app.get("/api/runs/{name}", summary="One run with its log, validations and evaluations")
    def get_run(name: str) -> dict:
        run_folder(work_dir, name, None)
        run = run_views.find_run(work_dir, name)
        if run is not None:
            return with_job(run)
        job = queue.active_for(name)
        if job is None:
            raise not_found(f"no run named {name!r}")
        return pending_run(job)

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

    @app.post(
        "/api/runs",
        status_code=202,
        summary='Start a training (body: train.py flags; "model": your own network as a JSON '
        "model spec)",
    )
    def start_training(
        body: Annotated[
            dict[str, Any],
            Body(examples=[{"n_way": 5, "epochs": 4, "run_name": "x"}, SPEC_EXAMPLE]),
        ],
    ) -> dict:
        config, argv, spec = validate_training(body, str(work_dir), str(data_dir))
        name = config["run_name"]
        folder = run_folder(work_dir, name, "run_name")
        if (folder / "last.npz").exists():
            raise invalid(
                f"run {name!r} already exists: resume it or choose another run_name", "run_name"
            )
        if reason := busy(name):
            raise invalid(reason, "run_name")
        flags = [a for a in argv if not a.startswith("--run_name=")]
        if spec is not None:  # the service's own copy, in the run's folder, for train.py --net
            flags.append(f"--net={save_spec_file(folder / SPEC_FILE, spec)}")
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
            outside_job(run)
            for run in run_views.list_runs(work_dir)
            if run["name"] not in mine and run_views.is_live(run)
        ]
        return others + own

    @app.get("/api/runs/{name}/events", summary="Server-sent events with live progress")
    async def events(name: str, request: Request) -> StreamingResponse:
        run_folder(work_dir, name, None)
        if queue.latest_for(name) is None and run_views.find_run(work_dir, name) is None:
            raise not_found(f"no run named {name!r}")
        return StreamingResponse(
            event_stream(queue, work_dir, name, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    # -- playground ------------------------------------------------------------------------------
    @app.get("/api/playground/runs", summary="Runs the playground can use, and the default")
    def playground() -> dict:
        limits = {"max_upload_bytes": settings.max_upload_bytes}
        return {**playground_runs(work_dir, specs), "limits": limits}

    def best_of(run: str) -> Path:
        best = run_folder(work_dir, run, "run") / "best.npz"
        if not best.is_file():
            raise not_found(f"run {run!r} has no best.npz")
        return best

    @app.get("/api/playground/random_task", summary="A real task from the packed test split")
    def random_task(
        run: str, seed: Annotated[int | None, Query(ge=0, le=2**32 - 1)] = None
    ) -> dict:
        record = run_views.get_run(work_dir, run_folder(work_dir, run, "run").name)
        config = record["config"]
        spec = image_spec(config, data_dir, run)  # the record's: the checkpoint is not needed
        task = test_images.random_task(spec, int(config["n_way"]), int(config["k_spt"]), seed)
        return {"run": run, "n_way": config["n_way"], "k_spt": config["k_spt"], **task}

    def network_input(image: object, field: str, spec: ImageSpec) -> np.ndarray:
        """One client image -> float32 [C, H, W] as the run's network sees it."""
        if spec.drawn:
            limits = (settings.max_image_bytes, settings.max_image_side)
            return decode_image(image, field, *limits)[None]
        limits = (settings.max_upload_bytes, settings.max_upload_side)
        return to_float(decode_upload(image, field, spec.size, spec.channels, *limits))

    def shown(x: np.ndarray, spec: ImageSpec) -> list:
        """What the page shows of the images the network saw: 28x28 ink arrays or PNGs."""
        if spec.drawn:
            return np.round(x[:, 0].astype(np.float64), 4).tolist()
        return [png_data_url(np.rint(image * 255).astype(np.uint8)) for image in x]

    @app.post("/api/adapt", summary="Adapt a run to a task; probabilities after each step")
    def adapt(request: AdaptRequest) -> dict:
        if len(request.support) > settings.max_support:
            raise too_large(f"at most {settings.max_support} support images", "support")
        if len(request.query) > settings.max_query:
            raise too_large(f"at most {settings.max_query} query images", "query")
        if not request.support or not request.query:
            raise invalid("send at least one support and one query image", "query")
        best = best_of(request.run)
        spec = specs.get(best)
        support_x = np.stack(
            [
                network_input(s.image, f"support.{i}.image", spec)
                for i, s in enumerate(request.support)
            ]
        )
        query_x = np.stack(
            [network_input(image, f"query.{i}", spec) for i, image in enumerate(request.query)]
        )
        support_y = np.array([s.label for s in request.support], dtype=np.int64)
        future = engine.submit(best, spec, support_x, support_y, query_x, request.steps)
        result = future.result()
        inputs = {"support": shown(support_x, spec), "query": shown(query_x, spec)}
        return {
            "run": request.run,
            "input": "drawing" if spec.drawn else "upload",
            **result,
            "inputs": inputs,
        }

    # -- 2D navigation playground ----------------------------------------------------------------
    @app.get("/api/navigate/runs", summary="Completed 2D-navigation runs, and the default")
    def navigate_runs() -> dict:
        return navigation_runs(work_dir)

    @app.post("/api/navigate", summary="Trajectories towards a goal after each PG step")
    def navigate_to(request: NavigateRequest) -> dict:
        goal = (float(request.goal[0]), float(request.goal[1]))
        if not all(np.isfinite(goal)) or max(abs(goal[0]), abs(goal[1])) > 1:
            raise invalid("the goal's coordinates must be in [-1, 1]", "goal")
        best = best_of(request.run)

        def work() -> dict:
            learner = navigation.learner(best)
            return navigate(learner, goal, request.steps, request.trajectories, request.seed)

        return {"run": request.run, **engine.call(work).result()}

    return app
