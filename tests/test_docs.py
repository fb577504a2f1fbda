"""The documentation stays true to the repository: links resolve, the README's commands are CI's.

The README is a front page and ``docs/`` holds one page per topic, linked from each other; files
and headings get renamed, so every relative link and image is checked here (GitHub's anchor rule
for ``#heading`` links). The README's test command is what ``.ci/run`` runs, so a newcomer who
copies it gets what CI checks. Docs are published, so they must not name paths of the machine
they were written on. These tests only read text; nothing runs on Paddle.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CI_SCRIPT = REPO_ROOT / ".ci" / "run"
FRONT_PAGE_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)")
# [text](target) and ![alt](target); the target may carry a "title". Nested brackets in the
# text (an image inside a link) are rare enough here to be left out.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SOURCE = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SKIPPED_SCHEMES = ("http://", "https://", "mailto:")
# An absolute path of a machine: /work/, /root/, /home/, /tmp/ not preceded by a name or a path
# component (so `work/runs.sqlite`, `../work/` and `/api/runs` are not matches).
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp)/")


def prose_lines(text: str, keep_inline_code: bool = False) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks. Inline code is removed unless kept: links
    in code are commands and examples, not links, but a heading's `code` is part of its anchor."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append((number, line if keep_inline_code else re.sub(r"`[^`]*`", "", line)))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than ``-`` and
    ``_`` dropped, spaces turned into ``-`` (no collapsing)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images → their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated headings get ``-1``, ``-2`` as on
    GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8"), keep_inline_code=True):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link, image and HTML ``src``/``href``."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (LINK, HTML_SOURCE):
            found += [(number, match.group(1)) for match in pattern.finditer(line)]
    return found


def broken_links(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """The relative links of one markdown file that name no file, or no heading of it."""
    problems = []
    for number, target in links(path):
        if target.startswith(SKIPPED_SCHEMES):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root).as_posix()}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where} (no heading with anchor #{anchor})")
    return problems


def test_the_anchor_rule_is_githubs() -> None:
    assert github_anchor("train.py flags") == "trainpy-flags"
    assert github_anchor("MAML++ against MAML, 5-way 1-shot") == "maml-against-maml-5-way-1-shot"
    assert (
        github_anchor("Do not set `MKL_DEBUG_CPU_TYPE` on AMD")
        == "do-not-set-mkl_debug_cpu_type-on-amd"
    )
    assert github_anchor("Memory: how many tasks to stack") == "memory-how-many-tasks-to-stack"


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """A checker that finds nothing proves nothing: it must flag a missing file and anchor."""
    (tmp_path / "other.md").write_text("# Real heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#nope) [self](#top)\n"
        "`[code](not-checked.md)`\n```\n[block](not-checked.md)\n```\n# Top\n",
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md:1: missing.md (no such file)",
        "page.md:1: other.md#nope (no heading with anchor #nope)",
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_relative_links_and_images_resolve(path: Path) -> None:
    assert broken_links(path) == []


CONFLICT_MARKER = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.MULTILINE)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_no_merge_conflict_markers_are_left(path: Path) -> None:
    assert CONFLICT_MARKER.findall(path.read_text()) == []


def test_the_conflict_marker_check_sees_one() -> None:
    assert CONFLICT_MARKER.findall("text\n<<<<<<< HEAD\na\n=======\nb\n>>>>>>> branch\n")


def test_every_figure_is_shown_somewhere() -> None:
    """A figure in docs/img that no page shows is either lost documentation or dead weight."""
    shown = {
        (path.parent / target.partition("#")[0]).resolve()
        for path in DOCS
        for _, target in links(path)
    }
    unused = [
        image.relative_to(REPO_ROOT).as_posix()
        for image in sorted((REPO_ROOT / "docs" / "img").iterdir())
        if image.resolve() not in shown
    ]
    assert unused == []


def test_readme_is_a_front_page() -> None:
    """Details belong in docs/: the README is read in five minutes."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= FRONT_PAGE_MAX_LINES


def readme_test_command() -> str:
    """The README's command that runs pytest (in a fenced bash block)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, (
        f"expected one pytest command in the README's bash blocks: {commands}"
    )
    return commands[0].strip()


def ci_commands() -> list[str]:
    """.ci/run's command lines, comments and blank lines dropped."""
    lines = CI_SCRIPT.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_readme_test_command_is_what_ci_runs() -> None:
    """CI's last command is the README's pytest call, after installing the same requirements."""
    install, _, pytest_part = readme_test_command().partition("&&")
    assert pytest_part.strip() == "python -m pytest -q"
    assert ci_commands()[-1] == pytest_part.strip()

    words = shlex.split(install)
    assert words[:3] == ["pip", "install", "-r"], install
    requirements = words[3]
    assert (REPO_ROOT / requirements).is_file()
    ci_installs = []
    for line in ci_commands():
        words = line.split()  # shell lines with continuations are not for shlex; pip's are plain
        if "pip" in words and "install" in words and "-r" in words:
            ci_installs.append(words[words.index("-r") + 1])
    assert ci_installs == [requirements]


def test_readme_requirements_files_exist() -> None:
    """Every `pip install -r FILE` the README tells a newcomer to run names a file that exists."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for requirements in re.findall(r"pip install -r ([\w./-]+)", text):
        assert (REPO_ROOT / requirements).is_file(), requirements


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_no_machine_paths(path: Path) -> None:
    """Published docs must not name where they were written (home folders, scratch folders)."""
    found = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if MACHINE_PATH.search(line)
    ]
    assert found == []


def test_machine_path_pattern() -> None:
    for named in ("/work/main", "see /root/.cache", "(/home/user/x)", "`/tmp/docs`"):
        assert MACHINE_PATH.search(named), named
    for fine in ("work/runs.sqlite", "../work/x", "/api/runs/NAME", "~/.cache/x", "data/tmp/"):
        assert not MACHINE_PATH.search(fine), fine
