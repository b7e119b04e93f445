#!/usr/bin/env bash
# Start the strong and the weak model of a DrSow reward as two `vllm serve` processes, wait until both answer
# /health, and print the rh_trl.DrSow construction that uses them.
#
#   bash recipes/launch_drsow.sh --strong Qwen/Qwen2.5-7B-Instruct --weak Qwen/Qwen2.5-7B \
#       --strong-gpus 0 --weak-gpus 1 --tp 1 --max-model-len 4096
#
# Each server runs its checkpoint's own dtype unless --dtype says otherwise (vLLM's "auto" would downcast a
# float32 checkpoint), so the rewards equal DrSow(engine="hf")'s. Arguments after -- go to both `vllm serve`s.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch_drsow.sh --strong MODEL --weak MODEL [options] [-- VLLM_SERVE_ARGS...]

  --strong MODEL           strong model (path or hub id)
  --weak MODEL             weak model (path or hub id)
  --strong-port PORT       port of the strong server (default 8001)
  --weak-port PORT         port of the weak server (default 8002)
  --host HOST              address to bind and to print (default 127.0.0.1)
  --strong-gpus IDS        CUDA_VISIBLE_DEVICES for the strong server (default 0)
  --weak-gpus IDS          CUDA_VISIBLE_DEVICES for the weak server (default 1)
  --tp N                   tensor parallel size of each server (default 1)
  --max-model-len N        longest sequence (prompt + response) in tokens (default 4096)
  --gpu-memory-utilization F   fraction of each GPU a server may take (default 0.9)
  --dtype DTYPE            weights' dtype (default: each checkpoint's own, read from its config.json)
  --api-key KEY            require this key (sent by DrSow as api_key=)
  --log-dir DIR            where server logs go (default ./drsow-logs)
  --timeout SECONDS        how long to wait for /health (default 900)
  -h, --help               show this help

Both servers keep running in the background after the script returns; their PIDs are printed. Each GPU list
must hold at least --tp devices.
USAGE
}

STRONG="" WEAK="" STRONG_PORT=8001 WEAK_PORT=8002 HOST=127.0.0.1 STRONG_GPUS=0 WEAK_GPUS=1 TP=1
MAX_LEN=4096 GPU_UTIL=0.9 API_KEY="" LOG_DIR=./drsow-logs TIMEOUT=900 DTYPE="" PASS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --strong) STRONG="$2"; shift 2 ;;
    --weak) WEAK="$2"; shift 2 ;;
    --strong-port) STRONG_PORT="$2"; shift 2 ;;
    --weak-port) WEAK_PORT="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --strong-gpus) STRONG_GPUS="$2"; shift 2 ;;
    --weak-gpus) WEAK_GPUS="$2"; shift 2 ;;
    --tp) TP="$2"; shift 2 ;;
    --max-model-len) MAX_LEN="$2"; shift 2 ;;
    --gpu-memory-utilization) GPU_UTIL="$2"; shift 2 ;;
    --api-key) API_KEY="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --) shift; PASS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$STRONG" || -z "$WEAK" ]]; then
  echo "both --strong and --weak are required (see --help)" >&2
  exit 2
fi
if ! command -v vllm >/dev/null 2>&1; then
  echo "the 'vllm' command is not installed: pip install 'rh_trl[vllm]'" >&2
  exit 1
fi
if [[ "$STRONG_PORT" == "$WEAK_PORT" ]]; then
  echo "--strong-port and --weak-port must differ" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

checkpoint_dtype() {  # model: the dtype its config.json stores (what DrSow's "hf" engine runs it in)
  python -c 'import sys; from rh_trl.engines.vllm_llm import checkpoint_dtype; print(checkpoint_dtype(sys.argv[1]))' "$1"
}

start() {  # name model port gpus
  local name="$1" model="$2" port="$3" gpus="$4"
  local extra=() dtype="$DTYPE"
  [[ -n "$API_KEY" ]] && extra+=(--api-key "$API_KEY")
  [[ -z "$dtype" ]] && dtype=$(checkpoint_dtype "$model")
  CUDA_VISIBLE_DEVICES="$gpus" nohup vllm serve "$model" \
    --host "$HOST" --port "$port" \
    --served-model-name "$name" \
    --tensor-parallel-size "$TP" \
    --max-model-len "$MAX_LEN" \
    --gpu-memory-utilization "$GPU_UTIL" \
    --dtype "$dtype" \
    "${extra[@]}" "${PASS[@]}" >"$LOG_DIR/$name.log" 2>&1 &
  echo $!
}

wait_healthy() {  # name port pid
  local name="$1" port="$2" pid="$3" waited=0
  until curl -sf "http://$HOST:$port/health" >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the $name server (pid $pid) exited; last lines of $LOG_DIR/$name.log:" >&2
      tail -n 20 "$LOG_DIR/$name.log" >&2
      exit 1
    fi
    if (( waited >= TIMEOUT )); then
      echo "the $name server did not answer /health within ${TIMEOUT}s (log: $LOG_DIR/$name.log)" >&2
      exit 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
  echo "$name server ready on http://$HOST:$port (pid $pid)"
}

STRONG_PID=$(start strong "$STRONG" "$STRONG_PORT" "$STRONG_GPUS")
WEAK_PID=$(start weak "$WEAK" "$WEAK_PORT" "$WEAK_GPUS")
wait_healthy strong "$STRONG_PORT" "$STRONG_PID"
wait_healthy weak "$WEAK_PORT" "$WEAK_PID"

KEY_ARG=""
[[ -n "$API_KEY" ]] && KEY_ARG="    api_key=\"$API_KEY\","$'\n'
cat <<PY

# stop them with: kill $STRONG_PID $WEAK_PID
import rh_trl.rewards.drsow as drsow

reward = drsow.DrSow(
    "http://$HOST:$STRONG_PORT",
    "http://$HOST:$WEAK_PORT",
    strong_tokenizer="$STRONG",
    weak_tokenizer="$WEAK",
    strong_model="strong",
    weak_model="weak",
    engine="openai",
${KEY_ARG})
PY
