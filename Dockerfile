# syntax=docker/dockerfile:1
# The watcher's GPU image: the daemon with PaddleOCR-VL (layout model in-process on Paddle)
# and a vLLM server for the VLM, which start.sh starts in the background.
#
# Build (pip's default index has no paddlepaddle-gpu 3.x; pass the CUDA 12.6 wheel index
# from Paddle's install guide):
#   docker build --build-arg PADDLE_INDEX_URL=<Paddle cu126 wheel index> -t watcher:gpu .
# Bake the weights into the image instead of fetching them into /models at start:
#   docker build --build-arg BAKE_MODELS=1 --build-arg PADDLE_INDEX_URL=... -t watcher:gpu .
# Run:
#   docker run --gpus all -p 8081:8081 --env-file s3.env -v watcher-models:/models watcher:gpu
# (-v keeps the weights fetched at the first start for the next ones.)

ARG CUDA_IMAGE_TAG=12.8.1-cudnn-runtime-ubuntu24.04
FROM nvidia/cuda:${CUDA_IMAGE_TAG}

# PaddleOCR 3.7 runs PaddleOCR-VL v1, v1.5 and v1.6 (the default; the daemon's and
# start.sh's defaults follow WATCHER_PIPELINE_VERSION). vLLM is not pinned here: PaddleOCR
# installs the version it supports for this release (`install_genai_server_deps vllm`).
ARG PADDLEOCR_VERSION=3.7.0
ARG PADDLE_VERSION=3.2.0
ARG PADDLE_INDEX_URL=""
ARG BAKE_MODELS=0
ARG VLM_MODEL_SOURCE=PaddlePaddle/PaddleOCR-VL-1.6

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc and python3-dev: Triton (under vLLM) compiles a small launcher at first use.
# libgl1/libglib2.0-0: OpenCV inside PaddleX. tini: reaps whatever the VLM server orphans.
# tesseract-ocr-*: the language data of the CPU engine (WATCHER_ENGINE=cpu), so that the
# image reads Russian without a GPU too.
# Ubuntu's point releases move, so apt versions are not pinned (the base tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev \
        curl ca-certificates tini libgl1 libglib2.0-0 libgomp1 \
        tesseract-ocr-rus tesseract-ocr-eng tesseract-ocr-osd \
    && rm -rf /var/lib/apt/lists/*

# Two environments, because paddlepaddle-gpu and vLLM's torch pin different exact
# nvidia-* CUDA wheels and pip cannot install both into one. The `gpu` extra of
# pyproject.toml goes with the watcher; /opt/vllm holds vLLM as PaddleOCR pins it, with
# PaddleX's vLLM plugin for PaddleOCR-VL and its `paddleocr genai_server` launcher.
RUN python3 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install "paddleocr[doc-parser]==${PADDLEOCR_VERSION}" \
    && /opt/vllm/bin/paddleocr install_genai_server_deps vllm \
    && ln -s /opt/vllm/bin/vllm /usr/local/bin/vllm

RUN if [ -z "${PADDLE_INDEX_URL}" ]; then \
        echo "set --build-arg PADDLE_INDEX_URL to Paddle's CUDA 12.6 wheel index" >&2; exit 1; \
    fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url "${PADDLE_INDEX_URL}" \
        "paddlepaddle-gpu==${PADDLE_VERSION}" \
    && /opt/venv/bin/pip install "paddleocr[doc-parser]==${PADDLEOCR_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY watcher ./watcher
RUN /opt/venv/bin/pip install .
COPY --chmod=0755 start.sh /app/start.sh

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin watcher \
    && mkdir -p /models \
    && chown 10001:10001 /models

# PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK: PaddleX otherwise probes every model host at
# import, which delays start-up.
ENV PATH="/opt/venv/bin:${PATH}" \
    WATCHER_PYTHON=/opt/venv/bin/python \
    WATCHER_ENGINE=paddleocr-vl \
    WATCHER_MODEL_CACHE=/models \
    WATCHER_HTTP_PORT=8081 \
    WATCHER_VLM_PORT=8080 \
    WATCHER_VLM_PADDLEOCR=/opt/vllm/bin/paddleocr \
    WATCHER_LOG_FORMAT=json \
    PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK=True

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# /models is a plain directory, not a VOLUME: mount a volume there to keep weights fetched
# at start across restarts (docker run -v NAME:/models, or the Kubernetes volume). No
# VOLUME instruction: Cloud.ru's Container Apps refuse images that declare one, and a
# declared volume would also discard anything later build steps (the bake) write there.
# With BAKE_MODELS=1 the weights are in the image; a volume over /models would hide them.
RUN if [ "${BAKE_MODELS}" = "1" ]; then \
        HF_HOME=/models/huggingface /opt/vllm/bin/python -c \
            "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" \
            "${VLM_MODEL_SOURCE}" \
        && PADDLE_PDX_CACHE_HOME=/models/paddlex /opt/venv/bin/python -c \
            "from paddleocr import PaddleOCRVL; PaddleOCRVL(device='cpu', vl_rec_backend='vllm-server', vl_rec_server_url='http://127.0.0.1:8080/v1')"; \
    fi

EXPOSE 8080 8081

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${WATCHER_HTTP_PORT:-8081}/health || exit 1"]

ENTRYPOINT ["/usr/bin/tini", "--", "/app/start.sh"]
