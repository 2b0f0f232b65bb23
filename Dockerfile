# syntax=docker/dockerfile:1
# The watcher's GPU image: the daemon with PaddleOCR-VL (layout model in-process on Paddle)
# and a vLLM server for the VLM, which start.sh starts, supervises and restarts.
#
# Route: upstream vLLM, pinned at VLLM_VERSION, serving PaddleOCR-VL natively with
# `vllm serve <weights> --served-model-name <name>` (start.sh) — not PaddleX's vLLM plugin.
#   - vLLM has PaddleOCRVLForConditionalGeneration (the architecture of the PaddleOCR-VL
#     weights, v1 to v1.6) in its own model registry from 0.11.1 on; PaddleX 3.7 itself
#     records 0.11.1 as the first vLLM that serves its three PaddleOCR-VL models natively
#     (ALL_MODEL_INFO in paddlex/inference/genai/models) and then registers no plugin.
#   - PaddleX's route (`paddleocr install_genai_server_deps vllm`) pins vLLM 0.10.2, where
#     the model exists only as PaddleX's plugin, registered only when flash-attn and
#     xformers import; flash-attn is only an sdist on pip's index, which needs CUDA to
#     build. Upstream vLLM needs neither, and its environment needs no PaddleX.
#   - 0.11.2: the last release of the first line that has the model, what the model's
#     vLLM recipe was written for; torch 2.9.0 with CUDA 12.8 wheels (compute capability
#     7.0 to 12.0), transformers < 5 as PaddleX pins for its own vLLM server. From 0.20
#     vLLM drops that bound and moves to torch 2.11, whose CUDA 12.8 wheels drop Volta.
# tests/test_image_resolution.py resolves both environments below from this file's pins
# with `pip install --dry-run --report` and checks what the image relies on (the vLLM
# version and architecture, one CUDA major, one OpenCV, the served model).
#
# One CUDA stack per environment, all from wheels: torch brings CUDA 12.8 as nvidia-*
# wheels, paddlepaddle-gpu its CUDA 12.6 ones; the driver (libcuda) comes from the host
# through the NVIDIA container runtime. So the base is plain Ubuntu, not a CUDA image
# whose own CUDA and cuDNN neither environment would load. Driver: any CUDA 12 driver
# (>= 525.60.13 through CUDA's minor-version compatibility; >= 570 runs CUDA 12.8 natively).
# Two environments, because torch and paddlepaddle-gpu pin different exact nvidia-* wheels.
#
# Build (pip's index has no paddlepaddle-gpu 3.x: pass the CUDA 12.6 ("cu126") wheel index
# from Paddle's install guide; it is used alone, with -i, for Paddle and its dependencies):
#   docker build --build-arg PADDLE_INDEX_URL=<Paddle cu126 wheel index> -t watcher:gpu .
# Bake the weights into the image instead of fetching them into /models at start; the
# image then runs with the hubs offline (HF_HUB_OFFLINE=1):
#   docker build --build-arg BAKE_MODELS=1 --build-arg PADDLE_INDEX_URL=... -t watcher:gpu .
# Run:
#   docker run --gpus all -p 8081:8081 --env-file s3.env -v watcher-models:/models watcher:gpu
# (-v keeps the weights fetched at the first start for the next ones.)
# On a machine with a GPU, deploy/gpu-check.sh builds or pulls, starts and checks it.

ARG UBUNTU_TAG=24.04
FROM ubuntu:${UBUNTU_TAG}

# Python of the Ubuntu release above (24.04: 3.12); both environments are made with it.
ARG PYTHON_VERSION=3.12
# Recent enough for --uploaded-prior-to.
ARG PIP_VERSION=26.3
ARG VLLM_VERSION=0.11.2
# vLLM's dependencies as PyPI had them just after VLLM_VERSION came out: later releases of
# unpinned ones (nvidia-cudnn-frontend, nvidia-cutlass-dsl) bring CUDA 13 libraries.
# Move it together with VLLM_VERSION.
ARG VLLM_RESOLVED_AT=2025-11-25T00:00:00Z
# PaddleOCR-VL asks for paddlepaddle-gpu >= 3.2.1; PaddleX 3.7's install guide uses 3.3.0.
ARG PADDLE_VERSION=3.3.0
ARG PADDLE_INDEX_URL=""
ARG PADDLEOCR_VERSION=3.7.0
# The daemon's dependencies as of this date (what its tests ran against).
ARG DAEMON_RESOLVED_AT=2026-12-01T00:00:00Z
ARG BAKE_MODELS=0
# The PaddleOCR-VL release the image defaults to, and its weights (for BAKE_MODELS=1):
# keep the pair as in PADDLEOCR_VL_MODELS of the daemon's settings (a test holds them).
ARG PIPELINE_VERSION=v1.6
ARG VLM_MODEL_SOURCE=PaddlePaddle/PaddleOCR-VL-1.6

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python3.X-dev, gcc, libc6-dev: Triton (under vLLM) compiles a small launcher at first use.
# libgl1, libglib2.0-0t64: OpenCV (opencv-contrib-python, PaddleX's). libgomp1: Paddle.
# tini: PID 1, reaps whatever the VLM server orphans. curl: the health check.
# tesseract-ocr-*: the language data of the CPU engine (WATCHER_ENGINE=cpu), so that the
# image reads Russian without a GPU too.
# Ubuntu's point releases move, so apt versions are not pinned (the base tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
        gcc libc6-dev curl ca-certificates tini libgl1 libglib2.0-0t64 libgomp1 \
        tesseract-ocr-rus tesseract-ocr-eng tesseract-ocr-osd \
    && rm -rf /var/lib/apt/lists/*

# The VLM server's environment: vLLM alone (it brings torch and its CUDA wheels).
RUN "python${PYTHON_VERSION}" -m venv /opt/vllm \
    && /opt/vllm/bin/pip install "pip==${PIP_VERSION}" \
    && /opt/vllm/bin/pip install --only-binary=:all: --uploaded-prior-to "${VLLM_RESOLVED_AT}" \
        "vllm==${VLLM_VERSION}" \
    && ln -s /opt/vllm/bin/vllm /usr/local/bin/vllm

# The daemon's environment: Paddle from Paddle's index only, then PaddleOCR and the watcher
# from pip's index (pip keeps the Paddle it has).
RUN if [ -z "${PADDLE_INDEX_URL}" ]; then \
        echo "set --build-arg PADDLE_INDEX_URL to Paddle's CUDA 12.6 wheel index" >&2; exit 1; \
    fi \
    && "python${PYTHON_VERSION}" -m venv /opt/venv \
    && /opt/venv/bin/pip install "pip==${PIP_VERSION}" \
    && /opt/venv/bin/pip install -i "${PADDLE_INDEX_URL}" "paddlepaddle-gpu==${PADDLE_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY watcher ./watcher
RUN /opt/venv/bin/pip install --only-binary=:all: --uploaded-prior-to "${DAEMON_RESOLVED_AT}" \
        "paddleocr[doc-parser]==${PADDLEOCR_VERSION}" /app
COPY --chmod=0755 start.sh /app/start.sh

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin watcher \
    && mkdir -p /models \
    && chown 10001:10001 /models

# PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK: PaddleX otherwise probes every model host at
# import, which delays start-up. PADDLE_PDX_DISABLE_DEVICE_FALLBACK: a layout model told
# to use the GPU raises when Paddle cannot see one, instead of running on the CPU quietly.
# NVIDIA_*: what CUDA base images declare, for runtimes that read them from the image.
ENV PATH="/opt/venv/bin:${PATH}" \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WATCHER_PYTHON=/opt/venv/bin/python \
    WATCHER_ENGINE=paddleocr-vl \
    WATCHER_PIPELINE_VERSION=${PIPELINE_VERSION} \
    WATCHER_MODEL_CACHE=/models \
    WATCHER_HTTP_PORT=8081 \
    WATCHER_VLM_PORT=8080 \
    WATCHER_LOG_FORMAT=json \
    PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK=True \
    PADDLE_PDX_DISABLE_DEVICE_FALLBACK=True

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# /models is a plain directory, not a VOLUME: mount a volume there to keep weights fetched
# at start across restarts (docker run -v NAME:/models, or the Kubernetes volume). No
# VOLUME instruction: Cloud.ru's Container Apps refuse images that declare one, and a
# declared volume would also discard anything later build steps (the bake) write there.
# With BAKE_MODELS=1 the weights are in the image; a volume over /models would hide them.
# The bake builds the pipeline as the daemon does (same release), on the CPU, so that
# PaddleX fetches every model that pipeline loads.
RUN case "${BAKE_MODELS}" in 0|1) ;; *) echo "BAKE_MODELS must be 0 or 1" >&2; exit 1 ;; esac \
    && if [ "${BAKE_MODELS}" = "1" ]; then \
        HF_HOME=/models/huggingface /opt/vllm/bin/python -c \
            "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" \
            "${VLM_MODEL_SOURCE}" \
        && PADDLE_PDX_CACHE_HOME=/models/paddlex /opt/venv/bin/python -c \
            "import sys; from paddleocr import PaddleOCRVL; PaddleOCRVL(pipeline_version=sys.argv[1], device='cpu', vl_rec_backend='vllm-server', vl_rec_server_url='http://127.0.0.1:8080/v1')" \
            "${PIPELINE_VERSION}"; \
    fi

# Baked weights: nothing may reach a model hub at run time (vLLM, transformers and
# PaddleX's Hugging Face downloads all go through huggingface_hub, which reads these).
ENV HF_HUB_OFFLINE=${BAKE_MODELS} \
    TRANSFORMERS_OFFLINE=${BAKE_MODELS}

EXPOSE 8080 8081

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${WATCHER_HTTP_PORT:-8081}/health || exit 1"]

ENTRYPOINT ["/usr/bin/tini", "--", "/app/start.sh"]
