"""Checkpoints: round trip, atomic writes, refusal of mismatched or unsafe files."""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from checkpoint_corpus import run_config, segfault_pickle
from helpers import assert_one_line_error, run_script

from metalearn.errors import UserError
from metalearn.learning.variants import make_variant
from metalearn.nets.builtin import ConvNet
from metalearn.runs.checkpoint import (
    Checkpoint,
    check_compatible,
    export_legacy_pkl,
    load_checkpoint,
    load_legacy_pkl,
    save_checkpoint,
)
from metalearn.training.config import evaluate_parser
from metalearn.training.evaluation import evaluate, find_run
from metalearn.training.trainer import Trainer, TrainState, prepare_config


def shapes(params: dict) -> dict:
    return {k: tuple(v.shape) for k, v in params.items()}


def test_round_trip_keeps_params_optimizer_and_meta(tmp_path) -> None:
    net = ConvNet(n_way=5)
    params = net.init_params(0)
    optimizer = {"conv0.weight_moment1_0": np.ones(3, "float32")}
    path = tmp_path / "last.npz"
    save_checkpoint(path, Checkpoint(params, {"network": net.config(), "x": [1, 2]}, optimizer))
    loaded = load_checkpoint(path)
    assert loaded.meta["x"] == [1, 2]
    assert list(loaded.params) == list(params)
    for name in params:
        np.testing.assert_array_equal(loaded.params[name], params[name])
    np.testing.assert_array_equal(loaded.optimizer["conv0.weight_moment1_0"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]  # no temporary file left behind
    check_compatible(loaded, net.config(), shapes(params))


def test_mismatched_network_is_refused(tmp_path) -> None:
    net = ConvNet(n_way=5)
    path = tmp_path / "best.npz"
    save_checkpoint(path, Checkpoint(net.init_params(0), {"network": net.config()}))
    other = ConvNet(n_way=20)
    with pytest.raises(UserError, match="n_way=5"):
        check_compatible(load_checkpoint(path), other.config(), shapes(other.init_params(0)))


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "best.npz"
    path.write_bytes(content)
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(path)


def test_missing_checkpoint_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.npz")


def assert_bitwise_equal(loaded: list[np.ndarray], original: list[np.ndarray]) -> None:
    assert len(loaded) == len(original)
    for got, want in zip(loaded, original):
        assert got.shape == want.shape and got.dtype.kind == "f" and got.flags.writeable
        assert got.astype(want.dtype).tobytes() == np.ascontiguousarray(want).tobytes()


def test_legacy_pickle_round_trip_is_exact(tmp_path) -> None:
    params = ConvNet(n_way=5).init_params(0)
    export_legacy_pkl(tmp_path / "best.pkl", params)
    expected = [v.shape for v in params.values()]
    assert_bitwise_equal(load_legacy_pkl(tmp_path / "best.pkl", expected), list(params.values()))


ARRAYS = [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.zeros((0, 4), np.float32),
    np.array(3.5),
    np.asfortranarray(np.random.default_rng(0).normal(size=(3, 4))),
    np.arange(5, dtype=">f4"),
    np.ones((2, 2), np.float16),
]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("container", [list, tuple, "dict", "ordered"])
def test_seed_style_pickles_of_every_protocol_load_exactly(tmp_path, protocol, container) -> None:
    named = {str(i): a for i, a in enumerate(ARRAYS)}
    data = {
        "dict": named,
        "ordered": collections.OrderedDict(named),
    }.get(container) or container(ARRAYS)
    path = tmp_path / "seed.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert_bitwise_equal(load_legacy_pkl(path, [a.shape for a in ARRAYS]), ARRAYS)


def test_pickles_written_by_numpy_1_load(tmp_path) -> None:
    """numpy 1.x named its reconstructor numpy.core.multiarray (GLOBAL opcodes, protocol 2)."""
    written = pickle.dumps(ARRAYS, protocol=2)
    assert b"numpy._core.multiarray" in written
    path = tmp_path / "old.pkl"
    path.write_bytes(written.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert_bitwise_equal(load_legacy_pkl(path, [a.shape for a in ARRAYS]), ARRAYS)


def test_the_reported_segfault_pickle_is_refused(tmp_path) -> None:
    """Admitted globals only (numpy dtype, _reconstruct, ndarray, builtins dict), with a forged
    dtype state: an object field over raw bytes (numpy's own unpickler then crashes on use)."""
    path = tmp_path / "best.pkl"
    path.write_bytes(segfault_pickle())
    with pytest.raises(UserError, match="plain floating-point arrays"):
        load_legacy_pkl(path, [(2,)])


def test_npz_shapes_are_checked_before_any_array_is_read(tmp_path) -> None:
    """A wrong network is refused from the headers alone: the damaged data is never reached."""
    net = ConvNet(n_way=5)
    path = tmp_path / "best.npz"
    save_checkpoint(path, Checkpoint(net.init_params(0), {"network": net.config()}))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside conv weights: reading them would fail the CRC
    path.write_bytes(bytes(data))
    other = shapes(ConvNet(n_way=20).init_params(0))
    with pytest.raises(UserError, match="parameter shapes"):
        load_checkpoint(path, other)
    with pytest.raises(UserError, match="CRC"):
        load_checkpoint(path, shapes(net.init_params(0)))


def test_npz_round_trip_is_exact_for_every_float_width(tmp_path) -> None:
    params = {"a": np.ones(3, np.float16), "b": ARRAYS[3], "c": ARRAYS[4]}
    save_checkpoint(tmp_path / "x.npz", Checkpoint(params, {"network": {}}))
    loaded = load_checkpoint(tmp_path / "x.npz").params
    assert_bitwise_equal(list(loaded.values()), list(params.values()))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_legacy_pickle_that_runs_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([np.zeros(2), _Exploit()]))
    with pytest.raises(UserError, match="refusing"):
        load_legacy_pkl(path, [(2,)])
    assert not (tmp_path / "should_not_exist").exists()


def test_atomic_writes_give_ordinary_file_permissions(tmp_path) -> None:
    net = ConvNet(n_way=5)
    path = tmp_path / "best.npz"
    save_checkpoint(path, Checkpoint(net.init_params(0), {"network": net.config()}))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    ("config_text", "fragment"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"dataset": "omniglot"}', "lacks"),
        (json.dumps({**run_config(Path("data")), "network": {"kind": "conv"}}), "network"),
        (None, "lacks 'epochs'"),
    ],
)
def test_legacy_pickle_needs_a_sound_config_beside_it(tmp_path, config_text, fragment) -> None:
    if config_text is None:  # complete but for one flag: written by another version
        config = run_config(tmp_path)
        del config["epochs"]
        config_text = json.dumps(config)
    (tmp_path / "config.json").write_text(config_text)
    export_legacy_pkl(tmp_path / "best.pkl", ConvNet(n_way=5).init_params(0))
    with pytest.raises(UserError, match=fragment):
        load_checkpoint(tmp_path / "best.pkl")


def test_legacy_pickle_beside_a_sound_config_loads_named(tmp_path) -> None:
    params = ConvNet(n_way=5).init_params(0)
    (tmp_path / "config.json").write_text(json.dumps(run_config(tmp_path)))
    export_legacy_pkl(tmp_path / "best.pkl", params)
    loaded = load_checkpoint(tmp_path / "best.pkl", shapes(params))
    assert list(loaded.params) == list(params)
    assert_bitwise_equal(list(loaded.params.values()), list(params.values()))
    assert loaded.meta["config"]["n_way"] == 5


# -- --resume with a damaged run folder, evaluate.py's search and flags --------------------------


def adam_state(params: dict) -> dict[str, np.ndarray]:
    shapes_ = make_variant("maml").optimizer_shapes(shapes(params))
    return {key: np.zeros(shape, np.float32) for key, shape in shapes_.items()}


def resumable_run(folder: Path, data_dir: Path, **changes) -> Path:
    """A run folder as train.py leaves it (config.json, last.npz), with ``changes`` to last.npz:
    ``meta`` entries, ``state`` entries (``...`` deletes one), or ``optimizer`` replaced."""
    run = folder / "run"
    run.mkdir()
    config = {**run_config(data_dir), "run_name": "run", "work_dir": str(folder), "epochs": 3}
    (run / "config.json").write_text(json.dumps(config))
    params = ConvNet(n_way=5).init_params(0)
    state = {**asdict(TrainState()), **changes.get("state", {})}
    state = {k: v for k, v in state.items() if v is not ...}
    meta = {"network": ConvNet(n_way=5).config(), "algo": "maml", "config": config, "state": state}
    meta.update(changes.get("meta", {}))
    optimizer = changes.get("optimizer", adam_state(params))
    save_checkpoint(run / "last.npz", Checkpoint(params, meta, optimizer))
    return run


def test_optimizer_shapes_are_what_the_optimizers_keep() -> None:
    """The resume check's idea of Adam and SGD state, against the optimisers' after one step."""

    from metalearn.learning.learner import make_parameters

    arrays = ConvNet(n_way=5).init_params(0)
    for algo in ("maml", "reptile"):
        params = make_parameters(arrays)
        optimizer = make_variant(algo).make_optimizer(params)
        optimizer.step({k: p * 2 for k, p in params.items()})
        kept = {k: v.shape for k, v in optimizer.state_dict().items()}
        assert kept == make_variant(algo).optimizer_shapes(shapes(arrays)), algo


def test_resume_accepts_a_genuine_run_folder(omniglot_dir, tmp_path) -> None:
    run = resumable_run(tmp_path, omniglot_dir, state={"iteration": 2})
    assert Trainer(prepare_config({"resume": str(run)})).state.iteration == 2


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"meta": {"format": 7}}, "format 7"),
        ({"optimizer": {}}, "optimiser state"),
        ({"state": {"iteration": ...}}, "no training state"),
        ({"state": {"momentum": 1.0}}, "no training state"),
        ({"state": {"iteration": "3"}}, "iteration='3'"),
        ({"meta": {"state": [1]}}, "no training state"),
        ({"meta": {"network": {"kind": "conv", "n_way": 20}}}, "n_way=20"),
    ],
)
def test_resume_refuses_a_last_npz_of_another_version(
    omniglot_dir, tmp_path, changes, fragment
) -> None:
    run = resumable_run(tmp_path, omniglot_dir, **changes)
    with pytest.raises(UserError, match=re.escape(fragment)):
        Trainer(prepare_config({"resume": str(run)}))


def test_resume_refuses_a_missing_optimizer_moment(omniglot_dir, tmp_path) -> None:
    optimizer = adam_state(ConvNet(n_way=5).init_params(0))
    del optimizer["head.bias_moment1_0"]
    run = resumable_run(tmp_path, omniglot_dir, optimizer=optimizer)
    with pytest.raises(UserError, match="optimiser state"):
        Trainer(prepare_config({"resume": str(run)}))


@pytest.mark.parametrize(
    ("config_text", "fragment"),
    [
        ("{truncated", "not JSON"),
        ('"a string"', "not a JSON object"),
        ('{"dataset": "omniglot", "network": {}}', "lacks"),
        (None, "n_way='5'"),
    ],
)
def test_resume_refuses_a_damaged_config(omniglot_dir, tmp_path, config_text, fragment) -> None:
    run = resumable_run(tmp_path, omniglot_dir)
    if config_text is None:
        config_text = json.dumps({**json.loads((run / "config.json").read_text()), "n_way": "5"})
    (run / "config.json").write_text(config_text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        prepare_config({"resume": str(run)})


def test_find_run_skips_junk_configs_of_other_runs(tmp_path) -> None:
    for name, text in {
        "not_json": "{oops",
        "a_list": "[]",
        "n_way_text": json.dumps({**run_config(tmp_path), "n_way": "5"}),
        "deep": "[" * 100_000,
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        (tmp_path / name / "best.npz").write_bytes(b"")
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(run_config(tmp_path)))
    (good / "best.npz").write_bytes(b"")
    assert find_run(tmp_path, "omniglot", 5, 1) == good


def test_a_negative_seed_is_refused_by_evaluate_and_train(omniglot_dir, tmp_path) -> None:
    """numpy's seed sequences refuse negative entropy with a traceback."""
    flags = ["--seed", "-1", "--data_dir", str(omniglot_dir), "--work_dir", str(tmp_path)]
    with pytest.raises(UserError, match="--seed must be a non-negative integer"):
        evaluate(vars(evaluate_parser().parse_args(flags)))
    with pytest.raises(UserError, match="--seed must be a non-negative integer"):
        prepare_config({"seed": -1, "data_dir": str(omniglot_dir), "work_dir": str(tmp_path)})


def test_a_pickle_larger_than_the_network_is_refused_unparsed(tmp_path) -> None:
    """The unpickler builds an object per opcode: the file size is what bounds its memory."""
    path = tmp_path / "flood.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * 100_000 + b".")  # 100 000 empty lists
    with pytest.raises(UserError, match="larger than the network"):
        load_legacy_pkl(path, [(64, 5)])


@pytest.mark.slow
def test_train_script_resume_of_another_version_is_one_line(omniglot_dir, tmp_path) -> None:
    run = resumable_run(tmp_path, omniglot_dir, state={"momentum": 0.9})
    result = run_script("train.py", "--resume", str(run))
    assert result.returncode == 2
    assert_one_line_error(result, "training state")


@pytest.mark.slow
def test_evaluate_script_negative_seed_is_one_line(omniglot_dir, tmp_path) -> None:
    result = run_script("evaluate.py", "--seed", "-1", "--data_dir", str(omniglot_dir))
    assert result.returncode == 2
    assert_one_line_error(result, "--seed")


def test_a_compressed_checkpoint_loads_exactly(tmp_path) -> None:
    """np.savez_compressed of the same members (deflate, read through a bounded reader)."""
    params = ConvNet(n_way=5).init_params(0)
    meta = json.dumps({"format": 1, "network": ConvNet(n_way=5).config()})
    arrays = {f"param:{k}": v for k, v in params.items()}
    np.savez_compressed(tmp_path / "small.npz", meta=np.array(meta), **arrays)
    loaded = load_checkpoint(tmp_path / "small.npz", shapes(params))
    assert_bitwise_equal(list(loaded.params.values()), list(params.values()))


def test_evaluation_takes_flags_an_older_checkpoint_lacks_from_the_defaults(
    omniglot_dir, tmp_path
) -> None:
    config = run_config(omniglot_dir)
    del config["kernels"]  # a flag added after the run was trained
    net = ConvNet(n_way=5)
    meta = {"network": net.config(), "algo": "maml", "config": config}
    save_checkpoint(tmp_path / "run" / "best.npz", Checkpoint(net.init_params(0), meta))
    flags = ["--ckpt", str(tmp_path / "run" / "best.npz"), "--data_dir", str(omniglot_dir)]
    results = evaluate(vars(evaluate_parser().parse_args([*flags, "--tasks", "2"])))
    assert results["tasks"] == 2
