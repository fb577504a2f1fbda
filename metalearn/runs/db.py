"""The queries on ``work_dir/runs.sqlite``: :class:`RunRecords` and :func:`remove_run`.

Every method opens its own short connection and transaction, so several processes (trainings,
evaluations, runs.py, the service) share the file safely. Liveness rules: metalearn/runs/liveness.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metalearn.errors import UserError
from metalearn.metrics import metric_for, results_metric
from metalearn.runs.liveness import HEARTBEAT_TIMEOUT_SECONDS, now, owner_alive, this_process
from metalearn.runs.names import check_run_name, check_work_dir
from metalearn.runs.schema import RecordsError, connect, db_path

STATUSES = ("training", "complete", "failed", "interrupted")
EVALUATION_STATUSES = ("running", "complete", "failed", "interrupted")


class RunConflict(UserError):
    """Another live process is training (or evaluating) under this run name."""


def describe_failure(error: BaseException) -> tuple[str, str]:
    """(status, message) recorded for a training or evaluation that ended with ``error``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", "interrupted (KeyboardInterrupt)"
    return "failed", str(error) if isinstance(
        error, UserError
    ) else f"{type(error).__name__}: {error}"


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def _score(per_step: Sequence[float]) -> float | None:
    return float(per_step[-1]) if len(per_step) else None


def _owned_by(row: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    return all(row[key] == owner[key] for key in ("pid", "pid_started", "host"))


class RunRecords:
    """All records of one ``work_dir``.

    ``heartbeat_timeout`` (seconds) is when a silent owner on another host counts as gone.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        create: bool = True,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
    ):
        self.work_dir = Path(work_dir)
        self.path = db_path(work_dir)
        self.create = create
        self.heartbeat_timeout = heartbeat_timeout
        self._ready = False

    def exists(self) -> bool:
        return self.path.is_file()

    # -- connections -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if not self.create and not self.path.is_file():
            raise RecordsError(
                f"no run database at {self.path} (nothing recorded in this work_dir)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = connect(self.path, migrate=not self._ready)
        self._ready = True
        return con

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; a write one takes its lock at once, so writers queue on the timeout."""
        try:
            con = self._connect()
        except (sqlite3.Error, OSError) as error:
            raise RecordsError(f"run database {self.path}: {error}") from None
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise RecordsError(f"run database {self.path}: {error}") from None
        finally:
            con.close()

    def _run_row(self, con: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(
                f"no run named {name!r} in {self.path} (see `python runs.py list"
                f"{'' if str(self.work_dir) == 'work' else ' --work_dir ' + str(self.work_dir)}`)"
            )
        return row

    # -- liveness --------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Mark trainings and evaluations whose process is gone as ``interrupted``.

        The owner columns stay, so an owner that was only slow takes its record back at its next
        heartbeat (unless another process has taken the run over meanwhile).
        """
        reaped = []
        with self._transaction() as con:
            for table, active, what in (
                ("runs", "training", "training"),
                ("evaluations", "running", "evaluation"),
            ):
                rows = con.execute(f"SELECT * FROM {table} WHERE status = ?", (active,))
                for row in rows.fetchall():
                    if owner_alive(row, self.heartbeat_timeout):
                        continue
                    con.execute(
                        f"UPDATE {table} SET status = 'interrupted', error = ?, ended_at = "
                        "COALESCE(ended_at, heartbeat_at) WHERE id = ?",
                        (
                            f"{what} process {row['pid']} on {row['host']} stopped without "
                            f"finishing (last heartbeat {row['heartbeat_at'] or 'never'})",
                            row["id"],
                        ),
                    )
                    reaped.append(row["name"] if table == "runs" else f"evaluation {row['id']}")
        return reaped

    def _reap_quietly(self) -> None:
        try:
            self.reap()
        except RecordsError as error:
            if "readonly" not in str(error) and "read-only" not in str(error):
                raise

    def _refuse_live(
        self,
        con: sqlite3.Connection,
        run: sqlite3.Row,
        *,
        force: bool,
        hint: str,
        evaluations: bool,
    ) -> None:
        """Raise :class:`RunConflict` if a live process owns the run (or, with ``evaluations``,
        evaluates it); with ``force``, print one warning line instead."""
        owners = [("is training", run)] if run["status"] == "training" else []
        if evaluations:
            owners += [
                ("is being evaluated", row)
                for row in con.execute(
                    "SELECT * FROM evaluations WHERE run_id = ? AND status = 'running'",
                    (run["id"],),
                )
            ]
        for doing, owner in owners:
            if not owner_alive(owner, self.heartbeat_timeout):
                continue
            what = (
                f"run {run['name']!r} {doing} right now (pid {owner['pid']} on {owner['host']}, "
                f"last heartbeat {owner['heartbeat_at'] or 'never'})"
            )
            if not force:
                raise RunConflict(f"{what}; wait for it or {hint}")
            print(f"warning: {what}; going ahead because of --force", file=sys.stderr, flush=True)

    # -- training --------------------------------------------------------------------------------
    def start_training(
        self,
        name: str,
        *,
        config: dict,
        resumed: bool,
        log: Sequence[dict],
        validation: Sequence[dict],
        iteration: int,
        elapsed_seconds: float,
        best_score: float | None,
        best_iteration: int | None,
        metric: str,
        higher_is_better: bool,
        run_dir: str | os.PathLike[str],
        device: str | None = None,
        paddle_version: str | None = None,
        command: Sequence[str] | None = None,
        commit: str | None = None,
        force: bool = False,
    ) -> int:
        """Create (fresh run) or take over (resumed run) the record of ``name``: status training.

        A fresh run replaces a stale record of the same name (the trainer has already refused
        names whose folder holds a run); a live one raises :class:`RunConflict`, unless
        ``force`` (resume only: the user says that process is gone). The history is set to
        ``log``/``validation``: a resumed run drops what was recorded after its checkpoint.
        """
        command = list(sys.argv if command is None else command)
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
            if row is not None:
                hint = (
                    "add --force if that process is gone for sure"
                    if resumed
                    else ("use another --run_name")
                )
                self._refuse_live(con, row, force=force, hint=hint, evaluations=False)
            if row is not None and not resumed:
                con.execute("DELETE FROM runs WHERE id = ?", (row["id"],))
                row = None
            commands = json.loads(row["commands"]) if row is not None else []
            commands.append({"argv": command, "cwd": os.getcwd(), "at": now()})
            values = {
                "status": "training",
                "error": None,
                "dataset": config.get("dataset"),
                "algo": config.get("algo"),
                "n_way": config.get("n_way"),
                "k_spt": config.get("k_spt"),
                "k_query": config.get("k_query"),
                "metric": metric,
                "higher_is_better": int(higher_is_better),
                "commands": _dumps(commands),
                "config": _dumps(config),
                "planned_iterations": config.get("epochs"),
                "completed_iterations": iteration,
                "elapsed_seconds": elapsed_seconds,
                "best_score": best_score,
                "best_iteration": best_iteration,
                "run_dir": str(Path(run_dir).resolve()),
                "updated_at": now(),
                "heartbeat_at": now(),
                "ended_at": None,
                "paddle_version": paddle_version,
                "device": device,
                "git_commit": commit,
                **this_process(),
            }
            if row is None:
                values["name"], values["started_at"] = name, now()
                columns = ", ".join(values)
                marks = ", ".join("?" for _ in values)
                cursor = con.execute(
                    f"INSERT INTO runs ({columns}) VALUES ({marks})", tuple(values.values())
                )
                run_id = cursor.lastrowid
            else:
                run_id = row["id"]
                assignments = ", ".join(f"{key} = ?" for key in values)
                con.execute(
                    f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run_id)
                )
                con.execute("DELETE FROM log_points WHERE run_id = ?", (run_id,))
                con.execute("DELETE FROM validations WHERE run_id = ?", (run_id,))
            self._add_history(con, run_id, log, validation)
        return run_id

    @staticmethod
    def _add_history(
        con: sqlite3.Connection, run_id: int, log: Sequence[dict], validation: Sequence[dict]
    ) -> None:
        con.executemany(
            "INSERT OR REPLACE INTO log_points VALUES (?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    e["iteration"],
                    e.get("loss"),
                    _dumps(e.get("query_per_step", [])),
                    e.get("elapsed"),
                )
                for e in log
            ],
        )
        con.executemany(
            "INSERT OR REPLACE INTO validations VALUES (?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    e["iteration"],
                    _dumps(e["per_step"]),
                    _score(e["per_step"]),
                    e.get("elapsed"),
                )
                for e in validation
            ],
        )

    def record_progress(
        self,
        name: str,
        *,
        log: Sequence[dict] = (),
        validation: Sequence[dict] = (),
        iteration: int,
        elapsed_seconds: float,
        best_score: float | None,
        best_iteration: int | None,
        checkpoints: dict[str, str] | None = None,
        status: str | None = None,
        error: str | None = None,
    ) -> bool:
        """The owner's heartbeat: new history entries, counters, and the status when finishing.

        Without ``status`` the run is (again) ``training``: an owner that a reader took for dead
        takes its record back. Returns False if the record is gone (then the caller starts it
        again); raises :class:`RecordsError` if another process has taken the run over.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        checkpoints = checkpoints or {}
        owner = this_process()
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            if not _owned_by(row, owner):
                raise RecordsError(
                    f"run {name!r} was taken over by process {row['pid']} on {row['host']}; "
                    "this process no longer updates its record"
                )
            self._add_history(con, row["id"], log, validation)
            ended = status is not None
            con.execute(
                "UPDATE runs SET completed_iterations = ?, elapsed_seconds = ?, best_score = ?, "
                "best_iteration = ?, best_checkpoint = COALESCE(?, best_checkpoint), "
                "last_checkpoint = COALESCE(?, last_checkpoint), updated_at = ?, "
                "heartbeat_at = ?, status = ?, error = ?, ended_at = ?, "
                "pid = CASE WHEN ? THEN NULL ELSE pid END WHERE id = ?",
                (
                    iteration,
                    elapsed_seconds,
                    best_score,
                    best_iteration,
                    checkpoints.get("best"),
                    checkpoints.get("last"),
                    now(),
                    now(),
                    status or "training",
                    error,
                    now() if ended else None,
                    ended,
                    row["id"],
                ),
            )
        return True

    # -- evaluation ------------------------------------------------------------------------------
    def import_run(self, name: str, meta: dict, run_dir: str | os.PathLike[str]) -> None:
        """Create a record from a checkpoint's meta for a run trained without one (if missing)."""
        config = meta.get("config", {})
        state = meta.get("state", {})
        metric = metric_for(config.get("dataset"))
        iteration = state.get("iteration", 0)
        planned = config.get("epochs")
        with self._transaction() as con:
            if con.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
                return
            cursor = con.execute(
                "INSERT INTO runs (name, status, error, dataset, algo, n_way, k_spt, k_query, "
                "metric, higher_is_better, config, planned_iterations, completed_iterations, "
                "elapsed_seconds, best_score, best_iteration, run_dir, best_checkpoint, "
                "last_checkpoint, updated_at, paddle_version, device) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    "complete" if planned is None or iteration >= planned else "interrupted",
                    None,
                    config.get("dataset"),
                    config.get("algo"),
                    config.get("n_way"),
                    config.get("k_spt"),
                    config.get("k_query"),
                    metric.name,
                    int(metric.higher_is_better),
                    _dumps(config),
                    planned,
                    iteration,
                    state.get("elapsed_seconds"),
                    state.get("best_score"),
                    state.get("best_iteration"),
                    str(Path(run_dir).resolve()),
                    _existing(Path(run_dir) / "best.npz"),
                    _existing(Path(run_dir) / "last.npz"),
                    now(),
                    config.get("paddle_version"),
                    config.get("device"),
                ),
            )
            self._add_history(
                con, cursor.lastrowid, state.get("log", []), state.get("validation", [])
            )

    def begin_evaluation(self, name: str, checkpoint: str | os.PathLike[str]) -> int:
        """A ``running`` evaluation row owned by this process; the run's status is untouched."""
        with self._transaction() as con:
            run_id = self._run_row(con, name)["id"]
            values = {
                "run_id": run_id,
                "status": "running",
                "created_at": now(),
                "heartbeat_at": now(),
                "checkpoint": str(checkpoint),
                **this_process(),
            }
            cursor = con.execute(
                f"INSERT INTO evaluations ({', '.join(values)}) "
                f"VALUES ({', '.join('?' for _ in values)})",
                tuple(values.values()),
            )
            return cursor.lastrowid

    def evaluation_heartbeat(self, evaluation_id: int) -> None:
        """The evaluation is alive (and ``running`` again if a reader took it for dead)."""
        owner = this_process()
        with self._transaction() as con:
            con.execute(
                "UPDATE evaluations SET heartbeat_at = ?, status = 'running', error = NULL, "
                "ended_at = NULL WHERE id = ? AND pid = ? AND host = ? "
                "AND status IN ('running', 'interrupted')",
                (now(), evaluation_id, owner["pid"], owner["host"]),
            )

    def end_evaluation(
        self,
        evaluation_id: int,
        results: dict | None,
        status: str = "complete",
        error: str | None = None,
    ) -> None:
        """Store the results (``complete``) or why there are none (``failed``/``interrupted``)."""
        if status not in EVALUATION_STATUSES[1:]:
            raise ValueError(f"unknown evaluation status {status!r}")
        summary: dict[str, Any] = {}
        if results is not None:
            key = results_metric(results).key
            summary = {
                "metric": results_metric(results).name,
                "mean": _dumps(results[f"{key}_mean"]),
                "ci95": _dumps(results[f"{key}_ci95"]),
                "tasks": results.get("tasks"),
                "steps": results.get("steps"),
                "seed": results.get("seed"),
                "results": _dumps(results),
            }
        values = {
            **summary,
            "status": status,
            "error": error,
            "ended_at": now(),
            "heartbeat_at": now(),
            "pid": None,
        }
        with self._transaction() as con:
            con.execute(
                f"UPDATE evaluations SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                (*values.values(), evaluation_id),
            )

    # -- reading ---------------------------------------------------------------------------------
    def has_run(self, name: str) -> bool:
        with self._transaction(write=False) as con:
            return con.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone() is not None

    def list_runs(self) -> list[dict]:
        """Every run (oldest first) with its latest complete evaluation as ``test`` (or None)
        and ``testing``: whether an evaluation of it is running now."""
        self._reap_quietly()
        with self._transaction(write=False) as con:
            rows = [_run_dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
            for run in rows:
                latest = con.execute(
                    "SELECT * FROM evaluations WHERE run_id = ? AND status = 'complete' "
                    "ORDER BY id DESC LIMIT 1",
                    (run["id"],),
                ).fetchone()
                run["test"] = _evaluation_dict(latest) if latest else None
                run["testing"] = _testing(con, run["id"])
        return rows

    def get_run(self, name: str) -> dict:
        """Everything recorded for ``name``: the row plus ``log``, ``validation``,
        ``evaluations`` (every one, with its status) and ``testing``."""
        self._reap_quietly()
        with self._transaction(write=False) as con:
            run = _run_dict(self._run_row(con, name))
            run_id = run["id"]
            run["log"] = _history(
                con, "log_points", run_id, ("iteration", "loss", "query_per_step", "elapsed")
            )
            run["validation"] = _history(
                con, "validations", run_id, ("iteration", "per_step", "elapsed")
            )
            run["evaluations"] = [
                _evaluation_dict(r)
                for r in con.execute(
                    "SELECT * FROM evaluations WHERE run_id = ? ORDER BY id", (run_id,)
                )
            ]
            run["testing"] = _testing(con, run_id)
        return run


def remove_run(
    work_dir: str | os.PathLike[str], name: str, *, files: bool, force: bool = False
) -> None:
    """Remove the record of run ``name`` and, with ``files``, its folder ``work_dir/name``.

    Refused while the run trains or is evaluated (unless ``force``: one warning line). The folder
    goes first, inside the write transaction (so no training can take the run over meanwhile):
    if it cannot be removed completely, the record stays as it was and the user can retry.
    """
    check_run_name(name)
    check_work_dir(work_dir)
    records = RunRecords(work_dir, create=False)
    records._reap_quietly()
    folder = Path(work_dir) / name
    with records._transaction() as con:
        run = records._run_row(con, name)
        records._refuse_live(
            con, run, force=force, hint="add --force if it is gone for sure", evaluations=True
        )
        if files and (folder.exists() or folder.is_symlink()):
            try:
                shutil.rmtree(folder)
            except OSError as error:
                raise UserError(
                    f"could not remove {folder} ({error}); its record is kept: fix that and "
                    "delete again"
                ) from None
        con.execute("DELETE FROM runs WHERE id = ?", (run["id"],))  # history: ON DELETE CASCADE


def _testing(con: sqlite3.Connection, run_id: int) -> bool:
    return (
        con.execute(
            "SELECT 1 FROM evaluations WHERE run_id = ? AND status = 'running'", (run_id,)
        ).fetchone()
        is not None
    )


_JSON_COLUMNS = ("query_per_step", "per_step")


def _history(
    con: sqlite3.Connection, table: str, run_id: int, columns: tuple[str, ...]
) -> list[dict]:
    """One run's rows of a history table (a constant name of ours) in iteration order."""
    rows = con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY iteration", (run_id,))
    return [{c: json.loads(r[c]) if c in _JSON_COLUMNS else r[c] for c in columns} for r in rows]


def _existing(path: Path) -> str | None:
    return str(path.resolve()) if path.is_file() else None


def _run_dict(row: sqlite3.Row) -> dict:
    run = dict(row)
    run["config"] = json.loads(run["config"] or "{}")
    run["commands"] = json.loads(run["commands"] or "[]")
    run["higher_is_better"] = bool(run["higher_is_better"])
    return run


def _evaluation_dict(row: sqlite3.Row) -> dict:
    evaluation = dict(row)
    for key in ("mean", "ci95", "results"):
        evaluation[key] = json.loads(evaluation[key]) if evaluation[key] is not None else None
    return evaluation
