"""Test the best model of a run on fixed tasks:  python evaluate.py --n_way 5 --k_spt 1."""

from metalearn.args import evaluate_parser
from metalearn.errors import run_cli
from metalearn.evaluation import evaluate

if __name__ == "__main__":
    run_cli(lambda: evaluate(vars(evaluate_parser().parse_args())))
