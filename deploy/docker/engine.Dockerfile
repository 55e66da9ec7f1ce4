# syntax=docker/dockerfile:1
# pagedserve engine: scheduler, KV block manager and prefix cache. Pure Python, no torch.
#   docker build -f deploy/docker/engine.Dockerfile -t pagedserve/engine .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

RUN useradd --create-home --uid 1000 pagedserve \
    && mkdir -p /cache/huggingface && chown -R pagedserve:pagedserve /cache

WORKDIR /app
COPY deploy/docker/requirements-engine.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY pagedserve ./pagedserve
COPY services ./services
COPY shared ./shared
COPY kernels ./kernels
# --no-deps: the requirements above are the whole dependency set; fail the build if torch slipped in.
RUN pip install --no-deps . \
    && python -c "import importlib.util, sys; sys.exit('torch must not be in the engine image' if importlib.util.find_spec('torch') else 0)"

USER pagedserve
# 5570/5571: frontend input/output ROUTERs, 5572: worker ROUTER, 8001: /metrics
EXPOSE 5570 5571 5572 8001
CMD ["pagedserve", "engine"]
