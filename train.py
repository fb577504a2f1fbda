"""Meta-train MAML / FOMAML / Reptile:  python train.py --n_way 5 --k_spt 1 [--use_gpu]."""

from metalearn.runtime import tune_allocator


def main() -> None:
    # Imported here so that Paddle loads only after tune_allocator() has re-executed us.
    from metalearn.errors import run_cli
    from metalearn.training.config import train_parser
    from metalearn.training.trainer import train

    run_cli(lambda: train(vars(train_parser().parse_args())))


if __name__ == "__main__":
    tune_allocator()
    main()
