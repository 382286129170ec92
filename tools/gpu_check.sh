#!/usr/bin/env bash
# One-GPU check (H100/H200), inside about 8 minutes: the fused and compiled Pattention against the
# reference on the GPU; the benchmark tables of the 150M and 450M configs (bf16, seq 2048) against
# the equal-FLOP GPT baseline; then the launcher end to end at 450M (DeepSpeed engine, ZeRO-1,
# clipping, the data loader, the default `auto` speed settings) for 30 steps on a synthetic corpus
# prepared here (the machine needs no network), its tokens/s and MFU next to the benchmark's.
# With 2 or more GPUs also TP=2 and DP=2 end to end. Results go to ${OUT:-gpu_results}/.
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
bench bench_150M 150 --config configs/150M.yml train.micro_batch_size=8 --check --rounds 2 --decode 512
bench bench_450M 120 --config configs/450M.yml train.micro_batch_size=8 --variants fused,compiled --rounds 1

# End to end through the launcher: a synthetic text corpus (random words), tokenized here.
python - "$out/e2e_text" <<'PY'
import random, sys, pathlib
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
for i in range(8):  # 8 documents of 20,000 lines of 20 words
    (d / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choices(words, k=20)) for _ in range(20_000)))
PY
python tools/prepare_data.py --input "$out/e2e_text" --output "$out/e2e_data" --vocab-size 4096 2>&1 | tail -1
e2e() {  # name, nproc, overrides...
    local name=$1 nproc=$2; shift 2
    timeout 200 torchrun --nproc_per_node "$nproc" launch/pretrain.py --config configs/450M.yml \
        data.path="$out/e2e_data" data.prepare=null model.seq_length=2048 train.micro_batch_size=8 \
        train.global_batch_size=$((8 * nproc)) train.steps=30 train.warmup_steps=5 log.interval=5 \
        eval.interval=0 checkpoint.interval=0 log.progress=false log.wandb_mode=disabled log.lock=false \
        log.dir="$out/$name" "$@" 2>&1 | grep -v Warning | tail -5 | tee "$out/$name.log"
    python - "$out/$name/metrics.jsonl" "$out/bench_450M.json" "$nproc" <<'PY' | tee -a "$out/$name.log"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l][1:]  # the first window holds compilation
bench = json.load(open(sys.argv[2]))
nproc = int(sys.argv[3])
tps = statistics.median(r["tokens_per_sec"] for r in rows) / nproc
tfl = statistics.median(r["tflops"] for r in rows) / nproc
best = min((r for r in bench["rows"] if r["variant"].startswith("tokenformer")), key=lambda r: r["step_ms"])
print(f"end to end: {tps:,.0f} tokens/s per GPU, {tfl:.1f} TFLOP/s per GPU, MFU {1e12 * tfl / bench['peak_flops']:.1%}; "
      f"benchmark {best['variant']}: {best['tokens_per_sec']:,.0f} tokens/s, MFU {best['mfu']:.1%}; "
      f"end to end / benchmark = {tps / best['tokens_per_sec']:.3f}")
PY
}
e2e e2e_450M 1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    e2e e2e_450M_tp2 2 parallel.tensor=2
    e2e e2e_450M_dp2 2
else
    echo "one GPU: no 2-GPU (TP=2, DP=2) end-to-end run" | tee "$out/e2e_2gpu.log"
fi
