"""Process-level settings that must be in place before Paddle starts.

glibc hands large freed blocks back to the OS and the next allocation faults every page in again;
Paddle's eager CPU kernels allocate a fresh output per op, so on this workload much of an
elementwise op's time was page faults. Raising glibc's mmap and trim thresholds keeps freed memory
in the process (measured: one MAML task ~2x faster; see README). Such variables are read when the
process starts, so :func:`tune_allocator` re-executes the entry point once with them set.

The MKL inside Paddle's CPU wheel chooses its kernels by CPU vendor and gives AMD processors a
generic path; :func:`prefer_fast_blas` (run when the package is imported) asks it for its AVX2
kernels instead. MKL reads that variable at its first call, so no re-exec is needed for it.

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
MKL_CPU_TYPE = "MKL_DEBUG_CPU_TYPE"
MKL_AVX2 = "5"


def prefer_fast_blas(cpuinfo: str | None = None) -> bool:
    """On an AMD processor with AVX2, have MKL use its AVX2 kernels; True if this set it.

    Paddle's matrix products go through the MKL it ships (mklml, older than 2020.1, which still
    honours ``MKL_DEBUG_CPU_TYPE``). Measured on a 2-core AMD EPYC: a [25, 10, 40] × [25, 40, 40]
    batched matmul 54 µs without the variable, 16 µs with it (PyTorch: 17 µs). A value the user
    set is kept; other vendors, and CPUs without AVX2 (where that path would fault), are left
    alone. ``cpuinfo`` is /proc/cpuinfo's text (read when None; absent off Linux: nothing done).
    """
    if MKL_CPU_TYPE in os.environ:
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return False
    vendors = set(_cpuinfo_values(cpuinfo, "vendor_id"))
    flags = [value.split() for value in _cpuinfo_values(cpuinfo, "flags")]
    if vendors != {"AuthenticAMD"} or not flags or not all("avx2" in f for f in flags):
        return False
    os.environ[MKL_CPU_TYPE] = MKL_AVX2
    return True


def _cpuinfo_values(cpuinfo: str, key: str) -> list[str]:
    """The value of ``key`` for every processor listed in /proc/cpuinfo's text."""
    fields = (line.partition(":") for line in cpuinfo.splitlines())
    return [value.strip() for name, _, value in fields if name.strip() == key]


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
