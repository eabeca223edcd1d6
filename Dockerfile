# CPU image of gpudiffim (the NumPy backend).  The CUDA image comes with the CuPy backend.
#   docker build -t gpudiffim . && docker run --rm gpudiffim demo --output ''
FROM python:3.11-slim
WORKDIR /opt/gpudiffim
COPY setup.cfg pyproject.toml README.md ./
COPY gpudiffim ./gpudiffim
RUN pip install --no-cache-dir . && useradd --create-home astro
USER astro
WORKDIR /home/astro
ENTRYPOINT ["gpudiffim"]
CMD ["demo"]
