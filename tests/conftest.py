"""Shared fixtures: the repository root, the Omniglot source, packed Omniglot arrays, and the
oneDNN kernels installed for a module (``fast``).

Omniglot is found where the README's first command (``python make_data.py``) puts it, unless an
environment variable points elsewhere:

* ``OMNIGLOT_SOURCE``: folder with images_background.zip / images_evaluation.zip (or extracted);
  default ``data/omniglot`` in the repository, then ``../shared/data/omniglot`` next to it.
* ``MAML_DATA_DIR``: folder already holding the packed .npy files + manifest (CI packs once);
  default the repository folder (make_data.py's default ``--out``); otherwise the arrays are
  packed from the source once per test session.

A data test that cannot find its data is skipped with the reason (listed by ``-rs``, the default).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metalearn.data import omniglot
from metalearn.kernels import onednn

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKED_FILES = [*(omniglot.npy_name(split) for split in omniglot.SPLITS), omniglot.MANIFEST_NAME]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def find_source() -> tuple[Path | None, str]:
    """The Omniglot source folder (or None) and where it was looked for."""
    given = os.environ.get("OMNIGLOT_SOURCE")
    if given:
        candidates = [Path(given)]
    else:  # where `python make_data.py` downloads it, then a checkout-independent shared copy
        candidates = [
            REPO_ROOT / omniglot.DEFAULT_SOURCE,
            REPO_ROOT.parent / "shared/data/omniglot",
        ]
    for source in candidates:
        if source.is_dir() and not omniglot.missing_sets(source):
            return source, ""
    looked = " or ".join(map(str, candidates))
    return None, f"no images_background + images_evaluation in {looked}"


def find_packed() -> tuple[Path | None, str]:
    """A folder with all packed files (or None) and where they were looked for."""
    given = os.environ.get("MAML_DATA_DIR")
    folder = Path(given) if given else REPO_ROOT
    if all((folder / name).is_file() for name in PACKED_FILES):
        return folder, ""
    return None, f"no packed {', '.join(PACKED_FILES)} in {folder}"


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The real Omniglot source folder, or skip saying where it was looked for."""
    source, looked = find_source()
    if source is None:
        pytest.skip(
            f"Omniglot source not found: {looked} (run `python make_data.py` or set "
            "OMNIGLOT_SOURCE)"
        )
    return source


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with omniglot_{train,val,test}.npy + manifest (default split and seed)."""
    packed, missing_packed = find_packed()
    if packed is not None:
        return packed
    source, missing_source = find_source()
    if source is None:
        pytest.skip(
            f"packed Omniglot not found: {missing_packed}, and {missing_source} to pack from "
            "(run `python make_data.py` or set MAML_DATA_DIR / OMNIGLOT_SOURCE)"
        )
    out = tmp_path_factory.mktemp("omniglot")
    omniglot.pack(source, out)
    return out


@pytest.fixture(scope="module")
def fast():
    """The oneDNN kernels in use for the module's tests (skipped where they cannot be built)."""
    if onednn.load_kernels() is None:
        pytest.skip("the oneDNN kernels could not be built here")
    onednn.use_kernels("fast")
    yield
    onednn.use_kernels("native")
