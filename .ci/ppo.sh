#!/usr/bin/env bash
# PPO stage: OpenRLHF's and verl's own reward code against rh_trl (pytest -m ppo).
# Both frameworks are installed without their dependencies (CUDA builds, DeepSpeed, vLLM, their transformers pins;
# .ci/overrides.txt lists them), plus only the light packages their reward paths import, in a venv layered over
# the main environment: torch, transformers, trl and the rest stay at the versions the other stages test. The
# venv comes from .ci/lock/ppo.txt; RH_TRL_CI_LATEST=1 resolves the light packages from today's releases, within
# the ranges the two frameworks declare.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${PPO_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-ppo}
ci_layered_venv "$venv"
pip=("$venv/bin/python" -m pip install "${ci_pip_flags[@]}")
if [ "$ci_latest" = 1 ]; then
    "${pip[@]}" --no-deps openrlhf==0.11.2 verl==0.9.1
    "${pip[@]}" aiohttp "ray==2.55.0" hydra-core omegaconf "tensordict>=0.8,!=0.9.0,<=0.10.0" codetiming pylatexenc \
        cachetools wheel einops
else
    ci_install_lock "$venv/bin/python" ppo
fi
ci_check_env "$venv/bin/python" ppo --layered

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ pytest -m ppo"
"$venv/bin/python" -m pytest -m ppo -q -p no:cacheprovider
