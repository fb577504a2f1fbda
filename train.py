"""Meta-train MAML / FOMAML / Reptile:  python train.py --n_way 5 --k_spt 1 [--use_gpu]."""

from metalearn.args import train_parser
from metalearn.errors import run_cli
from metalearn.trainer import train

if __name__ == "__main__":
    run_cli(lambda: train(vars(train_parser().parse_args())))
