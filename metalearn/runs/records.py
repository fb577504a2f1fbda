"""A record of every training and evaluation in ``work_dir/runs.sqlite`` (standard-library sqlite3).

One row per run name in ``runs`` (status, command lines, resolved flags, counters, best validation
score, checkpoints, times, Paddle version, device, git commit, owner and heartbeat), with its
history in ``log_points`` (meta-loss and query metric per inner step), ``validations`` and
``evaluations`` (one row per evaluate.py, with its own status and results). The database is a
record, never the source of truth for weights: training uses :class:`Recorder`, which turns any
database trouble into one warning line and goes on; ``runs.py`` uses :class:`RunRecords` and
:func:`remove_run` directly and reports trouble as one :class:`UserError`.

Training statuses: ``training`` → ``complete`` | ``failed`` (with the error) | ``interrupted``.
Evaluation statuses (per evaluation row): ``running`` → ``complete`` | ``failed`` |
``interrupted``. An evaluation never changes its run's status; ``runs.py`` shows ``testing``
beside the status while one runs. A ``training`` or ``running`` record whose owner is gone
(metalearn/runs/liveness.py: PID and start time on the same host, otherwise the heartbeat) is marked
``interrupted`` whenever the database is read, so a killed run shows up as such wherever it ran.

The code is split by concern: schema.py (schema, migrations, connections), liveness.py
(is the owner alive), db.py (the queries), sessions.py (the writers).
"""

from metalearn.runs.db import (
    RunConflict,
    RunRecords,
    describe_failure,
    remove_run,
)
from metalearn.runs.schema import RecordsError, db_path
from metalearn.runs.sessions import PLOT_TROUBLE, Recorder, TestSession, git_commit

__all__ = [
    "PLOT_TROUBLE",
    "Recorder",
    "RecordsError",
    "RunConflict",
    "RunRecords",
    "TestSession",
    "db_path",
    "describe_failure",
    "git_commit",
    "remove_run",
]
