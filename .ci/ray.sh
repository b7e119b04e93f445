#!/usr/bin/env bash
# Ray stage: the reward server on Ray Serve and scoring on Ray Data, on a local Ray (pytest -m ray).
# Ray lives in a venv layered over the main environment (torch, transformers, fastapi, ... stay the versions the
# other stages test; Ray's own additions, uvloop among them, stay out of the default run). The venv comes from
# .ci/lock/ray.txt; RH_TRL_CI_LATEST=1 resolves rh_trl's `ray` extra from today's releases, as a user's
# `pip install 'rh_trl[ray]'` does.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${RAY_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-ray}
ci_layered_venv "$venv"
if [ "$ci_latest" = 1 ]; then
    "$venv/bin/python" -m pip install "${ci_pip_flags[@]}" -e ".[ray]"
else
    ci_install_lock "$venv/bin/python" ray
fi
ci_check_env "$venv/bin/python" ray --layered

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ pytest -m ray"
"$venv/bin/python" -m pytest -m ray -q -p no:cacheprovider
