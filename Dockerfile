# gpudiffim with the CUDA 12 CuPy wheel and matplotlib (for --plots).  Build, then run as
# yourself so that the files written into the mounted folder are yours (GPU runs need the
# NVIDIA container toolkit):
#   docker build -t gpudiffim .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD":/data -v gpudiffim-cache:/cache \
#       gpudiffim subtract /data/sci.fits /data/tmpl.fits -o /data/diff.fits
# Without a GPU the NumPy backend runs: docker run --rm gpudiffim demo --output ''
# The same image is a Dask worker for `gpudiffim batch` (dask and dask-cuda are installed);
# the scheduler and the client may run anywhere that reaches it:
#   docker run --rm --network host gpudiffim batch /data/pairs.csv --out /data/diffs   # local cluster
#   docker run --rm --network host --entrypoint dask gpudiffim scheduler
#   docker run --rm --network host --gpus all --user "$(id -u):$(id -g)" -v /survey:/survey \
#       --entrypoint dask gpudiffim cuda worker tcp://SCHEDULER:8786 --resources GPU=1
#   docker run --rm --network host -v /survey:/survey --entrypoint dask gpudiffim \
#       worker tcp://SCHEDULER:8786 --nworkers auto --nthreads 1                    # CPU-only hosts
# .ci/check_docker_context.py builds the wheel from exactly what the COPY lines below bring in.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Any uid may run the image (docker run --user): HOME, the CuPy and emulator caches and
# matplotlib's config folder are world-writable places, never a particular user's home.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    CUPY_CACHE_DIR=/cache/cupy \
    GPUDIFFIM_CACHE_DIR=/cache/gpudiffim \
    MPLCONFIGDIR=/tmp/matplotlib
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/gpudiffim
COPY setup.cfg pyproject.toml README.md ./
COPY gpudiffim ./gpudiffim
# setup.cfg maps the package gpudiffim.kernels to the top-level kernels/ (the CUDA sources)
COPY kernels ./kernels
RUN pip install --no-cache-dir ".[cuda12x,plot,dask-cuda12x]" \
    && useradd --no-log-init --no-create-home --uid 10001 astro \
    && mkdir -p /cache/cupy /cache/gpudiffim /data \
    && chmod 1777 /cache /data \
    && chmod 0777 /cache/cupy /cache/gpudiffim

USER 10001
WORKDIR /data
VOLUME ["/cache"]
ENTRYPOINT ["gpudiffim"]
CMD ["info"]
