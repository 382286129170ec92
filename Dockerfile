# GPU image: CUDA PyTorch base, DeepSpeed and this package. Build: docker build -t megatron-tokenformer .
# Run:  docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megatron_tokenformer/runs megatron-tokenformer \
#         deepspeed launch/pretrain.py --config configs/150M.yml
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
CMD ["bash"]
