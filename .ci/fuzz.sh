#!/usr/bin/env bash
# Fuzz stage: schemathesis against the reward server's own /openapi.json (request bodies included), in a bounded
# run; any 5xx answer fails the stage. schemathesis lives in a venv of its own so that its dependencies never
# move the versions the tests run with. One worker: hypothesis parsing lambdas on two threads trips a CPython
# 3.11 ast bug. Run from the repository root after the package is installed. The venv comes from .ci/lock/fuzz.txt;
# RH_TRL_CI_LATEST=1 resolves schemathesis 4 from today's releases.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh

venv=${FUZZ_VENV:-${TMPDIR:-/tmp}/rh_trl-ci-fuzz}
max_examples=${FUZZ_MAX_EXAMPLES:-150}
max_time=${FUZZ_MAX_TIME:-180}
ci_fresh_venv "$venv"
if [ "$ci_latest" = 1 ]; then
    "$venv/bin/python" -m pip install "${ci_pip_flags[@]}" "schemathesis>=4.0,<5"
else
    ci_install_lock "$venv/bin/python" fuzz
fi
ci_check_env "$venv/bin/python" fuzz

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
scratch=$(mktemp -d)  # schemathesis keeps a cache in its working directory: not in the checkout
export RH_TRL_API_KEY=fuzz-key HF_HUB_OFFLINE=1
python -m rh_trl.cli serve --config configs/serve/tiny.yaml --port "$port" --log-level warning >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$log" "$scratch"' EXIT

for _ in $(seq 120); do
    python -c "import httpx, sys; httpx.get(sys.argv[1], timeout=1).raise_for_status()" \
        "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; echo "the server exited" >&2; exit 1; }
    sleep 0.5
done

echo "+ schemathesis: $max_examples examples per operation, at most ${max_time}s"
(cd "$scratch" && "$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
    --checks not_a_server_error --header "Authorization: Bearer $RH_TRL_API_KEY" \
    --max-examples "$max_examples" --max-time "$max_time" --seed 0 --request-timeout 30 \
    --workers 1 --no-color --suppress-health-check too_slow,data_too_large --generation-database none)

if grep -q "Exception in ASGI application" "$log"; then
    cat "$log"
    echo "the server logged an unhandled exception" >&2
    exit 1
fi
