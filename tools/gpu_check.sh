#!/usr/bin/env bash
# One-GPU check (H100/H200), inside 8 minutes: the fused and compiled Pattention against the
# reference on the GPU, then the benchmark tables of the 150M and 450M configs (bf16, seq 2048)
# against the equal-FLOP GPT baseline. Results go to ${OUT:-gpu_results}/ as JSON and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
bench() {  # name, timeout, args...
    local name=$1 limit=$2; shift 2
    timeout "$limit" python tools/benchmark.py "$@" --steps 10 --warmup 3 --json "$out/$name.json" 2>&1 \
        | grep -v Warning | tee "$out/$name.log"
}
bench bench_150M 150 --config configs/150M.yml train.micro_batch_size=8 --check
bench bench_450M 150 --config configs/450M.yml train.micro_batch_size=8 --variants fused,kernels,compiled
bench bench_450M_model 150 --config configs/450M.yml train.micro_batch_size=8 --variants compiled \
    --compile-scope model
