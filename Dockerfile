# slimconv: one image, two commands — the API (default) and a worker:
#   docker run IMAGE                       -> python -m service serve --host 0.0.0.0 --workers 0
#   docker run IMAGE python -m service worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLIMCONV_DATA_DIR=/data SLIMCONV_WORKERS=0
WORKDIR /app

# CPU PyTorch first, from PyTorch's CPU index, so nothing pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY models ./models
COPY search ./search
COPY service ./service
RUN pip install . && python -c "import service.app, search, models"

RUN useradd --create-home --uid 10001 slimconv && mkdir -p /data && chown slimconv /data
USER slimconv
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
