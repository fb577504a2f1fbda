"""A client's own network through the service: POST /api/runs with "model", a JSON model spec.

A valid spec is normalised, written to the run's folder and handed to train.py as --net; a bad one
(or a module path or file name as "net") is a 422 with one line, and nothing is written or run.
Jobs run a stand-in script, so nothing trains here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import assert_one_line_error, run_script
from PIL import Image

from metalearn.data import folders
from metalearn.errors import UserError
from metalearn.nets.spec import SPEC_FILE, build_from_spec, load_spec_file, validate_spec
from metalearn.service import app as service_app
from metalearn.service.app import create_app
from metalearn.service.flags import parse_train_argv
from metalearn.service.settings import Settings
from metalearn.training.config import resolve_defaults
from metalearn.training.trainer import prepare_config

EXAMPLE = service_app.SPEC_EXAMPLE["model"]
SET_SIZE = 20  # the image-folder set's images: 3 x 20 x 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding a tiny RGB image-folder set ``noise`` (Omniglot is not read: its
    image shape is fixed)."""
    root = tmp_path_factory.mktemp("spec_data")
    rng = np.random.default_rng(0)
    for label in range(8):
        (root / "images" / f"class{label}").mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"class{label}" / f"{i}.png")
    options = folders.PackOptions(size=SET_SIZE, channels=3, min_per_class=4, split="4,2,2")
    folders.pack(root / "images", "noise", root / "data", options, log=lambda _: None)
    return root / "data"


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def client(work, data_dir, monkeypatch) -> TestClient:
    """The service on an empty work folder; its jobs run ``python -c pass`` instead of train.py."""
    monkeypatch.setattr(
        service_app, "script_argv", lambda script, *args: [sys.executable, "-c", "pass", *args]
    )
    app = create_app(Settings.create(work, data_dir))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def refusal(client: TestClient, body: dict) -> dict:
    """The one error of a refused training request; nothing was queued."""
    jobs = [job["id"] for job in client.get("/api/jobs").json()]
    response = client.post("/api/runs", json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert "\n" not in error["message"]
    assert [job["id"] for job in client.get("/api/jobs").json()] == jobs
    return error


def test_a_valid_spec_is_saved_in_the_run_folder_and_passed_as_net(client, work) -> None:
    response = client.post("/api/runs", json={"run_name": "own", "epochs": 3, "model": EXAMPLE})
    assert response.status_code == 202, response.text
    argv = response.json()["job"]["argv"]
    path = work / "own" / SPEC_FILE
    assert f"--net={path}" in argv and "--epochs=3" in argv
    assert json.loads(path.read_text()) == validate_spec(EXAMPLE)
    # train.py's own parser and checks accept that argv: the file is read and fits Omniglot
    config = prepare_config(parse_train_argv(argv[3:]))
    assert config["net"] == str(path) and config["run_name"] == "own"
    model = build_from_spec(load_spec_file(config["net"]), (1, 28, 28), config["n_way"])
    assert [name for name, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]


def test_a_spec_is_checked_against_the_image_folder_set(client, work) -> None:
    rgb = {"dataset": "folder", "data": "noise", "n_way": 3, "k_query": 1}
    fits = [{"name": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 5, "stride": 5}]
    fits += [{"name": "Flatten"}, {"name": "Linear", "out_features": "n_way"}]
    response = client.post("/api/runs", json={**rgb, "run_name": "rgb", "model": fits})
    assert response.status_code == 202, response.text
    assert (work / "rgb" / SPEC_FILE).is_file()
    too_small = [{**fits[0], "kernel_size": 11, "stride": 11}, {**fits[0], "in_channels": "auto"}]
    error = refusal(client, {**rgb, "run_name": "rgb2", "model": [*too_small, *fits[1:]]})
    assert error == {
        "field": "model",
        "message": "model: layer 1 (Conv2d): a 5×5 kernel does not fit a 1×1 input",
    }
    grey = refusal(client, {"run_name": "grey", "model": fits})  # Omniglot: 1 channel
    assert "layer 0 (Conv2d): in_channels is 3 but its input has 1 channels" in grey["message"]
    assert not (work / "rgb2").exists() and not (work / "grey").exists()


def deeply_nested(depth: int) -> list:
    nested: list = [{"name": "ReLU"}]
    for _ in range(depth):
        nested = [nested]
    return nested


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("conv4", 'model: a model spec is a JSON object {"layers": [...]} or a list of layers'),
        (42, "or a list of layers, not 42"),
        ({"layers": [{"name": "Conv3d"}]}, "model: layer 0: unknown layer 'Conv3d' (known: "),
        (
            [{"name": "Conv2d", "out_channels": 8, "kernel_size": 3, "dilation": 2}],
            "model: layer 0 (Conv2d): unknown key 'dilation'",
        ),
        (
            [{"name": "Linear", "out_features": "five"}],
            "out_features must be an integer from 1 to 4096 or \"n_way\", not 'five'",
        ),
        ([{"name": "Linear", "out_features": 10_000}], "not 10000"),
        ([{"name": "ReLU"}], "model: the spec has no parameters"),
        ([{"name": "Flatten"}, {"name": "Linear", "out_features": 7}], "must be [n_way] = [5]"),
        (
            [{"name": "Flatten"}, {"name": "Linear", "in_features": 100, "out_features": 5}],
            "model: layer 1 (Linear): in_features is 100 but its input has 784 features",
        ),
        ([{"name": "ReLU"}] * 65, "the spec has 65 layers; at most 64"),
        ([{"name": "Linear", "out_features": 5, "bias": "x" * 70_000}], "larger than 65,536 bytes"),
        ({"layers": deeply_nested(200)}, "model: layer 0: is a list of 1, not an object"),
        (
            [
                *[
                    {
                        "name": "Conv2d",
                        "out_channels": 8,
                        "kernel_size": 3,
                        "stride": 2,
                        "padding": 1,
                    }
                ]
                * 4,
                *[{"name": "MaxPool2d", "kernel_size": 2}] * 2,
                {"name": "Flatten"},
                {"name": "Linear", "out_features": "n_way"},
            ],
            "model: layer 5 (MaxPool2d): a 2×2 pool does not fit a 1×1 input",
        ),
    ],
)
def test_bad_specs_are_422_with_the_reason(client, work, model, fragment) -> None:
    error = refusal(client, {"run_name": "bad", "model": model})
    assert error["field"] == "model" and fragment in error["message"], error
    assert not (work / "bad").exists()


@pytest.mark.parametrize(
    "net", ["my_module:make_model", "os:system", "/etc/passwd.json", "model.json", "conv5"]
)
def test_net_names_only_builtin_networks(client, net) -> None:
    error = refusal(client, {"run_name": "bad", "net": net})
    assert error["field"] == "net"
    assert "the service takes only conv4 or pool4 by name" in error["message"]
    assert 'send your own network as a JSON model spec in "model"' in error["message"]


def test_net_and_model_together_are_refused(client) -> None:
    error = refusal(client, {"run_name": "both", "net": "conv4", "model": EXAMPLE})
    assert error == {
        "field": "model",
        "message": 'send "net" (a built-in network) or "model" (your own), not both',
    }
    assert client.post("/api/runs", json={"run_name": "plain", "net": "conv4"}).status_code == 202


def test_sinusoid_runs_take_no_spec(client) -> None:
    error = refusal(client, {"dataset": "sinusoid", "run_name": "sine", "model": EXAMPLE})
    assert error["field"] == "model" and "a model spec is for images" in error["message"]


def test_a_body_nested_too_deeply_for_json_is_refused(client) -> None:
    """FastAPI's own refusal (400), before the spec is looked at: not a 500."""
    content = '{"run_name": "deep", "model": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post(
        "/api/runs", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["message"] == "There was an error parsing the body"
    assert client.get("/api/jobs").json() == []


def test_the_form_offers_the_builtin_networks_by_name(client) -> None:
    flags = {flag["name"]: flag for flag in client.get("/api/flags").json()["flags"]}
    assert flags["net"]["choices"] == ["conv4", "pool4"]


# -- train.py --net SPEC.json: checked with the other flags, before any training ---------------
def spec_file(tmp_path: Path, spec: object) -> str:
    path = tmp_path / "net.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_config_validation_reads_and_fits_a_spec_file(tmp_path, data_dir) -> None:
    good = spec_file(tmp_path, EXAMPLE)
    assert prepare_config({"net": good, "work_dir": str(tmp_path)})["net"] == good
    folder = {"dataset": "folder", "data": "noise", "data_dir": str(data_dir), "n_way": 3}
    assert prepare_config({**folder, "net": good, "work_dir": str(tmp_path)})["net"] == good
    bad = [*EXAMPLE["layers"][:-1], {"name": "Linear", "out_features": 10}]
    with pytest.raises(UserError, match=r"^--net .*net\.json: the network's output per example"):
        prepare_config({"net": spec_file(tmp_path, bad), "work_dir": str(tmp_path)})
    missing = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="cannot read it"):
        prepare_config({"net": missing, "work_dir": str(tmp_path)})
    with pytest.raises(UserError, match="is not one of conv4, pool4 or a model spec"):
        prepare_config({"net": "conv5", "work_dir": str(tmp_path)})
    assert resolve_defaults({"net": good})["net"] == good


@pytest.mark.slow
def test_train_py_refuses_a_bad_spec_file_in_one_line(tmp_path) -> None:
    path = spec_file(tmp_path, [{"name": "Conv3d", "out_channels": 8}])
    result = run_script("train.py", "--net", path, "--work_dir", str(tmp_path / "work"))
    assert_one_line_error(result, f"--net {path}: layer 0: unknown layer 'Conv3d' (known: ")
    assert not (tmp_path / "work").exists()
