"""Run records (runs.sqlite), runs.py, and the PNG plots: lifecycle, concurrency, failures."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    REPO,
    SINE_RECORD,
    TINY,
    as_flags,
    assert_one_line_error,
    run_script,
    start_script,
)
from helpers import tiny as tiny_run
from PIL import Image

from metalearn.errors import UserError
from metalearn.learning import learner
from metalearn.runs import plots
from metalearn.runs.names import check_run_name
from metalearn.runs.records import RecordsError, RunConflict, RunRecords, db_path, remove_run
from metalearn.training.evaluation import evaluate
from metalearn.training.trainer import Trainer, prepare_config, train

SINE = {
    "dataset": "sinusoid",
    "task_num": 2,
    "glob_update_step_test": 2,
    "val_tasks": 3,
    "val_every": 2,
    "log_every": 1,
}
TINY_FLAGS = as_flags({**TINY, "val_tasks": 2, "log_every": 1, "val_every": 2})


def tiny(omniglot_dir: Path, work: Path, **overrides) -> dict:
    return tiny_run(omniglot_dir, work, **{"val_every": 3, **overrides})


def sine(work: Path, **overrides) -> dict:
    return {**SINE, "work_dir": str(work), **overrides}


def runs_py(work: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return run_script("runs.py", *args, "--work_dir", str(work), stdin=stdin, timeout=60)


def assert_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 0, f"{path} is blank"


# -- lifecycle -----------------------------------------------------------------------------------
def test_training_and_evaluation_make_a_complete_record(omniglot_dir, tmp_path) -> None:
    train(tiny(omniglot_dir, tmp_path, run_name="rec", epochs=4))
    run = RunRecords(tmp_path).get_run("rec")
    assert run["status"] == "complete" and run["error"] is None
    assert (run["completed_iterations"], run["planned_iterations"]) == (4, 4)
    assert [e["iteration"] for e in run["log"]] == [1, 2, 4]
    assert all(len(e["query_per_step"]) == 2 and e["loss"] > 0 for e in run["log"])
    assert [e["iteration"] for e in run["validation"]] == [3, 4]
    best = max(run["validation"], key=lambda e: e["per_step"][-1])
    assert run["best_score"] == pytest.approx(best["per_step"][-1], abs=1e-4)
    assert run["best_iteration"] == best["iteration"]
    assert run["config"]["k_query"] == 2 and run["config"]["run_name"] == "rec"
    assert run["metric"] == "accuracy" and run["higher_is_better"]
    assert Path(run["best_checkpoint"]) == (tmp_path / "rec" / "best.npz").resolve()
    assert Path(run["last_checkpoint"]) == (tmp_path / "rec" / "last.npz").resolve()
    assert run["paddle_version"] and run["device"] == "cpu" and run["pid"] is None
    assert run["git_commit"] is None or len(run["git_commit"]) == 40
    assert run["started_at"] and run["ended_at"]
    assert run["commands"][0]["argv"] == sys.argv
    assert_png(tmp_path / "rec" / "curves.png")

    given = {
        "dataset": "omniglot",
        "n_way": 5,
        "k_spt": 1,
        "work_dir": str(tmp_path),
        "data_dir": str(omniglot_dir),
        "tasks": 4,
        "seed": 0,
        "glob_update_step_test": 2,
    }
    results = [evaluate(given), evaluate({**given, "tasks": 5})]
    run = RunRecords(tmp_path).get_run("rec")
    assert run["status"] == "complete" and not run["testing"]  # evaluations never change it
    assert [e["tasks"] for e in run["evaluations"]] == [4, 5]
    assert [e["status"] for e in run["evaluations"]] == ["complete", "complete"]
    assert run["evaluations"][1]["mean"] == results[1]["acc_mean"]
    assert run["evaluations"][1]["ci95"] == results[1]["acc_ci95"]
    assert run["evaluations"][0]["steps"] == 2
    assert_png(tmp_path / "rec" / "test_steps.png")

    listing = runs_py(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith("rec "))
    for value in ("maml", "5w/1s", "complete", "4/4", f"{run['best_score']:.4f}"):
        assert value in line
    assert f"{results[1]['acc_mean'][-1]:.4f} ± {results[1]['acc_ci95'][-1]:.4f}" in line
    shown = runs_py(tmp_path, "show", "rec")
    assert shown.returncode == 0, shown.stderr
    assert f"{run['log'][0]['loss']:.4f}" in shown.stdout
    assert "tests (2)" in shown.stdout and "k_query = 2" in shown.stdout


def test_a_resumed_run_keeps_its_record_and_runs_compare(tmp_path) -> None:
    train(sine(tmp_path, run_name="two", epochs=2))
    first_id = RunRecords(tmp_path).get_run("two")["id"]
    train({"resume": str(tmp_path / "two"), "epochs": 4})
    resumed = RunRecords(tmp_path).get_run("two")
    assert resumed["id"] == first_id and resumed["status"] == "complete"
    assert [e["iteration"] for e in resumed["log"]] == [1, 2, 3, 4]
    assert [e["iteration"] for e in resumed["validation"]] == [2, 4]
    assert (resumed["completed_iterations"], resumed["planned_iterations"]) == (4, 4)
    assert len(resumed["commands"]) == 2
    train(sine(tmp_path, run_name="one", epochs=3, glob_base_lr=0.02))

    compared = runs_py(tmp_path, "compare", "two", "one")
    assert compared.returncode == 0, compared.stderr
    assert "4/4" in compared.stdout and "3/3" in compared.stdout
    assert f"{resumed['best_score']:.4f}" in compared.stdout
    assert "--glob_base_lr" in compared.stdout  # differing flags are listed
    png = Path(compared.stdout.strip().splitlines()[-1].removeprefix("plot: "))
    assert_png(png)
    plotted = runs_py(tmp_path, "plot", "two", "--out", str(tmp_path / "two.png"))
    assert plotted.returncode == 0 and (tmp_path / "two.png").is_file()
    assert_png(tmp_path / "two.png")
    figures = tmp_path / "figures"
    figures.mkdir()
    into_folder = [
        runs_py(tmp_path, "plot", "two", "--out", str(figures)),
        runs_py(tmp_path, "compare", "two", "one", "--out", str(figures)),
    ]
    assert all(result.returncode == 0 for result in into_folder), into_folder
    assert sorted(p.name for p in figures.iterdir()) == ["compare_two_vs_one.png", "two_curves.png"]
    for png in figures.iterdir():
        assert_png(png)


@pytest.mark.slow
def test_two_concurrent_trainings_both_record(omniglot_dir, tmp_path) -> None:
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, str(REPO / "train.py"), *TINY_FLAGS, "--epochs", "6"),
                *("--data_dir", str(omniglot_dir), "--work_dir", str(tmp_path), "--run_name", name),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    for process in processes:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
        assert "warning: run database" not in err
    records = RunRecords(tmp_path)
    for name in ("left", "right"):
        run = records.get_run(name)
        assert run["status"] == "complete"
        assert [e["iteration"] for e in run["log"]] == [1, 2, 3, 4, 5, 6]
        assert [e["iteration"] for e in run["validation"]] == [2, 4, 6]
    with sqlite3.connect(db_path(tmp_path)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_killed_training_shows_as_interrupted(tmp_path) -> None:
    process = start_script(
        *("train.py", "--dataset", "sinusoid"),
        *("--epochs", "100000", "--log_every", "1", "--val_every", "100000"),
        *("--task_num", "2", "--work_dir", str(tmp_path), "--run_name", "victim"),
    )
    records = RunRecords(tmp_path)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if records.exists() and records.has_run("victim"):
                run = records.get_run("victim")
                if run["completed_iterations"] >= 3:
                    break
            time.sleep(0.2)
        assert run["status"] == "training" and run["pid"] == process.pid
        with pytest.raises(RunConflict, match="training right now"):
            train(sine(tmp_path, run_name="victim", epochs=2))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    run = records.get_run("victim")
    assert run["status"] == "interrupted"
    assert str(process.pid) in run["error"]
    assert run["completed_iterations"] >= 3
    listing = runs_py(tmp_path, "list")
    assert "interrupted" in listing.stdout


def test_a_dead_process_is_reaped_and_a_live_one_is_protected(tmp_path) -> None:
    records = RunRecords(tmp_path)
    common = {**SINE_RECORD, "run_dir": tmp_path / "x"}
    records.start_training("x", resumed=False, **common)
    with pytest.raises(RunConflict):  # this very process holds it
        records.start_training("x", resumed=True, **common)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with sqlite3.connect(records.path) as con:
        con.execute("UPDATE runs SET pid = ?, pid_started = NULL", (dead.pid,))
    assert records.list_runs()[0]["status"] == "interrupted"
    records.start_training("x", resumed=True, **common)  # now it may be taken over
    assert records.get_run("x")["status"] == "training"


def test_a_run_that_raises_is_failed_with_its_message(tmp_path, monkeypatch) -> None:
    trainer = Trainer(prepare_config(sine(tmp_path, run_name="nan", epochs=6)))
    real = learner.MetaLearner.batch_direction

    def poisoned(self, tasks, *args):
        direction, stats = real(self, tasks, *args)
        if trainer.state.iteration >= 2:
            direction = {k: v * float("nan") for k, v in direction.items()}
        return direction, stats

    monkeypatch.setattr(learner.MetaLearner, "batch_direction", poisoned)
    with pytest.raises(UserError, match="iteration 3"):
        trainer.run()
    run = RunRecords(tmp_path).get_run("nan")
    assert run["status"] == "failed"
    assert run["error"].startswith("non-finite meta-update") and "at iteration 3" in run["error"]
    assert run["completed_iterations"] == 2 and run["metric"] == "mse"

    def broken(self, tasks, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(learner.MetaLearner, "batch_direction", broken)
    with pytest.raises(RuntimeError):
        train(sine(tmp_path, run_name="boom", epochs=2))
    assert RunRecords(tmp_path).get_run("boom")["error"] == "RuntimeError: boom"
    shown = runs_py(tmp_path, "show", "boom")
    assert "failed" in shown.stdout and "RuntimeError: boom" in shown.stdout


def test_a_corrupt_database_warns_once_and_training_goes_on(tmp_path, capsys) -> None:
    tmp_path.mkdir(exist_ok=True)
    db_path(tmp_path).write_bytes(b"this is not a database " * 200)
    state = train(sine(tmp_path, run_name="ok", epochs=4))
    assert state.iteration == 4
    assert (tmp_path / "ok" / "last.npz").is_file() and (tmp_path / "ok" / "best.npz").is_file()
    warnings = [x for x in capsys.readouterr().err.splitlines() if "runs.sqlite" in x]
    assert len(warnings) == 1 and warnings[0].startswith("warning: run database"), warnings
    assert_one_line_error(runs_py(tmp_path, "list"), "not a database")


def test_a_newer_schema_is_a_clear_error(tmp_path) -> None:
    RunRecords(tmp_path).list_runs()  # creates the current schema
    with sqlite3.connect(db_path(tmp_path)) as con:
        con.execute("PRAGMA user_version = 99")
    assert_one_line_error(runs_py(tmp_path, "list"), "schema version 99")
    with pytest.raises(RecordsError, match="newer"):
        RunRecords(tmp_path).get_run("anything")


def test_unknown_names_and_missing_database_are_clear_errors(tmp_path) -> None:
    assert "no runs recorded" in runs_py(tmp_path, "list").stdout
    assert_one_line_error(runs_py(tmp_path, "show", "ghost"), "no runs recorded")
    RunRecords(tmp_path).list_runs()
    assert_one_line_error(runs_py(tmp_path, "show", "ghost"), "no run named 'ghost'")
    assert_one_line_error(runs_py(tmp_path, "compare", "ghost", "other"), "'ghost'")


def test_delete_asks_and_respects_the_answer(tmp_path) -> None:
    train(sine(tmp_path, run_name="gone", epochs=1))
    kept = runs_py(tmp_path, "delete", "gone", stdin="n\n")
    assert "[y/N]" in kept.stdout and "not deleted" in kept.stdout
    assert RunRecords(tmp_path).has_run("gone")
    assert "not deleted" in runs_py(tmp_path, "delete", "gone").stdout  # EOF means no
    deleted = runs_py(tmp_path, "delete", "gone", stdin="y\n")
    assert deleted.returncode == 0 and "deleted the record" in deleted.stdout
    assert not RunRecords(tmp_path).has_run("gone")
    assert (tmp_path / "gone" / "last.npz").is_file()  # files stay without --files

    train(sine(tmp_path, run_name="wiped", epochs=1))
    wiped = runs_py(tmp_path, "delete", "wiped", "--yes", "--files")
    assert wiped.returncode == 0 and "[y/N]" not in wiped.stdout
    assert not (tmp_path / "wiped").exists() and not RunRecords(tmp_path).has_run("wiped")


# -- plots ---------------------------------------------------------------------------------------
def test_plots_are_non_blank_pngs(tmp_path) -> None:
    x = np.linspace(-5, 5, 50)
    curve = {
        "x_grid": x,
        "y_true": 2 * np.sin(x),
        "x_support": x[::5],
        "y_support": 2 * np.sin(x[::5]),
        "predictions": {"pre-update": 0 * x, "1 step": np.sin(x), "10 steps": 1.8 * np.sin(x)},
    }
    log = [{"iteration": i, "loss": 1 / i, "query_per_step": [0.2, 0.2 + i / 50]} for i in (1, 2)]
    written = [
        plots.sinusoid_fits(tmp_path / "fits.png", [curve, curve]),
        plots.steps_curve(
            tmp_path / "steps.png",
            {
                "MAML": ([3.0, 1.0, 0.5], [0.3, 0.1, 0.05]),
                "pretrained": ([3.0, 2.5, 2.4], [0.3] * 3),
            },
            "mse",
        ),
        plots.training_curves(tmp_path / "empty.png", [], [], "accuracy"),
        plots.training_curves(
            tmp_path / "curves.png", log, [{"iteration": 2, "per_step": [0.2, 0.4]}], "accuracy"
        ),
        plots.compare_curves(tmp_path / "cmp.png", {"a": {"log": log, "validation": []}}, "mse"),
    ]
    for path in written:
        assert_png(path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_steps_curve_pairs_published_values_with_our_series_by_colour(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    series = {"MAML (ours)": ([-40.0, -20.0], [2.0, 1.0]), "oracle": ([-8.0, -8.5], [0.3] * 2)}
    reference = {"MAML": [-39.0, -11.6], "random": [-82.0, -58.0]}
    plots.steps_curve(tmp_path / "s.png", series, "return", reference=reference)
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert set(lines) == {"MAML (ours)", "oracle", "MAML (paper)", "random (paper)"}
    assert lines["MAML (paper)"].get_color() == lines["MAML (ours)"].get_color()
    assert lines["MAML (paper)"].get_linestyle() == "--"
    assert lines["random (paper)"].get_color() not in (
        lines["MAML (ours)"].get_color(),
        lines["oracle"].get_color(),
    )
    np.testing.assert_array_equal(lines["random (paper)"].get_ydata(), [-82.0, -58.0])


def test_the_papers_rl_values_cover_our_environments_at_0_to_3_steps() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from rl_compare import paper_returns
    finally:
        sys.path.remove(str(REPO / "bench"))
    for dataset in ("nav2d", "cheetah_vel", "cheetah_dir"):
        returns = paper_returns(dataset)
        assert set(returns) == {"MAML", "pretrained", "random", "oracle"}
        assert all(len(mean) == len(ci) == 4 for mean, ci in returns.values())
        maml = returns["MAML"][0]
        assert maml[1] > maml[0]  # the paper's claim: MAML adapts in one step
    assert paper_returns("sinusoid") == {}


def test_make_data_preview_draws_one_task(omniglot_dir, tmp_path) -> None:
    out = tmp_path / "task.png"
    result = subprocess.run(
        [
            *(sys.executable, str(REPO / "make_data.py"), "--preview", "--out", str(omniglot_dir)),
            *("--n_way", "3", "--k_spt", "2", "--k_query", "4", "--preview_path", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert_png(out, min_size=(400, 300))


def test_evaluating_an_unrecorded_run_records_it(tmp_path) -> None:
    train(sine(tmp_path, run_name="old", epochs=3))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path(tmp_path)}{suffix}").unlink(missing_ok=True)
    given = {"dataset": "sinusoid", "work_dir": str(tmp_path), "tasks": 3, "seed": 0}
    results = evaluate({**given, "ckpt": str(tmp_path / "old")})
    run = RunRecords(tmp_path).get_run("old")
    assert run["status"] == "complete" and run["completed_iterations"] == 3
    assert [e["iteration"] for e in run["log"]] == [1, 2, 3]
    assert run["evaluations"][0]["metric"] == "mse"
    assert run["evaluations"][0]["mean"] == results["mse_mean"]
    assert_png(tmp_path / "old" / "test_steps.png")


# -- names, folders, deletion ---------------------------------------------------------------------
BAD_NAMES = ["../../x", "/tmp/x", "a/b", ".", "..", "", "a b", "a\nb", "a\0b", ".hidden", "-x"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "x" * 101])
def test_a_run_name_is_one_folder_name(name) -> None:
    with pytest.raises(UserError, match="is not allowed"):
        check_run_name(name)


def test_good_run_names_pass() -> None:
    for name in ("quick", "omniglot_5w1s_maml_seed-1", "v1.2", "A-b_C.9", "x" * 100):
        assert check_run_name(name) == name


def test_bad_run_names_and_work_dirs_are_refused_everywhere(tmp_path) -> None:
    work = tmp_path / "work"
    for name in BAD_NAMES:
        with pytest.raises(UserError, match="is not allowed"):
            train(sine(work, run_name=name, epochs=1))
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
    train(sine(work, run_name="fine", epochs=1))
    shutil.copytree(work / "fine", work / "fine copy")
    with pytest.raises(UserError, match="'fine copy' is not allowed"):
        train({"resume": str(work / "fine copy"), "epochs": 2})
    for args in (("show", "../fine"), ("plot", "a/b"), ("compare", "fine", ".."), ("delete", "")):
        assert_one_line_error(runs_py(work, *args), "is not allowed")

    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        train(sine(a_file, run_name="x", epochs=1))
    with pytest.raises(UserError, match="is not a folder"):
        evaluate({"dataset": "sinusoid", "work_dir": str(a_file), "tasks": 2, "seed": 0})
    assert_one_line_error(runs_py(a_file, "list"), "is not a folder")


@pytest.mark.slow
def test_train_py_says_a_bad_run_name_in_one_line(tmp_path) -> None:
    assert_one_line_error(
        run_script("train.py", "--run_name", "../escape", "--work_dir", str(tmp_path)),
        "run name '../escape' is not allowed",
    )
    assert list(tmp_path.parent.glob("escape")) == []


def test_remove_run_keeps_the_record_when_the_folder_cannot_go(tmp_path, monkeypatch) -> None:
    train(sine(tmp_path, run_name="stuck", epochs=1))

    def unremovable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(path) / "last.npz"))

    monkeypatch.setattr(shutil, "rmtree", unremovable)
    with pytest.raises(UserError, match="its record is kept"):
        remove_run(tmp_path, "stuck", files=True)
    run = RunRecords(tmp_path).get_run("stuck")
    assert run["status"] == "complete" and len(run["log"]) == 1
    assert (tmp_path / "stuck" / "last.npz").is_file()
    deleted = runs_py(tmp_path, "delete", "stuck", "--yes", "--files")  # the real rmtree
    assert deleted.returncode == 0, deleted.stderr
    assert not (tmp_path / "stuck").exists() and not RunRecords(tmp_path).has_run("stuck")
    with pytest.raises(UserError, match="is not allowed"):
        remove_run(tmp_path, "../stuck", files=True)


@pytest.mark.slow
def test_a_sigkilled_evaluation_leaves_the_run_complete(tmp_path) -> None:
    train(sine(tmp_path, run_name="judged", epochs=2))
    process = start_script(
        *("evaluate.py", "--dataset", "sinusoid"),
        *("--ckpt", str(tmp_path / "judged"), "--tasks", "2"),
        *("--glob_update_step_test", "1000000", "--work_dir", str(tmp_path)),
    )
    records = RunRecords(tmp_path)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if records.get_run("judged")["testing"]:
                break
            time.sleep(0.2)
        run = records.get_run("judged")
        assert run["testing"] and run["status"] == "complete"
        assert "complete, testing" in runs_py(tmp_path, "list").stdout
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    run = records.get_run("judged")
    assert run["status"] == "complete" and not run["testing"]
    [evaluation] = run["evaluations"]
    assert evaluation["status"] == "interrupted" and str(process.pid) in evaluation["error"]
    assert "complete, testing" not in runs_py(tmp_path, "list").stdout
