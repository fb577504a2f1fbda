"""pip install: the wheel holds every module, the C++ operator's sources and the service's pages,
and nothing else; installed into a fresh virtual environment (plain or editable), the package
works from another folder. Offline: builds use this environment's setuptools and wheel
(``--no-build-isolation``), and the fresh environments see its site-packages through a .pth file
for Paddle and numpy (``--no-deps``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "metalearn"
pytestmark = pytest.mark.slow


def pip(*args: str, python: str = sys.executable) -> None:
    """The running environment's pip, installing into ``python``'s environment."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    result = subprocess.run(
        [*command, *args, "--no-index"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr


def source_copy(folder: Path) -> Path:
    """What a source distribution holds, copied, so that building writes nothing into the
    checkout."""
    shutil.copytree(PACKAGE, folder / "metalearn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    source = source_copy(folder / "source")
    pip("wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(folder / "dist"))
    (built,) = (folder / "dist").glob("*.whl")
    return built


def fresh_venv(folder: Path) -> str:
    """A new virtual environment (no pip) that also sees this one's packages, after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = str(folder / "bin" / "python")
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own, "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def files_in_checkout(*patterns: str) -> set[str]:
    return {
        path.relative_to(REPO_ROOT).as_posix()
        for pattern in patterns
        for path in PACKAGE.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def requirements(name: str) -> set[str]:
    """The requirement lines of a requirements file (no comments, no ``-r``)."""
    lines = (REPO_ROOT / name).read_text(encoding="utf-8").splitlines()
    stripped = (line.split("#")[0].strip() for line in lines)
    return {line for line in stripped if line and not line.startswith("-r")}


def test_the_wheel_holds_the_package_its_sources_and_pages_only(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    package = {name for name in names if not name.startswith(info)}
    modules = files_in_checkout("**/*.py")
    data = files_in_checkout("kernels/csrc/*.cc", "kernels/csrc/*.h", "service/static/**/*")
    assert "metalearn/kernels/csrc/conv.cc" in data  # csrc/ split by operator family
    assert "metalearn/service/static/index.html" in data
    assert "metalearn/data/tasks.py" in modules  # every sub-package, data/ included
    assert package == modules | data  # no tests/, bench/, entry-point scripts or build files


def test_the_wheel_depends_on_what_the_requirements_files_list(wheel) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    required = [line.removeprefix("Requires-Dist: ") for line in lines if "Requires-Dist" in line]
    extras = {}
    for line in required:
        requirement, _, marker = line.partition("; extra == ")
        extras.setdefault(marker.strip('"'), set()).add(requirement)
    assert extras[""] == requirements("requirements.txt")
    assert extras["dev"] == requirements("requirements-dev.txt")
    assert extras["bench"] == requirements("requirements-bench.txt")
    assert extras["rl"] == requirements("requirements-rl.txt")
    assert {r.split(">=")[0] for r in extras["rl"]} == {"gymnasium", "mujoco", "imageio"}


CHECK_INSTALL = """
import metalearn
from metalearn.kernels import onednn
from metalearn.nets.spec import load_spec_file
from metalearn.service.app import STATIC_DIR
print(metalearn.__file__)
print((onednn.SOURCE_DIR / "conv.cc").is_file(), (STATIC_DIR / "index.html").is_file())
print(onednn.cache_root())
print(onednn.load_kernels() is not None)
"""


def run_installed(python: str, folder: Path) -> list[str]:
    """CHECK_INSTALL's lines, run by ``python`` in ``folder`` (outside the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [python, "-c", CHECK_INSTALL],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def kernels_here() -> bool:
    """Whether the oneDNN operator builds and loads in this environment (needs a C++ compiler)."""
    from metalearn.kernels import onednn

    return onednn.load_kernels() is not None


def test_an_installed_copy_works_from_another_folder(wheel, tmp_path, kernels_here) -> None:
    python = fresh_venv(tmp_path / "venv")
    pip("install", "--no-deps", str(wheel), python=python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    module, found, cache, loaded = run_installed(python, elsewhere)
    assert Path(module).is_relative_to(tmp_path / "venv")  # not the checkout's copy
    assert found == "True True"  # the C++ sources and the pages, beside the installed modules
    assert not Path(cache).is_relative_to(tmp_path / "venv")  # builds go to a user cache
    assert loaded == str(kernels_here)  # built from (or found for) the installed sources


def test_an_editable_install_runs_the_source_folder(tmp_path) -> None:
    source = source_copy(tmp_path / "source")
    python = fresh_venv(tmp_path / "venv")
    pip("install", "--no-deps", "--no-build-isolation", "-e", str(source), python=python)
    module, found, *_ = run_installed(python, tmp_path)
    assert Path(module) == source / "metalearn" / "__init__.py"
    assert found == "True True"
