"""The runs service and few-shot playground:  python serve.py [--port 8000] [--token T]."""

from metalearn.runtime import tune_allocator


def main() -> None:
    # Imported here so that Paddle loads only after tune_allocator() has re-executed us.
    from metalearn.errors import run_cli
    from metalearn.service.server import main as serve

    run_cli(serve)


if __name__ == "__main__":
    tune_allocator()
    main()
