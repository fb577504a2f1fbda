"""Process-level settings that must be in place before Paddle starts.

glibc hands large freed blocks back to the OS and the next allocation faults every page in again;
Paddle's eager CPU kernels allocate a fresh output per op, so on this workload much of an
elementwise op's time was page faults. Raising glibc's mmap and trim thresholds keeps freed memory
in the process (measured: one MAML task ~2x faster; see docs/performance.md). Such variables are read when the
process starts, so :func:`tune_allocator` re-executes the entry point once with them set.

The re-exec repeats the interpreter's own command line (``sys.orig_argv``), so options such as
``-u`` (Paddle's launcher starts its workers with it), ``-X dev``, ``-W error`` or
``-m cProfile`` survive. Python 3.9 has no ``sys.orig_argv``; there the process runs untuned rather
than lose those options.
"""

from __future__ import annotations

import os
import sys

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
OPT_OUT = "PADDLE_MAML_NO_MALLOC_TUNING"
_YES = ("1", "true", "yes")


def tune_allocator() -> None:
    """Re-exec this Linux process with the allocator settings, unless set already or opted out.

    ``PADDLE_MAML_NO_MALLOC_TUNING=1`` (or ``true``/``yes``) opts out; ``0`` does not. The PID
    stays the same (``execv``), so launchers that track their workers are unaffected.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "").strip().lower() in _YES:
        return
    if all(key in os.environ for key in ALLOCATOR_ENV):
        return
    command = getattr(sys, "orig_argv", None)
    if not command:  # Python 3.9 (or an embedded interpreter): cannot repeat its options
        return
    os.environ.update({key: os.environ.get(key, value) for key, value in ALLOCATOR_ENV.items()})
    os.execv(sys.executable, [sys.executable, *command[1:]])
