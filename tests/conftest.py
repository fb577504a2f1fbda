"""Shared fixtures: the repository root, the Omniglot source, and packed Omniglot arrays.

* ``OMNIGLOT_SOURCE``: folder with images_background.zip / images_evaluation.zip (or extracted)
  (default ``../shared/data/omniglot`` next to the repository).
* ``MAML_DATA_DIR``: folder already holding the packed .npy files + manifest (CI packs once);
  otherwise the arrays are packed from the source once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metalearn import omniglot

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKED_FILES = [*(omniglot.npy_name(split) for split in omniglot.SPLITS), omniglot.MANIFEST_NAME]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The real Omniglot source folder, or skip."""
    source = Path(os.environ.get("OMNIGLOT_SOURCE", REPO_ROOT.parent / "shared/data/omniglot"))
    if not source.is_dir() or omniglot.missing_sets(source):
        pytest.skip(f"Omniglot source not found at {source} (set OMNIGLOT_SOURCE)")
    return source


@pytest.fixture(scope="session")
def omniglot_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with omniglot_{train,val,test}.npy + manifest (default split and seed)."""
    packed = os.environ.get("MAML_DATA_DIR")
    if packed and all((Path(packed) / name).is_file() for name in PACKED_FILES):
        return Path(packed)
    source = request.getfixturevalue("omniglot_source")
    out = tmp_path_factory.mktemp("omniglot")
    omniglot.pack(source, out)
    return out
