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


def _serve(args: argparse.Namespace) -> int:
    from rh_trl.serve.config import load_config

    try:
        config = load_config(args.config, host=args.host, port=args.port, api_key=args.api_key)
        config.check_exposure()
    except (ValueError, FileNotFoundError) as err:
        print(f"rh-trl serve: {err}", file=sys.stderr)
        return 2
    if args.api_key:
        print(
            f"rh-trl serve: warning: --api-key is visible to every user of this machine in the process list; "
            f"export {config.api_key_env}=<key> instead",
            file=sys.stderr,
        )
    from rh_trl.serve.app import serve

    serve(config, log_level=args.log_level)
    return 0


def _run_func(args: argparse.Namespace) -> int:
    """Commands that bring their own parser set ``func``; their result is printed by themselves."""
    args.func(args)
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

    srv = commands.add_parser("serve", help="host rewards over HTTP with dynamic batching (rh_trl[serve])")
    srv.add_argument("--config", required=True, help="a YAML server config (see configs/serve/)")
    srv.add_argument("--host", default=None, help="address to bind (default: the config's, else 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="port (default: the config's, else 8000)")
    srv.add_argument(
        "--api-key",
        default=None,
        help="bearer key clients must send (required off loopback); prefer $RH_TRL_API_KEY, since a command-line "
        "argument is visible in the process list",
    )
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(handler=_serve)

    from rh_trl.annotate import add_annotate_command
    from rh_trl.eval_command import add_eval_command
    from rh_trl.score_command import add_score_command

    for add_command in (add_annotate_command, add_eval_command, add_score_command):
        add_command(commands).set_defaults(handler=_run_func)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
