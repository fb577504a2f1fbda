"""Checkpoints: round trip, atomic writes, refusal of mismatched or unsafe files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from metalearn.checkpoint import (
    Checkpoint,
    check_compatible,
    export_legacy_pkl,
    load_checkpoint,
    load_legacy_pkl,
    save_checkpoint,
)
from metalearn.errors import UserError
from metalearn.nets import ConvNet


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


def test_legacy_pickle_round_trip(tmp_path) -> None:
    params = ConvNet(n_way=5).init_params(0)
    export_legacy_pkl(tmp_path / "best.pkl", params)
    arrays = load_legacy_pkl(tmp_path / "best.pkl")
    assert [a.shape for a in arrays] == [v.shape for v in params.values()]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_legacy_pickle_that_runs_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([np.zeros(2), _Exploit()]))
    with pytest.raises(UserError, match="refusing"):
        load_legacy_pkl(path)
    assert not (tmp_path / "should_not_exist").exists()


def test_atomic_writes_give_ordinary_file_permissions(tmp_path) -> None:
    net = ConvNet(n_way=5)
    path = tmp_path / "best.npz"
    save_checkpoint(path, Checkpoint(net.init_params(0), {"network": net.config()}))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
