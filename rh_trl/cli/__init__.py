"""The ``rh-trl`` command line: one module per command (``score``, ``eval``, ``annotate``, ``quickstart``; ``serve``
lives in :mod:`rh_trl.cli.main` over :mod:`rh_trl.serve`), the shared parser and error reports
(:mod:`rh_trl.cli.parser`), and the Ray Data paths of ``score`` and ``annotate`` (:mod:`rh_trl.cli.ray_data`).
"""

from rh_trl.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
