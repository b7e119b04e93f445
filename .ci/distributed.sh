#!/usr/bin/env bash
# Distributed stage: rewards on two processes (gloo) inside real GRPO, RLOO and online DPO runs, and the recipes
# under DeepSpeed ZeRO-2 and ZeRO-3 on CPU (pytest -m distributed). DeepSpeed lives in a venv layered over the main
# environment, from .ci/lock/distributed.txt; RH_TRL_CI_LATEST=1 resolves rh_trl's `deepspeed` extra from today's
# releases. DS_ACCELERATOR=cpu makes DeepSpeed run on the CPU; it compiles its shared-memory communication op with
# the machine's C++ compiler on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${DISTRIBUTED_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-distributed}
ci_layered_venv "$venv"
if [ "$ci_latest" = 1 ]; then
    "$venv/bin/python" -m pip install "${ci_pip_flags[@]}" -e ".[deepspeed]"
else
    ci_install_lock "$venv/bin/python" distributed
fi
ci_check_env "$venv/bin/python" distributed --layered

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
export PATH="$venv/bin:$PATH"  # the launched processes run this venv's python, which has DeepSpeed
echo "+ pytest -m distributed"
"$venv/bin/python" -m pytest -m distributed -q -p no:cacheprovider
