from setuptools import find_packages, setup

HF = ["transformers>=4.56"]  # export to, and load from, Hugging Face transformers
# Zero-shot tasks through EleutherAI's harness. lm-eval's own `hf` model (docs/EVAL.md: scoring a
# `tools/export.py --format hf` export with stock lm_eval) imports transformers and accelerate: its
# [hf] extra without peft, which only its peft= argument loads.
EVAL = ["lm-eval>=0.4.8,<0.5", "accelerate>=0.26", *HF]

setup(
    name="megatron_tokenformer",
    version="0.1.0",
    description="Pretrain and grow TokenFormer language models with tensor, pipeline and ZeRO data parallelism",
    packages=find_packages(include=["megatron_tokenformer", "megatron_tokenformer.*"]),
    package_data={"megatron_tokenformer.evaluation": ["tasks/*.yaml"]},  # lm-eval task definitions
    python_requires=">=3.10",
    # torch is left open so GPU users keep the CUDA build they installed; on a CPU machine install
    # `torch==2.13.0` (the CPU wheel) first, as the README and .ci/run do.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy",
        "pyyaml",
        "sentencepiece>=0.2",
        "datasets>=3.0",
        "wandb>=0.18",
        "tqdm",
        "psutil",  # launcher_watch: a rank notices its launcher is gone (DeepSpeed needs it too)
        "safetensors",
        "tokenizers>=0.19",  # the GPT-NeoX tokenizer of the released models
        # tools/prepare_data.py runs on datatrove (pinned to the minor version: the preparation uses its
        # executors' and steps' interfaces); orjson for its JSON lines, zstandard for the Pile's .jsonl.zst,
        # xxhash for its exact dedup. In the base install because the quick start prepares data.
        "datatrove>=0.10.1,<0.11",
        "orjson",
        "zstandard",
        "xxhash",
    ],
    extras_require={
        "hf": HF,
        "eval": EVAL,
        # The tests cover export and evaluation, and read datatrove's and megatron-core's Megatron files
        # (megatron-core's IndexedDatasetBuilder is the independent writer; it needs torch, installed first).
        "dev": ["pytest>=8", "pytest-timeout", *HF, *EVAL, "megatron-core>=0.16", "matplotlib"],
        "experiments": ["matplotlib"],
        "data": [],  # kept so `pip install -e '.[data]'` still works: zstandard is in the base install now
        "ray": ["ray>=2.9"],  # tools/prepare_data.py --executor ray, on a running Ray cluster
    },
)
