"""A record of every training and evaluation in ``work_dir/runs.sqlite`` (standard-library sqlite3).

One row per run name in ``runs`` (status, command lines, resolved flags, counters, best validation
score, checkpoints, times, Paddle version, device, git commit, PID and host), with its history in
``log_points`` (meta-loss and query metric per inner step), ``validations`` and ``evaluations``
(test results; several per run). The database is a record, never the source of truth for weights:
training uses :class:`Recorder`, which turns any database trouble into one warning line and goes
on; ``runs.py`` uses :class:`RunRecords` directly and reports trouble as one :class:`UserError`.

Statuses: ``training`` → ``complete`` | ``failed`` (with the error) | ``interrupted``; ``testing``
while evaluate.py runs on a run, after which the previous status comes back. A ``training`` or
``testing`` record whose process (PID + start time, on this host) is gone is marked ``interrupted``
whenever the database is read, so a SIGKILLed run shows up as such. The schema is versioned with
``PRAGMA user_version`` and migrated forward; WAL mode and a busy timeout let runs share the file.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metalearn.errors import UserError

DB_NAME = "runs.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 10.0
ACTIVE = ("training", "testing")
STATUSES = ("training", "complete", "failed", "interrupted", "testing")
PROJECT_DIR = Path(__file__).resolve().parent.parent

# Migration i brings a database from user_version i - 1 to i. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            previous_status TEXT,
            error TEXT,
            dataset TEXT,
            algo TEXT,
            n_way INTEGER,
            k_spt INTEGER,
            k_query INTEGER,
            metric TEXT,
            higher_is_better INTEGER,
            commands TEXT NOT NULL DEFAULT '[]',
            config TEXT NOT NULL DEFAULT '{}',
            planned_iterations INTEGER,
            completed_iterations INTEGER NOT NULL DEFAULT 0,
            elapsed_seconds REAL,
            best_score REAL,
            best_iteration INTEGER,
            run_dir TEXT,
            best_checkpoint TEXT,
            last_checkpoint TEXT,
            started_at TEXT,
            updated_at TEXT,
            ended_at TEXT,
            paddle_version TEXT,
            device TEXT,
            git_commit TEXT,
            pid INTEGER,
            pid_started TEXT,
            host TEXT
        )""",
        """CREATE TABLE log_points (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            iteration INTEGER NOT NULL,
            loss REAL,
            query_per_step TEXT NOT NULL,
            elapsed REAL,
            PRIMARY KEY (run_id, iteration)
        )""",
        """CREATE TABLE validations (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            iteration INTEGER NOT NULL,
            per_step TEXT NOT NULL,
            score REAL,
            elapsed REAL,
            PRIMARY KEY (run_id, iteration)
        )""",
        """CREATE TABLE evaluations (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            metric TEXT NOT NULL,
            mean TEXT NOT NULL,
            ci95 TEXT NOT NULL,
            tasks INTEGER,
            steps INTEGER,
            seed INTEGER,
            checkpoint TEXT,
            results TEXT NOT NULL
        )""",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class RecordsError(UserError):
    """The run database cannot be used (broken, locked, or from a newer schema)."""


class RunConflict(UserError):
    """Another live process is training or testing under this run name."""


def db_path(work_dir: str | os.PathLike[str]) -> Path:
    return Path(work_dir) / DB_NAME


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def metric_for(dataset: str | None) -> tuple[str, bool]:
    """(metric name, higher is better) of a dataset: accuracy for images, MSE for sinusoids."""
    return ("mse", False) if dataset == "sinusoid" else ("accuracy", True)


def git_commit(folder: str | os.PathLike[str] = PROJECT_DIR) -> str | None:
    """``git rev-parse HEAD`` in ``folder``, or None (not a checkout, no git, anything else)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except Exception:
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


# -- liveness ------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) from /proc, or None where /proc is absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def process_started(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int | None, started: str | None, host: str | None) -> bool:
    """Whether the process that owns a record may still run; unknown (other host) counts as alive."""
    if pid is None or host != socket.gethostname():
        return pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and (started is None or start == started)


# -- the database --------------------------------------------------------------------------------
def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def _score(per_step: Sequence[float]) -> float | None:
    return float(per_step[-1]) if len(per_step) else None


class RunRecords:
    """All records of one ``work_dir``. Every method opens its own short connection."""

    def __init__(self, work_dir: str | os.PathLike[str], create: bool = True):
        self.work_dir = Path(work_dir)
        self.path = db_path(work_dir)
        self.create = create
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
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            con.execute("PRAGMA foreign_keys = ON")
            if not self._ready:
                self._prepare(con)
                self._ready = True
        except BaseException:
            con.close()
            raise
        return con

    def _prepare(self, con: sqlite3.Connection) -> None:
        """Refuse newer schemas, switch to WAL, migrate forward (once per instance)."""
        self._check_version(con.execute("PRAGMA user_version").fetchone()[0])
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            # Readers and one writer at once; if switching fails now, runs still queue safely.
            with suppress(sqlite3.OperationalError):
                con.execute("PRAGMA journal_mode = WAL")
        if con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        con.execute("BEGIN IMMEDIATE")
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]  # another process may won
            self._check_version(version)
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    con.execute(statement)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise RecordsError(
                f"run database {self.path} has schema version {version}, newer than this code "
                f"understands ({SCHEMA_VERSION}); update the project or use another --work_dir"
            )

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; a write one takes its lock at once, so writers queue on the timeout."""
        try:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            finally:
                con.close()
        except sqlite3.Error as error:
            raise RecordsError(f"run database {self.path}: {error}") from None

    def _run_id(self, con: sqlite3.Connection, name: str) -> int:
        row = con.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(
                f"no run named {name!r} in {self.path} (see `python runs.py list"
                f"{'' if str(self.work_dir) == 'work' else ' --work_dir ' + str(self.work_dir)}`)"
            )
        return row["id"]

    # -- liveness --------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Mark ``training``/``testing`` records whose process is gone as ``interrupted``."""
        reaped = []
        with self._transaction() as con:
            for row in con.execute(
                "SELECT id, name, status, previous_status, pid, pid_started, host FROM runs "
                "WHERE status IN ('training', 'testing')"
            ).fetchall():
                if process_alive(row["pid"], row["pid_started"], row["host"]):
                    continue
                what = "training" if row["status"] == "training" else "evaluation"
                message = f"{what} process {row['pid']} on {row['host']} stopped without finishing"
                if row["status"] == "testing":
                    message += f" (status before the evaluation: {row['previous_status']})"
                con.execute(
                    "UPDATE runs SET status = 'interrupted', error = ?, ended_at = "
                    "COALESCE(ended_at, updated_at), pid = NULL WHERE id = ?",
                    (message, row["id"]),
                )
                reaped.append(row["name"])
        return reaped

    def _reap_quietly(self) -> None:
        try:
            self.reap()
        except RecordsError as error:
            if "readonly" not in str(error) and "read-only" not in str(error):
                raise

    def check_not_live(self, row: sqlite3.Row | None) -> None:
        if (
            row is not None
            and row["status"] in ACTIVE
            and process_alive(row["pid"], row["pid_started"], row["host"])
        ):
            raise RunConflict(
                f"run {row['name']!r} is {row['status']} right now (pid {row['pid']} on "
                f"{row['host']}); wait for it or use another --run_name"
            )

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
    ) -> int:
        """Create (fresh run) or take over (resumed run) the record of ``name``: status training.

        A fresh run replaces a stale record of the same name (the trainer has already refused
        names whose folder holds a run); a live one raises :class:`RunConflict`. The history is
        set to ``log``/``validation``: a resumed run drops what was recorded after its checkpoint.
        """
        command = list(sys.argv if command is None else command)
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
            self.check_not_live(row)
            if row is not None and not resumed:
                con.execute("DELETE FROM runs WHERE id = ?", (row["id"],))
                row = None
            commands = json.loads(row["commands"]) if row is not None else []
            commands.append({"argv": command, "cwd": os.getcwd(), "at": now()})
            values = {
                "status": "training",
                "previous_status": None,
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
                "ended_at": None,
                "paddle_version": paddle_version,
                "device": device,
                "git_commit": commit,
                "pid": os.getpid(),
                "pid_started": process_started(os.getpid()),
                "host": socket.gethostname(),
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
        """Add new history entries and update counters (and the status when finishing).

        Returns False if the record is gone (then the caller starts it again).
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        checkpoints = checkpoints or {}
        with self._transaction() as con:
            row = con.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            self._add_history(con, row["id"], log, validation)
            con.execute(
                "UPDATE runs SET completed_iterations = ?, elapsed_seconds = ?, best_score = ?, "
                "best_iteration = ?, best_checkpoint = COALESCE(?, best_checkpoint), "
                "last_checkpoint = COALESCE(?, last_checkpoint), updated_at = ? WHERE id = ?",
                (
                    iteration,
                    elapsed_seconds,
                    best_score,
                    best_iteration,
                    checkpoints.get("best"),
                    checkpoints.get("last"),
                    now(),
                    row["id"],
                ),
            )
            if status is not None:
                con.execute(
                    "UPDATE runs SET status = ?, error = ?, ended_at = ?, pid = CASE WHEN ? "
                    "THEN pid ELSE NULL END WHERE id = ?",
                    (status, error, now(), status in ACTIVE, row["id"]),
                )
        return True

    # -- evaluation ------------------------------------------------------------------------------
    def import_run(self, name: str, meta: dict, run_dir: str | os.PathLike[str]) -> None:
        """Create a record from a checkpoint's meta for a run trained without one (if missing)."""
        config = meta.get("config", {})
        state = meta.get("state", {})
        metric, higher = metric_for(config.get("dataset"))
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
                    metric,
                    int(higher),
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

    def begin_test(self, name: str) -> bool:
        """Status ``testing`` (previous one kept) unless the run is training right now."""
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                self._run_id(con, name)
            if row["status"] in ACTIVE and process_alive(
                row["pid"], row["pid_started"], row["host"]
            ):
                return False
            con.execute(
                "UPDATE runs SET previous_status = status, status = 'testing', pid = ?, "
                "pid_started = ?, host = ?, updated_at = ? WHERE id = ?",
                (
                    os.getpid(),
                    process_started(os.getpid()),
                    socket.gethostname(),
                    now(),
                    row["id"],
                ),
            )
        return True

    def end_test(self, name: str, results: dict | None) -> None:
        """Store ``results`` (if any) and give back the status the run had before testing."""
        with self._transaction() as con:
            run_id = self._run_id(con, name)
            if results is not None:
                key = next(k[: -len("_mean")] for k in results if k.endswith("_mean"))
                con.execute(
                    "INSERT INTO evaluations (run_id, created_at, metric, mean, ci95, tasks, "
                    "steps, seed, checkpoint, results) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        now(),
                        "accuracy" if key == "acc" else key,
                        _dumps(results[f"{key}_mean"]),
                        _dumps(results[f"{key}_ci95"]),
                        results.get("tasks"),
                        results.get("steps"),
                        results.get("seed"),
                        results.get("checkpoint"),
                        _dumps(results),
                    ),
                )
            con.execute(
                "UPDATE runs SET status = COALESCE(previous_status, 'complete'), "
                "previous_status = NULL, pid = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'testing' AND pid = ?",
                (now(), run_id, os.getpid()),
            )

    # -- reading ---------------------------------------------------------------------------------
    def has_run(self, name: str) -> bool:
        with self._transaction(write=False) as con:
            return con.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone() is not None

    def list_runs(self) -> list[dict]:
        """Every run (oldest first) with its latest evaluation as ``test`` (or None)."""
        self._reap_quietly()
        with self._transaction(write=False) as con:
            rows = [_run_dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
            for run in rows:
                latest = con.execute(
                    "SELECT * FROM evaluations WHERE run_id = ? ORDER BY id DESC LIMIT 1",
                    (run["id"],),
                ).fetchone()
                run["test"] = _evaluation_dict(latest) if latest else None
        return rows

    def get_run(self, name: str) -> dict:
        """Everything recorded for ``name``: the row plus ``log``, ``validation``, ``evaluations``."""
        self._reap_quietly()
        with self._transaction(write=False) as con:
            run_id = self._run_id(con, name)
            run = _run_dict(con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
            run["log"] = [
                {
                    "iteration": r["iteration"],
                    "loss": r["loss"],
                    "query_per_step": json.loads(r["query_per_step"]),
                    "elapsed": r["elapsed"],
                }
                for r in con.execute(
                    "SELECT * FROM log_points WHERE run_id = ? ORDER BY iteration", (run_id,)
                )
            ]
            run["validation"] = [
                {
                    "iteration": r["iteration"],
                    "per_step": json.loads(r["per_step"]),
                    "elapsed": r["elapsed"],
                }
                for r in con.execute(
                    "SELECT * FROM validations WHERE run_id = ? ORDER BY iteration", (run_id,)
                )
            ]
            run["evaluations"] = [
                _evaluation_dict(r)
                for r in con.execute(
                    "SELECT * FROM evaluations WHERE run_id = ? ORDER BY id", (run_id,)
                )
            ]
        return run

    def delete_run(self, name: str) -> None:
        """Remove the record of ``name`` and its history (refused while it trains or tests)."""
        self._reap_quietly()
        with self._transaction() as con:
            run_id = self._run_id(con, name)
            self.check_not_live(
                con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            )
            for table in ("log_points", "validations", "evaluations"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            con.execute("DELETE FROM runs WHERE id = ?", (run_id,))


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
        evaluation[key] = json.loads(evaluation[key])
    return evaluation


# -- the training side ---------------------------------------------------------------------------
class Recorder:
    """Keeps one training run's record and ``curves.png`` up to date; never stops training.

    Database or plotting trouble prints one warning line on stderr (per kind) and training goes
    on; the record is caught up at the next log point if the database recovers. Only a live run
    of the same name (:class:`RunConflict`) is raised, before training starts.
    """

    def __init__(self, work_dir: str | os.PathLike[str], name: str, curves: bool = True):
        self.records = RunRecords(work_dir)
        self.name = name
        self.curves = curves
        self.run_dir = Path(work_dir) / name
        self._warned: set[str] = set()
        self._start_args: dict | None = None
        self._started = False
        self._synced = (0, 0)

    def warn(self, kind: str, error: BaseException) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        if kind == "database":
            message = f"run database {self.records.path} not updated ({error})"
        else:
            message = f"could not draw {self.run_dir / 'curves.png'} ({error})"
        print(f"warning: {message}; training goes on", file=sys.stderr, flush=True)

    def start(
        self,
        config: dict,
        state: Any,
        *,
        resumed: bool,
        metric: str,
        higher_is_better: bool,
        device: str | None = None,
        paddle_version: str | None = None,
    ) -> None:
        """Record that the run (fresh or resumed, at ``state``) is training now."""
        self.metric = metric
        self._start_args = {
            "config": config,
            "resumed": resumed,
            "metric": metric,
            "higher_is_better": higher_is_better,
            "run_dir": self.run_dir,
            "device": device,
            "paddle_version": paddle_version,
            "commit": git_commit(),
        }
        self._try_start(state)

    def _try_start(self, state: Any) -> bool:
        try:
            self.records.start_training(self.name, **self._start_args, **_state_fields(state))
        except RunConflict:
            raise
        except Exception as error:
            self.warn("database", error)
            return False
        self._started = True
        self._synced = (len(state.log), len(state.validation))
        return True

    def progress(self, state: Any, status: str | None = None, error: str | None = None) -> None:
        """After an iteration: record new log/validation entries; redraw curves after a validation."""
        new_log = len(state.log) > self._synced[0]
        new_validation = len(state.validation) > self._synced[1]
        if new_validation or (status is not None and state.log):
            self._draw(state)
        if not (new_log or new_validation or status):
            return
        if not self._started:
            if not self._try_start(state):
                return
            if status is None:
                return
        fields = _state_fields(state)
        try:
            stored = self.records.record_progress(
                self.name,
                log=fields.pop("log")[self._synced[0] :],
                validation=fields.pop("validation")[self._synced[1] :],
                checkpoints={
                    kind: path
                    for kind in ("best", "last")
                    if (path := _existing(self.run_dir / f"{kind}.npz"))
                },
                status=status,
                error=error,
                **fields,
            )
        except Exception as problem:
            self.warn("database", problem)
            return
        if not stored:  # the record vanished (database replaced?): write it again
            self._started = False
            self.progress(state, status, error)
            return
        self._synced = (len(state.log), len(state.validation))

    def finish(self, status: str, state: Any, error: str | None = None) -> None:
        """Final counters, checkpoints and curves, and status complete / failed / interrupted."""
        self.progress(state, status=status, error=error)

    def _draw(self, state: Any) -> None:
        if not self.curves:
            return
        try:
            from metalearn import plots

            plots.training_curves(
                self.run_dir / "curves.png",
                state.log,
                state.validation,
                self.metric,
                title=self.name,
            )
        except Exception as error:
            self.warn("plot", error)


def _state_fields(state: Any) -> dict:
    return {
        "log": list(state.log),
        "validation": list(state.validation),
        "iteration": state.iteration,
        "elapsed_seconds": round(state.elapsed_seconds, 2),
        "best_score": state.best_score,
        "best_iteration": state.best_iteration,
    }


# -- the evaluation side -------------------------------------------------------------------------
class TestSession:
    """evaluate.py on one checkpoint: status ``testing``, then the results and the old status.

    Only checkpoints inside a run folder (one with config.json) are recorded, in the database of
    the folder above it. Database trouble is one warning line; the evaluation goes on.
    """

    __test__ = False  # not a pytest class

    def __init__(self, checkpoint: str | os.PathLike[str]):
        self.checkpoint = Path(checkpoint)
        self.run_dir = self.checkpoint.resolve().parent
        self.enabled = (self.run_dir / "config.json").is_file()
        self.records = RunRecords(self.run_dir.parent)
        self.name = self.run_dir.name
        self._warned = False

    def _warn(self, error: BaseException) -> None:
        if not self._warned:
            self._warned = True
            print(
                f"warning: run database {self.records.path} not updated ({error}); "
                "evaluation goes on",
                file=sys.stderr,
                flush=True,
            )

    def begin(self) -> None:
        if not self.enabled:
            return
        try:
            self.records.reap()
            if not self.records.has_run(self.name):
                self.records.import_run(self.name, self._meta(), self.run_dir)
            self.records.begin_test(self.name)
        except Exception as error:
            self._warn(error)

    def _meta(self) -> dict:
        from metalearn.checkpoint import load_checkpoint

        last = self.run_dir / "last.npz"
        return load_checkpoint(last if last.is_file() else self.checkpoint).meta

    def end(self, results: dict | None) -> None:
        """Store ``results`` (None: the evaluation failed) and restore the status."""
        if not self.enabled:
            return
        try:
            self.records.end_test(self.name, results)
        except Exception as error:
            self._warn(error)
