#!/usr/bin/env bash
# Today's releases: the README's install resolved from scratch (no lock) in a fresh venv, the fast subset, then the
# vLLM stage resolved the same way (its overrides applied as in CI). It tells whether a release published since
# the lock was written breaks rh_trl; CI itself installs the lock and is not moved by new releases.
#   bash .ci/latest.sh         (about 20 minutes on 2 cores; prints the versions it resolved)
set -euo pipefail
cd "$(dirname "$0")/.."
export RH_TRL_CI_LATEST=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
source .ci/lib.sh  # after RH_TRL_CI_LATEST: it reads the mode when sourced
unset PIP_CONSTRAINT

test_command=$(awk '/<!-- test-command -->/{found=1; next} found && /^```/{if (inside) exit; inside=1; next} found && inside {print}' README.md)
main_venv=${RH_TRL_CI_VENV:-${TMPDIR:-/tmp}/rh_trl-latest-main}
ci_fresh_venv "$main_venv"
export PATH="$main_venv/bin:$PATH" VIRTUAL_ENV="$main_venv" RH_TRL_CI_PYTHON="$main_venv/bin/python"
ci_main_python=$RH_TRL_CI_PYTHON
fast='not slow and not vllm and not ppo and not ray and not distributed'
echo "+ $test_command  (today's releases; the fast subset: -m \"$fast\")"
PYTEST_ADDOPTS="-m '$fast'" bash -euo pipefail -c "$test_command"
ci_check_env python main
python -c "import importlib.metadata as m; print('main environment:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'trl', 'accelerate', 'peft', 'datasets')))"
VLLM_VENV=${TMPDIR:-/tmp}/rh_trl-latest-vllm bash .ci/vllm.sh
