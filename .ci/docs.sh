#!/usr/bin/env bash
# Docs stage: the documentation site built in strict mode (a broken link, anchor or docstring fails it), with the
# API reference generated from the docstrings and the benchmark plots drawn from benchmarks/results/. mkdocs and
# its plugins live in a venv of their own (mkdocstrings reads the source without importing it), from
# .ci/lock/docs.txt; RH_TRL_CI_LATEST=1 resolves the `docs` extra of pyproject.toml from today's releases. The
# docs' code blocks run as tests in the default suite (tests/test_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${DOCS_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-docs}
ci_fresh_venv "$venv"
if [ "$ci_latest" = 1 ]; then
    mapfile -t requirements < <("$venv/bin/python" -c \
        "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))")
    "$venv/bin/python" -m pip install "${ci_pip_flags[@]}" "${requirements[@]}"
else
    ci_install_lock "$venv/bin/python" docs
fi
ci_check_env "$venv/bin/python" docs

echo "+ mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true "$venv/bin/python" -m mkdocs build --strict --site-dir "$venv/site"
