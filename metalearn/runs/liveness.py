"""Whether the process that owns a record (a training or an evaluation) may still be running.

A record names its owner by PID, the PID's start time (from /proc) and the host name, and the
owner writes a heartbeat (a UTC time) at least every :data:`HEARTBEAT_INTERVAL_SECONDS` while it
works. The host name alone cannot be trusted (a restarted container gets a new one), nor can a
heartbeat alone (a long step may delay it), so the rules are:

1. Same host, and the PID is gone, a zombie, or a different process (other start time): dead, at
   once, whatever the heartbeat says.
2. Same host, and the PID runs with the recorded start time: alive, whatever the heartbeat says.
   A stuck process is still there: kill it (then rule 1 applies) or use ``--force``.
3. Otherwise (another host, or no /proc to confirm the PID): alive while the heartbeat is younger
   than the timeout, :data:`HEARTBEAT_TIMEOUT_SECONDS`. Hosts sharing a work_dir should keep their
   clocks within a fraction of it; a heartbeat from the future counts as fresh.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HEARTBEAT_INTERVAL_SECONDS = 10.0
# Six missed beats, and never under a minute: a slow validation or checkpoint write between two
# beats must not make a live run on another host look dead.
HEARTBEAT_TIMEOUT_SECONDS = max(60.0, 6 * HEARTBEAT_INTERVAL_SECONDS)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def this_process() -> dict[str, Any]:
    """The owner columns (pid, pid_started, host) that name the calling process in a record."""
    pid = os.getpid()
    return {"pid": pid, "pid_started": process_started(pid), "host": socket.gethostname()}


def _same_process(pid: int, started: str | None) -> bool | None:
    """On this host: is ``pid`` still the recorded process? None when this cannot be told."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return None
    state, start = stat
    if state in ("Z", "X"):
        return False
    return None if started is None else start == started


def heartbeat_fresh(heartbeat_at: str | None, timeout: float, at: datetime | None = None) -> bool:
    """Whether ``heartbeat_at`` (ISO time) is younger than ``timeout`` seconds at ``at``."""
    if not heartbeat_at:
        return False
    try:
        beat = datetime.fromisoformat(heartbeat_at)
    except ValueError:
        return False
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    age = ((at or datetime.now(timezone.utc)) - beat).total_seconds()
    return age < timeout


def owner_alive(row: Mapping[str, Any], timeout: float = HEARTBEAT_TIMEOUT_SECONDS) -> bool:
    """Whether the owner named by a record's pid, pid_started, host and heartbeat_at may run."""
    if row["pid"] is None:
        return False
    if row["host"] == socket.gethostname():
        same = _same_process(row["pid"], row["pid_started"])
        if same is not None:
            return same
    return heartbeat_fresh(row["heartbeat_at"], timeout)
