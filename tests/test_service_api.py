"""The runs service and playground API (metalearn/service) through FastAPI's TestClient.

One tiny run is trained in-process per module; jobs that really train are in the two slow tests.
Other job tests replace the script with a few lines of Python that echo their arguments.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import (
    FONTS,
    TINY,
    assert_one_line_error,
    glyph,
    make_glyph_folder,
    run_script,
    tiny,
    wait_line_full,
)
from PIL import Image, ImageDraw

from metalearn.data import folders, images, omniglot
from metalearn.metrics import ACCURACY
from metalearn.runs.checkpoint import load_checkpoint, save_checkpoint
from metalearn.runs.cli import LIST_HEADER, list_row
from metalearn.runs.liveness import process_started
from metalearn.runs.records import RunRecords
from metalearn.service import app as service_app
from metalearn.service.app import create_app
from metalearn.service.flags import REFUSED, parse_train_argv, training_argv
from metalearn.service.server import parser as serve_parser
from metalearn.service.server import settings_from
from metalearn.service.settings import Settings
from metalearn.training.config import train_parser
from metalearn.training.trainer import train

TOKEN = "secret-token-1"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(omniglot_dir, tmp_path_factory) -> Path:
    """A work_dir holding one complete tiny 5-way 1-shot run called ``tiny``."""
    work = tmp_path_factory.mktemp("service_work")
    train(tiny(omniglot_dir, work, run_name="tiny", epochs=2))
    return work


@pytest.fixture
def work(trained, tmp_path) -> Path:
    """A private copy of the trained work_dir, so tests may change it."""
    copy = tmp_path / "work"
    shutil.copytree(trained, copy)
    return copy


def make_client(work: Path, data_dir: Path, **options) -> TestClient:
    app = create_app(Settings.create(work, data_dir, **options))
    return TestClient(app, base_url="http://127.0.0.1:8000")


@pytest.fixture
def client(work, omniglot_dir) -> TestClient:
    with make_client(work, omniglot_dir) as client:
        yield client


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def drawing(seed: int, size: int = 105, mode: str = "L") -> Image.Image:
    """Black strokes on white, as the playground's canvas."""
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (size, size), "white")
    points = [tuple(int(v) for v in rng.integers(10, size - 10, 2)) for _ in range(5)]
    ImageDraw.Draw(image).line(points, fill="black", width=max(2, size // 12))
    return image


def task_body(client: TestClient, steps: int = 3, seed: int = 0) -> dict:
    task = client.get("/api/playground/random_task", params={"run": "tiny", "seed": seed}).json()
    return {
        "run": "tiny",
        "support": task["support"],
        "query": [q["image"] for q in task["query"]],
        "steps": steps,
    }


def detail(response) -> dict:
    """The first error of a refused request (the one error shape of the API)."""
    body = response.json()
    assert set(body) == {"detail"} and body["detail"], body
    assert set(body["detail"][0]) == {"field", "message"}, body
    return body["detail"][0]


# -- runs ----------------------------------------------------------------------------------------
def test_runs_list_has_the_columns_of_runs_py_list(client, work) -> None:
    runs = client.get("/api/runs").json()
    assert [run["name"] for run in runs] == ["tiny"]
    record = RunRecords(work).list_runs()[0]
    assert runs[0]["columns"] == dict(zip(LIST_HEADER, list_row(record)))
    assert runs[0]["status"] == "complete" and runs[0]["job"] is None


def test_runs_list_of_an_empty_work_dir_is_empty(tmp_path, omniglot_dir) -> None:
    assert make_client(tmp_path, omniglot_dir).get("/api/runs").json() == []


def test_run_detail_has_its_history_and_files(client) -> None:
    run = client.get("/api/runs/tiny").json()
    assert [entry["iteration"] for entry in run["log"]] == [1, 2]
    assert run["validation"][-1]["iteration"] == 2
    assert run["evaluations"] == [] and run["config"]["n_way"] == 5
    assert run["commands"] and run["has_best"] and run["has_last"]
    assert "curves.png" in run["files"]
    assert run["metric_info"] == dataclasses.asdict(ACCURACY)
    assert run["columns"]["metric"] == ACCURACY.key


def test_run_pngs_are_served_from_a_whitelist_only(client, work) -> None:
    response = client.get("/api/runs/tiny/files/curves.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (work / "tiny" / "curves.png").read_bytes()
    for name in ("config.json", "best.npz", "last.npz", "train.log"):
        assert client.get(f"/api/runs/tiny/files/{name}").status_code == 404
    for path in ("/api/runs/tiny/files/..%2Fruns.sqlite", "/api/runs/..%2F..%2Fetc/files/x"):
        assert client.get(path).status_code in (404, 422)


def test_openapi_docs_are_served(client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/runs", "/api/adapt", "/api/jobs", "/api/runs/{name}/events"} <= set(paths)


def test_static_files_stay_in_the_static_folder(client) -> None:
    for path in ("/static/..%2F..%2Fapp.py", "/static/../app.py", "/static/%2e%2e/app.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"create_app" not in response.content


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/runs/{}"),
        ("get", "/api/attempts/{}"),
        ("get", "/api/runs/{}/events"),
        ("get", "/api/runs/{}/files/curves.png"),
        ("post", "/api/runs/{}/evaluate"),
        ("post", "/api/runs/{}/resume"),
        ("post", "/api/runs/{}/cancel"),
        ("delete", "/api/runs/{}"),
        ("get", "/api/playground/random_task?run={}"),
    ],
)
def test_unknown_runs_are_404_and_bad_names_422(client, method, path) -> None:
    assert getattr(client, method)(path.format("nosuchrun")).status_code == 404
    for name in ("a%20b", "a$b", "x" * 200, "%2E%2E"):
        response = getattr(client, method)(path.format(name))
        assert response.status_code in (404, 422), (name, response.status_code)
        if response.status_code == 422:
            assert "not allowed" in detail(response)["message"]


def test_attempt_view(client) -> None:
    attempt = client.get("/api/attempts/tiny").json()
    assert attempt["name"] == "tiny" and attempt["status"] == "complete"
    assert attempt["iterations"] == [1, 2] and len(attempt["training_losses"]) == 2
    assert attempt["training_command"].startswith("python ")
    assert attempt["testing_command"] is None and attempt["accuracy"] is None


def test_delete_removes_record_and_folder_but_not_while_training(client, work) -> None:
    assert client.delete("/api/runs/tiny").json() == {"deleted": "tiny"}
    assert not (work / "tiny").exists() and client.get("/api/runs/tiny").status_code == 404
    _record_live_training(work, "busy")
    response = client.delete("/api/runs/busy")
    assert response.status_code == 409 and "cancel" in detail(response)["message"]


def _record_live_training(work: Path, name: str) -> None:
    """A record as a training process would write it, owned by this (live) test process."""
    RunRecords(work).start_training(
        name,
        config={"dataset": "omniglot", "n_way": 5, "k_spt": 1, "epochs": 10},
        resumed=False,
        log=[],
        validation=[],
        iteration=0,
        elapsed_seconds=0.0,
        best_score=None,
        best_iteration=None,
        metric="accuracy",
        higher_is_better=True,
        run_dir=work / name,
        command=["train.py", "--run_name", name],
    )


def test_jobs_show_trainings_this_server_did_not_start(client, work) -> None:
    _record_live_training(work, "outside")
    jobs = client.get("/api/jobs").json()
    assert [(j["run"], j["status"], j["previous_server"]) for j in jobs] == [
        ("outside", "running", True)
    ]
    # Its process "dies" (a pid that cannot exist): the records show it interrupted.
    with RunRecords(work)._transaction() as con:
        con.execute("UPDATE runs SET pid = 2147483646 WHERE name = 'outside'")
    assert client.get("/api/jobs").json() == []
    assert client.get("/api/runs/outside").json()["status"] == "interrupted"


def test_cancel_reaches_a_training_of_a_previous_server(client, work) -> None:
    _record_live_training(work, "orphan")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with RunRecords(work)._transaction() as con:
            con.execute(
                "UPDATE runs SET pid = ?, pid_started = ? WHERE name = 'orphan'",
                (stand_in.pid, process_started(stand_in.pid)),
            )
        assert client.post("/api/runs/orphan/cancel").json() == {"name": "orphan", "job": None}
        assert stand_in.wait(timeout=60) != 0  # it got SIGINT
    finally:
        stand_in.kill()
        stand_in.wait()
    assert client.get("/api/runs/orphan").json()["status"] == "interrupted"


def test_events_of_a_finished_run_say_progress_then_end(client) -> None:
    text = client.get("/api/runs/tiny/events").text
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events[0].startswith("event: progress\ndata: ")
    progress = json.loads(events[0].split("data: ", 1)[1])
    assert progress["status"] == "complete" and progress["iteration"] == 2
    assert progress["best_score"] is not None and progress["job"] is None
    assert events[-1].startswith("event: end")


# -- starting trainings: the command line's validation -------------------------------------------
def test_flags_describe_train_py(client) -> None:
    flags = {flag["name"]: flag for flag in client.get("/api/flags").json()["flags"]}
    dests = {a.dest for a in train_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == dests - set(REFUSED)
    assert flags["n_way"]["type"] == "int" and flags["n_way"]["default"] == 5
    assert flags["k_spt"]["defaults"]["sinusoid"] == 10
    assert flags["glob_base_lr"]["type"] == "float" and flags["use_gpu"]["type"] == "bool"
    assert flags["algo"]["choices"][:4] == ["maml", "fomaml", "reptile", "pretrain"]
    assert {"maml++", "metasgd", "anil"} <= set(flags["algo"]["choices"])
    assert flags["epochs"]["help"]


def test_preset_switches_can_be_set_on_and_off() -> None:
    """MAML++'s ingredients are --flag/--no-flag: false must reach train.py as --no-flag."""
    assert training_argv({"algo": "maml++", "per_step_bn": False, "cosine_meta_lr": True}) == [
        "--algo=maml++",
        "--no-per_step_bn",
        "--cosine_meta_lr",
    ]
    assert training_argv({"use_gpu": False, "export_pkl": True}) == ["--export_pkl"]
    config = parse_train_argv(training_argv({"algo": "maml++", "multi_step_loss": False}))
    assert config["multi_step_loss"] is False


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"n_way": 0}, "n_way", "positive integer"),
        ({"n_way": "five"}, "n_way", "invalid int"),
        ({"n_way": 2.5}, "n_way", "invalid int"),
        ({"glob_base_lr": -1}, "glob_base_lr", "positive number"),
        ({"augment": "blur"}, "augment", "unknown augmentation"),
        ({"k_spt": 10, "k_query": 15}, None, "20 drawings"),
        ({"resume": "work/x"}, "resume", "/resume"),
        ({"work_dir": "/"}, "work_dir", "server"),
        ({"data_dir": "/"}, "data_dir", "server"),
        ({"bogus": 1}, "bogus", "unknown flag"),
        ({"use_gpu": "yes"}, "use_gpu", "true or false"),
        ({"epochs": [1]}, "epochs", "one int"),
        ({"run_name": "../escape"}, "run_name", "not allowed"),
        ({"run_name": "--epochs"}, "run_name", "not allowed"),
        ({"run_name": "tiny"}, "run_name", "already exists"),
        ({"net": "tests.user_models:omniglot_net"}, "net", "takes only conv4 or pool4 by name"),
    ],
)
def test_training_requests_are_validated_like_the_command_line(
    client, body, field, fragment
) -> None:
    response = client.post("/api/runs", json=body)
    assert response.status_code == 422, response.json()
    error = detail(response)
    assert error["field"] == field and fragment in error["message"], error
    assert client.get("/api/jobs").json() == []


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b'"text"', b"", b'{"n_way": NaN, "glob_base_lr": NaN}']
)
def test_malformed_bodies_are_422_not_500(client, content) -> None:
    paths = ["/api/runs", "/api/adapt"]
    if content:  # evaluate and resume take an optional body
        paths += ["/api/runs/tiny/evaluate", "/api/runs/tiny/resume"]
    for path in paths:
        response = client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, content, response.text)
        assert detail(response)["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/runs/tiny/evaluate", {"tasks": 0}),
        ("/api/runs/tiny/evaluate", {"tasks": "many"}),
        ("/api/runs/tiny/evaluate", {"glob_update_step_test": -1}),
        ("/api/runs/tiny/evaluate", {"ckpt": "/etc/passwd"}),
        ("/api/runs/tiny/resume", {"epochs": 0}),
        ("/api/runs/tiny/resume", {"work_dir": "/"}),
    ],
)
def test_evaluate_and_resume_bodies_are_checked(client, path, body) -> None:
    assert client.post(path, json=body).status_code == 422


def test_evaluate_and_resume_need_their_checkpoints(client, work) -> None:
    (work / "tiny" / "best.npz").unlink()
    (work / "tiny" / "last.npz").unlink()
    assert "best.npz" in detail(client.post("/api/runs/tiny/evaluate"))["message"]
    assert "last.npz" in detail(client.post("/api/runs/tiny/resume"))["message"]
    assert client.post("/api/runs/tiny/cancel").status_code == 409


@pytest.fixture
def echo_jobs(monkeypatch, tmp_path):
    """Jobs run a stand-in script: it prints its arguments, then waits for a file (or SIGINT)."""
    release = tmp_path / "release"
    code = (
        "import sys, time, pathlib; print('args', *sys.argv[1:], flush=True)\n"
        f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)\n"
    )
    monkeypatch.setattr(
        service_app,
        "script_argv",
        lambda script, *args: [sys.executable, "-c", code, script, *args],
    )
    return release


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def job_of(client: TestClient, run: str) -> dict:
    return next(j for j in client.get("/api/jobs").json() if j["run"] == run)


def test_jobs_queue_one_at_a_time_and_cancel(client, work, echo_jobs) -> None:
    first = client.post("/api/runs", json={"run_name": "one", "epochs": 3, "augment": "rot90"})
    assert first.status_code == 202 and first.json()["name"] == "one"
    second = client.post("/api/runs", json={"run_name": "two", "use_gpu": True}).json()
    assert second["job"]["status"] == "queued"
    assert [r["status"] for r in client.get("/api/runs").json() if r["name"] == "two"] == ["queued"]
    assert client.post("/api/runs", json={"run_name": "two"}).status_code == 422  # has a job
    assert client.delete("/api/runs/two").status_code == 409
    output = wait_for(lambda: job_of(client, "one")["output"])
    assert output[0].split()[1:5] == ["train.py", "--epochs=3", "--augment=rot90", "--run_name=one"]
    assert f"--work_dir={work}" in output[0] and "--data_dir=" in output[0]
    assert client.post("/api/runs/two/cancel").json()["job"]["status"] == "cancelled"
    assert client.post("/api/runs/one/cancel").status_code == 200  # SIGINT to the stand-in
    wait_for(lambda: job_of(client, "one")["status"] == "interrupted")
    third = client.post("/api/runs/tiny/evaluate", json={"tasks": 7}).json()
    wait_for(lambda: job_of(client, "tiny")["output"])
    echo_jobs.touch()
    finished = wait_for(lambda: (j := job_of(client, "tiny"))["status"] == "succeeded" and j)
    assert finished["id"] == third["job"]["id"] and finished["exit_code"] == 0
    assert finished["output"][0].split()[1:3] == ["evaluate.py", f"--ckpt={work / 'tiny'}"]
    assert "--tasks=7" in finished["output"][0]


# -- playground ----------------------------------------------------------------------------------
def test_playground_lists_completed_runs(client) -> None:
    listing = client.get("/api/playground/runs").json()
    assert listing["default"] == "tiny"
    assert listing["runs"][0]["n_way"] == 5 and listing["runs"][0]["inner_lr"] == 0.4


def test_random_task_comes_from_the_test_split(client, omniglot_dir) -> None:
    task = client.get("/api/playground/random_task", params={"run": "tiny", "seed": 3}).json()
    assert (task["n_way"], task["k_spt"]) == (5, 1)
    assert sorted(item["label"] for item in task["support"]) == [0, 1, 2, 3, 4]
    assert sorted(item["label"] for item in task["query"]) == [0, 1, 2, 3, 4]
    test = omniglot.load_split(omniglot_dir, "test")
    image = np.array(task["support"][0]["image"], dtype=np.float32)
    assert image.shape == (28, 28)
    assert np.abs(test[:, :, 0] - image).max(axis=(-2, -1)).min() < 1e-4  # one of the drawings


def test_adapt_gives_a_distribution_per_query_and_step(client) -> None:
    body = task_body(client, steps=4)
    result = client.post("/api/adapt", json=body).json()
    probabilities = np.array(result["probabilities"])
    assert probabilities.shape == (5, 5, 5)  # query, step 0..4, class
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    assert result["predictions"] == probabilities.argmax(axis=-1).tolist()
    assert (result["n_way"], result["k_spt"], result["steps"], result["inner_lr"]) == (5, 1, 4, 0.4)
    before = client.post("/api/adapt", json={**body, "steps": 0}).json()["probabilities"]
    np.testing.assert_allclose(np.array(before)[:, 0], probabilities[:, 0], atol=1e-6)
    assert not np.allclose(probabilities[:, 0], probabilities[:, -1])  # the steps change them
    np.testing.assert_allclose(result["inputs"]["query"], body["query"], atol=1e-6)


def test_a_drawn_png_is_preprocessed_like_packed_omniglot(client) -> None:
    body = task_body(client)
    png = drawing(7)
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    canvas = drawing(7, mode="RGBA")
    canvas.putalpha(Image.eval(png, lambda v: 255 - v))  # transparent where nothing was drawn
    body["query"] = [png_data_url(png), png_data_url(canvas)]
    body["support"][0]["image"] = png_data_url(drawing(8, size=300))
    result = client.post("/api/adapt", json=body)
    assert result.status_code == 200, result.json()
    seen = np.array(result.json()["inputs"]["query"])
    packed = omniglot.decode_drawing(buffer.getvalue())
    np.testing.assert_allclose(seen[0], packed, atol=1e-4)
    np.testing.assert_allclose(seen[1], packed, atol=2e-2)  # alpha edges round differently
    assert seen[0].max() == pytest.approx(1.0, abs=1e-3) and seen[0][0, 0] == 0.0


def _replace(body: dict, **changes) -> dict:
    return {**body, **changes}


def test_bad_images_and_tasks_are_refused(client) -> None:
    body = task_body(client)
    good = body["query"][0]
    big = png_data_url(drawing(1, size=600))
    cases = [
        (_replace(body, query=[42]), 422, "query.0"),
        (_replace(body, query=["data:image/gif;base64,R0lGOD"]), 422, "query.0"),
        (_replace(body, query=["data:image/png;base64,%%%"]), 422, "query.0"),
        (
            _replace(body, query=["data:image/png;base64," + base64.b64encode(b"x" * 99).decode()]),
            422,
            "query.0",
        ),
        (_replace(body, query=[big]), 413, "query.0"),
        (_replace(body, query=["data:image/png;base64," + "A" * 1_500_000]), 413, "query.0"),
        (_replace(body, query=[[[0.5] * 28] * 27]), 422, "query.0"),
        (_replace(body, query=[[[1.5] * 28] * 28]), 422, "query.0"),
        (_replace(body, query=[[[True] * 28] * 28]), 422, "query.0"),
        (_replace(body, query=[good] * 51), 413, "query"),
        (_replace(body, query=[]), 422, "query"),
        (_replace(body, support=body["support"] * 21), 413, "support"),
        (_replace(body, support=body["support"][:4]), 422, None),  # class 4 missing
        (
            _replace(body, support=[{**s, "label": s["label"] + 1} for s in body["support"]]),
            422,
            None,
        ),
        (_replace(body, support=[{**body["support"][0], "label": -1}]), 422, "support.0.label"),
        (_replace(body, steps=11), 422, "steps"),
        (_replace(body, run="../tiny"), 422, "run"),
        (_replace(body, run="nosuchrun"), 404, None),
        ({**body, "extra": 1}, 422, "extra"),
    ]
    for case, status, field in cases:
        response = client.post("/api/adapt", json=case)
        assert response.status_code == status, (field, response.json())
        assert detail(response)["field"] == field, response.json()
    nan = json.dumps(body).replace("0.0,", "NaN,", 1)
    response = client.post("/api/adapt", content=nan, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in detail(response)["message"]


def test_more_support_per_class_is_allowed(client) -> None:
    body = task_body(client)
    body["support"] = body["support"] + body["support"][:2]
    assert client.post("/api/adapt", json=body).status_code == 200


def test_a_full_wait_line_answers_503_with_retry_after(client) -> None:
    with wait_line_full(client):
        response = client.post("/api/adapt", json=task_body(client))
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    assert client.post("/api/adapt", json=task_body(client)).status_code == 200


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c.meta["network"].update(hidden=10**6), "Omniglot network"),
        (lambda c: c.meta["network"].update(n_way="5"), "Omniglot network"),
        (lambda c: c.meta["config"].update(glob_base_lr="0.4"), "inner learning rate"),
        (lambda c: c.meta["config"].update(k_spt=0.5), "k_spt"),
        (
            lambda c: c.params.update({"head.bias": c.params["head.bias"].astype(np.float64)}),
            "float32",
        ),
        (lambda c: c.params.update({"head.bias": c.params["head.bias"] * np.nan}), "finite"),
        (lambda c: c.params.pop("head.bias"), "shapes"),
    ],
)
def test_hostile_checkpoints_are_422(client, work, change, fragment) -> None:
    best = work / "tiny" / "best.npz"
    checkpoint = load_checkpoint(best)
    assert "head.bias" in checkpoint.params
    change(checkpoint)
    save_checkpoint(best, checkpoint)
    response = client.post("/api/adapt", json=task_body(client))
    assert response.status_code == 422 and fragment in detail(response)["message"]


def test_an_unreadable_checkpoint_is_422(client, work) -> None:
    (work / "tiny" / "best.npz").write_bytes(b"not a checkpoint")
    response = client.post("/api/adapt", json=task_body(client))
    assert response.status_code == 422 and "unreadable" in detail(response)["message"]


# -- the playground on image-folder runs (uploads) -----------------------------------------------
GLYPH_SIZE = 20  # neither Omniglot's 28 nor the default 84: the size must come from the set
FOLDER_RUNS = {"glyph_pool": {"net": "pool4"}, "glyph_mamlpp": {"algo": "maml++", "net": "conv4"}}


@pytest.fixture(scope="module")
def glyph_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(work_dir, data_dir): a 15-letter RGB set packed at 20x20 and two tiny 3-way runs on it,
    one with the MiniImagenet net, one with MAML++'s learned per-step rates."""
    if not FONTS:
        pytest.skip("no TrueType fonts found (apt-get install fonts-dejavu-core fonts-liberation)")
    root = tmp_path_factory.mktemp("glyph_runs")
    images_dir = make_glyph_folder(root / "images", classes=15, per_class=6, size=48)
    options = folders.PackOptions(size=GLYPH_SIZE, channels=3, min_per_class=4)
    folders.pack(images_dir, "glyphs", root / "data", options, log=lambda _: None)
    for name, flags in FOLDER_RUNS.items():
        config = {**TINY, "n_way": 3, "k_query": 1, "epochs": 2, "run_name": name, **flags}
        paths = {"data_dir": str(root / "data"), "work_dir": str(root / "work")}
        train({**config, **paths, "dataset": "folder", "data": "glyphs"})
    return root / "work", root / "data"


@pytest.fixture
def glyph_client(glyph_runs) -> TestClient:
    with make_client(*glyph_runs) as client:
        yield client


def encoded(image: Image.Image, format: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    kind = "jpeg" if format == "JPEG" else format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels_of(data_url: str) -> np.ndarray:
    """A PNG data URL's pixels as the packed layout uint8 [C, H, W]."""
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def folder_task(client: TestClient, run: str, seed: int = 0) -> dict:
    task = client.get("/api/playground/random_task", params={"run": run, "seed": seed}).json()
    query = [q["image"] for q in task["query"]]
    return {"run": run, "support": task["support"], "query": query, "steps": 3}


def test_folder_runs_are_offered_for_uploads(glyph_client) -> None:
    listing = glyph_client.get("/api/playground/runs").json()
    runs = {run["name"]: run for run in listing["runs"]}
    assert set(runs) == set(FOLDER_RUNS) and listing["default"] in runs
    for name, run in runs.items():
        assert (run["input"], run["dataset"], run["data"]) == ("upload", "folder", "glyphs")
        assert (run["image_size"], run["channels"], run["n_way"]) == (GLYPH_SIZE, 3, 3)
        assert run["net"] == FOLDER_RUNS[name]["net"]
    assert listing["limits"]["max_upload_bytes"] == Settings.max_upload_bytes


def test_a_random_folder_task_holds_packed_test_images(glyph_client, glyph_runs) -> None:
    task = folder_task(glyph_client, "glyph_pool", seed=5)
    test = folders.load_split(glyph_runs[1], "glyphs", "test")
    assert sorted(item["label"] for item in task["support"]) == [0, 1, 2]
    for image in [s["image"] for s in task["support"]] + task["query"]:
        assert image.startswith("data:image/png;base64,")
        pixels = pixels_of(image)
        assert pixels.shape == (3, GLYPH_SIZE, GLYPH_SIZE)
        assert (test.pixels == pixels).all(axis=(1, 2, 3)).any()  # exactly a packed image


@pytest.mark.parametrize("run", list(FOLDER_RUNS))
def test_adapt_on_a_folder_run_sees_uploads_as_the_set_was_packed(glyph_client, run) -> None:
    body = folder_task(glyph_client, run)
    photo = glyph("B", np.random.default_rng(1), size=90).resize((120, 90))  # not square
    body["query"] = [*body["query"], encoded(photo, "JPEG"), encoded(photo.convert("L"), "PNG")]
    response = glyph_client.post("/api/adapt", json=body)
    assert response.status_code == 200, response.json()
    result = response.json()
    probabilities = np.array(result["probabilities"])
    assert probabilities.shape == (5, 4, 3)  # query, step 0..3, class
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(probabilities[:, 0], probabilities[:, -1])  # the steps change them
    assert result["input"] == "upload" and result["k_spt"] == 1
    seen = [pixels_of(url) for url in result["inputs"]["query"]]
    for packed, shown in zip(body["query"][:3], seen):  # the packed images pass unchanged
        assert np.array_equal(shown, pixels_of(packed))
    jpeg = base64.b64decode(body["query"][3].split(",", 1)[1])
    assert np.array_equal(seen[3], images.preprocess(jpeg, GLYPH_SIZE, 3))  # make_data's function
    assert seen[4].shape == (3, GLYPH_SIZE, GLYPH_SIZE)  # grayscale upload to the set's RGB


def test_a_run_adapts_with_its_learned_inner_rates(glyph_runs, tmp_path) -> None:
    """MAML++'s per-step rates come from the checkpoint: set to zero, steps 1..3 are all alike
    (step 0 differs only by its own batch-norm row)."""
    work = tmp_path / "work"
    shutil.copytree(glyph_runs[0], work)
    client = make_client(work, glyph_runs[1])
    body = folder_task(client, "glyph_mamlpp")
    learned = np.array(client.post("/api/adapt", json=body).json()["probabilities"])
    assert not np.allclose(learned[:, 1], learned[:, 3], atol=1e-4)
    best = work / "glyph_mamlpp" / "best.npz"
    checkpoint = load_checkpoint(best)
    rates = [name for name in checkpoint.params if name.startswith("lr:")]
    assert rates
    for name in rates:
        checkpoint.params[name] = np.zeros_like(checkpoint.params[name])
    save_checkpoint(best, checkpoint)
    frozen = np.array(
        make_client(work, glyph_runs[1]).post("/api/adapt", json=body).json()["probabilities"]
    )
    np.testing.assert_allclose(frozen[:, 1], frozen[:, 3], atol=1e-6)


def huge_png_header(side: int) -> bytes:
    """A few bytes that claim a side x side image: decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_bad_uploads_are_refused_with_a_message(glyph_runs) -> None:
    client = make_client(*glyph_runs, max_upload_bytes=20_000)
    body = folder_task(client, "glyph_pool")
    png = "data:image/png;base64,"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), np.uint8))
    wide, bomb = (png + base64.b64encode(huge_png_header(side)).decode() for side in (5000, 10**5))
    cases = [
        (png + base64.b64encode(b"just some text").decode(), 422, "cannot decode"),
        ("data:image/gif;base64,R0lGOD", 422, "must start with"),
        ([[0.5] * 28] * 28, 422, "uploaded images"),
        (encoded(noise, "PNG"), 413, "larger than 20000 bytes"),
        (wide, 413, "larger than 4096x4096"),
        (bomb, 413, "decompression bomb"),
    ]
    for image, status, fragment in cases:
        response = client.post("/api/adapt", json={**body, "query": [image]})
        assert response.status_code == status, response.json()
        assert detail(response)["field"] == "query.0" and fragment in detail(response)["message"]
    wrong_counts = [
        ({**body, "support": body["support"][:2]}, 422),  # class 2 has no example
        ({**body, "query": body["query"] * 17}, 413),  # 51 queries
        ({**body, "query": []}, 422),
    ]
    for case, status in wrong_counts:
        assert client.post("/api/adapt", json=case).status_code == status
    assert client.post("/api/adapt", json=body).status_code == 200  # the server lives on


def test_a_folder_run_without_its_set_is_422(glyph_runs, tmp_path) -> None:
    """The server's data_dir lacks the run's set: listed with the problem, adapt says how to fix."""
    client = make_client(glyph_runs[0], tmp_path)
    listing = client.get("/api/playground/runs").json()["runs"]
    assert all("make_data.py --images" in run["problem"] for run in listing)
    body = {"run": "glyph_pool", "support": [{"image": "x", "label": 0}], "query": ["x"]}
    response = client.post("/api/adapt", json=body)
    assert response.status_code == 422 and "make_data.py --images" in detail(response)["message"]


# -- security ------------------------------------------------------------------------------------
def test_body_size_is_limited(work, omniglot_dir) -> None:
    client = make_client(work, omniglot_dir, max_body_bytes=1000)
    response = client.post("/api/adapt", content=b"{" + b" " * 2000 + b"}")
    assert response.status_code == 413
    chunked = client.post("/api/adapt", content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]))
    assert chunked.status_code == 413


def test_a_token_guards_every_request(work, omniglot_dir) -> None:
    client = make_client(work, omniglot_dir, token=TOKEN)
    for path in ("/api/runs", "/api/runs/tiny/events", "/static/style.css", "/docs", "/"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/runs", headers=headers).status_code == 200
    first = client.get(f"/api/flags?token={TOKEN}")
    assert first.status_code == 200
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/api/runs").status_code == 200  # the cookie now


def test_other_sites_cannot_drive_the_server(client) -> None:
    assert client.get("/api/runs", headers={"Host": "evil.example:8000"}).status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:8000"}).status_code == 200
    foreign = {"Origin": "http://evil.example"}
    assert client.post("/api/runs/tiny/cancel", headers=foreign).status_code == 403
    assert client.delete("/api/runs/tiny", headers=foreign).status_code == 403
    assert client.get("/api/runs", headers=foreign).status_code == 200  # reading is harmless
    same = {"Origin": "http://127.0.0.1:8000"}
    assert client.post("/api/runs/tiny/cancel", headers=same).status_code == 409


def test_serve_refuses_other_addresses_without_a_token() -> None:
    def settings(*argv: str):
        return settings_from(serve_parser().parse_args(list(argv)))

    assert settings().token is None
    assert settings("--host", "0.0.0.0", "--token", TOKEN).token == TOKEN
    for argv in (["--host", "0.0.0.0"], ["--host", "192.168.1.2"], ["--jobs", "0"]):
        with pytest.raises(Exception, match=r"--token|--jobs"):
            settings(*argv)
    assert_one_line_error(run_script("serve.py", "--host", "0.0.0.0"), "--token")


# -- real jobs -----------------------------------------------------------------------------------
def events_of(client: TestClient, name: str) -> list[tuple[str, dict]]:
    """All events of a run's stream (the stream ends when its job does)."""
    text = client.get(f"/api/runs/{name}/events").text
    blocks = [b for b in text.split("\n\n") if b.startswith("event: ")]
    return [(b.split("\n")[0][7:], json.loads(b.split("data: ", 1)[1])) for b in blocks]


@pytest.mark.slow
def test_a_training_job_streams_progress_and_completes(client, work, omniglot_dir) -> None:
    flags = {k: v for k, v in tiny(omniglot_dir, work, epochs=3).items() if k[-4:] != "_dir"}
    started = client.post("/api/runs", json={**flags, "run_name": "served"})
    assert started.status_code == 202, started.json()
    events = events_of(client, "served")
    assert events[-1] == ("end", {"run": "served", "status": "complete", "exit_code": 0})
    iterations = [e["iteration"] for kind, e in events if kind == "progress" and e["iteration"]]
    assert iterations == sorted(iterations) and iterations[-1] == 3
    run = client.get("/api/runs/served").json()
    assert run["status"] == "complete" and run["completed_iterations"] == 3
    argv = run["commands"][0]["argv"]
    assert argv[1:] == [*(f"--{k}={v}" for k, v in flags.items()), "--run_name=served",
                        f"--work_dir={work}", f"--data_dir={omniglot_dir.resolve()}"]  # fmt: skip
    assert (work / "served" / "train.log").read_text().count("it 2: meta-loss") == 1
    assert client.post("/api/runs/served/evaluate", json={"tasks": 5}).status_code == 202
    assert events_of(client, "served")[-1][1]["status"] == "complete"
    attempt = client.get("/api/attempts/served").json()
    assert attempt["testing_command"].startswith("python evaluate.py --ckpt=")
    assert 0.0 <= attempt["accuracy"] <= 1.0 and attempt["iterations"] == [1, 2]  # log_every 2


@pytest.mark.slow
def test_cancel_interrupts_like_ctrl_c_and_resume_continues(client, work, omniglot_dir) -> None:
    flags = tiny(omniglot_dir, work, epochs=500, ckpt_every=1000, val_every=1000)
    flags = {k: v for k, v in flags.items() if k[-4:] != "_dir"}
    client.post("/api/runs", json={**flags, "run_name": "stopped"})
    wait_for(lambda: (job_of(client, "stopped")["progress"]["iteration"] or 0) >= 1, 300)
    assert client.post("/api/runs/stopped/cancel").status_code == 200
    events = events_of(client, "stopped")
    assert events[-1][1]["status"] == "interrupted" and events[-1][1]["exit_code"] == 130
    job = job_of(client, "stopped")
    assert job["status"] == "interrupted" and job["error"].startswith("interrupted at iteration")
    run = client.get("/api/runs/stopped").json()
    assert run["status"] == "interrupted" and run["has_last"]
    done = run["completed_iterations"]
    assert 1 <= done < 500
    resumed = client.post("/api/runs/stopped/resume", json={"epochs": done + 2})
    assert resumed.status_code == 202 and resumed.json()["job"]["kind"] == "resume"
    assert events_of(client, "stopped")[-1][1]["status"] == "complete"
    assert client.get("/api/runs/stopped").json()["completed_iterations"] == done + 2
