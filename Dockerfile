# The image that `lmrec launch k8s --image ...` runs: the CUDA stack, installed the way
# `make install DEVICE=cuda` installs it (the same pins and order). Build on a machine with Docker:
#   docker build -t REGISTRY/lmrec:TAG .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lmrec
COPY . .
RUN make install DEVICE=cuda PYTHON=python3.11 && rm -rf /root/.cache/pip
ENV PATH=/opt/lmrec/.venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/lmrec/.venv/torch_extensions \
    PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["lmrec", "--help"]
