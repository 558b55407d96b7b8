# GPU image of epdserve (the chart's default image): CUDA runtime, the package with its CUDA torch,
# the kubernetes client for k8s:// discovery, the OTLP exporter for tracing; runs as a non-root
# user. Build from the repository root:
#   docker build -t ghcr.io/epdserve/epdserve:0.1.0 .
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/epdserve
COPY pyproject.toml README.md ./
COPY epdserve ./epdserve
COPY services ./services
COPY mmcache ./mmcache
COPY tuner ./tuner
COPY protos ./protos
# The same install CI runs (pip install of the package; DL3013: it is this checkout, not a PyPI
# name), with the CUDA build of the pinned torch.
# hadolint ignore=DL3013
RUN pip install --index-url https://download.pytorch.org/whl/cu130 "torch==2.13.0" \
    && pip install ".[kubernetes,otlp]" \
    && epdserve --help > /dev/null

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin epdserve
USER 10001:10001
EXPOSE 50051 8000 9400
ENTRYPOINT ["epdserve"]
CMD ["--help"]
