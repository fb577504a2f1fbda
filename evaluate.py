"""Test the best model of a run on fixed tasks:  python evaluate.py --n_way 5 --k_spt 1."""

from metalearn.runtime import tune_allocator


def main() -> None:
    # Imported here so that Paddle loads only after tune_allocator() has re-executed us.
    from metalearn.errors import run_cli
    from metalearn.training.config import evaluate_parser
    from metalearn.training.evaluation import evaluate

    run_cli(lambda: evaluate(vars(evaluate_parser().parse_args())))


if __name__ == "__main__":
    tune_allocator()
    main()
