# nnunet-jax on NVIDIA GPUs: jax with its CUDA plugin, NVIDIA DALI for the same CUDA major version, the project.
#   docker build -t nnunet-jax .
#   docker run --gpus all --ipc=host -v $PWD/data:/data -v $PWD/results:/results nnunet-jax \
#       python train.py --task 01 --dim 3 --fold 0 --amp --data /data/01_3d --results /results
# The install steps live in scripts/install.sh, which the test environment runs too (with --cuda none).
ARG CUDA_MAJOR=13
FROM nvidia/cuda:13.0.0-base-ubuntu24.04
ARG CUDA_MAJOR
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /workspace/nnunet_jax
COPY . .
RUN python3 -m venv /opt/venv \
 && bash scripts/install.sh --python /opt/venv/bin/python --cuda ${CUDA_MAJOR} \
 && rm -rf /root/.cache/pip
