#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU and Docker: builds or pulls the
# image, starts it as production does (start.sh, vLLM, the daemon) beside a throwaway S3
# server (SeaweedFS, from the same image), and checks, one line each:
#
#   PASS|FAIL|SKIP <check> <detail>
#
#   image        the image is there (built with --build, pulled with --pull)
#   gpu          a container sees the GPU: name, driver (>= 525.60.13: CUDA 12), memory,
#                compute capability (>= 7.0, vLLM's floor)
#   s3           the throwaway S3 server answers
#   cold-start   seconds from `docker run` to /ready, on an empty model volume (weights
#                downloaded) or, for an image built with BAKE_MODELS=1, with no network
#                at all but the one to the S3 container (proves it needs no model hub)
#   vlm-models   vLLM's /v1/models lists the name start.sh served, which the daemon asks for
#   paddle       paddle.utils.run_check() in the daemon's environment
#   layout-gpu   the pipeline's layout model loads on gpu:0 and reads a page (Paddle may
#                not fall back to the CPU: PADDLE_PDX_DISABLE_DEVICE_FALLBACK)
#   document     one sample page dropped into the bucket comes back as a result written
#                by the paddleocr-vl engine, through the daemon, layout model and vLLM
#   warm-start   seconds from `docker restart` to /ready (weights and vLLM's compile
#                cache already on the volume)
#
# and exits 0 when nothing failed. Everything it starts is removed at the end (--keep
# leaves it for a look).

set -uo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/gpu-check.sh [options]

  --image NAME         image to check (default watcher:gpu)
  --build              build NAME from this checkout first (PADDLE_INDEX_URL from the
                       environment is passed on as the build argument of that name)
  --build-arg K=V      another build argument (repeatable; implies --build)
  --pull               pull NAME first
  --gpus SPEC          docker's --gpus value (default all)
  --ready-timeout S    seconds each start may take to /ready (default 1800)
  --timeout S          seconds each other check may take (default 600)
  --poll S             seconds between /ready probes (default 5)
  --name PREFIX        prefix of the containers, network and volume (default watcher-gpu-check)
  --keep               do not remove them at the end
  -h, --help           this text

Environment: DOCKER, the docker command (default docker).
EOF
}

DOCKER="${DOCKER:-docker}"
IMAGE=watcher:gpu
BUILD=0
PULL=0
BUILD_ARGS=()
GPUS=all
READY_TIMEOUT=1800
CHECK_TIMEOUT=600
POLL=5
PREFIX=watcher-gpu-check
KEEP=0

die_usage() {
    printf 'gpu-check: %s\n' "$1" >&2
    usage >&2
    exit 2
}

while (($#)); do
    case "$1" in
        --image) IMAGE="${2:-}"; shift ;;
        --build) BUILD=1 ;;
        --build-arg) BUILD_ARGS+=(--build-arg "${2:-}"); BUILD=1; shift ;;
        --pull) PULL=1 ;;
        --gpus) GPUS="${2:-}"; shift ;;
        --ready-timeout) READY_TIMEOUT="${2:-}"; shift ;;
        --timeout) CHECK_TIMEOUT="${2:-}"; shift ;;
        --poll) POLL="${2:-}"; shift ;;
        --name) PREFIX="${2:-}"; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
    shift
done
[[ -n "$IMAGE" ]] || die_usage "--image needs a name"
for number in "$READY_TIMEOUT" "$CHECK_TIMEOUT"; do
    [[ "$number" =~ ^[0-9]+$ ]] || die_usage "'$number' is not a whole number of seconds"
done
[[ "$POLL" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--poll '$POLL' is not a number of seconds"
((BUILD && PULL)) && die_usage "--build and --pull exclude each other"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN="$PREFIX-main"
S3="$PREFIX-s3"
NETWORK="$PREFIX-net"
VOLUME="$PREFIX-models"
S3_PORT=8333
BUCKET=documents
# Credentials of the throwaway S3 server only, made up for this run.
CLOUDRU_S3_ACCESS_KEY="gpu-check:$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
CLOUDRU_S3_SECRET_KEY="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export CLOUDRU_S3_ACCESS_KEY CLOUDRU_S3_SECRET_KEY
# docker exec does not see what start.sh exported for the daemon: point the checks run
# beside it at the same caches.
EXEC_ENV=(-e HF_HOME=/models/huggingface -e PADDLE_PDX_CACHE_HOME=/models/paddlex)

passed=0
failed=0
skipped=0
report() {
    local status="$1" name="$2"
    shift 2
    printf '%s %s %s\n' "$status" "$name" "$*"
    case "$status" in
        PASS) passed=$((passed + 1)) ;;
        FAIL) failed=$((failed + 1)) ;;
        *) skipped=$((skipped + 1)) ;;
    esac
}
skip() {
    local why="$1" name
    shift
    for name in "$@"; do
        report SKIP "$name" "$why"
    done
}

dk() { "$DOCKER" "$@"; }
# A program (not a function: timeout execs it) with a time limit, where coreutils' timeout is.
limit() {
    local seconds="$1"
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout "$seconds" "$@"
    else
        "$@"
    fi
}
last_line() { printf '%s\n' "$1" | sed '/^[[:space:]]*$/d' | tail -n 1; }

created_containers=()
created_network=0
created_volume=0
cleanup() {
    if ((KEEP)); then
        printf 'gpu-check: kept %s\n' "${created_containers[*]:-nothing}" >&2
        return
    fi
    local name
    for name in "${created_containers[@]}"; do
        dk rm -f "$name" >/dev/null 2>&1
    done
    ((created_network)) && dk network rm "$NETWORK" >/dev/null 2>&1
    ((created_volume)) && dk volume rm "$VOLUME" >/dev/null 2>&1
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

summary() {
    printf 'gpu-check: %d PASS, %d FAIL, %d SKIP\n' "$passed" "$failed" "$skipped"
    ((failed == 0))
}

running() { [[ "$(dk inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" == "true" ]]; }

# Waits for the daemon's /ready; sets ready_seconds, or ready_problem and fails.
ready_seconds=0
ready_problem=""
wait_ready() {
    local started=$SECONDS body
    while ((SECONDS - started < READY_TIMEOUT)); do
        if ! running "$MAIN"; then
            ready_problem="the container stopped ($(dk inspect -f 'exit code {{.State.ExitCode}}' "$MAIN" 2>/dev/null)); last log line: $(last_line "$(dk logs --tail 20 "$MAIN" 2>&1)")"
            return 1
        fi
        if body="$(dk exec "$MAIN" curl -fsS --max-time 10 http://127.0.0.1:8081/ready 2>&1)"; then
            ready_seconds=$((SECONDS - started))
            return 0
        fi
        sleep "$POLL"
    done
    body="$(dk exec "$MAIN" curl -sS --max-time 10 http://127.0.0.1:8081/ready 2>&1)"
    ready_problem="not ready after ${READY_TIMEOUT} s: $(last_line "$body")"
    return 1
}

LAYOUT_PY="$(cat <<'PY'
import os, sys, time
from pathlib import Path

import numpy as np
import paddle
import paddlex
import yaml
from paddleocr import LayoutDetection

fallback = os.environ.get("PADDLE_PDX_DISABLE_DEVICE_FALLBACK", "")
if fallback.lower() not in ("1", "true"):
    sys.exit(f"PADDLE_PDX_DISABLE_DEVICE_FALLBACK={fallback!r}: a GPU failure would run on the CPU unseen")
if paddle.device.cuda.device_count() < 1:
    sys.exit(f"Paddle sees no GPU (compiled with CUDA: {paddle.device.is_compiled_with_cuda()})")
version = os.environ.get("WATCHER_PIPELINE_VERSION", "v1.6")
pipeline = "PaddleOCR-VL" if version == "v1" else f"PaddleOCR-VL-{version[1:]}"
config = Path(paddlex.__file__).parent / "configs" / "pipelines" / f"{pipeline}.yaml"
name = yaml.safe_load(config.read_text())["SubModules"]["LayoutDetection"]["model_name"]
model = LayoutDetection(model_name=name, device="gpu:0")
page = np.full((1400, 1000, 3), 255, dtype=np.uint8)
page[100:140, 100:900] = 0
page[300:1200:40, 100:900] = 0
model.predict(page)
start = time.monotonic()
boxes = model.predict(page)[0].get("boxes", [])
print(f"{name} ({pipeline}) on gpu:0: {len(boxes)} boxes, {time.monotonic() - start:.3f} s a page")
PY
)"

DOCUMENT_PY="$(cat <<'PY'
import json, os, sys, time
from pathlib import Path

import botocore.session
from botocore.config import Config

endpoint, bucket, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
samples = sorted(Path("/app").glob("watcher/**/samples/*.png"))
if not samples:
    sys.exit("no sample image in the image under /app/watcher")
sample = samples[0]
s3 = botocore.session.get_session().create_client(
    "s3", endpoint_url=endpoint, region_name="ru-central-1",
    aws_access_key_id=os.environ["CLOUDRU_S3_ACCESS_KEY"],
    aws_secret_access_key=os.environ["CLOUDRU_S3_SECRET_KEY"],
    config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                  response_checksum_validation="when_required"))
key = f"gpu-check/{int(time.time())}-{sample.name}"
inp = os.environ.get("WATCHER_INPUT_PREFIX", "input/")
out = os.environ.get("WATCHER_OUTPUT_PREFIX", "output/")
s3.put_object(Bucket=bucket, Key=inp + key, Body=sample.read_bytes())
started = time.monotonic()
while time.monotonic() < deadline:
    for suffix in (".json", ".error.json"):
        try:
            body = s3.get_object(Bucket=bucket, Key=out + key + suffix)["Body"].read()
        except s3.exceptions.NoSuchKey:
            continue
        result = json.loads(body)
        if "error" in result:
            sys.exit(f"{sample.name}: error record {result['error'].get('code')}: {result['error'].get('message')}")
        engine = result.get("engine", {}).get("name")
        text = " ".join(result.get("markdown", "").split())
        if engine != "paddleocr-vl":
            sys.exit(f"{sample.name}: read by engine {engine!r}, not paddleocr-vl")
        if not text:
            sys.exit(f"{sample.name}: the result has no text")
        print(f"{sample.name}: {len(result.get('pages', []))} page(s), {len(text)} characters by "
              f"{result['engine'].get('model')} in {time.monotonic() - started:.1f} s: {text[:60]!r}")
        sys.exit(0)
    time.sleep(1)
sys.exit(f"{sample.name}: no result after {sys.argv[3]} s")
PY
)"

# --- the image ---------------------------------------------------------------------
REMAINING=(gpu s3 cold-start vlm-models paddle layout-gpu document warm-start)
if ((BUILD)); then
    if [[ -n "${PADDLE_INDEX_URL:-}" ]]; then
        BUILD_ARGS+=(--build-arg PADDLE_INDEX_URL)
    fi
    if ! out="$(dk build -t "$IMAGE" "${BUILD_ARGS[@]}" "$REPO_ROOT" 2>&1)"; then
        report FAIL image "docker build failed: $(last_line "$out")"
        skip "no image" "${REMAINING[@]}"
        summary
        exit 1
    fi
elif ((PULL)); then
    if ! out="$(dk pull "$IMAGE" 2>&1)"; then
        report FAIL image "docker pull failed: $(last_line "$out")"
        skip "no image" "${REMAINING[@]}"
        summary
        exit 1
    fi
fi
if ! image_env="$(dk image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" 2>&1)"; then
    report FAIL image "$IMAGE is not there: $(last_line "$image_env") (use --build or --pull)"
    skip "no image" "${REMAINING[@]}"
    summary
    exit 1
fi
baked=0
grep -qx 'HF_HUB_OFFLINE=1' <<<"$image_env" && baked=1
if ((baked)); then
    report PASS image "$IMAGE (weights baked in, hubs offline)"
else
    report PASS image "$IMAGE (weights fetched at start into a volume)"
fi

# --- the GPU -----------------------------------------------------------------------
REMAINING=("${REMAINING[@]:1}")
if ! out="$(limit "$CHECK_TIMEOUT" "$DOCKER" run --rm --gpus "$GPUS" --entrypoint nvidia-smi "$IMAGE" \
        --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)"; then
    report FAIL gpu "a container gets no GPU: $(last_line "$out")"
    skip "no GPU in the container" "${REMAINING[@]}"
    summary
    exit 1
fi
IFS=, read -r gpu_name driver memory capability <<<"$(head -n 1 <<<"$out")"
gpu_name="${gpu_name# }"; driver="${driver// /}"; memory="${memory# }"; capability="${capability// /}"
gpu_detail="$gpu_name, driver $driver, $memory, compute capability $capability"
driver_ok=0
if [[ "$driver" =~ ^([0-9]+)\.([0-9]+) ]]; then
    major="${BASH_REMATCH[1]}"; minor="${BASH_REMATCH[2]}"
    ((major > 525 || (major == 525 && 10#$minor >= 60))) && driver_ok=1
fi
capability_ok=0
[[ "$capability" =~ ^([0-9]+)\. ]] && ((BASH_REMATCH[1] >= 7)) && capability_ok=1
if ((!driver_ok)); then
    report FAIL gpu "$gpu_detail: the CUDA 12 libraries need driver >= 525.60.13"
elif ((!capability_ok)); then
    report FAIL gpu "$gpu_detail: vLLM needs compute capability >= 7.0"
else
    report PASS gpu "$gpu_detail"
fi

# --- S3 beside it --------------------------------------------------------------------
REMAINING=("${REMAINING[@]:1}")
network_args=()
# Baked weights: the containers get a network to each other and nothing else.
((baked)) && network_args=(--internal)
if ! out="$(dk network create "${network_args[@]}" "$NETWORK" 2>&1)"; then
    report FAIL s3 "docker network create failed: $(last_line "$out")"
    skip "no network" "${REMAINING[@]}"
    summary
    exit 1
fi
created_network=1
# Expanded by the S3 container's shell, from the -e variables below.
# shellcheck disable=SC2016
S3_SCRIPT='set -e
d=/tmp/s3
mkdir -p "$d/data"
printf "{\"identities\":[{\"name\":\"gpu-check\",\"credentials\":[{\"accessKey\":\"%s\",\"secretKey\":\"%s\"}],\"actions\":[\"Admin\",\"Read\",\"Write\",\"List\",\"Tagging\"]}]}" \
    "$CLOUDRU_S3_ACCESS_KEY" "$CLOUDRU_S3_SECRET_KEY" >"$d/identities.json"
exec weed mini -dir="$d/data" -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port="$S3_PORT" \
    -s3.config="$d/identities.json" -bucket="$BUCKET" -admin.ui=false -webdav=false'
if ! out="$(dk run -d --name "$S3" --network "$NETWORK" --entrypoint /bin/sh \
        -e CLOUDRU_S3_ACCESS_KEY -e CLOUDRU_S3_SECRET_KEY -e "S3_PORT=$S3_PORT" -e "BUCKET=$BUCKET" \
        "$IMAGE" -c "$S3_SCRIPT" 2>&1)"; then
    report FAIL s3 "the S3 container did not start: $(last_line "$out")"
    skip "no S3" "${REMAINING[@]}"
    summary
    exit 1
fi
created_containers+=("$S3")
s3_started=$SECONDS
s3_ok=0
while ((SECONDS - s3_started < 60)); do
    code="$(dk exec "$S3" curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/$BUCKET" 2>/dev/null)"
    # Any S3 answer (403 to an unsigned request) means it serves.
    if [[ "$code" =~ ^[1-5][0-9][0-9]$ ]]; then
        s3_ok=1
        break
    fi
    running "$S3" || break
    sleep 1
done
if ((!s3_ok)); then
    report FAIL s3 "SeaweedFS did not answer: $(last_line "$(dk logs --tail 20 "$S3" 2>&1)")"
    skip "no S3" "${REMAINING[@]}"
    summary
    exit 1
fi
report PASS s3 "SeaweedFS at http://$S3:$S3_PORT, bucket $BUCKET"

# --- cold start --------------------------------------------------------------------
REMAINING=("${REMAINING[@]:1}")
volume_args=()
if ((!baked)); then
    if ! out="$(dk volume create "$VOLUME" 2>&1)"; then
        report FAIL cold-start "docker volume create failed: $(last_line "$out")"
        skip "no volume" "${REMAINING[@]}"
        summary
        exit 1
    fi
    created_volume=1
    volume_args=(-v "$VOLUME:/models")
fi
started_at=$SECONDS
if ! out="$(dk run -d --name "$MAIN" --gpus "$GPUS" --network "$NETWORK" --shm-size 2g \
        "${volume_args[@]}" \
        -e "CLOUDRU_S3_ENDPOINT=http://$S3:$S3_PORT" -e "CLOUDRU_S3_BUCKET=$BUCKET" \
        -e CLOUDRU_S3_ACCESS_KEY -e CLOUDRU_S3_SECRET_KEY \
        -e WATCHER_DRAIN_SECONDS=5 -e WATCHER_POLL_INTERVAL=2 \
        "$IMAGE" 2>&1)"; then
    report FAIL cold-start "docker run failed: $(last_line "$out")"
    skip "no container" "${REMAINING[@]}"
    summary
    exit 1
fi
created_containers+=("$MAIN")
if wait_ready; then
    if ((baked)); then
        report PASS cold-start "ready after $((SECONDS - started_at)) s (baked weights, no network beyond S3)"
    else
        report PASS cold-start "ready after $((SECONDS - started_at)) s (empty model volume: weights downloaded)"
    fi
else
    report FAIL cold-start "$ready_problem"
    dk logs --tail 60 "$MAIN" >&2 2>&1
    if ! running "$MAIN"; then
        skip "the container stopped" "${REMAINING[@]}"
        summary
        exit 1
    fi
fi

# --- inside the running container ------------------------------------------------------
logs="$(dk logs "$MAIN" 2>&1)"
served="$(grep -o -- '--served-model-name [^ ]*' <<<"$logs" | tail -n 1 | cut -d' ' -f2)"
[[ -n "$served" ]] || served="$(grep -o -- '--model_name [^ ]*' <<<"$logs" | tail -n 1 | cut -d' ' -f2)"
if ! models="$(limit "$CHECK_TIMEOUT" "$DOCKER" exec "$MAIN" curl -fsS --max-time 30 http://127.0.0.1:8080/v1/models 2>&1)"; then
    report FAIL vlm-models "GET /v1/models failed: $(last_line "$models")"
else
    ids="$(grep -o '"id": *"[^"]*"' <<<"$models" | sed 's/.*"\([^"]*\)"$/\1/' | tr '\n' ' ')"
    ids="${ids% }"
    if [[ -z "$served" ]]; then
        report FAIL vlm-models "start.sh logged no served model name; vLLM serves: ${ids:-nothing}"
    elif [[ " $ids " == *" $served "* ]]; then
        report PASS vlm-models "serves $served"
    else
        report FAIL vlm-models "start.sh serves '$served' but /v1/models lists: ${ids:-nothing}"
    fi
fi

if out="$(limit "$CHECK_TIMEOUT" "$DOCKER" exec "${EXEC_ENV[@]}" "$MAIN" /opt/venv/bin/python -c \
        'import paddle; paddle.utils.run_check()' 2>&1)"; then
    report PASS paddle "$(last_line "$out")"
else
    report FAIL paddle "$(last_line "$out")"
fi

if out="$(limit "$CHECK_TIMEOUT" "$DOCKER" exec "${EXEC_ENV[@]}" "$MAIN" /opt/venv/bin/python -c "$LAYOUT_PY" 2>&1)"; then
    report PASS layout-gpu "$(last_line "$out")"
else
    report FAIL layout-gpu "$(last_line "$out")"
fi

if out="$(limit $((CHECK_TIMEOUT + 30)) "$DOCKER" exec "$MAIN" /opt/venv/bin/python -c "$DOCUMENT_PY" \
        "http://$S3:$S3_PORT" "$BUCKET" "$CHECK_TIMEOUT" 2>&1)"; then
    report PASS document "$(last_line "$out")"
else
    report FAIL document "$(last_line "$out")"
fi

# --- warm start --------------------------------------------------------------------
if ! out="$(dk restart -t 60 "$MAIN" 2>&1)"; then
    report FAIL warm-start "docker restart failed: $(last_line "$out")"
elif wait_ready; then
    report PASS warm-start "ready after $ready_seconds s (restart with the model volume and compile cache)"
else
    report FAIL warm-start "$ready_problem"
fi

summary
