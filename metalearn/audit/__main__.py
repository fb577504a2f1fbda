"""``python -m metalearn.audit MODULE:FUNCTION`` (or ``SPEC.json``): the table of
metalearn.audit, exit status 1 when any parameter's meta-gradient is off (2 for a bad command
line or model)."""

from __future__ import annotations

import argparse
import sys

from metalearn.errors import UserError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metalearn.audit",
        description="Check a model's second-order MAML meta-gradient against finite differences "
        "(float64, one small random task).",
    )
    parser.add_argument(
        "model",
        help="MODULE:FUNCTION in the working directory, called as FUNCTION(input_shape, n_way), "
        "or a model spec file (.json, metalearn/nets/spec.py)",
    )
    parser.add_argument(
        "--input-shape",
        default="1,28,28",
        help="one example's shape: C,H,W for images, C,L for sequences (default 1,28,28)",
    )
    parser.add_argument("--n-way", type=int, default=5, help="classes per task (default 5)")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[1, 2], help="inner steps (default 1 2)"
    )
    parser.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner step size (0.1)")
    parser.add_argument(
        "--adapt", default="all", help="all, head, or comma-separated parameter names"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-exact",
        action="store_true",
        help="run Paddle's own double-grads instead of metalearn's exact routing",
    )
    parser.add_argument(
        "--no-smooth",
        action="store_true",
        help="keep ReLU / LeakyReLU (their finite differences diverge: expect failures)",
    )
    return parser.parse_args(argv)


def shape_of(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or len(shape) > 4 or not all(0 < n <= 4096 for n in shape):
        raise UserError(f"--input-shape {text!r:.40}: expected sizes like 1,28,28 or 1,128")
    return shape


def main(argv: list[str] | None = None) -> bool:
    args = parse_args(argv)
    shape = shape_of(args.input_shape)
    if not 1 <= args.n_way <= 1000 or not all(1 <= s <= 20 for s in args.steps):
        raise UserError("--n-way must be 1..1000 and --steps 1..20")
    adapt = args.adapt if args.adapt in ("all", "head") else args.adapt.split(",")

    from metalearn import audit  # Paddle loads from here on
    from metalearn.nets.factory import build_layer, load_factory
    from metalearn.nets.spec import build_from_spec, load_spec_file

    if args.model.endswith(".json"):
        spec = load_spec_file(args.model)
        build = lambda: build_from_spec(spec, shape, args.n_way)  # noqa: E731
    else:
        load_factory(args.model)  # import errors before any work, as one line
        build = lambda: build_layer(args.model, shape, args.n_way)  # noqa: E731
    reports = audit.audit(
        build,
        shape,
        args.n_way,
        steps=args.steps,
        loss=args.loss,
        exact=not args.no_exact,
        smooth=not args.no_smooth,
        inner_lr=args.inner_lr,
        adapt=adapt,
        seed=args.seed,
    )
    table, passed = audit.format_reports(reports, exact=not args.no_exact)
    print(table)
    return passed


if __name__ == "__main__":
    passed = []
    run_cli(lambda: passed.append(main()))
    sys.exit(0 if passed and passed[0] else 1)
