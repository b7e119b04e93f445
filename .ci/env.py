"""Check a CI environment against .ci/overrides.txt and its lock, or write its lock.

    python .ci/env.py --python PY --env NAME [--layered] [--compare-lock | --write-lock]

* ``pip check`` must report nothing but the overrides listed for NAME in .ci/overrides.txt; with the lock, every
  listed override must also still be needed, so the list never outlives its reasons.
* ``--compare-lock``: the environment's packages must be exactly .ci/lock/NAME.txt.
* ``--write-lock``: write .ci/lock/NAME.txt from the environment.

The package list is ``pip freeze --all`` without pip, editable installs (rh_trl itself) and the ``vllm`` metadata
alias of the vLLM stage; ``--layered`` keeps only what a layered venv adds to the main environment.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ROOT / ".ci" / "overrides.txt"
LOCKS = ROOT / ".ci" / "lock"
# the installer itself; the vLLM stage's metadata alias (not a real distribution)
NOT_LOCKED = ("pip", "vllm")

# "a 1.0 has requirement b<2, but you have b 3." / "a 1.0 requires b, which is not installed."
PIP_CHECK_LINE = re.compile(
    r"^(?P<package>\S+) \S+ (?:has requirement (?P<spec>\S+?)(?:;.*)?, but you have .*|requires (?P<missing>\S+?)"
    r"(?:;.*)?, which is not installed\.)$"
)
REQUIREMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_overrides(env: str) -> dict[tuple[str, str], str]:
    """``{(package, requirement): reason}`` for one environment. A line is ``ENV PACKAGE REQ [REQ …]  # reason``."""
    overrides = {}
    for number, raw in enumerate(OVERRIDES.read_text().splitlines(), 1):
        line, _, reason = raw.partition("#")
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3 or not reason.strip():
            sys.exit(f"{OVERRIDES}:{number}: expected 'ENV PACKAGE REQUIREMENT… # reason', got {raw!r}")
        if fields[0] == env:
            for requirement in fields[2:]:
                overrides[(canonical(fields[1]), canonical(requirement))] = reason.strip()
    return overrides


def pip_check(python: str) -> list[tuple[str, str, str]]:
    """``(package, requirement name, pip's line)`` for every broken requirement ``pip check`` reports."""
    result = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    broken = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if not line or line == "No broken requirements found.":
            continue
        match = PIP_CHECK_LINE.match(line)
        if match is None:
            broken.append(("?", "?", line))
            continue
        spec = match["spec"] or match["missing"]
        requirement = REQUIREMENT_NAME.match(spec)
        broken.append((canonical(match["package"]), canonical(requirement[0] if requirement else spec), line))
    if result.returncode and not broken:
        broken.append(
            ("?", "?", (result.stdout + result.stderr).strip() or f"pip check exited {result.returncode}")
        )
    return broken


def frozen(python: str, layered: bool) -> list[str]:
    """The environment's ``name==version`` lines, sorted by name."""
    command = [python, "-m", "pip", "freeze", "--all", "--exclude-editable"]
    command += [arg for name in NOT_LOCKED for arg in ("--exclude", name)]
    if layered:
        command.append("--local")
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted((line for line in lines if line and not line.startswith("#")), key=str.lower)


def lock_lines(path: Path) -> list[str]:
    return sorted(
        (line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")),
        key=str.lower,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True)
    parser.add_argument("--env", required=True)
    parser.add_argument("--layered", action="store_true")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compare-lock", action="store_true")
    mode.add_argument("--write-lock", action="store_true")
    args = parser.parse_args()

    failures = []
    overrides = read_overrides(args.env)
    used = set()
    for package, requirement, line in pip_check(args.python):
        if (package, requirement) in overrides:
            used.add((package, requirement))
        else:
            failures.append(f"pip check: {line}")
    for package, requirement in sorted(set(overrides) - used):
        unused = f"{OVERRIDES.name}: the override '{args.env} {package} {requirement}' is no longer needed; remove it"
        if args.compare_lock:  # the locked environment is fixed, so a stale entry is a mistake
            failures.append(unused)
        else:  # today's releases may have made it unnecessary: say so
            print(f"{args.env} environment: note: {unused}")

    lock = LOCKS / f"{args.env}.txt"
    current = frozen(args.python, args.layered)
    if args.write_lock:
        LOCKS.mkdir(exist_ok=True)
        header = (
            f"# The {args.env} environment of CI, as resolved on {date.today()} by RH_TRL_CI_LATEST=1 and checked by "
            ".ci/run.\n# Written by `bash .ci/lock.sh`; installed with `pip install --no-deps -r`.\n"
        )
        lock.write_text(header + "\n".join(current) + "\n")
        print(f"wrote {lock.relative_to(ROOT)} ({len(current)} packages)")
    elif args.compare_lock:
        expected = lock_lines(lock)
        missing = sorted(set(expected) - set(current), key=str.lower)
        extra = sorted(set(current) - set(expected), key=str.lower)
        if missing or extra:
            failures.append(
                f"the {args.env} environment differs from {lock.relative_to(ROOT)}: "
                f"missing {missing or 'nothing'}, not in the lock {extra or 'nothing'} "
                "(a dependency changed in pyproject.toml or a stage script: refresh the lock with bash .ci/lock.sh)"
            )

    for failure in failures:
        print(f"{args.env} environment: {failure}", file=sys.stderr)
    if not failures:
        noted = f", {len(used)} listed override(s)" if used else ""
        print(f"{args.env} environment: pip check clean{noted}; {len(current)} packages")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
