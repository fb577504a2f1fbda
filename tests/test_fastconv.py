"""The oneDNN convolution kernels (metalearn.kernels.onednn) against Paddle's native conv2d / conv2d_grad.

Shapes are those of the Omniglot conv net at the batch sizes MAML uses, plus a stride-1 / no-padding
case and a few odd sizes. Skipped where the fast path cannot be built (no compiler, say).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from paddle import _C_ops

from metalearn.errors import UserError
from metalearn.kernels import onednn

# (x shape, out channels, stride, padding)
NETWORK_CASES = [
    ([batch, channels, size, size], 64, 2, 1)
    for batch in (5, 25, 75)
    for channels, size in ((1, 28), (64, 14), (64, 7), (64, 4))
]
OTHER_CASES = [
    ([5, 64, 7, 7], 64, 1, 0),  # stride 1, no padding
    ([3, 5, 9, 6], 7, 1, 1),  # odd channel counts, non-square input
    ([2, 3, 8, 8], 4, 3, 2),  # stride 3: last rows/columns unused
    ([2, 3, 8, 8], 4, 2, 0),  # last input row/column unused without padding
]
CASES = NETWORK_CASES + OTHER_CASES


def _case_id(case) -> str:
    shape, out_channels, stride, padding = case
    return f"{'x'.join(map(str, shape))}-o{out_channels}-s{stride}p{padding}"


@pytest.fixture(scope="module")
def kernels() -> onednn.Kernels:
    found = onednn.load_kernels()
    if found is None:
        pytest.skip("oneDNN fast path unavailable (see the warning on stderr)")
    return found


def _native_forward(x, w, stride, padding):
    return _C_ops.conv2d(x, w, [stride] * 2, [padding] * 2, "EXPLICIT", [1, 1], 1, "NCHW")


def _native_backward(x, w, dy, stride, padding):
    return _C_ops.conv2d_grad(x, w, dy, [stride] * 2, [padding] * 2, "EXPLICIT", [1, 1], 1, "NCHW")


def _assert_close(got: paddle.Tensor, want: paddle.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    got_np, want_np = got.numpy(), want.numpy()
    scale = float(np.abs(want_np).max()) or 1.0
    err = float(np.abs(got_np - want_np).max())
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} vs max magnitude {scale:.3g}"


def _random_case(case, seed: int = 0):
    shape, out_channels, stride, padding = case
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    w = paddle.to_tensor(
        rng.standard_normal([out_channels, shape[1], 3, 3]).astype("float32") / 3.0
    )
    y = _native_forward(x, w, stride, padding)
    dy = paddle.to_tensor(rng.standard_normal(y.shape).astype("float32"))
    return x, w, dy, stride, padding


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_native(kernels, case):
    x, w, _, stride, padding = _random_case(case)
    _assert_close(
        kernels.forward(x, w, stride, padding), _native_forward(x, w, stride, padding), "y"
    )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_native(kernels, case):
    x, w, dy, stride, padding = _random_case(case)
    dx_ref, dw_ref = _native_backward(x, w, dy, stride, padding)
    dx, dw = kernels.backward(x, w, dy, stride, padding)
    _assert_close(dx, dx_ref, "dx")
    _assert_close(dw, dw_ref, "dw")
    _assert_close(kernels.backward_data(x, w, dy, stride, padding), dx_ref, "backward_data")
    _assert_close(kernels.backward_weights(x, w, dy, stride, padding), dw_ref, "backward_weights")


# (x shape, out channels, stride, padding, groups): stacked tasks of the Omniglot net
GROUPED_CASES = [
    ([5, 32, 28, 28], 2048, 2, 1, 32),  # first layer: one input channel per task
    ([5, 512, 7, 7], 512, 2, 1, 8),
    ([2, 6, 9, 9], 4, 1, 1, 2),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda case: f"{case[0]}-g{case[4]}")
def test_grouped_kernels_match_native(kernels, case):
    shape, out_channels, stride, padding, groups = case
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    w_shape = [out_channels, shape[1] // groups, 3, 3]
    w = paddle.to_tensor(rng.standard_normal(w_shape).astype("float32") / 3.0)
    geometry = ([stride] * 2, [padding] * 2, "EXPLICIT", [1, 1], groups, "NCHW")
    y_ref = _C_ops.conv2d(x, w, *geometry)
    dy = paddle.to_tensor(rng.standard_normal(y_ref.shape).astype("float32"))
    dx_ref, dw_ref = _C_ops.conv2d_grad(x, w, dy, *geometry)
    _assert_close(kernels.forward(x, w, stride, padding, groups), y_ref, "y")
    dx, dw = kernels.backward(x, w, dy, stride, padding, groups)
    _assert_close(dx, dx_ref, "dx")
    _assert_close(dw, dw_ref, "dw")
    _assert_close(kernels.backward_data(x, w, dy, stride, padding, groups), dx_ref, "dx only")
    _assert_close(kernels.backward_weights(x, w, dy, stride, padding, groups), dw_ref, "dw only")


def test_repeated_calls_use_new_data(kernels):
    """Cached primitives must read the tensors of each call, not those of the first."""
    case = ([5, 64, 7, 7], 64, 2, 1)
    for seed in (1, 2):
        x, w, dy, stride, padding = _random_case(case, seed)
        _assert_close(
            kernels.forward(x, w, stride, padding), _native_forward(x, w, stride, padding), "y"
        )
        dx_ref, dw_ref = _native_backward(x, w, dy, stride, padding)
        dx, dw = kernels.backward(x, w, dy, stride, padding)
        _assert_close(dx, dx_ref, "dx")
        _assert_close(dw, dw_ref, "dw")


def test_non_contiguous_input(kernels):
    x, w, _, stride, padding = _random_case(([5, 64, 7, 7], 64, 2, 1))
    x_t = x.transpose([0, 1, 3, 2])  # a strided view where Paddle allows it
    want = _native_forward(x_t.contiguous(), w, stride, padding)
    _assert_close(kernels.forward(x_t, w, stride, padding), want, "y")


def test_float64_falls_back_to_native(kernels):
    x, w, dy, stride, padding = _random_case(([2, 3, 8, 8], 4, 2, 1))
    x, w, dy = x.astype("float64"), w.astype("float64"), dy.astype("float64")
    y = kernels.forward(x, w, stride, padding)
    assert y.dtype == paddle.float64
    _assert_close(y, _native_forward(x, w, stride, padding), "y")
    dx, dw = kernels.backward(x, w, dy, stride, padding)
    dx_ref, dw_ref = _native_backward(x, w, dy, stride, padding)
    _assert_close(dx, dx_ref, "dx")
    _assert_close(dw, dw_ref, "dw")


def test_non_square_kernels_fall_back_to_native(kernels):
    """A Conv1D runs as a [1, k] convolution; the oneDNN operator takes square kernels only."""
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal([4, 3, 1, 20]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([5, 3, 1, 3]).astype("float32"))
    y = _native_forward(x, w, 1, 0)
    dy = paddle.to_tensor(rng.standard_normal(y.shape).astype("float32"))
    _assert_close(kernels.forward(x, w, 1, 0), y, "y")
    dx, dw = _native_backward(x, w, dy, 1, 0)
    for got, want in zip(kernels.backward(x, w, dy, 1, 0), (dx, dw)):
        _assert_close(got, want, "dx, dw")
    _assert_close(kernels.backward_data(x, w, dy, 1, 0), dx, "dx")
    _assert_close(kernels.backward_weights(x, w, dy, 1, 0), dw, "dw")


def test_channel_mismatch_raises(kernels):
    x = paddle.ones([2, 3, 8, 8])
    w = paddle.ones([4, 5, 3, 3])
    with pytest.raises(Exception, match="channels"):
        kernels.forward(x, w, 1, 1)


def test_openmp_thread_count_restored(kernels):
    """Paddle keeps its OpenMP runtime at one thread; the kernels must leave it that way."""
    import ctypes

    library = os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")
    if not os.path.isfile(library):
        pytest.skip("this Paddle build has no libiomp5")
    iomp = ctypes.CDLL(library)
    before = iomp.omp_get_max_threads()
    x, w, dy, stride, padding = _random_case(([25, 64, 14, 14], 64, 2, 1))
    kernels.forward(x, w, stride, padding)
    kernels.backward(x, w, dy, stride, padding)
    assert iomp.omp_get_max_threads() == before


def test_second_order_gradients_through_ops(kernels, monkeypatch):
    """MAML-style meta-gradient through metalearn.kernels.ops with the fast kernels equals the native one."""
    from metalearn.kernels import ops, registry

    def meta_gradient(seed):
        rng = np.random.default_rng(seed)
        x = paddle.to_tensor(rng.standard_normal([5, 3, 9, 9]).astype("float32"))
        w1 = paddle.to_tensor(rng.standard_normal([4, 3, 3, 3]).astype("float32"))
        w2 = paddle.to_tensor(rng.standard_normal([6, 4, 3, 3]).astype("float32"))
        w1.stop_gradient = w2.stop_gradient = False

        def loss(a, b):
            hidden = paddle.nn.functional.relu(ops.conv2d(x, a, 2, 1))
            out = ops.conv2d(hidden, b, 1, 0)
            return (out * out).mean()

        g1, g2 = paddle.grad(loss(w1, w2), [w1, w2], create_graph=True)
        return [g.numpy() for g in paddle.grad(loss(w1 - 0.1 * g1, w2 - 0.1 * g2), [w1, w2])]

    native = meta_gradient(3)
    monkeypatch.setattr(registry, "_active", kernels)
    fast = meta_gradient(3)
    for got, want in zip(fast, native):
        _assert_close(paddle.to_tensor(got), paddle.to_tensor(want), "meta-gradient")


def test_disabled_by_environment():
    code = "import sys; from metalearn.kernels import onednn; sys.exit(onednn.load_kernels() is not None)"
    env = dict(os.environ, PADDLE_MAML_NO_FASTCONV="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "fastconv" not in result.stderr


def test_build_failure_returns_none_with_one_line(tmp_path):
    """A broken source gives None and a single warning line, no traceback."""
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "conv.cc").write_text("this is not C++\n")
    code = (
        "import pathlib, sys; from metalearn.kernels import onednn; "
        f"onednn.SOURCE_DIR = pathlib.Path({str(broken)!r}); "
        "sys.exit(onednn.load_kernels() is not None)"
    )
    env = dict(os.environ, PADDLE_MAML_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PADDLE_MAML_NO_FASTCONV", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "metalearn.kernels.onednn" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "compilation failed" in lines[0]


# Run in a fresh process: forward and backward of the cases argv[2] (JSON), saved in folder argv[1].
_RECORD_SCRIPT = """
import json, sys
import numpy as np
import paddle
from metalearn.kernels import onednn

out, cases = sys.argv[1], json.loads(sys.argv[2])
kernels = onednn.load_kernels()
assert kernels is not None, "fast path unavailable"
print("LIBRARY", kernels.library)
for i, (shape, out_channels, stride, padding) in enumerate(cases):
    rng = np.random.default_rng(i)
    x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    w = paddle.to_tensor(
        rng.standard_normal([out_channels, shape[1], 3, 3]).astype("float32") / 3.0
    )
    y = kernels.forward(x, w, stride, padding)
    dy = paddle.to_tensor(rng.standard_normal(y.shape).astype("float32"))
    dx, dw = kernels.backward(x, w, dy, stride, padding)
    dx_only = kernels.backward_data(x, w, dy, stride, padding)
    dw_only = kernels.backward_weights(x, w, dy, stride, padding)
    outputs = {"y": y, "dx": dx, "dw": dw, "dx_only": dx_only, "dw_only": dw_only}
    for name, value in outputs.items():
        np.save(f"{out}/{i}_{name}.npy", value.numpy())
"""


def _cache_with_build(kernels, tmp_path):
    """A fresh cache folder holding a copy of the compiled operator (no rebuild) and no choices.

    Returns (cache folder, the copy's choices folder).
    """
    import shutil

    build_dir = kernels.library.parent.parent
    choices = onednn.choices_dir(kernels.library)
    cache = tmp_path / "cache"
    copy = cache / "fastconv" / build_dir.name
    shutil.copytree(build_dir, copy, ignore=shutil.ignore_patterns(choices.name))
    return cache, copy / choices.relative_to(build_dir)


def _run_recording(cache, out, cases):
    """Runs _RECORD_SCRIPT in a new process on `cache`; returns its stderr (verbose choices)."""
    import json

    out.mkdir()
    env = dict(os.environ, PADDLE_MAML_CACHE_DIR=str(cache), PADDLE_MAML_FASTCONV_VERBOSE="1")
    for name in ("PADDLE_MAML_NO_FASTCONV", "PADDLE_MAML_FASTCONV_TUNE", onednn.CHOICES_ENV):
        env.pop(name, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _RECORD_SCRIPT, str(out), json.dumps(cases)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    library = result.stdout.split("LIBRARY ", 1)[1].split()[0]
    assert library.startswith(str(cache)), library  # the copied build, not a new one
    return result.stderr


RECORDED_CASES = [
    ([5, 1, 28, 28], 64, 2, 1),
    ([25, 64, 14, 14], 64, 2, 1),
    ([25, 64, 7, 7], 64, 2, 1),
    ([75, 64, 4, 4], 64, 2, 1),
    ([5, 64, 7, 7], 64, 1, 0),
]


def test_recorded_choices_give_identical_results_across_processes(kernels, tmp_path):
    """The first process tunes and records its choices; a second one loads them without timing
    and computes bit-identical forward and backward results."""
    cache, choices = _cache_with_build(kernels, tmp_path)
    first = _run_recording(cache, tmp_path / "first", RECORDED_CASES)
    records = sorted(choices.glob("*.txt"))
    # three kinds for each case and for the shape of the self-check, plus its grouped forward
    assert len(records) == 3 * (len(RECORDED_CASES) + 1) + 1, [p.name for p in records]
    assert all(p.read_text().startswith("impl=") for p in records)
    assert "recorded in" in first and "(recorded)" not in first, first
    contents = [p.read_text() for p in records]

    second = _run_recording(cache, tmp_path / "second", RECORDED_CASES)
    assert "recorded in" not in second and "(recorded)" in second, second
    assert sorted(choices.glob("*.txt")) == records
    assert [p.read_text() for p in records] == contents

    names = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert len(names) == 5 * len(RECORDED_CASES)
    for name in names:
        a = np.load(tmp_path / "first" / name)
        b = np.load(tmp_path / "second" / name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} differs between the processes"


def test_unusable_recorded_choice_is_retuned(kernels, tmp_path):
    """A record naming an implementation this machine lacks is replaced by a fresh tuning."""
    cache, choices = _cache_with_build(kernels, tmp_path)
    case = ([2, 3, 8, 8], 4, 2, 0)
    _run_recording(cache, tmp_path / "first", [case])
    record = next(choices.glob("fwd-x2x3x8x8-o4-k3-g1-s2-p0-*.txt"))
    bogus = "impl=jit:no_such_isa\nblocked=1\nthreads=1\nsignature=jit:no_such_isa|2|1\n"
    record.write_text(bogus)

    second = _run_recording(cache, tmp_path / "second", [case])
    assert "cannot rebuild" in second, second
    assert record.read_text() != bogus and record.read_text().startswith("impl=")
    rng = np.random.default_rng(0)  # the inputs of _RECORD_SCRIPT's case 0
    x = paddle.to_tensor(rng.standard_normal(case[0]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([4, 3, 3, 3]).astype("float32") / 3.0)
    _assert_close(
        paddle.to_tensor(np.load(tmp_path / "second" / "0_y.npy")),
        _native_forward(x, w, case[2], case[3]),
        "y after re-tuning",
    )


# ---------------------------------------------------------------------------------------------
# The kernel cache, with the compilation replaced by a stand-in (a real build takes 20-30 s)


@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """A private cache in tmp_path whose 'compiler' writes a small file as the library."""
    state = SimpleNamespace(commands=[], fail=False)

    def fake_run(command, **kwargs):
        state.commands.append(command)
        if not state.fail:
            library = Path(command[-1]) / onednn._NAME / f"{onednn._NAME}.so"
            library.parent.mkdir(exist_ok=True)
            library.write_bytes(b"library %d" % len(state.commands))
        return subprocess.CompletedProcess(command, 1 if state.fail else 0)

    monkeypatch.setenv("PADDLE_MAML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onednn, "_compiler_id", lambda: "c++: fake 1.0\n")
    monkeypatch.setattr(onednn.subprocess, "run", fake_run)
    state.build_dir = onednn.cache_root() / (
        f"{onednn._NAME}-{onednn._build_key(onednn._read_sources(onednn.SOURCE_DIR))}"
    )
    return state


def test_every_source_file_is_compiled_and_keyed(fake_builds, tmp_path, monkeypatch):
    """All .cc files are compiled (sorted, headers only copied beside them); a change to any
    file, header included, or a renamed file, means a new build sub-folder."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in ("b.cc", "shared.h", "a.cc"):
        (sources / name).write_text("// the same text: the key must hash the names too\n")
    (sources / "notes.txt").write_text("not a source\n")
    monkeypatch.setattr(onednn, "SOURCE_DIR", sources)

    first = onednn._build()
    compiled = fake_builds.commands[0][-3:-1]
    copies = first.parent.parent / "csrc"
    assert compiled == [str(copies / "a.cc"), str(copies / "b.cc")]
    assert sorted(path.name for path in copies.iterdir()) == ["a.cc", "b.cc", "shared.h"]
    assert onednn._build() == first and len(fake_builds.commands) == 1  # nothing changed

    (sources / "shared.h").write_text("// shared.h, changed\n")
    second = onednn._build()
    (sources / "a.cc").rename(sources / "c.cc")
    third = onednn._build()
    assert len({first, second, third}) == 3 and len(fake_builds.commands) == 3


def test_missing_sources_are_a_build_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn, "SOURCE_DIR", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="no C\\+\\+ sources in"):
        onednn._build()


def test_failed_build_is_remembered(fake_builds, monkeypatch, capsys):
    fake_builds.fail = True
    with pytest.raises(RuntimeError, match="compilation failed"):
        onednn._build()
    monkeypatch.setattr(onednn, "_loaded", False)
    monkeypatch.setattr(onednn, "_kernels", None)
    assert onednn.load_kernels() is None  # a later start: no new compilation, one line
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "an earlier build with this compiler failed" in lines[0], lines
    assert "BUILD_FAILED to retry" in lines[0], lines[0]
    assert len(fake_builds.commands) == 1

    monkeypatch.setattr(onednn, "_compiler_id", lambda: "c++: fake 2.0\n")
    with pytest.raises(RuntimeError, match="compilation failed"):
        onednn._build()  # a new compiler is tried
    assert len(fake_builds.commands) == 2
    (fake_builds.build_dir / "BUILD_FAILED").unlink()
    fake_builds.fail = False
    onednn._build()  # so is a deleted marker
    assert len(fake_builds.commands) == 3
    assert not (fake_builds.build_dir / "BUILD_FAILED").exists()


def test_corrupt_library_is_rebuilt(fake_builds):
    library = onednn._build()
    assert onednn._build() == library and len(fake_builds.commands) == 1  # cached
    library.write_bytes(b"corrupt")
    assert onednn._build() == library
    assert len(fake_builds.commands) == 2
    assert library.read_bytes() == b"library 2"


def test_cache_folders_are_private(fake_builds):
    onednn._build()
    for folder in (onednn.cache_root(), fake_builds.build_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize("planted", ["lock", "log"])
def test_symlinked_lock_or_log_is_not_followed(fake_builds, tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    fake_builds.build_dir.mkdir(parents=True)
    link = {
        "lock": fake_builds.build_dir.parent / f"{fake_builds.build_dir.name}.lock",
        "log": fake_builds.build_dir / "build.log",
    }[planted]
    link.symlink_to(victim)
    with pytest.raises(OSError):
        onednn._build()
    assert victim.read_text() == "keep"
    assert fake_builds.commands == []


@pytest.mark.parametrize("change", ["group-writable folder", "foreign library"])
def test_untrusted_cache_is_refused(fake_builds, change):
    library = onednn._build()
    if change == "foreign library":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(library, 4242, -1)
        message = "belongs to user id 4242"
    else:
        fake_builds.build_dir.chmod(0o770)
        message = "others may write to"
    with pytest.raises(RuntimeError, match=message):
        onednn._build()
    assert len(fake_builds.commands) == 1  # refused, neither loaded nor rebuilt


def test_launcher_stop_is_not_swallowed(monkeypatch):
    """The SIGTERM of the launcher arrives as UserError (metalearn.training.distributed): it must stop the
    process, not be reported as an unavailable fast path."""

    def stopped():
        raise UserError("process 1 was stopped by the launcher")

    monkeypatch.setattr(onednn, "_loaded", False)
    monkeypatch.setattr(onednn, "_kernels", None)
    monkeypatch.delenv(onednn.DISABLE_ENV, raising=False)
    monkeypatch.setattr(onednn, "_build", stopped)
    with pytest.raises(UserError, match="stopped by the launcher"):
        onednn.load_kernels()


THREADS_SCRIPT = """
import sys, threading
import numpy as np, paddle
from metalearn.kernels import onednn
from metalearn.nets.builtin import ConvNet
onednn.use_kernels("fast")
net = ConvNet(5)
params = {k: paddle.to_tensor(v) for k, v in net.init_params(0).items()}
x = paddle.to_tensor(np.random.default_rng(0).random((25, 1, 28, 28)).astype("float32"))
def forward_and_grads(results):
    grad_params = {k: v.detach() for k, v in params.items()}
    for v in grad_params.values():
        v.stop_gradient = False
    loss = net.forward(x, grad_params).square().mean()
    grads = paddle.grad(loss, list(grad_params.values()))
    with paddle.no_grad():
        scored = net.forward(x, params)
    results.append(np.concatenate([g.numpy().ravel() for g in grads] + [scored.numpy().ravel()]))
results = []
forward_and_grads(results)
worker = threading.Thread(target=forward_and_grads, args=(results,))
worker.start()
worker.join()
forward_and_grads(results)
assert len(results) == 3, "a thread failed"
assert all(np.array_equal(results[0], r) for r in results[1:]), "threads disagree"
print("ok")
"""


@pytest.mark.parametrize("layout", ["plain", "blocked"])
def test_kernels_run_on_any_thread(kernels, layout):
    """A primitive created on one thread runs on another and back (the playground's worker after
    the main thread). With oneDNN's per-thread library scratchpad this crashed in gemm's im2col
    (the plain layout's first choice) or corrupted the heap; the kernels now pass their own."""
    env = {
        **os.environ,
        "PADDLE_MAML_FASTCONV_LAYOUT": layout,
        "PADDLE_MAML_FASTCONV_TUNE": "0",  # oneDNN's first choice: gemm on the plain layout
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    result = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
