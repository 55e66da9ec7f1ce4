# syntax=docker/dockerfile:1
# pagedserve frontend: FastAPI + uvicorn, tokenizer and detokenizer. No torch in this image.
#   docker build -f deploy/docker/frontend.Dockerfile -t pagedserve/frontend .
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
COPY deploy/docker/requirements-frontend.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY pagedserve ./pagedserve
COPY services ./services
COPY shared ./shared
COPY kernels ./kernels
# --no-deps: the requirements above are the whole dependency set; fail the build if torch slipped in.
RUN pip install --no-deps . \
    && python -c "import importlib.util, sys; sys.exit('torch must not be in the frontend image' if importlib.util.find_spec('torch') else 0)"

USER pagedserve
EXPOSE 8000
# /health answers 200 once the engine answers a ping; /metrics is on the same port.
CMD ["pagedserve", "frontend"]
