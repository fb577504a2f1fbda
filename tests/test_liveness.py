"""Who owns a run record: heartbeats, other hosts, --force, evaluations, the launcher's SIGTERM.

Heartbeat ages are set in the database directly, so nothing here waits for a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import SINE_RECORD, assert_one_line_error, fresh_state, run_script

from metalearn.errors import UserError
from metalearn.runs import liveness, plots
from metalearn.runs.records import Recorder, RunConflict, RunRecords, TestSession, remove_run
from metalearn.runs.schema import MIGRATIONS, SCHEMA_VERSION, db_path
from metalearn.training import distributed
from metalearn.training.trainer import Trainer, prepare_config, train

SINE = {"dataset": "sinusoid", "task_num": 2, "val_tasks": 2, "val_every": 2, "log_every": 1}


def ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def set_columns(work: Path, table: str, **values) -> None:
    with sqlite3.connect(db_path(work)) as con:
        assignments = ", ".join(f"{key} = ?" for key in values)
        con.execute(f"UPDATE {table} SET {assignments}", tuple(values.values()))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def record(work: Path, name: str = "x") -> RunRecords:
    records = RunRecords(work)
    records.start_training(name, resumed=False, run_dir=work / name, **SINE_RECORD)
    return records


def runs_py(work: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("runs.py", *args, "--work_dir", str(work), timeout=60)


# -- training liveness ---------------------------------------------------------------------------
def test_another_hosts_run_is_live_until_its_heartbeat_is_stale(tmp_path) -> None:
    """The issue: a record from another host (a restarted container) blocked --resume and
    delete forever. Now a fresh heartbeat protects it and a stale one frees it."""
    records = record(tmp_path)
    set_columns(tmp_path, "runs", host="old-container", pid=1, heartbeat_at=ago(5))
    with pytest.raises(RunConflict, match=r"training right now.*--force"):
        records.start_training("x", resumed=True, run_dir=tmp_path / "x", **SINE_RECORD)
    assert_one_line_error(runs_py(tmp_path, "delete", "x", "--yes"), "training right now")
    assert records.get_run("x")["status"] == "training"

    set_columns(tmp_path, "runs", heartbeat_at=ago(liveness.HEARTBEAT_TIMEOUT_SECONDS + 5))
    run = records.get_run("x")
    assert run["status"] == "interrupted" and "old-container" in run["error"]
    records.start_training("x", resumed=True, run_dir=tmp_path / "x", **SINE_RECORD)
    assert records.get_run("x")["host"] == socket.gethostname()


def test_the_heartbeat_timeout_is_injectable(tmp_path) -> None:
    record(tmp_path)
    set_columns(tmp_path, "runs", host="elsewhere", heartbeat_at=ago(30))
    assert RunRecords(tmp_path).get_run("x")["status"] == "training"
    assert RunRecords(tmp_path, heartbeat_timeout=10).get_run("x")["status"] == "interrupted"


def test_on_this_host_the_pid_decides_before_the_heartbeat(tmp_path) -> None:
    records = record(tmp_path)  # owned by this very process, alive
    set_columns(tmp_path, "runs", heartbeat_at=ago(10 * liveness.HEARTBEAT_TIMEOUT_SECONDS))
    assert records.get_run("x")["status"] == "training"  # stuck or slow: still there
    set_columns(tmp_path, "runs", pid=dead_pid(), heartbeat_at=ago(0))
    assert records.get_run("x")["status"] == "interrupted"  # gone: at once


def test_heartbeat_freshness_edge_cases() -> None:
    at = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert liveness.heartbeat_fresh("2026-01-01T11:59:30+00:00", 60, at)
    assert not liveness.heartbeat_fresh("2026-01-01T11:58:00+00:00", 60, at)
    assert liveness.heartbeat_fresh("2026-01-01T12:05:00+00:00", 60, at)  # clock ahead
    assert not liveness.heartbeat_fresh(None, 60, at)
    assert not liveness.heartbeat_fresh("yesterday", 60, at)


def test_the_recorder_beats_with_its_counters_but_not_every_iteration(tmp_path) -> None:
    state = fresh_state()
    quiet = Recorder(tmp_path, "quiet", curves=False, heartbeat_interval=3600)
    quiet.start({"epochs": 9}, state, resumed=False, metric="mse", higher_is_better=False)
    state.iteration = 3
    quiet.progress(state)  # nothing new and the beat is not due: no write
    assert RunRecords(tmp_path).get_run("quiet")["completed_iterations"] == 0

    eager = Recorder(tmp_path, "eager", curves=False, heartbeat_interval=0)
    eager.start({"epochs": 9}, state, resumed=False, metric="mse", higher_is_better=False)
    set_columns(tmp_path, "runs", heartbeat_at="2000-01-01T00:00:00+00:00")
    state.iteration, state.elapsed_seconds = 5, 1.5
    eager.progress(state)
    run = RunRecords(tmp_path).get_run("eager")
    assert (run["completed_iterations"], run["elapsed_seconds"]) == (5, 1.5)
    assert run["heartbeat_at"] > "2000-01-01T00:00:00+00:00"


def test_a_slow_owner_takes_its_record_back_and_a_replaced_one_stops_writing(
    tmp_path, capsys
) -> None:
    state = fresh_state(iteration=1)
    recorder = Recorder(tmp_path, "x", curves=False, heartbeat_interval=0)
    recorder.start({"epochs": 9}, state, resumed=False, metric="mse", higher_is_better=False)
    set_columns(tmp_path, "runs", status="interrupted", error="taken for dead")
    recorder.progress(state)
    run = RunRecords(tmp_path).get_run("x")
    assert (run["status"], run["error"]) == ("training", None)

    set_columns(tmp_path, "runs", pid=1, host="new-owner", completed_iterations=0)
    state.iteration = 2
    recorder.progress(state)
    recorder.progress(state)
    assert RunRecords(tmp_path).get_run("x")["completed_iterations"] == 0  # not overwritten
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "taken over by process 1 on new-owner" in warnings[0]


def test_resume_and_delete_with_force_take_over_a_live_looking_run(tmp_path, capsys) -> None:
    train({**SINE, "work_dir": str(tmp_path), "run_name": "r", "epochs": 2})
    set_columns(tmp_path, "runs", status="training", pid=1, host="elsewhere", heartbeat_at=ago(1))
    resume = {"resume": str(tmp_path / "r"), "epochs": 3}
    with pytest.raises(RunConflict, match="add --force"):
        train(resume)
    with pytest.raises(UserError, match="only applies with --resume"):
        train({**SINE, "work_dir": str(tmp_path), "run_name": "q", "force": True})
    capsys.readouterr()
    assert train({**resume, "force": True}).iteration == 3
    err = capsys.readouterr().err
    assert "warning: run 'r' is training right now (pid 1 on elsewhere" in err
    assert "--force" in err
    run = RunRecords(tmp_path).get_run("r")
    assert run["status"] == "complete" and run["completed_iterations"] == 3

    set_columns(tmp_path, "runs", status="training", pid=1, host="elsewhere", heartbeat_at=ago(1))
    forced = runs_py(tmp_path, "delete", "r", "--yes", "--files", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.count("warning:") == 1 and "--force" in forced.stderr
    assert not (tmp_path / "r").exists() and not RunRecords(tmp_path).has_run("r")


# -- evaluations ---------------------------------------------------------------------------------
def make_run_folder(work: Path, name: str = "x") -> Path:
    folder = work / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "sinusoid"}))
    return folder


def test_a_killed_evaluation_leaves_the_run_complete(tmp_path) -> None:
    records = record(tmp_path)
    records.record_progress(
        "x", iteration=5, elapsed_seconds=1.0, best_score=0.5, best_iteration=5, status="complete"
    )
    session = TestSession(make_run_folder(tmp_path) / "best.npz", heartbeat_interval=3600)
    session.begin()
    try:
        run = records.get_run("x")
        assert run["status"] == "complete" and run["testing"]
        assert [e["status"] for e in run["evaluations"]] == ["running"]
        listing = runs_py(tmp_path, "list")
        assert "complete, testing" in listing.stdout, listing.stdout
        assert_one_line_error(runs_py(tmp_path, "delete", "x", "--yes"), "being evaluated")
    finally:
        session._heartbeat.stop()
    set_columns(tmp_path, "evaluations", pid=dead_pid())  # as if SIGKILLed
    run = records.get_run("x")
    assert run["status"] == "complete" and not run["testing"]
    evaluation = run["evaluations"][0]
    assert (
        evaluation["status"] == "interrupted" and "stopped without finishing" in evaluation["error"]
    )
    shown = runs_py(tmp_path, "show", "x")
    status = next(line for line in shown.stdout.splitlines() if line.startswith("status"))
    assert status.split() == ["status", "complete"]
    assert "interrupted: evaluation process" in shown.stdout


def test_a_failed_evaluation_records_why_and_results_end_a_running_one(tmp_path) -> None:
    records = record(tmp_path)
    folder = make_run_folder(tmp_path)
    failing = TestSession(folder / "best.npz", heartbeat_interval=3600)
    failing.begin()
    failing.fail(UserError("checkpoint does not match"))
    passing = TestSession(folder / "best.npz", heartbeat_interval=3600)
    passing.begin()
    passing.end({"mse_mean": [2.0, 1.0], "mse_ci95": [0.2, 0.1], "tasks": 3, "seed": 0})
    first, second = records.get_run("x")["evaluations"]
    assert (first["status"], first["error"]) == ("failed", "checkpoint does not match")
    assert (second["status"], second["mean"], second["tasks"]) == ("complete", [2.0, 1.0], 3)
    assert records.list_runs()[0]["test"]["id"] == second["id"]
    assert records.get_run("x")["status"] == "training"  # still this process's training


def test_a_version_1_database_is_migrated(tmp_path) -> None:
    """A database written by the previous code: a run left `testing`, one evaluation."""
    with sqlite3.connect(db_path(tmp_path)) as con:
        for statement in MIGRATIONS[0]:  # migration 1 is the old schema, never edited
            con.execute(statement)
        con.execute("PRAGMA user_version = 1")
        con.execute(
            "INSERT INTO runs (name, status, previous_status, updated_at, pid, host) "
            "VALUES ('old', 'testing', 'complete', '2026-01-01T00:00:00+00:00', 123, 'h')"
        )
        con.execute(
            "INSERT INTO evaluations (run_id, created_at, metric, mean, ci95, tasks, results) "
            "VALUES (1, '2026-01-01T00:00:00+00:00', 'mse', '[1.5]', '[0.1]', 3, '{}')"
        )
    run = RunRecords(tmp_path).get_run("old")
    assert (run["status"], run["pid"]) == ("complete", None)
    assert run["heartbeat_at"] == "2026-01-01T00:00:00+00:00"
    [evaluation] = run["evaluations"]
    assert (evaluation["status"], evaluation["mean"], evaluation["tasks"]) == ("complete", [1.5], 3)
    with sqlite3.connect(db_path(tmp_path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    remove_run(tmp_path, "old", files=False)  # the history goes with it
    with sqlite3.connect(db_path(tmp_path)) as con:
        assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 0


# -- the launcher's SIGTERM ----------------------------------------------------------------------
@pytest.fixture
def launcher_sigterm():
    """The handler distributed.init() installs under the launcher, for this test only."""
    previous = signal.signal(signal.SIGTERM, distributed._stopped_by_launcher)
    yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, previous)


def test_the_launchers_sigterm_is_not_swallowed_by_the_records(
    tmp_path, monkeypatch, launcher_sigterm
) -> None:
    config = prepare_config({**SINE, "work_dir": str(tmp_path), "run_name": "t", "epochs": 6})
    trainer = Trainer(config)
    real = RunRecords.record_progress

    def stopped_while_writing(self, name, **fields):
        if fields["iteration"] == 2 and fields.get("status") is None:
            launcher_sigterm()  # the handler raises inside this records call
        return real(self, name, **fields)

    monkeypatch.setattr(RunRecords, "record_progress", stopped_while_writing)
    with pytest.raises(UserError, match="stopped by the launcher"):
        trainer.run()
    run = RunRecords(tmp_path).get_run("t")
    assert run["status"] == "failed" and "stopped by the launcher" in run["error"]
    assert run["completed_iterations"] == 2

    def stopped_while_drawing(*args, **kwargs):
        launcher_sigterm()

    monkeypatch.setattr(plots, "training_curves", stopped_while_drawing)
    recorder = Recorder(tmp_path, "p")
    state = fresh_state(iteration=1)
    recorder.start({"epochs": 2}, state, resumed=False, metric="mse", higher_is_better=False)
    state.validation.append({"iteration": 1, "per_step": [1.0]})
    with pytest.raises(UserError, match="stopped by the launcher"):
        recorder.progress(state)  # a validation: the curves are redrawn
