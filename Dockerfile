# The image every poolq service in docker-compose.yml runs.
FROM python:3.11-slim
WORKDIR /app
# The embed example needs PyTorch; the CPU build keeps the image small.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY poolq ./poolq
COPY workers ./workers
COPY config ./config
RUN pip install --no-cache-dir '.[embed]'
RUN useradd --create-home poolq
USER poolq
ENV POOLQ_CONFIG=/app/config/pools.toml PYTHONUNBUFFERED=1
