#!/usr/bin/env bash
# Container entrypoint: start the VLM server (vLLM) in the background when a GPU is
# present, then exec the watcher daemon so that it receives SIGTERM directly.
#
# The VLM server is optional from this script's point of view: if it is missing, crashes
# or never becomes healthy, a one-line "start.sh: WARNING ..." says so and the daemon
# runs anyway. The daemon answers /health on WATCHER_HTTP_PORT from its first second and
# waits for the VLM server itself before warming a VLM engine, so nothing here blocks.
#
# Settings (environment, all optional):
#   WATCHER_VLM_SERVER       auto | on | off (default auto: start only when `nvidia-smi -L`
#                            succeeds and lists a GPU; on: start without checking)
#   WATCHER_VLM_BACKEND      vllm | genai_server (default vllm; genai_server runs
#                            `paddleocr genai_server ... --backend vllm`)
#   WATCHER_PIPELINE_VERSION PaddleOCR-VL release: v1 | v1.5 | v1.6 (default v1.6). It picks
#                            the defaults of the next two, as the daemon does.
#   WATCHER_VLM_MODEL_SOURCE weights: Hugging Face id or local directory
#                            (default PaddlePaddle/PaddleOCR-VL-1.6 for v1.6)
#   WATCHER_VLM_MODEL        served model name (default PaddleOCR-VL-1.6-0.9B for v1.6). The
#                            daemon's VLM engines request exactly this name; a mismatch
#                            shows up as "The model ... does not exist" from vLLM.
#   WATCHER_VLM_PADDLEOCR    the `paddleocr` command of the VLM server's environment, for
#                            the genai_server backend (default paddleocr)
#   WATCHER_VLM_HOST         bind address of the VLM server (default 127.0.0.1)
#   WATCHER_VLM_PORT         its port (default 8080)
#   WATCHER_VLM_GPU_MEMORY_UTILIZATION   share of GPU memory vLLM may take (default 0.5;
#                            the rest is left to the in-process layout model)
#   WATCHER_VLM_MAX_NUM_BATCHED_TOKENS   default 16384
#   WATCHER_VLM_MAX_NUM_SEQS default 64
#   WATCHER_VLM_EXTRA_ARGS   more arguments for the server, split on whitespace (no
#                            quoting, no globbing), appended last (default empty)
#   WATCHER_VLM_STARTUP_TIMEOUT  seconds to wait for the server's /health before logging a
#                            warning (default 900); the daemon has its own, same-named limit
#   WATCHER_VLM_HEALTH_INTERVAL  seconds between /health probes (default 2)
#   WATCHER_MODEL_CACHE      where weights are downloaded at start (default /models, a
#                            volume); exported as HF_HOME, PADDLE_PDX_CACHE_HOME and
#                            VLLM_CACHE_ROOT unless those are already set
#   WATCHER_PYTHON           interpreter that runs the daemon (default python)
# Arguments to this script are passed on to `python -m watcher run`.

# No `set -e`: a failing optional step must turn into a warning, never stop the daemon.
set -uo pipefail

log() { printf 'start.sh: %s\n' "$*"; }
warn() { printf 'start.sh: WARNING %s\n' "$*"; }

WATCHER_VLM_SERVER="${WATCHER_VLM_SERVER:-auto}"
WATCHER_VLM_BACKEND="${WATCHER_VLM_BACKEND:-vllm}"
# Keep in step with PADDLEOCR_VL_MODELS in watcher/settings.py (tests/test_models.py).
case "${WATCHER_PIPELINE_VERSION:-v1.6}" in
    v1) default_model=PaddleOCR-VL-0.9B; default_source=PaddlePaddle/PaddleOCR-VL ;;
    v1.5) default_model=PaddleOCR-VL-1.5-0.9B; default_source=PaddlePaddle/PaddleOCR-VL-1.5 ;;
    v1.6) default_model=PaddleOCR-VL-1.6-0.9B; default_source=PaddlePaddle/PaddleOCR-VL-1.6 ;;
    *)
        warn "WATCHER_PIPELINE_VERSION='${WATCHER_PIPELINE_VERSION}' is not v1|v1.5|v1.6; serving v1.6"
        default_model=PaddleOCR-VL-1.6-0.9B; default_source=PaddlePaddle/PaddleOCR-VL-1.6
        ;;
esac
WATCHER_VLM_MODEL_SOURCE="${WATCHER_VLM_MODEL_SOURCE:-$default_source}"
WATCHER_VLM_MODEL="${WATCHER_VLM_MODEL:-$default_model}"
WATCHER_VLM_PADDLEOCR="${WATCHER_VLM_PADDLEOCR:-paddleocr}"
WATCHER_VLM_HOST="${WATCHER_VLM_HOST:-127.0.0.1}"
WATCHER_VLM_PORT="${WATCHER_VLM_PORT:-8080}"
WATCHER_VLM_GPU_MEMORY_UTILIZATION="${WATCHER_VLM_GPU_MEMORY_UTILIZATION:-0.5}"
WATCHER_VLM_MAX_NUM_BATCHED_TOKENS="${WATCHER_VLM_MAX_NUM_BATCHED_TOKENS:-16384}"
WATCHER_VLM_MAX_NUM_SEQS="${WATCHER_VLM_MAX_NUM_SEQS:-64}"
WATCHER_VLM_EXTRA_ARGS="${WATCHER_VLM_EXTRA_ARGS:-}"
WATCHER_VLM_STARTUP_TIMEOUT="${WATCHER_VLM_STARTUP_TIMEOUT:-900}"
WATCHER_VLM_HEALTH_INTERVAL="${WATCHER_VLM_HEALTH_INTERVAL:-2}"
WATCHER_MODEL_CACHE="${WATCHER_MODEL_CACHE:-/models}"
PYTHON="${WATCHER_PYTHON:-python}"

# The daemon reads WATCHER_VLM_STARTUP_TIMEOUT too (as a float), so only this script's copy
# is normalised; bash arithmetic wants whole seconds.
startup_timeout="${WATCHER_VLM_STARTUP_TIMEOUT%%.*}"
if ! [[ "$startup_timeout" =~ ^[0-9]+$ ]]; then
    warn "WATCHER_VLM_STARTUP_TIMEOUT is not a number of seconds; using 900"
    startup_timeout=900
fi
health_interval="$WATCHER_VLM_HEALTH_INTERVAL"
if ! [[ "$health_interval" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    warn "WATCHER_VLM_HEALTH_INTERVAL is not a number of seconds; using 2"
    health_interval=2
fi

# Weights fetched at start must land in the mounted volume, or every restart downloads
# them again; an unwritable cache falls back to the libraries' own defaults under $HOME.
setup_model_cache() {
    if mkdir -p "$WATCHER_MODEL_CACHE" 2>/dev/null && [[ -w "$WATCHER_MODEL_CACHE" ]]; then
        export HF_HOME="${HF_HOME:-$WATCHER_MODEL_CACHE/huggingface}"
        export PADDLE_PDX_CACHE_HOME="${PADDLE_PDX_CACHE_HOME:-$WATCHER_MODEL_CACHE/paddlex}"
        export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$WATCHER_MODEL_CACHE/vllm}"
        log "model cache at $WATCHER_MODEL_CACHE"
    else
        warn "model cache $WATCHER_MODEL_CACHE is not writable; weights go to the default caches under ${HOME:-/}"
    fi
}

# Sets skip_reason to why no VLM server should start; leaves it empty when one should.
skip_reason=""
decide_vlm() {
    case "$WATCHER_VLM_SERVER" in
        off) skip_reason="WATCHER_VLM_SERVER=off"; return ;;
        on) return ;;
        auto) ;;
        *) warn "WATCHER_VLM_SERVER='$WATCHER_VLM_SERVER' is not auto|on|off; using auto" ;;
    esac
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        skip_reason="no GPU: nvidia-smi not found (WATCHER_VLM_SERVER=auto)"
        return
    fi
    local listing rc
    # A wedged driver can make nvidia-smi hang; it must not hold up the daemon.
    if command -v timeout >/dev/null 2>&1; then
        listing="$(timeout 10 nvidia-smi -L 2>&1)"
    else
        listing="$(nvidia-smi -L 2>&1)"
    fi
    rc=$?
    if [[ $rc -ne 0 ]]; then
        skip_reason="no GPU: nvidia-smi -L failed with code $rc (WATCHER_VLM_SERVER=auto)"
    elif ! grep -q '^GPU [0-9]' <<<"$listing"; then
        skip_reason="no GPU: nvidia-smi -L listed none (WATCHER_VLM_SERVER=auto)"
    fi
}

# Fills the array vlm_cmd, or sets vlm_problem and fails.
vlm_cmd=()
vlm_problem=""
build_vlm_command() {
    local extra=()
    read -r -a extra <<<"$WATCHER_VLM_EXTRA_ARGS"
    case "$WATCHER_VLM_BACKEND" in
        vllm)
            # Flags from PaddleOCR-VL's vLLM recipe: OCR prompts share no prefix worth
            # caching, and each image is seen once, so both caches only cost memory.
            vlm_cmd=(vllm serve "$WATCHER_VLM_MODEL_SOURCE"
                --trust-remote-code
                --served-model-name "$WATCHER_VLM_MODEL"
                --host "$WATCHER_VLM_HOST" --port "$WATCHER_VLM_PORT"
                --gpu-memory-utilization "$WATCHER_VLM_GPU_MEMORY_UTILIZATION"
                --max-num-batched-tokens "$WATCHER_VLM_MAX_NUM_BATCHED_TOKENS"
                --max-num-seqs "$WATCHER_VLM_MAX_NUM_SEQS"
                --no-enable-prefix-caching
                --mm-processor-cache-gb 0
                "${extra[@]}")
            ;;
        genai_server)
            # genai_server takes engine settings only from a YAML file; its --model_name
            # is both the PaddleX model and the served name.
            local config="${TMPDIR:-/tmp}/watcher-genai-server.yaml"
            if ! printf '%s\n' \
                "gpu-memory-utilization: $WATCHER_VLM_GPU_MEMORY_UTILIZATION" \
                "max-num-batched-tokens: $WATCHER_VLM_MAX_NUM_BATCHED_TOKENS" \
                "max-num-seqs: $WATCHER_VLM_MAX_NUM_SEQS" >"$config" 2>/dev/null; then
                vlm_problem="cannot write $config"
                return 1
            fi
            vlm_cmd=("$WATCHER_VLM_PADDLEOCR" genai_server --model_name "$WATCHER_VLM_MODEL"
                --backend vllm --host "$WATCHER_VLM_HOST" --port "$WATCHER_VLM_PORT"
                --backend_config "$config")
            if [[ -d "$WATCHER_VLM_MODEL_SOURCE" ]]; then
                vlm_cmd+=(--model_dir "$WATCHER_VLM_MODEL_SOURCE")
            fi
            vlm_cmd+=("${extra[@]}")
            ;;
        *)
            vlm_problem="WATCHER_VLM_BACKEND='$WATCHER_VLM_BACKEND' is not vllm|genai_server"
            return 1
            ;;
    esac
    if ! command -v "${vlm_cmd[0]}" >/dev/null 2>&1; then
        vlm_problem="command '${vlm_cmd[0]}' not found"
        return 1
    fi
}

prefix_lines() {
    local line
    while IFS= read -r line || [[ -n "$line" ]]; do
        printf '[vlm] %s\n' "$line"
    done
}

vlm_health_ok() {
    local host="$WATCHER_VLM_HOST"
    # A wildcard bind address is not something one can connect to.
    [[ "$host" == "0.0.0.0" || "$host" == "::" ]] && host=127.0.0.1
    local url="http://$host:$WATCHER_VLM_PORT/health"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
            "$url" >/dev/null 2>&1
    fi
}

# Logs the first healthy answer, or one warning when the server takes too long. Runs
# beside the server and gives up quietly once the server is gone (its exit is logged).
watch_vlm_health() {
    local pid="$1" started=$SECONDS next_note=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
        if vlm_health_ok; then
            log "vlm server healthy on port $WATCHER_VLM_PORT after $((SECONDS - started)) s"
            return
        fi
        if ((SECONDS - started >= startup_timeout)); then
            warn "vlm server not healthy after ${startup_timeout} s (WATCHER_VLM_STARTUP_TIMEOUT); giving up watching it, the daemon keeps running"
            return
        fi
        if ((SECONDS >= next_note)); then
            log "waiting for vlm server /health ($((SECONDS - started)) s so far)"
            next_note=$((SECONDS + 60))
        fi
        sleep "$health_interval"
    done
}

# Runs in the background for the daemon's whole life. It owns the VLM server process so
# that the daemon (after exec) never sees it as a child, logs how it ends, and stops it
# once the daemon is gone so that nothing outlives the daemon outside a container.
supervise_vlm() {
    local daemon_pid="$1"
    # stdin from /dev/null: the server must not compete with anything for the terminal.
    "${vlm_cmd[@]}" </dev/null > >(prefix_lines) 2>&1 &
    local vlm_pid=$!
    log "vlm server started (pid $vlm_pid, backend $WATCHER_VLM_BACKEND, model $WATCHER_VLM_MODEL, port $WATCHER_VLM_PORT)"
    watch_vlm_health "$vlm_pid" &
    local health_pid=$!
    (
        while kill -0 "$daemon_pid" 2>/dev/null && kill -0 "$vlm_pid" 2>/dev/null; do
            sleep 1
        done
        kill -TERM "$vlm_pid" 2>/dev/null
    ) &
    local reaper_pid=$!
    local code=0
    wait "$vlm_pid" || code=$?
    kill "$health_pid" 2>/dev/null
    if kill -0 "$daemon_pid" 2>/dev/null; then
        warn "vlm server exited with code $code; the daemon keeps running without it (VLM engines report it unreachable)"
    else
        log "vlm server stopped with code $code after the daemon exited"
    fi
    kill "$reaper_pid" 2>/dev/null
    wait 2>/dev/null
}

setup_model_cache
decide_vlm
if [[ -n "$skip_reason" ]]; then
    log "no VLM server started: $skip_reason; engine ${WATCHER_ENGINE:-cpu}"
elif build_vlm_command; then
    log "starting vlm server: ${vlm_cmd[*]}"
    # $$ is this shell, which becomes the daemon at the exec below.
    supervise_vlm "$$" &
else
    warn "vlm server not started: $vlm_problem; the daemon starts without it"
fi

exec "$PYTHON" -m watcher run "$@"
