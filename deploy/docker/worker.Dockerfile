# syntax=docker/dockerfile:1
# pagedserve worker: one model-runner rank (torch, Triton kernels) on a CUDA PyTorch base.
#   docker build -f deploy/docker/worker.Dockerfile -t pagedserve/worker .
# CPU build (docker-compose.cpu.yml passes these):
#   --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_SPEC=torch==2.13.0 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Keep BASE_IMAGE's torch in step with the version the Makefile tests (torch==2.13.0).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Empty: use the base image's torch. Set (with an index) to install torch on a plain Python base.
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 pagedserve) \
    && mkdir -p /cache/huggingface && chown -R 1000:1000 /cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pagedserve ./pagedserve
COPY services ./services
COPY shared ./shared
COPY kernels ./kernels
# The worker extra adds xgrammar (structured outputs); the torch it names is the base image's build.
RUN pip install '.[worker]' \
    && python -c "import torch, services.worker.service"

USER 1000
# 8002 + rank: /metrics
EXPOSE 8002
CMD ["pagedserve", "worker"]
