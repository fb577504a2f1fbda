"""Recorded runs (work_dir/runs.sqlite):  python runs.py list | show NAME | compare A B | plot NAME
| delete NAME [--yes] [--files] [--force], each with --work_dir (default work)."""

from metalearn.errors import run_cli
from metalearn.runs.cli import main

if __name__ == "__main__":
    run_cli(main)
