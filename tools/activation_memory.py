"""Activation bytes each rank keeps for backward, for one micro-batch, with and without sequence
parallelism, measured from the real autograd graph (saved-tensor hooks), not from a formula.

Every tensor size runs the whole model (embedding, blocks, final norm, vocab-parallel loss) on
that many gloo processes of this machine; the figure is the largest over the ranks (distinct
storages, parameters excluded: planner.saved_tensor_bytes).

    python tools/activation_memory.py --config configs/150M.yml --seq 256 --tp 1 2 4 [--markdown]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tokenformer.config import ModelConfig, load_config
from megatron_tokenformer.distributed import free_port
from megatron_tokenformer.model import TokenFormerModel
from megatron_tokenformer.planner import saved_tensor_bytes


def _measure(rank: int, world: int, port: int, cfg_dict: dict, vocab: int, micro: int, sp: bool, dtype: str,
             out_q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world))) if world > 1 else None
    cfg = ModelConfig(**cfg_dict)
    model = TokenFormerModel(cfg, vocab, tp_group=group, seed=0, sequence_parallel=sp).to(getattr(torch, dtype))
    ids = torch.randint(0, vocab, (micro, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    _, kept = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:])
    most = torch.tensor([kept], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    if rank == 0:
        out_q.put(int(most.item()))
    dist.destroy_process_group()


def measure(cfg: ModelConfig, vocab: int, tp: int, sp: bool, micro: int = 1, dtype: str = "float32") -> int:
    """Bytes the most loaded of `tp` tensor ranks keeps for backward for one micro-batch."""
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_measure, args=(tp, free_port(), dataclasses.asdict(cfg), vocab, micro, sp, dtype, q),
                       nprocs=tp, start_method="spawn")
    return q.get()


def table(cfg: ModelConfig, vocab: int, tps: list[int], micro: int, dtype: str) -> list[dict]:
    base = None
    rows = []
    for tp in tps:
        for sp in ((False, True) if tp > 1 else (False,)):
            b = measure(cfg, vocab, tp, sp, micro, dtype)
            base = b if tp == 1 else base
            rows.append({"tp": tp, "sequence_parallel": sp, "bytes": b,
                         "vs_tp1_over_tp": None if base is None else b / (base / tp)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a model shape, e.g. configs/150M.yml")
    ap.add_argument("--seq", type=int, default=256, help="sequence length (shrunk to fit a CPU)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="tensor sizes; start with 1")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    run = load_config(args.config, [])
    cfg = dataclasses.replace(run.model, seq_length=args.seq, activation_checkpointing=False,
                              pattention_impl="fused")
    vocab = run.model.vocab_size or 50304
    rows = table(cfg, vocab, args.tp, args.micro_batch, args.dtype)
    if not args.markdown:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.config}: {cfg.num_layers} layers, d={cfg.hidden_size}, vocab {vocab}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, {args.dtype}\n")
    print("| TP | sequence parallel | MiB per rank | / (TP=1 MiB / TP) |\n|---|---|---|---|")
    for r in rows:
        ratio = "" if r["vs_tp1_over_tp"] is None else f"{r['vs_tp1_over_tp']:.3f}"
        print(f"| {r['tp']} | {'yes' if r['sequence_parallel'] else 'no'} | {r['bytes'] / 2**20:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
