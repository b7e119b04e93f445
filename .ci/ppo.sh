#!/usr/bin/env bash
# PPO stage: OpenRLHF's and verl's own reward code against rh_trl (pytest -m ppo).
# Both frameworks are installed without their dependencies (CUDA builds, DeepSpeed, vLLM, their transformers pins),
# plus only the light packages their reward paths import, in a venv that sees the main environment: torch,
# transformers, trl and the rest stay at the versions the other stages test.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${PPO_VENV:-${TMPDIR:-/tmp}/rh_trl-ppo-venv}
python -m venv --system-site-packages "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps openrlhf==0.11.2 verl==0.9.1
"${pip[@]}" aiohttp==3.14.5 ray==2.55.0 hydra-core==1.3.8 omegaconf==2.3.1 tensordict==0.10.0 \
    codetiming==1.4.0 pylatexenc==2.11 cachetools==8.0.2

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ pytest -m ppo"
"$venv/bin/python" -m pytest -m ppo -q -p no:cacheprovider
