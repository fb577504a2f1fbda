"""oneDNN fast path for the first-order convolution kernels behind :mod:`metalearn.kernels.ops`.

Paddle's eager CPU ``conv2d`` / ``conv2d_grad`` are several times slower than oneDNN on the shapes
of our networks. The wheel ships oneDNN (``libdnnl.so.3``), so ``csrc/conv.cc`` calls it
directly from a Paddle custom C++ operator. The same library holds batch norm as one operator
(``csrc/batch_norm.cc``: forward, backward and double-backward, optionally followed by ReLU; plain
C++ loops on the same OpenMP threads, no oneDNN) for :func:`metalearn.kernels.ops.batch_norm`,
ConvNet's body at inference (``csrc/body.cc``), and likewise the ReLU network of the sinusoid MLP
(``csrc/relu_network.cc``) for :func:`metalearn.kernels.ops.relu_network`; ``csrc/onednn.h``
declares what they share. :func:`load_kernels` compiles every ``csrc/*.cc`` into that library
once per machine (``paddle.utils.cpp_extension.load`` in a quiet subprocess, the files in
parallel: about a minute of compiler time, most of it Paddle's headers, parsed once per file),
caches it on disk and registers it in this process (well under a second on later starts).

Cache folder: ``$PADDLE_MAML_CACHE_DIR/fastconv`` if set, else
``$XDG_CACHE_HOME/paddle-maml/fastconv`` (default ``~/.cache/paddle-maml/fastconv``), one
sub-folder per (sources, Paddle build, Python, flags) so any edited source or a new Paddle
rebuilds. Delete it to force a rebuild. ``BUILD_OK`` records the sha256 of the compiled library, so
a corrupt library is rebuilt. A failed build leaves its log and a ``BUILD_FAILED`` marker naming the
compiler: later starts use the native kernels at once (one warning line) until the compiler
changes or the marker is deleted.

The cache is trusted only if it is private: folders are created 0700, lock and log files are never
opened through a symlink, other files are written under fresh names and renamed; a cache folder or
library that is not owned by this user, or that others may write, is refused (native kernels, one
warning line) rather than loaded.

At the first call of each shape the operator times oneDNN's candidate implementations (both memory
layouts, all threads vs one thread) and keeps the fastest: about 2-3 s in all for the 12 shapes of
the Omniglot net at batches 5/25/75. Timing is noisy, and two implementations differ in the last
bits of their float32 results, so the choice is recorded: the first process that tunes a shape
writes it to ``<build sub-folder>/choices/`` (one small text file per kind, shape, thread budget
and layout setting, written atomically; tuning holds a lock on ``choices/.lock``), and every later
process on this machine rebuilds exactly that implementation without timing. Results are then
bit-identical between a run and its resumed continuation, or between 1- and 2-process runs. A
record that cannot be rebuilt (another CPU, say) is replaced by a new tuning. Delete the folder to
tune afresh (after a change of machine load, say).

Environment:

* ``PADDLE_MAML_NO_FASTCONV=1``: disable; :func:`load_kernels` returns None.
* ``PADDLE_MAML_FASTCONV_THREADS=N``: use exactly N oneDNN threads. Default: per shape, all the
  CPUs this process may use or one thread, whichever timed faster (one wins on a busy machine).
  Batch norm splits its channels over N threads (default: all those CPUs), with results that do
  not depend on N. Paddle keeps its OpenMP runtime at one thread; the operator changes that only
  during its calls.
* ``PADDLE_MAML_FASTCONV_LAYOUT=auto|plain|blocked``: memory layouts oneDNN may compute in;
  ``plain`` also keeps training's activations in NCHW (``activation_block`` is then 1).
* ``PADDLE_MAML_FASTCONV_TUNE=0``: no timing; oneDNN's first choice, blocked layout, all threads
  (recorded choices are neither read nor written).
* ``PADDLE_MAML_FASTCONV_CHOICES``: folder of the recorded choices, read by the operator at its
  first call. :func:`load_kernels` sets it to ``choices/`` in the build sub-folder (replacing an
  inherited value, which may belong to another build) unless it is ``0``: no recording, every
  process tunes for itself.
* ``PADDLE_MAML_FASTCONV_VERBOSE=1``: print the candidates, their times and the choice to stderr.

Only float32 CPU tensors go to oneDNN; :class:`Kernels` sends anything else (float64 for the
gradient checks, say) to Paddle's native kernels, so callers may use it unconditionally.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import paddle
from paddle import _C_ops

from metalearn.errors import UserError
from metalearn.fileio import atomic_write, file_lock
from metalearn.kernels.registry import NativeKernels, install

__all__ = ["Kernels", "load_kernels", "use_kernels"]

DISABLE_ENV = "PADDLE_MAML_NO_FASTCONV"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_NAME = "paddle_maml_fastconv"
_CXX_FLAGS = ["-O3", "-g0", "-w", "-ffp-contract=off"]  # see csrc/batch_norm.h: run_ranges
_LD_FLAGS = ["-ldl"]
_BUILD_TIMEOUT_S = 900
CHOICES_ENV = "PADDLE_MAML_FASTCONV_CHOICES"
_OPS = (
    "fastconv_forward",
    "fastconv_backward",
    "fastconv_backward_data",
    "fastconv_backward_weights",
    "fastconv_activation_block",
    "fastbn_forward",
    "fastbn_backward",
    "fastbn_double_backward",
    "fastbnrelu_backward",
    "fastbnrelu_double_backward",
    "fastbody_forward",
    "fastnet_forward",
    "fastnet_backward",
    "fastnet_double_backward",
)
_BUILD_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
from paddle.utils.cpp_extension import load
name, *sources, build_dir = sys.argv[1:]
load(name=name, sources=sources, extra_cxx_cflags={cxx!r}, extra_ldflags={ld!r},
     build_directory=build_dir, verbose=False)
"""


class Kernels(NativeKernels):
    """The three first-order convolution kernels (NCHW, no bias, dilation 1, any groups).

    ``forward(x, w, stride, padding, groups)`` equals ``_C_ops.conv2d`` and ``backward(x, w, dy,
    stride, padding, groups) -> (dx, dw)`` equals ``_C_ops.conv2d_grad``, both with explicit
    symmetric padding.
    ``backward_data`` / ``backward_weights`` return just dx / dw and skip the other half of the
    work. Outputs are new tensors that record no autograd history: call these from inside a
    PyLayer (as metalearn.kernels.ops does), not on tensors that need gradients through them.
    """

    def __init__(self, library: Path):
        self.library = library
        self._block: int | None = None  # activation_block's answer, asked once
        self._float32 = paddle.float32
        # Only a build with another device can hand us a non-CPU tensor; skip the check otherwise.
        self._check_place = paddle.is_compiled_with_cuda() or paddle.is_compiled_with_xpu()

    def _fast(self, *tensors) -> bool:
        for t in tensors:
            if t.dtype != self._float32 or (self._check_place and not t.place.is_cpu_place()):
                return False
        return True

    def _fast_conv(self, weight: paddle.Tensor, *tensors) -> bool:
        """Whether the convolution kernels take these tensors: float32 on the CPU, and a square
        kernel (a Conv1D runs as a 1×k convolution on Paddle's kernels)."""
        return weight.shape[2] == weight.shape[3] and self._fast(weight, *tensors)

    def forward(
        self,
        x: paddle.Tensor,
        weight: paddle.Tensor,
        stride: int,
        padding: int,
        groups: int = 1,
        layout: int = 0,
    ):
        if self._fast_conv(weight, x):
            return _C_ops._run_custom_op(
                "fastconv_forward", x, weight, stride, padding, groups, layout
            )[0]
        return super().forward(x, weight, stride, padding, groups, layout)

    def backward(
        self,
        x: paddle.Tensor,
        weight: paddle.Tensor,
        grad_out: paddle.Tensor,
        stride: int,
        padding: int,
        groups: int = 1,
        layout: int = 0,
    ):
        if self._fast_conv(weight, x, grad_out):
            dx, dw = _C_ops._run_custom_op(
                "fastconv_backward", x, weight, grad_out, stride, padding, groups, layout
            )
            return dx, dw
        return super().backward(x, weight, grad_out, stride, padding, groups, layout)

    def backward_data(
        self,
        x: paddle.Tensor,
        weight: paddle.Tensor,
        grad_out: paddle.Tensor,
        stride: int,
        padding: int,
        groups: int = 1,
        layout: int = 0,
    ) -> paddle.Tensor:
        """``backward(...)[0]`` without computing the weight gradient (x gives the shape only)."""
        if self._fast_conv(weight, grad_out) and x.dtype == self._float32:
            return _C_ops._run_custom_op(
                "fastconv_backward_data", x, weight, grad_out, stride, padding, groups, layout
            )[0]
        return super().backward_data(x, weight, grad_out, stride, padding, groups, layout)

    def backward_weights(
        self,
        x: paddle.Tensor,
        weight: paddle.Tensor,
        grad_out: paddle.Tensor,
        stride: int,
        padding: int,
        groups: int = 1,
        layout: int = 0,
    ) -> paddle.Tensor:
        """``backward(...)[1]`` without computing the input gradient (weight gives the shape only)."""
        if self._fast_conv(weight, x, grad_out):
            return _C_ops._run_custom_op(
                "fastconv_backward_weights", x, weight, grad_out, stride, padding, groups, layout
            )[0]
        return super().backward_weights(x, weight, grad_out, stride, padding, groups, layout)

    def activation_block(self, *tensors) -> int:
        if not self._fast(*tensors):
            return 1
        if self._block is None:  # oneDNN's preference on this CPU (csrc/onednn.cc)
            probe = paddle.zeros([1], dtype="float32")
            self._block = int(_C_ops._run_custom_op("fastconv_activation_block", probe)[0].item())
        return self._block

    def fuses_batch_norm(self, *tensors) -> bool:
        return self._fast(*tensors)

    def batch_norm_forward(self, x, scale, shift, eps: float, relu: bool = False, block: int = 1):
        """(y, mean, rstd) of batch norm with the batch's statistics (csrc/batch_norm.cc); with
        ``relu`` y is relu(batch norm). ``block``: 1 for plain NCHW tensors, B for nChw{B}c
        (:meth:`activation_block`); the same for the passes below, which take x with the
        forward's (mean, rstd) and recompute x̂ from them exactly as the forward did."""
        return _C_ops._run_custom_op(
            "fastbn_forward", x, scale, shift, float(eps), bool(relu), int(block)
        )

    def batch_norm_backward(self, x, mean, rstd, scale, grad_out, relu_shift=None, block: int = 1):
        """(dx, dscale, dshift) given dL/dy; after a fused ReLU ``relu_shift`` is the forward's
        shift, from which the ReLU mask is recomputed, and ``grad_out`` is the ReLU's dL/dz."""
        if relu_shift is None:
            return _C_ops._run_custom_op("fastbn_backward", x, mean, rstd, scale, grad_out, block)
        return _C_ops._run_custom_op(
            "fastbnrelu_backward", x, mean, rstd, scale, relu_shift, grad_out, block
        )

    def batch_norm_double_backward(
        self, x, mean, rstd, scale, grad_out, g_x, g_scale, g_shift, relu_shift=None, block=1
    ):
        """Cotangents of (x, scale, dy) for incoming ones (g_x, g_scale, g_shift) on the
        backward's outputs (dx, dscale, dshift); ``relu_shift`` as for the backward."""
        if relu_shift is None:
            return _C_ops._run_custom_op(
                "fastbn_double_backward",
                x,
                mean,
                rstd,
                scale,
                grad_out,
                g_x,
                g_scale,
                g_shift,
                block,
            )
        return _C_ops._run_custom_op(
            "fastbnrelu_double_backward",
            x,
            mean,
            rstd,
            scale,
            relu_shift,
            grad_out,
            g_x,
            g_scale,
            g_shift,
            block,
        )

    def fuses_relu_conv_body(self, x, *params) -> bool:
        return x.ndim == 4 and x.shape[0] > 0 and self._fast(x, *params)

    def relu_conv_body_features(
        self, x, params, stride: int, padding: int, eps: float, groups: int = 1
    ):
        return _C_ops._run_custom_op(
            "fastbody_forward", x, list(params), int(stride), int(padding), int(groups), float(eps)
        )[0]

    # The ReLU network (csrc/relu_network.cc): one operator call per pass, for networks
    # of at most MAX_NETWORK_LAYERS layers. The hidden activations and the dz_l travel packed,
    # between the operators only.
    def fuses_linear(self, *tensors) -> bool:
        return len(tensors) <= 1 + 2 * MAX_NETWORK_LAYERS and self._fast(*tensors)

    def relu_network_forward(self, x, params):
        return tuple(_C_ops._run_custom_op("fastnet_forward", x, list(params)))

    def relu_network_backward(self, x, params, state, grad_out, with_x: bool):
        *grads, grad_zs = _C_ops._run_custom_op(
            "fastnet_backward", x, list(params), state, grad_out, with_x
        )
        return _gradients(grads, len(params), with_x), grad_zs

    def relu_network_double_backward(self, x, params, state, grad_zs, cotangents, with_x: bool):
        *grads, grad_out = _C_ops._run_custom_op(
            "fastnet_double_backward", x, list(params), state, grad_zs, list(cotangents), with_x
        )
        return (*_gradients(grads, len(params), with_x), grad_out)


MAX_NETWORK_LAYERS = 4  # the operators' fixed number of outputs (relu_network.cc: kMaxLayers)


def _gradients(outputs: list, count: int, with_x: bool) -> tuple:
    """([dx,] dW_0, db_0, ...) of the operators' fixed outputs (dx, dW_0, db_0, ...,
    placeholders)."""
    return tuple(outputs[: 1 + count]) if with_x else tuple(outputs[1 : 1 + count])


_lock = threading.Lock()
_loaded = False
_kernels: Kernels | None = None


def load_kernels() -> Kernels | None:
    """The oneDNN kernels, built on first use; None (with one warning line) if unavailable.

    The result is cached for the process: the build, registration and self-check run once.
    """
    global _loaded, _kernels
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                library = _build()
                _use_choices(library)
                _register(library)
                kernels = Kernels(library)
                _self_check(kernels)
                _kernels = kernels
            except (
                UserError
            ):  # the launcher's SIGTERM (metalearn.training.distributed): stop, not fall back
                raise
            except Exception as error:  # any other failure means: use the native kernels
                reason = " ".join(str(error).split()) or type(error).__name__
                if len(reason) > 300:
                    reason = reason[:300] + "..."
                print(
                    f"metalearn.kernels.onednn: oneDNN convolution unavailable, using Paddle's native "
                    f"kernels ({reason})",
                    file=sys.stderr,
                )
        return _kernels


def use_kernels(kind: str) -> str:
    """Install the convolution kernels for :mod:`metalearn.kernels.ops`: ``"fast"`` (oneDNN, CPU float32,
    built on first use) or ``"native"`` (Paddle's). Returns the kind actually in use: fast falls
    back to native on a GPU or where oneDNN cannot be built. Both compute the same function.
    """
    if kind == "fast" and paddle.get_device() == "cpu":
        fast = load_kernels()
        if fast is not None:
            install(fast, "fast")
            return "fast"
    install(NativeKernels(), "native")
    return "native"


def cache_root() -> Path:
    """Folder that holds the compiled operators (see the module docstring)."""
    if os.environ.get("PADDLE_MAML_CACHE_DIR"):
        return Path(os.environ["PADDLE_MAML_CACHE_DIR"]).expanduser() / "fastconv"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "paddle-maml" / "fastconv"


def _read_sources(folder: Path) -> dict[str, bytes]:
    """Name → bytes of the operator's C++ files in ``folder`` (``*.cc`` compiled, ``*.h``
    included), sorted by name. Read once, so that the build compiles exactly what its key hashed."""
    files = sorted(path for pattern in ("*.cc", "*.h") for path in folder.glob(pattern))
    sources = {path.name: path.read_bytes() for path in files if path.is_file()}
    if not any(name.endswith(".cc") for name in sources):
        raise RuntimeError(f"no C++ sources in {folder}")
    return sources


def _build_key(sources: dict[str, bytes]) -> str:
    """Hash of every source and header (names and bytes) and of what else shapes the build."""
    digest = hashlib.sha256()
    for name, text in sources.items():
        digest.update(f"{name}\0{len(text)}\0".encode() + text)
    for part in (
        paddle.__version__,
        getattr(paddle.version, "commit", ""),
        sys.version,
        platform.machine(),
        repr(_CXX_FLAGS),
        repr(_LD_FLAGS),
        _BUILD_SCRIPT,
    ):
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:16]


def _build() -> Path:
    """Path of the compiled operator library, compiling it first if the cache has no valid one."""
    sources = _read_sources(SOURCE_DIR)
    build_dir = cache_root() / f"{_NAME}-{_build_key(sources)}"
    library = build_dir / _NAME / f"{_NAME}.so"
    if _built(build_dir, library):
        return library

    header = Path(os.path.dirname(paddle.__file__)) / "include" / "paddle" / "extension.h"
    if not header.is_file():
        raise RuntimeError(f"Paddle C++ headers not found ({header})")
    compiler = _compiler_id()
    if compiler is None:
        raise RuntimeError("no C++ compiler found")

    cache_root().mkdir(mode=0o700, parents=True, exist_ok=True)
    build_dir.mkdir(mode=0o700, exist_ok=True)
    _check_private(cache_root(), build_dir)
    with file_lock(build_dir.parent / f"{build_dir.name}.lock"):
        if _built(build_dir, library):  # another process built it meanwhile
            return library
        failed, log = build_dir / "BUILD_FAILED", build_dir / "build.log"
        if failed.is_file() and failed.read_text() == compiler:
            raise RuntimeError(
                f"an earlier build with this compiler failed; delete {failed} to retry "
                "(build.log beside it says why)"
            )
        _compile(sources, build_dir, library, log)
        if not library.is_file():
            atomic_write(failed, lambda handle: handle.write(compiler.encode()))
            raise RuntimeError(f"compilation failed, see {log}")
        failed.unlink(missing_ok=True)
        record = f"{_NAME}\nsha256={_sha256(library)}\n".encode()
        atomic_write(build_dir / "BUILD_OK", lambda handle: handle.write(record))
    _check_private(library.parent, library)
    return library


def _compile(sources: dict[str, bytes], build_dir: Path, library: Path, log: Path) -> None:
    """Compile copies of ``sources`` (in ``<build_dir>/csrc``) in a quiet subprocess running the
    build script; its output goes to ``log``.

    A library already there (corrupt, or of a failed build) is removed first: Paddle would keep
    one whose sources did not change.
    """
    library.unlink(missing_ok=True)
    copies = build_dir / "csrc"
    copies.mkdir(mode=0o700, exist_ok=True)
    for name, text in sources.items():
        atomic_write(copies / name, lambda handle, text=text: handle.write(text))
    compiled = [str(copies / name) for name in sources if name.endswith(".cc")]
    script = _BUILD_SCRIPT.format(cxx=_CXX_FLAGS, ld=_LD_FLAGS)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with open(os.open(log, flags, 0o600), "w") as out:
        result = subprocess.run(
            [sys.executable, "-c", script, _NAME, *compiled, str(build_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=build_dir,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    if result.returncode != 0:
        library.unlink(missing_ok=True)


def _built(build_dir: Path, library: Path) -> bool:
    """True if ``BUILD_OK`` records exactly this library (a corrupt one is rebuilt); the cache
    must be private before anything in it is trusted."""
    done = build_dir / "BUILD_OK"
    if not (done.is_file() and library.is_file()):
        return False
    _check_private(cache_root(), build_dir, library.parent, library)
    return f"sha256={_sha256(library)}" in done.read_text().split()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiler_id() -> str | None:
    """The C++ compiler a build would use and its version line (None if there is none)."""
    found = [shutil.which(cc) for cc in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cc]
    compiler = next((path for path in found if path), None)
    if compiler is None:
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.partition("\n")[0]
    except (OSError, subprocess.SubprocessError):
        version = "unknown version"
    return f"{compiler}: {version}\n"


def _check_private(*paths: Path) -> None:
    """Refuse a cache that someone else could have planted or changed (a shared folder, say)."""
    if not hasattr(os, "geteuid"):
        return
    for path in paths:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise RuntimeError(f"refusing the kernel cache: {path} is a symlink")
        if info.st_uid != os.geteuid():
            raise RuntimeError(
                f"refusing the kernel cache: {path} belongs to user id {info.st_uid}, not you "
                "(set PADDLE_MAML_CACHE_DIR to a folder of your own)"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(
                f"refusing the kernel cache: others may write to {path} "
                f"(mode {stat.filemode(info.st_mode)}); `chmod go-w` it or delete it"
            )


def choices_dir(library: Path) -> Path:
    """Folder of the recorded tuning choices of the operator built at ``library``."""
    return library.parent.parent / "choices"


def _use_choices(library: Path) -> None:
    """Point the operator at its recorded choices (before its first call reads the variable)."""
    if os.environ.get(CHOICES_ENV, "").strip() == "0":
        return
    folder = choices_dir(library)
    with contextlib.suppress(OSError):  # read-only cache: each process tunes, records fail quietly
        folder.mkdir(parents=True, exist_ok=True)
    os.environ[CHOICES_ENV] = str(folder)


def _register(library: Path) -> None:
    from paddle.utils import cpp_extension

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = cpp_extension.load_op_meta_info_and_register_op(str(library))
    missing = set(_OPS) - set(ops or ())
    if ops and missing:  # (an empty answer is left to the self-check)
        raise RuntimeError(f"operators {sorted(missing)} not registered by {library}")


def _self_check(kernels: Kernels) -> None:
    """Compare with the native kernels on a small case; refuse the fast path on any mismatch."""
    with paddle.no_grad():
        rng = np.random.default_rng(1234)  # leaves Paddle's generator alone
        x = paddle.to_tensor(rng.standard_normal([2, 3, 7, 6]).astype("float32"))
        w = paddle.to_tensor(rng.standard_normal([4, 3, 3, 3]).astype("float32"))
        y = kernels.forward(x, w, 2, 1)
        dy = paddle.ones_like(y) * 0.5
        dx, dw = kernels.backward(x, w, dy, 2, 1)
        dx_only = kernels.backward_data(x, w, dy, 2, 1)
        dw_only = kernels.backward_weights(x, w, dy, 2, 1)
        y_ref = _C_ops.conv2d(x, w, [2, 2], [1, 1], "EXPLICIT", [1, 1], 1, "NCHW")
        dx_ref, dw_ref = _C_ops.conv2d_grad(x, w, dy, [2, 2], [1, 1], "EXPLICIT", [1, 1], 1, "NCHW")
        checks = (
            ("forward", y, y_ref),
            ("dx", dx, dx_ref),
            ("dw", dw, dw_ref),
            ("backward_data", dx_only, dx_ref),
            ("backward_weights", dw_only, dw_ref),
        )
        x_grouped = paddle.concat([x, x * 0.5], axis=1)  # two groups of 3 channels
        y_grouped = kernels.forward(x_grouped, w, 2, 1, 2)
        y_grouped_ref = _C_ops.conv2d(x_grouped, w, [2, 2], [1, 1], "EXPLICIT", [1, 1], 2, "NCHW")
        checks += (("grouped forward", y_grouped, y_grouped_ref),)
        gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([0.0, -1.0, 1.0])
        as_tensor = lambda a: paddle.to_tensor(a.astype("float32"))  # noqa: E731
        y_bn = kernels.batch_norm_forward(x, as_tensor(gamma), as_tensor(beta), 1e-3)[0]
        centred = x.numpy().astype("float64")
        centred -= centred.mean(axis=(0, 2, 3), keepdims=True)
        normalised = centred / np.sqrt((centred**2).mean(axis=(0, 2, 3), keepdims=True) + 1e-3)
        y_bn_ref = as_tensor(normalised * gamma.reshape(1, 3, 1, 1) + beta.reshape(1, 3, 1, 1))
        checks += (("batch norm", y_bn, y_bn_ref),)
        params = [as_tensor(rng.standard_normal(s)) for s in ((2, 3, 5), (2, 5), (2, 5, 1), (2, 1))]
        inputs = as_tensor(rng.standard_normal((2, 4, 3)))
        y_net = kernels.relu_network_forward(inputs, params)[0]
        y_net_ref = NativeKernels().relu_network_forward(inputs, params)[0]
        checks += (("relu network", y_net, y_net_ref),)
        for name, got, want in checks:
            if got.shape != want.shape:
                raise RuntimeError(f"self-check: {name} shape {got.shape} != {want.shape}")
            scale = float(want.abs().max()) + 1e-6
            err = float((got - want).abs().max())
            if not err <= 1e-4 * scale:
                raise RuntimeError(f"self-check: {name} differs from Paddle by {err:.3g}")
