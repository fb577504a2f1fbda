"""The 2D-navigation playground's API: paths and returns after each step, bounded counts,
nav2d runs only, loopback and busy rules like /api/adapt."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import wait_line_full

from metalearn.service.app import create_app
from metalearn.service.settings import Settings
from metalearn.training.trainer import train

RUN = "nav"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work_dir with one complete tiny nav2d run and one tiny sinusoid run."""
    work = tmp_path_factory.mktemp("navigation_work")
    flags = {"task_num": 2, "k_spt": 3, "horizon": 20, "val_tasks": 2, "epochs": 1}
    train({"dataset": "nav2d", "run_name": RUN, "work_dir": str(work), **flags})
    train(
        {
            "dataset": "sinusoid",
            "run_name": "sine",
            "work_dir": str(work),
            "epochs": 1,
            "val_tasks": 2,
        }
    )
    return work


@pytest.fixture
def client(work) -> TestClient:
    app = create_app(Settings.create(work, work))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def body(**changes) -> dict:
    return {"run": RUN, "goal": [0.3, -0.2], "steps": 2, "trajectories": 4, **changes}


def test_navigation_runs_lists_nav2d_runs_only(client) -> None:
    listed = client.get("/api/navigate/runs").json()
    assert [run["name"] for run in listed["runs"]] == [RUN] and listed["default"] == RUN


def test_navigate_gives_paths_and_a_return_after_each_step(client) -> None:
    response = client.post("/api/navigate", json=body())
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["goal"] == [0.3, -0.2] and len(result["per_step"]) == 3
    for step in result["per_step"]:
        assert len(step["paths"]) == 4 and step["return"] < 0
        assert step["paths"][0][0] == [0.0, 0.0]  # every path starts at the origin
        assert all(len(point) == 2 for point in step["paths"][0])
    again = client.post("/api/navigate", json=body()).json()
    assert again == result  # the same seed samples the same trajectories


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 6}, "steps"),
        ({"trajectories": 0}, "trajectories"),
        ({"trajectories": 41}, "trajectories"),
        ({"goal": [0.1]}, "goal"),
        ({"goal": [0.1, 0.2, 0.3]}, "goal"),
        ({"goal": [2.0, 0.0]}, "goal"),
        ({"goal": ["0.1", 0.2]}, "goal.0.float"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_requests_are_422_naming_the_field(client, changes, field) -> None:
    response = client.post("/api/navigate", json=body(**changes))
    assert response.status_code == 422
    assert any(d["field"].startswith(field) for d in response.json()["detail"]), response.text


def test_unknown_and_foreign_runs_are_refused(client) -> None:
    assert client.post("/api/navigate", json=body(run="missing")).status_code == 404
    assert client.post("/api/navigate", json=body(run="../x")).status_code == 422
    foreign = client.post("/api/navigate", json=body(run="sine"))
    assert foreign.status_code == 422 and "not a 2D-navigation run" in foreign.text


def test_a_full_wait_line_answers_503_with_retry_after(client) -> None:
    with wait_line_full(client):
        response = client.post("/api/navigate", json=body())
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0


def test_the_page_is_served(client) -> None:
    page = client.get("/navigate")
    assert page.status_code == 200 and "navigate.js" in page.text
