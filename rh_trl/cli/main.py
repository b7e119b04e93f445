"""The ``rh-trl`` command line.

The arguments are parsed before any torch-heavy module is imported, so that ``rh-trl --help`` and bad usage
answer at once; errors are one line (:mod:`rh_trl.cli.parser`), with the traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rh_trl import __version__
from rh_trl.cli.parser import CommandLineParser, debug_requested, report_error


def _quickstart(args: argparse.Namespace) -> int:
    from rh_trl.cli import quickstart

    result = quickstart.run(steps=args.steps, output_dir=args.output_dir, seed=args.seed)
    print(quickstart.report(result))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rh_trl.serve.config import load_config

    config = load_config(args.config, host=args.host, port=args.port, api_key=args.api_key)
    config.check_exposure()
    if args.api_key:
        print(
            "rh-trl serve: warning: --api-key is visible to every user of this machine in the process list; "
            f"export {config.api_key_env}=<key> instead",
            file=sys.stderr,
        )
    if args.ray:
        from rh_trl.serve.ray_serve import serve_on_ray

        serve_on_ray(config)
        return 0
    from rh_trl.serve.app import serve

    serve(config, log_level=args.log_level)
    return 0


def _run_func(args: argparse.Namespace) -> int:
    """Commands that bring their own parser set ``func``; their result is printed by themselves."""
    args.func(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="rh-trl", description="Reward models as TRL reward functions.")
    parser.add_argument("--version", action="version", version=f"rh-trl {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also: RH_TRL_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    quick = commands.add_parser(
        "quickstart", help="a short GRPO run on tiny offline models with an rh_trl reward"
    )
    quick.add_argument("--steps", type=int, default=60, help="GRPO steps (default 60)")
    quick.add_argument(
        "--output-dir",
        default=None,
        help="where the trained policy and the reward curve are written (default: a new temporary directory)",
    )
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
    srv.add_argument(
        "--ray",
        action="store_true",
        help="deploy on Ray Serve (rh_trl[ray]): a deployment per reward with the replicas and resources of its "
        "ray: block, on the cluster at the config's ray.address (default: a local Ray)",
    )
    srv.set_defaults(handler=_serve)

    from rh_trl.cli.annotate import add_annotate_command
    from rh_trl.cli.eval import add_eval_command
    from rh_trl.cli.score import add_score_command

    for add_command in (add_annotate_command, add_eval_command, add_score_command):
        add_command(commands).set_defaults(handler=_run_func)
    for sub in commands.choices.values():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(command_parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``rh-trl``; returns the exit status (bad usage exits from the parser with status 2)."""
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        args.command_parser.unrecognized(extras)
    debug = debug_requested(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rh_trl").setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        return args.handler(args)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        return report_error(args.command_parser.prog, err)
