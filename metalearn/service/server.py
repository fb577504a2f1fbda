"""serve.py's flags, the loopback-or-token rule, and uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence

from metalearn.errors import UserError
from metalearn.service.settings import Settings


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        description="Serve the runs API, the runs pages and the few-shot playground."
    )
    main.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    main.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    main.add_argument("--work_dir", default="work", help="where runs live (default work)")
    main.add_argument("--data_dir", default=".", help="folder with the packed Omniglot .npy")
    main.add_argument("--jobs", type=int, default=1, help="jobs run at once (default 1)")
    main.add_argument(
        "--token", help="require 'Authorization: Bearer TOKEN' (or open /?token=TOKEN once)"
    )
    return main


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings_from(args: argparse.Namespace) -> Settings:
    """Checked settings: a non-loopback address needs a token; counts must be positive."""
    if not is_loopback(args.host) and not args.token:
        raise UserError(
            f"--host {args.host} is reachable from other machines: set --token too "
            "(every request must then send it)"
        )
    if args.token is not None and len(args.token) < 8:
        raise UserError("--token must have at least 8 characters")
    if args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    return Settings.create(args.work_dir, args.data_dir, jobs=args.jobs, token=args.token)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from metalearn.service.app import create_app

    args = parser().parse_args(argv)
    settings = settings_from(args)
    print(f"serving {settings.work_dir} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
