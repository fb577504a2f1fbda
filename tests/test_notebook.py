"""main.ipynb: committed without outputs, and runs end to end in a Jupyter kernel on tiny settings."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import numpy as np
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

from metalearn.runs import plots
from metalearn.training.notebook import is_packed, softmax, train_once

NOTEBOOK = Path(__file__).resolve().parent.parent / "main.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parameters_index(notebook: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
    return tagged[0]


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]


def test_parameters_cell_comes_first_and_names_every_knob() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = parameters_index(notebook)
    assert all(cell.cell_type == "markdown" for cell in notebook.cells[:index])
    names = {line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines()}
    for name in ("RUN_NAME", "MAX_MINUTES", "DATA_DIR", "WORK_DIR", "USE_GPU", "EPOCHS"):
        assert name in names


def test_adaptation_steps_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((5, 5)) for _ in range(4)]
    png = plots.adaptation_steps(
        tmp_path / "a.png",
        rng.random((5, 1, 28, 28)),
        np.arange(5),
        rng.random((5, 1, 28, 28)),
        np.arange(5),
        [softmax(x) for x in logits],
    )
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_softmax_is_a_distribution_even_for_huge_logits() -> None:
    probabilities = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probabilities, [[1.0, 0.0], [0.5, 0.5]])


def test_train_once_reuses_a_trained_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Re-running the notebook's training cell must not fail on (or retrain) its finished run."""
    run_dir = tmp_path / "work" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "best.npz").write_bytes(b"")
    flags = {"work_dir": str(tmp_path / "work"), "run_name": "run", "epochs": -1}  # never used
    assert train_once(flags) == run_dir
    assert "reusing it" in capsys.readouterr().out


def image_outputs(cell: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


@pytest.mark.slow
def test_notebook_runs_end_to_end(
    omniglot_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny settings injected after the parameters cell, as papermill does; packing is skipped."""
    assert is_packed(omniglot_dir)
    # The kernel is this interpreter, whatever other `python3` kernels the machine has installed:
    # JUPYTER_PATH is searched before the user's and the system's kernel folders.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    tiny = {
        "RUN_NAME": "nb",
        "MAX_MINUTES": 2.0,
        "DATA_DIR": str(omniglot_dir),
        "SOURCE_DIR": "/nonexistent",  # packing must be skipped, so the source is never read
        "WORK_DIR": str(work),
        "USE_GPU": False,
        "EPOCHS": 4,
        "TASK_NUM": 2,
        "VAL_EVERY": 2,
        "VAL_TASKS": 5,
        "TEST_TASKS": 10,
        "SINUSOID_ITERATIONS": 200,
    }
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in tiny.items()),
        metadata={"tags": ["injected-parameters"]},
    )
    notebook.cells.insert(parameters_index(notebook) + 1, injected)

    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()  # raises CellExecutionError on the first failing cell

    run, sine = work / "nb", work / "nb_sinusoid"
    figures = [
        work / "task_preview.png",
        run / "curves.png",
        run / "test_steps.png",
        run / "adaptation.png",
        sine / "sinusoid_fits.png",
    ]
    for png in figures:
        assert png.read_bytes().startswith(PNG_SIGNATURE), png
    shown = [image for cell in notebook.cells for image in image_outputs(cell)]
    assert shown == [png.read_bytes() for png in figures]
    text = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "not packing again" in text
    assert "step 3: accuracy" in text  # evaluate() printed accuracy after 0..3 inner steps
    stderr = [
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stderr"
    ]
    assert not [text for text in stderr if "Warning" in text], stderr  # a quiet start
