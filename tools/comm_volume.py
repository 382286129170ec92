"""Bytes each rank sends per token per layer under tensor parallelism, measured on gloo.

A TokenFormer block (token-sharded Pattentions) beside a Megatron GPT block of the same width
(column-parallel QKV and fc1, row-parallel output projection and fc2), both built on the same
collectives in megatron_tokenformer/mappings.py and counted by the same counter; and the
TokenFormer block under sequence parallelism (its backward gathers the sharded inputs again).

    python tools/comm_volume.py --hidden 1024 --tp 2 4 8 [--markdown]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_tokenformer import mappings as M
from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.distributed import free_port
from megatron_tokenformer.model import Block


class MegatronBlock(nn.Module):
    """The communication pattern of a Megatron GPT block: f (copy_to) before the column-parallel
    layers, g (reduce_from) after the row-parallel ones. Compute is a plain stand-in."""

    def __init__(self, d: int, tp: int, group):
        super().__init__()
        self.group = group
        self.qkv, self.out = nn.Linear(d, 3 * d // tp), nn.Linear(d // tp, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d // tp), nn.Linear(4 * d // tp, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        q, k, v = self.qkv(M.copy_to(self.ln1(x), self.group)).chunk(3, dim=-1)
        x = x + M.reduce_from(self.out(q * k.sigmoid() + v), self.group)
        return x + M.reduce_from(self.fc2(torch.relu(self.fc1(M.copy_to(self.ln2(x), self.group)))), self.group)


def _measure(rank, world, port, cfg_dict, tokens, out_q):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    cfg = ModelConfig(**cfg_dict)
    result = {}
    for name, block in (("tokenformer", Block(cfg, group)), ("megatron", MegatronBlock(cfg.hidden_size, world, group))):
        x = torch.randn(1, tokens, cfg.hidden_size, requires_grad=True)
        with M.count_comm() as comm:
            block(x).sum().backward()
        result[name] = {f"{op}/{phase}": b / tokens for (op, phase), b in comm.items()}
    if world > 1 and tokens % world == 0:  # sequence parallelism: this rank's shard of the tokens in and out
        x = torch.randn(1, tokens // world, cfg.hidden_size, requires_grad=True)
        with M.count_comm() as comm:
            Block(cfg, group, sequence_parallel=True)(x).sum().backward()
        result["tokenformer_sp"] = {f"{op}/{phase}": b / tokens for (op, phase), b in comm.items()}
    if rank == 0:
        out_q.put(result)
    dist.destroy_process_group()


def measure(cfg: ModelConfig, tp: int, tokens: int) -> dict:
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_measure, args=(tp, port, cfg.__dict__, tokens, q), nprocs=tp, start_method="spawn")
    return q.get()


def summarize(per_op: dict) -> dict:
    fwd = sum(v for k, v in per_op.items() if k.endswith("/fwd"))
    bwd = sum(v for k, v in per_op.items() if k.endswith("/bwd"))
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens-per-layer", type=int, nargs=3, default=None, metavar=("QKV", "PROJ", "FFN"),
                    help="parameter tokens; default hidden, hidden, 4*hidden (the released ratios)")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seq", type=int, default=32, help="tokens per measurement (bytes scale linearly)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    d = args.hidden
    qkv, proj, ffn = args.tokens_per_layer or (d, d, 4 * d)
    cfg = ModelConfig(num_layers=1, hidden_size=d, num_heads=args.heads, qkv_tokens=qkv, proj_tokens=proj,
                      ffn_tokens=ffn, seq_length=args.seq)
    rows = []
    for tp in args.tp:
        r = measure(cfg, tp, args.seq)
        rows.append({"tp": tp, "tokenformer": summarize(r["tokenformer"]), "megatron": summarize(r["megatron"]),
                     "tokenformer_ops": r["tokenformer"]})
        if "tokenformer_sp" in r:
            rows[-1].update(tokenformer_sp=summarize(r["tokenformer_sp"]), tokenformer_sp_ops=r["tokenformer_sp"])
    if not args.markdown:
        print(json.dumps(rows, indent=1))
        return
    print(f"Bytes sent per rank per token per layer, fp32 activations, d={d}, tokens {qkv}/{proj}/{ffn}\n")
    print("| TP | TokenFormer fwd | bwd | total | Megatron GPT fwd | bwd | total | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, m = r["tokenformer"], r["megatron"]
        print(f"| {r['tp']} | {t['fwd']:.0f} | {t['bwd']:.0f} | {t['total']:.0f} | {m['fwd']:.0f} | {m['bwd']:.0f} "
              f"| {m['total']:.0f} | {t['total'] / m['total']:.3f} |")
    print("\nTokenFormer per collective (TP=%d):\n" % rows[-1]["tp"])
    for k, v in sorted(rows[-1]["tokenformer_ops"].items()):
        print(f"- `{k}`: {v:.1f} B/token")
    sp = [r for r in rows if "tokenformer_sp" in r]
    if sp:
        print("\nWith sequence parallelism (parallel.sequence_parallel=true):\n")
        print("| TP | fwd | bwd | total | vs without |\n|---|---|---|---|---|")
        for r in sp:
            t = r["tokenformer_sp"]
            print(f"| {r['tp']} | {t['fwd']:.0f} | {t['bwd']:.0f} | {t['total']:.0f} | "
                  f"{t['total'] / r['tokenformer']['total']:.3f} |")
        print("\nTokenFormer with sequence parallelism per collective (TP=%d):\n" % sp[-1]["tp"])
        for k, v in sorted(sp[-1]["tokenformer_sp_ops"].items()):
            print(f"- `{k}`: {v:.1f} B/token")


if __name__ == "__main__":
    main()
