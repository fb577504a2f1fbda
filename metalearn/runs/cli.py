"""The commands of runs.py: list, show, compare, plot and delete recorded runs (see records.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from metalearn.errors import UserError
from metalearn.metrics import metric_named
from metalearn.runs.names import check_run_name, check_work_dir
from metalearn.runs.records import RunRecords, remove_run


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        description="List, inspect, compare, plot and delete the runs recorded in "
        "work_dir/runs.sqlite."
    )
    main.add_argument("--work_dir", default="work", help="where runs live (default work)")
    common = argparse.ArgumentParser(add_help=False)  # --work_dir also after the command
    common.add_argument(
        "--work_dir", default=argparse.SUPPRESS, help="where runs live (default work)"
    )
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", parents=[common], help="one line per run")
    show = commands.add_parser("show", parents=[common], help="everything recorded for one run")
    show.add_argument("name")
    compare = commands.add_parser(
        "compare", parents=[common], help="runs side by side, and one plot of their curves"
    )
    compare.add_argument("names", nargs="+", metavar="NAME")
    compare.add_argument(
        "--out",
        help="PNG path, or an existing folder to write compare_<names>.png into "
        "(default work_dir/compare_<names>.png)",
    )
    plot = commands.add_parser("plot", parents=[common], help="a run's curves as a PNG")
    plot.add_argument("name")
    plot.add_argument(
        "--out",
        help="PNG path, or an existing folder to write <name>_curves.png into "
        "(default work_dir/<name>/curves.png)",
    )
    delete = commands.add_parser(
        "delete",
        parents=[common],
        help="remove a run's record (refused while it trains or is evaluated)",
    )
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.add_argument(
        "--files",
        action="store_true",
        help="also remove its run folder (first: if that fails, the record is kept)",
    )
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete even though the record says a process is training or evaluating the run "
        "(for when that process is gone but this cannot be told, e.g. on another host)",
    )
    return main


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_work_dir(args.work_dir)
    for name in [*getattr(args, "names", []), *([args.name] if "name" in args else [])]:
        check_run_name(name)
    records = RunRecords(args.work_dir, create=False)
    if args.command == "list":
        list_runs(records)
        return
    if not records.exists():
        raise UserError(f"no runs recorded in {args.work_dir}/ yet ({records.path} is missing)")
    if args.command == "show":
        show(records, args.name)
    elif args.command == "compare":
        compare(records, args.names, args.out)
    elif args.command == "plot":
        plot(records, args.name, args.out)
    elif args.command == "delete":
        delete(records, args.name, args.yes, args.files, args.force)


# -- formatting ----------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _shape(run: dict) -> str:
    if run.get("dataset") == "sinusoid":
        return f"K={run.get('k_spt')}"
    return f"{run.get('n_way')}w/{run.get('k_spt')}s"


def _iterations(run: dict) -> str:
    return f"{run.get('completed_iterations') or 0}/{run.get('planned_iterations') or '?'}"


def _best(run: dict) -> str:
    if run.get("best_score") is None:
        return "-"
    return f"{run['best_score']:.4f} @{run['best_iteration']}"


def _status(run: dict) -> str:
    return f"{run['status']}, testing" if run.get("testing") else run["status"]


def _latest_test(run: dict) -> dict | None:
    complete = [e for e in run["evaluations"] if e["status"] == "complete"]
    return complete[-1] if complete else None


def _out_path(out: str | None, default: Path, file_name: str) -> Path:
    """``--out``: a PNG path, or an existing folder to put ``file_name`` in; default if not given."""
    if not out:
        return default
    path = Path(out)
    return path / file_name if path.is_dir() else path


def _test(evaluation: dict | None) -> str:
    if not evaluation or not evaluation["mean"]:
        return "-"
    return f"{evaluation['mean'][-1]:.4f} ± {evaluation['ci95'][-1]:.4f}"


def _metric(run: dict) -> str:
    known = metric_named(run.get("metric"))
    return known.key if known else run.get("metric") or "?"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
    )


def _steps(values: Sequence[float], ci: Sequence[float] | None = None) -> str:
    if ci is None:
        return " ".join(f"{v:.4f}" for v in values)
    return " ".join(f"{m:.4f}±{c:.4f}" for m, c in zip(values, ci))


LIST_HEADER = ("name", "algo", "n_way/k_spt", "status", "iterations", "metric", "best val", "test")


def list_row(run: dict) -> list[str]:
    """The cells of one run in ``runs.py list`` (and the service's runs table), by LIST_HEADER."""
    return [
        run["name"],
        run.get("algo") or "-",
        _shape(run),
        _status(run),
        _iterations(run),
        _metric(run),
        _best(run),
        _test(run["test"]),
    ]


# -- commands ------------------------------------------------------------------------------------
def list_runs(records: RunRecords) -> None:
    if not records.exists():
        print(f"no runs recorded in {records.work_dir}/ yet")
        return
    runs = records.list_runs()
    if not runs:
        print(f"no runs recorded in {records.work_dir}/")
        return
    rows = [list_row(run) for run in runs]
    print(_table(LIST_HEADER, rows))


def show(records: RunRecords, name: str) -> None:
    run = records.get_run(name)
    metric = run.get("metric") or "metric"
    direction = "higher" if run["higher_is_better"] else "lower"
    fields = [
        ("run", f"{run['name']} (id {run['id']})"),
        ("status", _status(run)),
        ("error", run.get("error") or "-"),
        ("dataset", f"{run.get('dataset')} {_shape(run)}, k_query {run.get('k_query')}"),
        ("algo", run.get("algo")),
        ("iterations", f"{_iterations(run)} (elapsed {_num(run.get('elapsed_seconds'), 1)} s)"),
        (
            "best val",
            f"{metric} {_num(run.get('best_score'))} at iteration {run.get('best_iteration')} "
            f"({direction} is better)",
        ),
        ("started", run.get("started_at") or "-"),
        ("updated", run.get("updated_at") or "-"),
        ("ended", run.get("ended_at") or "-"),
        ("host / pid", f"{run.get('host') or '-'} / {run.get('pid') or '-'}"),
        ("heartbeat", run.get("heartbeat_at") or "-"),
        ("paddle", f"{run.get('paddle_version') or '-'} on {run.get('device') or '-'}"),
        ("git commit", run.get("git_commit") or "-"),
        ("run folder", run.get("run_dir") or "-"),
        ("best ckpt", run.get("best_checkpoint") or "-"),
        ("last ckpt", run.get("last_checkpoint") or "-"),
    ]
    for index, command in enumerate(run["commands"]):
        label = "command" if index == 0 else "resumed"
        argv = command["argv"]
        prefix = "python " if argv and argv[0].endswith(".py") else ""
        fields.append((label, f"{prefix}{' '.join(argv)}  [{command['at']}]"))
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        print(f"{label.ljust(width)}  {value}")
    print("config")
    for key, value in run["config"].items():
        print(f"  {key} = {json.dumps(value, default=str)}")
    print(f"log ({len(run['log'])} points): iteration, meta-loss, query {metric} per inner step")
    for entry in run["log"]:
        print(
            f"  {entry['iteration']:>7}  {_num(entry['loss'])}  {_steps(entry['query_per_step'])}"
        )
    print(f"validation ({len(run['validation'])}): iteration, {metric} per inner step")
    for entry in run["validation"]:
        print(f"  {entry['iteration']:>7}  {_steps(entry['per_step'])}")
    print(f"tests ({len(run['evaluations'])}): {metric} mean ± 95% CI per inner step")
    for evaluation in run["evaluations"]:
        if evaluation["status"] != "complete":
            reason = f": {evaluation['error']}" if evaluation.get("error") else ""
            print(f"  {evaluation['created_at']}  {evaluation['status']}{reason}")
            continue
        print(
            f"  {evaluation['created_at']}  {evaluation['tasks']} tasks, seed "
            f"{evaluation['seed']}, {evaluation['steps']} steps: "
            f"{_steps(evaluation['mean'], evaluation['ci95'])}"
        )


def _slug(names: Sequence[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", "_vs_".join(names))
    return slug[:120]


def compare(records: RunRecords, names: Sequence[str], out: str | None) -> None:
    from metalearn.runs import plots

    if len(set(names)) < 2:
        raise UserError("compare needs at least two different run names")
    runs = [records.get_run(name) for name in names]
    fields = {
        "status": _status,
        "dataset": lambda r: r.get("dataset") or "-",
        "algo": lambda r: r.get("algo") or "-",
        "n_way/k_spt": _shape,
        "iterations": _iterations,
        "metric": _metric,
        "best val": _best,
        "test (last step)": lambda r: _test(_latest_test(r)),
        "last val per step": lambda r: (
            _steps(r["validation"][-1]["per_step"]) if r["validation"] else "-"
        ),
        "elapsed s": lambda r: _num(r.get("elapsed_seconds"), 1),
        "git commit": lambda r: (r.get("git_commit") or "-")[:10],
    }
    rows = [[label, *(get(run) for run in runs)] for label, get in fields.items()]
    keys = sorted({key for run in runs for key in run["config"]})
    ignore = {"run_name", "resume", "work_dir"}
    for key in keys:
        values = [json.dumps(run["config"].get(key), default=str) for run in runs]
        if key not in ignore and len(set(values)) > 1:
            rows.append([f"--{key}", *values])
    print(_table(["", *names], rows))
    metrics = {run.get("metric") for run in runs}
    file_name = f"compare_{_slug(names)}.png"
    path = _out_path(out, records.work_dir / file_name, file_name)
    plots.compare_curves(path, {run["name"]: run for run in runs}, " / ".join(sorted(metrics)))
    if len(metrics) > 1:
        print("note: these runs use different metrics", file=sys.stderr)
    print(f"plot: {path}")


def plot(records: RunRecords, name: str, out: str | None) -> None:
    from metalearn.runs import plots

    run = records.get_run(name)
    path = _out_path(out, records.work_dir / name / "curves.png", f"{name}_curves.png")
    plots.training_curves(
        path, run["log"], run["validation"], run.get("metric") or "metric", title=name
    )
    print(f"plot: {path}")


def delete(records: RunRecords, name: str, yes: bool, files: bool, force: bool) -> None:
    run = records.get_run(name)
    folder = records.work_dir / name
    what = f"the record of run {name!r} ({_status(run)}, {_iterations(run)} iterations)"
    if files:
        what += f" and its folder {folder}"
    if not yes:
        print(f"Delete {what}? [y/N] ", end="", flush=True)
        try:
            answer = sys.stdin.readline()
        except (OSError, ValueError):
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return
    remove_run(records.work_dir, name, files=files, force=force)
    print(f"deleted {what}")
