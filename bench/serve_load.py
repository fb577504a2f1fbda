"""Bounded load test of the playground's ``POST /api/adapt`` on loopback.

    python bench/serve_load.py [--url URL --run NAME] [--work_dir DIR --run NAME]
                               [--data_dir DIR] [--requests 20] [--clients 1 4 16] [--json FILE]

Without ``--url`` it starts ``serve.py`` itself on a free loopback port (on ``--work_dir``, or on
a fresh folder where it first trains a tiny 5-way 1-shot run for two iterations). Each client
sends 5-way 1-shot tasks (5 queries, 5 steps) drawn from the test split, one request at a time,
until it has ``--requests`` answers or ``--max_seconds`` pass; a 503 waits for its Retry-After
and tries again. The table gives, per number of concurrent clients, the p50 and p95 latency of
the successful requests, the status counts and the transport errors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = [
    "--n_way=5",
    "--k_spt=1",
    "--k_query=2",
    "--task_num=2",
    "--glob_update_step=1",
    "--glob_update_step_test=5",
    "--glob_base_lr=0.4",
    "--val_tasks=3",
    "--epochs=2",
    "--run_name=load",
]


def call(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of one GET (no body) or POST."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(work_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, str(REPO / "serve.py"), f"--port={port}"]
    argv += [f"--work_dir={work_dir}", f"--data_dir={data_dir}"]
    server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: serve.py exited with {server.returncode}")
        try:
            call(f"{url}/api/flags", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("error: serve.py did not answer within 120 s")


def train_tiny(work_dir: Path, data_dir: Path) -> str:
    argv = [sys.executable, str(REPO / "train.py"), *TINY_RUN]
    argv += [f"--work_dir={work_dir}", f"--data_dir={data_dir}"]
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    return "load"


def task_bodies(url: str, run: str, count: int) -> list[dict]:
    """Distinct 5-way 1-shot tasks (5 queries, 5 steps) from the server's test split."""
    bodies = []
    for seed in range(count):
        status, task, _ = call(f"{url}/api/playground/random_task?run={run}&seed={seed}")
        if status != 200:
            raise SystemExit(f"error: random_task answered {status}: {task}")
        if (task["n_way"], task["k_spt"]) != (5, 1):
            raise SystemExit(f"error: run {run} is {task['n_way']}-way {task['k_spt']}-shot")
        query = [item["image"] for item in task["query"]]
        bodies.append({"run": run, "support": task["support"], "query": query, "steps": 5})
    return bodies


def client(url: str, bodies: list[dict], requests: int, deadline: float, out: dict) -> None:
    done = attempts = 0
    while done < requests and attempts < 3 * requests and time.monotonic() < deadline:
        attempts += 1
        started = time.perf_counter()
        try:
            status, _, headers = call(f"{url}/api/adapt", bodies[attempts % len(bodies)])
        except OSError as error:
            out["errors"].append(str(error))
            continue
        elapsed = time.perf_counter() - started
        out["status"][status] = out["status"].get(status, 0) + 1
        if status == 200:
            out["latencies"].append(elapsed)
            done += 1
        elif status in (429, 503):
            time.sleep(float(headers.get("Retry-After", "1")))


def load_level(url: str, bodies: list[dict], clients: int, requests: int, seconds: float) -> dict:
    results = [{"latencies": [], "status": {}, "errors": []} for _ in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(url, bodies, requests, deadline, results[i]))
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(v for r in results for v in r["latencies"])
    status: dict[int, int] = {}
    for result in results:
        for code, count in result["status"].items():
            status[code] = status.get(code, 0) + count
    return {
        "clients": clients,
        "ok": status.get(200, 0),
        "busy_503": status.get(503, 0) + status.get(429, 0),
        "other": sum(c for code, c in status.items() if code not in (200, 429, 503)),
        "errors": sum(len(r["errors"]) for r in results),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1)
        if latencies
        else None,
        "answers_per_s": round(status.get(200, 0) / wall, 2),
    }


def print_table(rows: list[dict]) -> None:
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(row[h]).rjust(w) for h, w in zip(header, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one on loopback)")
    parser.add_argument("--run", help="a 5-way 1-shot run with best.npz (default: train one)")
    parser.add_argument("--work_dir", help="work_dir for the started server")
    parser.add_argument("--data_dir", default=os.environ.get("MAML_DATA_DIR", "."))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=20, help="answers per client")
    parser.add_argument("--max_seconds", type=float, default=120.0, help="per level")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.url and not args.run:
        parser.error("--url needs --run")
    server = None
    with tempfile.TemporaryDirectory() as scratch:
        url, run = args.url, args.run
        if url is None:
            work_dir = Path(args.work_dir or scratch).resolve()
            if run is None:
                run = train_tiny(work_dir, Path(args.data_dir).resolve())
            server, url = start_server(work_dir, Path(args.data_dir).resolve())
        try:
            bodies = task_bodies(url, run, 8)
            call(f"{url}/api/adapt", bodies[0], timeout=120)  # warm-up: loads the run
            rows = [
                load_level(url, bodies, n, args.requests, args.max_seconds) for n in args.clients
            ]
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
    print(f"POST /api/adapt, 5-way 1-shot, 5 queries, 5 steps, run {run}, {url}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
