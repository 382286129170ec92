"""Rank the parallel layouts of a config on N GPUs: memory per GPU and estimated step time.

    python tools/plan_parallelism.py --config configs/1.5B.yml --gpus 16 --gpu-memory 80GB
    python tools/plan_parallelism.py --config configs/450M.yml --gpus 8 --benchmark docs/perf/bench_450M_model.json

Compute speed: `--tflops` achieved per GPU, or the best TokenFormer row of a tools/benchmark.py
JSON (`--benchmark`), else 45% of an H100's bf16 peak. See megatron_tokenformer/planner.py for
the memory and time model.
"""
import argparse
import json
import sys

from megatron_tokenformer.config import ConfigError, load_config
from megatron_tokenformer.planner import HEADER, parse_memory, plans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-memory", default="80GB")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU")
    ap.add_argument("--benchmark", help="a tools/benchmark.py JSON to take the achieved TFLOP/s from")
    ap.add_argument("--intra-gbps", type=float, default=300.0, help="GB/s per GPU inside a node (NVLink)")
    ap.add_argument("--inter-gbps", type=float, default=25.0, help="GB/s per GPU between nodes")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tflops:
        tflops, source = args.tflops, "given"
    elif args.benchmark:
        rows = [r for r in json.load(open(args.benchmark))["rows"] if r["variant"].startswith("tokenformer")]
        tflops, source = max(r["tflops"] for r in rows), f"measured in {args.benchmark}"
    else:
        tflops, source = 0.45 * 989, "45% of H100 bf16 peak"
    vocab = cfg.model.vocab_size or 4096
    fit, every = plans(cfg, vocab, args.gpus, parse_memory(args.gpu_memory), tflops * 1e12, args.gpus_per_node,
                       args.intra_gbps, args.inter_gbps)
    print(f"{args.config} on {args.gpus} GPUs of {args.gpu_memory} ({args.gpus_per_node} per node), "
          f"{tflops:.0f} TFLOP/s per GPU ({source}); global batch {cfg.train.global_batch_size} x "
          f"{cfg.model.seq_length}, micro-batch {cfg.train.micro_batch_size}")
    if not fit:
        smallest = min(every, key=lambda p: p.total_gb, default=None)
        need = f"; the smallest needs {smallest.total_gb:.1f} GB per GPU" if smallest else ""
        print(f"no layout fits in 90% of {args.gpu_memory}{need}: add GPUs or lower train.micro_batch_size")
        return 1
    print(HEADER)
    for p in fit[:args.top]:
        print(p.row())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([p.__dict__ for p in fit], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
