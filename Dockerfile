# gpudiffim with the CUDA 12 CuPy wheel.  Build and run (needs the NVIDIA container toolkit):
#   docker build -t gpudiffim .
#   docker run --rm --gpus all -v "$PWD":/data -v gpudiffim-cache:/cache gpudiffim \
#       subtract /data/sci.fits /data/tmpl.fits -o /data/diff.fits
# Without a GPU the NumPy backend runs: docker run --rm gpudiffim demo --output ''
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUPY_CACHE_DIR=/cache/cupy
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/gpudiffim
COPY setup.cfg pyproject.toml README.md ./
COPY gpudiffim ./gpudiffim
RUN pip install --no-cache-dir ".[cuda12x]" \
    && useradd --create-home --uid 10001 astro \
    && mkdir -p /cache/cupy /data \
    && chown 10001 /cache/cupy /data

USER 10001
WORKDIR /data
VOLUME ["/cache"]
ENTRYPOINT ["gpudiffim"]
CMD ["info"]
