#!/usr/bin/env bash
# Ray stage: the reward server on Ray Serve and scoring on Ray Data, on a local Ray (pytest -m ray).
# Ray lives in a venv that sees the main environment (torch, transformers, fastapi, ... stay the versions the
# other stages test; Ray's own additions, uvloop among them, stay out of the default run). protobuf stays below 7:
# Ray 2.55's Serve reads its deployment configs with protobuf APIs that 7 removed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${RAY_VENV:-${TMPDIR:-/tmp}/rh_trl-ray-venv}
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "ray[serve,data]==2.55.0" "protobuf<7"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ pytest -m ray"
"$venv/bin/python" -m pytest -m ray -q -p no:cacheprovider
