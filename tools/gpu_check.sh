#!/usr/bin/env bash
# One-GPU check (H100/H200), inside 8 minutes: the fused Pattention against the reference on the
# GPU, then the benchmark table of the 150M and 450M configs (bf16, seq 2048) against the
# equal-FLOP GPT baseline. Results go to ${OUT:-gpu_results}/ as JSON and a log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 200 python tools/benchmark.py --config configs/150M.yml train.micro_batch_size=8 --check \
    --steps 10 --warmup 3 --json "$out/bench_150M.json" 2>&1 | tee "$out/bench_150M.log"
timeout 220 python tools/benchmark.py --config configs/450M.yml train.micro_batch_size=8 \
    --variants fused,compiled --steps 10 --warmup 3 --json "$out/bench_450M.json" 2>&1 | tee "$out/bench_450M.log"
