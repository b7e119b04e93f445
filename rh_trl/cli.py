"""The ``rh-trl`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from rh_trl import quickstart

    result = quickstart.run(steps=args.steps, output_dir=args.output_dir, seed=args.seed)
    print(quickstart.report(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rh-trl", description="Reward models as TRL reward functions.")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser(
        "quickstart", help="a short GRPO run on tiny offline models with an rh_trl reward"
    )
    quick.add_argument("--steps", type=int, default=60, help="GRPO steps (default 60)")
    quick.add_argument("--output-dir", default=None, help="where the trainer writes (default: a temp dir)")
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(handler=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
