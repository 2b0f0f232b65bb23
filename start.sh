#!/usr/bin/env bash
# Container entrypoint: start the VLM server (vLLM) in the background when a GPU is
# present, keep it running, then exec the watcher daemon so that it receives SIGTERM
# directly.
#
# The VLM server never stops the daemon: if it is missing, crashes or never becomes
# healthy, a one-line "start.sh: WARNING ..." says so and the daemon runs anyway. The
# daemon answers /health on WATCHER_HTTP_PORT from its first second and waits for the VLM
# server itself before warming a VLM engine, so nothing here blocks.
#
# A VLM server that exits is started again, after a delay that doubles with each exit in
# a row (WATCHER_VLM_RESTART_DELAY, 2x, 4x, ... up to WATCHER_VLM_RESTART_MAX_DELAY); a run
# that stayed up WATCHER_VLM_RESTART_RESET_AFTER seconds starts the count again. Each exit
# is logged with its code, how long the run lasted, the restart number and the delay.
# Once the daemon exits, the VLM server is stopped (TERM, KILL 10 s later) and not restarted.
#
# The daemon gets WATCHER_VLM_MANAGED=1 when this script started a VLM server beside it
# (the server is this container's to keep: the daemon's /health reports it when it stays
# unreachable too long, so that liveness restarts the container), and
# WATCHER_VLM_MANAGED=0 when it did not (no GPU, WATCHER_VLM_SERVER=off, no server command).
#
# Settings (environment, all optional):
#   WATCHER_VLM_SERVER       auto | on | off (default auto: start only when `nvidia-smi -L`
#                            succeeds and lists a GPU; on: start without checking)
#   WATCHER_VLM_BACKEND      vllm | genai_server (default vllm: upstream `vllm serve`, which
#                            the image ships; genai_server runs `paddleocr genai_server ...
#                            --backend vllm` and needs PaddleX's vLLM plugin, not in the image)
#   WATCHER_PIPELINE_VERSION PaddleOCR-VL release: v1 | v1.5 | v1.6 (default v1.6). It picks
#                            the defaults of the next two, as the daemon does.
#   WATCHER_VLM_MODEL_SOURCE weights: Hugging Face id or local directory
#                            (default PaddlePaddle/PaddleOCR-VL-1.6 for v1.6)
#   WATCHER_VLM_MODEL        served model name (default PaddleOCR-VL-1.6-0.9B for v1.6). The
#                            daemon's VLM engines request exactly this name; a mismatch
#                            shows up as "The model ... does not exist" from vLLM.
#   WATCHER_VLM_PADDLEOCR    the `paddleocr` command for the genai_server backend
#                            (default paddleocr)
#   WATCHER_VLM_HOST         bind address of the VLM server (default 127.0.0.1)
#   WATCHER_VLM_PORT         its port (default 8080)
#   WATCHER_VLM_GPU_MEMORY_UTILIZATION   share of GPU memory vLLM may take (default 0.5;
#                            the rest is left to the in-process layout model)
#   WATCHER_VLM_MAX_MODEL_LEN            context length vLLM sizes its KV cache for (default
#                            16384, as PaddleX's own vLLM settings for PaddleOCR-VL; the
#                            model's own 131072 does not fit small cards and MIG slices)
#   WATCHER_VLM_MAX_NUM_BATCHED_TOKENS   default 16384 (vLLM's PaddleOCR-VL recipe)
#   WATCHER_VLM_MAX_NUM_SEQS default 64
#   WATCHER_VLM_EXTRA_ARGS   more arguments for the server, split on whitespace (no
#                            quoting, no globbing), appended last (default empty)
#   WATCHER_VLM_STARTUP_TIMEOUT  seconds to wait for the server's /health before logging a
#                            warning (default 900); the daemon has its own, same-named limit
#   WATCHER_VLM_HEALTH_INTERVAL  seconds between /health probes (default 2)
#   WATCHER_VLM_RESTART      on | off (default on): start the VLM server again when it exits
#   WATCHER_VLM_RESTART_DELAY        seconds before the first restart (default 5)
#   WATCHER_VLM_RESTART_MAX_DELAY    the longest delay between restarts (default 300): a
#                            server that cannot start (out of memory, bad weights) is
#                            tried every 5 minutes at most, each try costing a model load
#   WATCHER_VLM_RESTART_RESET_AFTER  seconds a run must last to count as healthy again, so
#                            that the next restart waits WATCHER_VLM_RESTART_DELAY (default 600)
#   WATCHER_MODEL_CACHE      where weights are downloaded at start (default /models, a
#                            volume); exported as HF_HOME, PADDLE_PDX_CACHE_HOME and
#                            VLLM_CACHE_ROOT unless those are already set
#   WATCHER_PYTHON           interpreter that runs the daemon (default python)
# The delays accept decimals (0.5) to the millisecond.
# Arguments to this script are passed on to `python -m watcher run`.

# No `set -e`: a failing optional step must turn into a warning, never stop the daemon.
set -uo pipefail

log() { printf 'start.sh: %s\n' "$*"; }
warn() { printf 'start.sh: WARNING %s\n' "$*"; }

WATCHER_VLM_SERVER="${WATCHER_VLM_SERVER:-auto}"
WATCHER_VLM_BACKEND="${WATCHER_VLM_BACKEND:-vllm}"
# Keep in step with PADDLEOCR_VL_MODELS in the daemon's settings (tests/test_start_sh.py).
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
WATCHER_VLM_MAX_MODEL_LEN="${WATCHER_VLM_MAX_MODEL_LEN:-16384}"
WATCHER_VLM_MAX_NUM_BATCHED_TOKENS="${WATCHER_VLM_MAX_NUM_BATCHED_TOKENS:-16384}"
WATCHER_VLM_MAX_NUM_SEQS="${WATCHER_VLM_MAX_NUM_SEQS:-64}"
WATCHER_VLM_EXTRA_ARGS="${WATCHER_VLM_EXTRA_ARGS:-}"
WATCHER_VLM_STARTUP_TIMEOUT="${WATCHER_VLM_STARTUP_TIMEOUT:-900}"
WATCHER_VLM_HEALTH_INTERVAL="${WATCHER_VLM_HEALTH_INTERVAL:-2}"
WATCHER_VLM_RESTART="${WATCHER_VLM_RESTART:-on}"
WATCHER_VLM_RESTART_DELAY="${WATCHER_VLM_RESTART_DELAY:-5}"
WATCHER_VLM_RESTART_MAX_DELAY="${WATCHER_VLM_RESTART_MAX_DELAY:-300}"
WATCHER_VLM_RESTART_RESET_AFTER="${WATCHER_VLM_RESTART_RESET_AFTER:-600}"
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

# Seconds ("5", "0.25") as whole milliseconds; fails on anything else.
to_ms() {
    [[ "$1" =~ ^([0-9]+)(\.([0-9]*))?$ ]] || return 1
    local whole="${BASH_REMATCH[1]}" frac="${BASH_REMATCH[3]}000"
    printf '%d' "$((10#$whole * 1000 + 10#${frac:0:3}))"
}

# Milliseconds as seconds for logs and sleep: 5000 -> 5, 250 -> 0.25.
ms_to_s() {
    local whole=$(($1 / 1000)) frac
    frac="$(printf '%03d' $(($1 % 1000)))"
    frac="${frac%%0}"; frac="${frac%%0}"; frac="${frac%%0}"
    if [[ -n "$frac" ]]; then printf '%d.%s' "$whole" "$frac"; else printf '%d' "$whole"; fi
}

# A delay setting in milliseconds, or its default with a warning (on stderr, since the
# value itself is read from stdout).
ms_setting() {
    local name="$1" default="$2"
    if ! to_ms "${!name}"; then
        warn "$name is not a number of seconds; using $default" >&2
        to_ms "$default"
    fi
}
restart_delay_ms="$(ms_setting WATCHER_VLM_RESTART_DELAY 5)"
restart_max_delay_ms="$(ms_setting WATCHER_VLM_RESTART_MAX_DELAY 300)"
restart_reset_after_ms="$(ms_setting WATCHER_VLM_RESTART_RESET_AFTER 600)"
((restart_max_delay_ms < restart_delay_ms)) && restart_max_delay_ms=$restart_delay_ms
case "$WATCHER_VLM_RESTART" in
    on | off) ;;
    *)
        warn "WATCHER_VLM_RESTART='$WATCHER_VLM_RESTART' is not on|off; using on"
        WATCHER_VLM_RESTART=on
        ;;
esac

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
                --max-model-len "$WATCHER_VLM_MAX_MODEL_LEN"
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
                "max-model-len: $WATCHER_VLM_MAX_MODEL_LEN" \
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

# One run of the VLM server: starts it, watches its health, stops it if the daemon
# exits first, and waits for it. Sets vlm_code and vlm_ran_ms.
run_vlm_once() {
    local daemon_pid="$1" attempt="$2"
    # stdin from /dev/null: the server must not compete with anything for the terminal.
    "${vlm_cmd[@]}" </dev/null > >(prefix_lines) 2>&1 &
    local vlm_pid=$! started_ms
    started_ms="$(now_ms)"
    log "vlm server started (pid $vlm_pid, attempt $attempt, backend $WATCHER_VLM_BACKEND, model $WATCHER_VLM_MODEL, port $WATCHER_VLM_PORT)"
    watch_vlm_health "$vlm_pid" &
    local health_pid=$!
    (
        while kill -0 "$daemon_pid" 2>/dev/null && kill -0 "$vlm_pid" 2>/dev/null; do
            sleep 1
        done
        kill -TERM "$vlm_pid" 2>/dev/null || exit 0
        sleep 10
        kill -KILL "$vlm_pid" 2>/dev/null
    ) &
    local reaper_pid=$!
    vlm_code=0
    wait "$vlm_pid" || vlm_code=$?
    vlm_ran_ms=$(($(now_ms) - started_ms))
    kill "$health_pid" "$reaper_pid" 2>/dev/null
    wait "$health_pid" "$reaper_pid" 2>/dev/null
}

now_ms() {
    local now="${EPOCHREALTIME/[^0-9]/}"
    printf '%d' "$((10#$now / 1000))"
}

# Sleeps up to the given milliseconds; returns early (failing) once the daemon is gone.
sleep_while_daemon_runs() {
    local daemon_pid="$1" left_ms="$2" step_ms
    while ((left_ms > 0)); do
        kill -0 "$daemon_pid" 2>/dev/null || return 1
        step_ms=$((left_ms < 1000 ? left_ms : 1000))
        sleep "$(ms_to_s "$step_ms")"
        left_ms=$((left_ms - step_ms))
    done
    kill -0 "$daemon_pid" 2>/dev/null
}

# Runs in the background for the daemon's whole life. It owns the VLM server process so
# that the daemon (after exec) never sees it as a child, restarts it with backoff when it
# exits, logs each exit, and stops it once the daemon is gone so that nothing outlives
# the daemon outside a container.
supervise_vlm() {
    local daemon_pid="$1" attempt=0 restarts=0 delay_ms="$restart_delay_ms"
    local vlm_code vlm_ran_ms
    while kill -0 "$daemon_pid" 2>/dev/null; do
        attempt=$((attempt + 1))
        run_vlm_once "$daemon_pid" "$attempt"
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            log "vlm server stopped with code $vlm_code after the daemon exited"
            return
        fi
        local ran
        ran="after $(ms_to_s "$vlm_ran_ms") s"
        if [[ "$WATCHER_VLM_RESTART" == off ]]; then
            warn "vlm server exited with code $vlm_code $ran; not restarted (WATCHER_VLM_RESTART=off), the daemon keeps running without it (VLM engines report it unreachable)"
            return
        fi
        # A run that stayed up long enough was a healthy one: start the backoff afresh.
        ((vlm_ran_ms >= restart_reset_after_ms)) && delay_ms="$restart_delay_ms"
        restarts=$((restarts + 1))
        warn "vlm server exited with code $vlm_code $ran; restart $restarts in $(ms_to_s "$delay_ms") s (the daemon keeps running; VLM engines report it unreachable meanwhile)"
        if ! sleep_while_daemon_runs "$daemon_pid" "$delay_ms"; then
            log "vlm server not restarted: the daemon exited"
            return
        fi
        delay_ms=$((delay_ms * 2))
        ((delay_ms > restart_max_delay_ms)) && delay_ms="$restart_max_delay_ms"
    done
}

setup_model_cache
decide_vlm
export WATCHER_VLM_MANAGED=0
if [[ -n "$skip_reason" ]]; then
    log "no VLM server started: $skip_reason; engine ${WATCHER_ENGINE:-cpu}"
elif build_vlm_command; then
    log "starting vlm server: ${vlm_cmd[*]}"
    # $$ is this shell, which becomes the daemon at the exec below.
    WATCHER_VLM_MANAGED=1
    supervise_vlm "$$" &
else
    warn "vlm server not started: $vlm_problem; the daemon starts without it"
fi

exec "$PYTHON" -m watcher run "$@"
