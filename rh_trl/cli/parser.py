"""What every ``rh-trl`` command shares: a parser whose errors are one line naming the closest valid choice,
JSON option values, help text from docstrings, and the one-line report of an error raised while a command runs.

Errors look as command-line tools print them, ``rh-trl <command>: error: <what was wrong; what was expected>``,
with exit status 2 for bad usage or input and 1 for a failure; the traceback is shown only with ``--debug`` or
``RH_TRL_DEBUG=1``. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, NoReturn

from rh_trl.options import did_you_mean

#: set to 1 to get the traceback of any error (as ``--debug`` does)
DEBUG_ENV = "RH_TRL_DEBUG"

#: exit status of bad usage or input, and of a failure while running
USAGE_ERROR, FAILURE = 2, 1


def one_line(text: str) -> str:
    """``text`` with its lines joined, so that an error stays on one line."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def help_text(doc: str | None) -> str:
    """A docstring as plain help text: reST roles and double backquotes removed (``:func:`~a.b``` → ``b``)."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block) and suggest the closest
    valid option or choice. Subparsers made from it are of the same class."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)}; see {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE_ERROR)

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Refuse arguments this parser does not know, naming the closest option for the first unknown one."""
        options = sorted(s for s in self._option_string_actions if s.startswith("--"))
        first = next((e for e in extras if e.startswith("-")), extras[0])
        hint = did_you_mean(first.split("=", 1)[0], options)
        if not hint and first.startswith("-"):
            hint = f"; options: {', '.join(options)}"
        self.error(f"unrecognized argument(s): {' '.join(extras)}{hint}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            hint = did_you_mean(str(value), [str(c) for c in action.choices or ()])
            if not hint:
                raise
            raise argparse.ArgumentError(action, f"{err.message}{hint}") from None


def json_object(text: str) -> dict[str, Any]:
    """An argparse ``type``: a JSON object (``'{"max_length": 4096}'``), with a one-line error otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({err.msg} at character {err.pos + 1}): {text!r}; expected a JSON object such as "
            "'{\"max_length\": 4096}' (keys and strings in double quotes)"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of keyword arguments, such as '{{\"max_length\": 4096}}', got {text!r}"
        )
    return value


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether ``--debug`` was given or ``RH_TRL_DEBUG`` is set (to anything but 0/false/no)."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or bool(getattr(args, "debug", False))


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad usage or input (exit status 2); any other exception is a failure (1)."""
    from rh_trl.models.loading import ModelLoadError

    return (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ModelLoadError)


def report_error(prog: str, err: BaseException) -> int:
    """Print ``err`` as one line on stderr and return the exit status it calls for."""
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    message = one_line(str(err)) or type(err).__name__
    if isinstance(err, input_error_types()):
        status = USAGE_ERROR
    else:
        status = FAILURE
        message = f"{type(err).__name__}: {message} (--debug or {DEBUG_ENV}=1 shows the traceback)"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
