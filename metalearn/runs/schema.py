"""The schema of ``work_dir/runs.sqlite`` and how a connection to it is opened and migrated.

The version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` brings a database forward one
version at a time, inside one write transaction (so concurrent processes migrate once). A newer
schema than this code knows is refused. WAL mode and a busy timeout let runs share the file.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path

from metalearn.errors import UserError

DB_NAME = "runs.sqlite"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_SECONDS = 10.0

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
    # 2: a heartbeat for training runs; evaluations get their own status and owner instead of
    # lending the run a `testing` status (runs.previous_status is unused from here on).
    (
        "ALTER TABLE runs ADD COLUMN heartbeat_at TEXT",
        "UPDATE runs SET heartbeat_at = updated_at",
        "UPDATE runs SET status = COALESCE(previous_status, 'complete'), previous_status = NULL, "
        "pid = NULL WHERE status = 'testing'",
        """CREATE TABLE evaluations_v2 (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            error TEXT,
            created_at TEXT NOT NULL,
            ended_at TEXT,
            metric TEXT,
            mean TEXT,
            ci95 TEXT,
            tasks INTEGER,
            steps INTEGER,
            seed INTEGER,
            checkpoint TEXT,
            results TEXT,
            pid INTEGER,
            pid_started TEXT,
            host TEXT,
            heartbeat_at TEXT
        )""",
        "INSERT INTO evaluations_v2 (id, run_id, status, created_at, ended_at, metric, mean, "
        "ci95, tasks, steps, seed, checkpoint, results) SELECT id, run_id, 'complete', "
        "created_at, created_at, metric, mean, ci95, tasks, steps, seed, checkpoint, results "
        "FROM evaluations",
        "DROP TABLE evaluations",
        "ALTER TABLE evaluations_v2 RENAME TO evaluations",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class RecordsError(UserError):
    """The run database cannot be used (broken, locked, or from a newer schema)."""


def db_path(work_dir: str | os.PathLike[str]) -> Path:
    return Path(work_dir) / DB_NAME


def connect(path: Path, migrate: bool) -> sqlite3.Connection:
    """A connection with rows as mappings, foreign keys on, the busy timeout set; with
    ``migrate``, also refuse newer schemas, switch to WAL and migrate forward."""
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    try:
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        if migrate:
            _prepare(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _prepare(con: sqlite3.Connection, path: Path) -> None:
    _check_version(con.execute("PRAGMA user_version").fetchone()[0], path)
    if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        # Readers and one writer at once; if switching fails now, runs still queue safely.
        with suppress(sqlite3.OperationalError):
            con.execute("PRAGMA journal_mode = WAL")
    if con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
        _check_version(version, path)
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                con.execute(statement)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _check_version(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise RecordsError(
            f"run database {path} has schema version {version}, newer than this code "
            f"understands ({SCHEMA_VERSION}); update the project or use another --work_dir"
        )
