from setuptools import find_packages, setup

HF = ["transformers>=4.56"]  # export to, and load from, Hugging Face transformers
EVAL = ["lm-eval>=0.4.8,<0.5"]  # zero-shot tasks through EleutherAI's harness

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
        "safetensors",
        "tokenizers>=0.19",  # the GPT-NeoX tokenizer of the released models
    ],
    extras_require={
        "hf": HF,
        "eval": EVAL,
        "dev": ["pytest>=8", "pytest-timeout", *HF, *EVAL],  # the tests cover export and evaluation
        "experiments": ["matplotlib"],
        "data": ["zstandard"],  # the Pile's .jsonl.zst files
    },
)
