# The one image every microfed component and PyTorchJob worker runs in.
#   CPU (default):  docker build -t IMAGE .
#   CUDA:           docker build -t IMAGE --build-arg TORCH_VARIANT=cu128 .
# Not built in CI (the project's machines have no Docker engine); `make image IMAGE=...` wraps the build.
FROM python:3.11-slim

# cpu, or a CUDA tag of PyTorch's wheel index (cu126, cu128, ...). The CUDA wheels carry their own CUDA
# runtime; the GKE node supplies the driver.
ARG TORCH_VARIANT=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The image states its variant: the train step (microfed.training.image) keeps a resource plan off GPUs that a
# CPU build of torch cannot drive, instead of starting replicas that fail on nccl.
ENV MICROFED_TORCH_VARIANT=${TORCH_VARIANT}

WORKDIR /opt/microfed
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY training ./training
COPY components ./components
COPY pipelines ./pipelines
RUN pip install . && python -c "import microfed.training.worker, microfed.components"

# KFP runs lightweight components with `python3 -m kfp.dsl.executor_main`; PyTorchJob replicas run
# `python -m microfed.training.worker`. Neither needs root.
RUN useradd --create-home --uid 1000 microfed
USER 1000
