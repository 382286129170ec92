"""Benchmark a TokenFormer config against an equal-FLOP GPT baseline, side by side in one run.

    python tools/benchmark.py --config configs/450M.yml train.micro_batch_size=8 --json out.json

For each variant (TokenFormer with the fused Pattention, with plain autograd, compiled; the GPT
baseline eager and compiled) it runs warm training steps (forward, backward, AdamW) on random
tokens, in rounds that interleave the variants (A B C, A B C, ...: each variant is built, warmed,
timed and freed in turn, so a variant and its baseline are timed close together and a change of
load on the machine moves both), and reports the median over rounds of tokens/s, model FLOPs per token, MFU, peak memory (GPU), activation bytes kept
for backward per token (counted in eager mode), the tensor-parallel bytes each rank would send per
token at the config's parallel.tensor (the formula tests check against mappings.py's counter), and
the ratios against the baseline with their spread (min and max over rounds). `--check` first compares the fused
Pattention with the reference on this device. `--decode N` also times greedy decoding of N new
tokens with and without the KV cache, and loglikelihood scoring in requests/s as the lm-eval backend
does it (`--decode-only`: nothing else). Runs on one GPU or on the
CPU; needs no DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from megatron_tokenformer.baseline import GPTModel, gpt_flops_per_token
from megatron_tokenformer.config import load_config
from megatron_tokenformer.generation import Sampling, generate
from megatron_tokenformer.model import TokenFormerModel, model_flops_per_token
from megatron_tokenformer.observe import mfu  # the formula the training run's `mfu` uses
from megatron_tokenformer.pattention import Pattention
from megatron_tokenformer.planner import saved_tensor_bytes, tp_bytes_per_token

# Dense peak FLOP/s (bf16 tensor cores; fp32 without TF32) by device name.
PEAKS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
         "L40S": (362e12, 91.6e12), "A10": (125e12, 31.2e12)}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in PEAKS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"{name} (table)"
        return float("nan"), f"{name} (not in the table)"
    n = 1024  # CPU: measured matmul throughput of this machine
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0), f"CPU ({torch.get_num_threads()} threads, measured matmul)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One model and its AdamW, built and warmed; `time(steps)` times training steps on `ids`."""

    def __init__(self, name: str, build, flops_per_token: int, ids, device, dtype, warmup: int,
                 compile_model: str | None, peak: float):
        torch.manual_seed(0)
        self.name, self.flops_per_token, self.ids, self.device, self.peak = name, flops_per_token, ids, device, peak
        self.model = build().to(device=device, dtype=dtype)
        self.act_bytes = saved_tensor_bytes(self.model, ids[:, :-1], ids[:, 1:])[1]
        if compile_model == "blocks":  # regional: one compiled graph serves every block (fast to compile)
            for block in self.model.blocks:
                block.compile()
        elif compile_model == "model":
            self.model.compile()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.step()
        sync(device)
        self.warm_s = time.perf_counter() - t0

    def step(self):
        loss = self.model(self.ids[:, :-1], self.ids[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def time(self, steps: int, measure_memory: bool) -> dict:
        if measure_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        sync(self.device)
        step_s = (time.perf_counter() - t0) / steps
        tokens = self.ids.shape[0] * (self.ids.shape[1] - 1)
        return {"variant": self.name, "step_ms": 1e3 * step_s, "tokens_per_sec": tokens / step_s,
                "flops_per_token": self.flops_per_token, "tflops": self.flops_per_token * tokens / step_s / 1e12,
                "mfu": mfu(self.flops_per_token, tokens / step_s, self.peak),
                "activation_bytes_per_token": self.act_bytes / tokens,
                "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if measure_memory else None,
                "warmup_s": self.warm_s, "final_loss": loss.item()}


def measure(plan, ids, device, dtype, args, peak) -> dict[str, list[dict]]:
    """Each variant's timings, one per round, the variants interleaved round by round.

    interleave=step: every variant is built and warmed once and stays resident; each round times
    `steps` steps of each in turn (the finest interleaving: robust to a machine whose load
    changes; peak memory is not measured, the other variants are resident). interleave=variant:
    each round builds, warms, times and frees each variant in turn (memory of one variant at a
    time; peak memory measured; for large models on one GPU)."""
    runs: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    if args.interleave == "step":
        built = [Variant(name, build, flops, ids, device, dtype, args.warmup, comp, peak)
                 for name, build, flops, comp in plan]
    for rnd in range(args.rounds):
        for i, (name, build, flops, comp) in enumerate(plan):
            if args.interleave == "step":
                row = built[i].time(args.steps, measure_memory=False)
            else:
                v = Variant(name, build, flops, ids, device, dtype, args.warmup, comp, peak)
                row = v.time(args.steps, measure_memory=device.type == "cuda")
                del v
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the variant's model and optimizer are gone: free their cache
            runs[name].append(row)
            print(json.dumps({"round": rnd, **row}), flush=True)
    return runs


def summarize(rounds: list[dict]) -> dict:
    """One variant's rounds: the median step time (and what follows from it), the largest peak."""
    step_ms = statistics.median(r["step_ms"] for r in rounds)
    first = rounds[0]
    tokens_per_step = first["tokens_per_sec"] * first["step_ms"] / 1e3
    mems = [r["peak_memory_gb"] for r in rounds if r["peak_memory_gb"] is not None]
    return {**first, "step_ms": step_ms, "step_ms_rounds": [r["step_ms"] for r in rounds],
            "tokens_per_sec": tokens_per_step / (step_ms / 1e3),
            "tflops": first["flops_per_token"] * tokens_per_step / (step_ms / 1e3) / 1e12,
            "mfu": first["mfu"] * first["step_ms"] / step_ms, "peak_memory_gb": max(mems) if mems else None,
            "final_loss": rounds[-1]["final_loss"]}


def check_fused(device: torch.device) -> list[dict]:
    """Fused Pattention against the plain-autograd reference on this device (fp32 and bf16)."""
    out = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for norm in ("l2_norm_gelu", "gelu_l2_norm", "softmax"):
            torch.manual_seed(0)
            layers = [Pattention(256, 256, 512, norm=norm, groups=3, impl=impl).to(device, dtype)
                      for impl in ("reference", "fused", "compiled")]
            for layer in layers[1:]:
                layer.load_state_dict(layers[0].state_dict())
            x = torch.randn(4, 128, 256, device=device, dtype=dtype)
            res = []
            for layer in layers:
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.float().square().sum().backward()
                res.append([y, xi.grad, layer.key_tokens.grad, layer.value_tokens.grad])
            for impl, got in zip(("fused", "compiled"), res[1:]):
                errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                        for a, b in zip(got, res[0])]
                out.append({"impl": impl, "dtype": str(dtype), "norm": norm, "max_rel_error": max(errs),
                            "ok": max(errs) <= tol})
    return out


def measure_decode(cfg, vocab: int, device, dtype, new_tokens: int, prompt_tokens: int = 16) -> dict:
    """Greedy decoding of `new_tokens` after a random prompt, with the KV cache and recomputing the
    whole sequence at each step: tokens/s of each (the prompt's forward included). The config's
    model with random weights; its seq_length raised to fit, if needed (only generate() reads it)."""
    m = cfg.model
    shape = type(m)(**{**m.__dict__, "seq_length": max(m.seq_length, prompt_tokens + new_tokens)})
    model = TokenFormerModel(shape, vocab, seed=0).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    generate(model, prompt, 8, Sampling(greedy=True))  # warm up
    out = {"new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "weights": "random",
           "seq_length": shape.seq_length, "threads": torch.get_num_threads()}
    for name, cache in (("cached", True), ("uncached", False)):
        g = generate(model, prompt, new_tokens, Sampling(greedy=True), use_cache=cache)
        out[f"{name}_tokens_per_sec"] = g.tokens_per_sec
    out["cache_speedup"] = out["cached_tokens_per_sec"] / out["uncached_tokens_per_sec"]
    print(json.dumps({"decode": out}), flush=True)
    return out


def measure_scoring(cfg, vocab: int, device, dtype, requests: int = 256, batch_size: int = 16) -> dict:
    """Loglikelihood scoring as the lm-eval backend does it (evaluation/scoring.py): requests/s of
    random (context, continuation) pairs, contexts of a quarter to a half of seq_length and
    continuations of 1-8 tokens (multiple-choice answers), batched by length."""
    from megatron_tokenformer.evaluation.scoring import score_continuations

    model = TokenFormerModel(cfg.model, vocab, seed=0).to(device=device, dtype=dtype).eval()
    g, t = torch.Generator().manual_seed(0), cfg.model.seq_length

    def rand(lo: int, hi: int) -> list[int]:
        return torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    reqs = [(rand(max(1, t // 4), max(1, t // 2)), rand(1, 8)) for _ in range(requests)]
    score_continuations(model, reqs[:batch_size], t, batch_size, device)  # warm up
    sync(device)
    start = time.perf_counter()
    score_continuations(model, reqs, t, batch_size, device)
    sync(device)
    out = {"requests": requests, "batch_size": batch_size, "weights": "random",
           "requests_per_sec": requests / (time.perf_counter() - start), "threads": torch.get_num_threads()}
    print(json.dumps({"scoring": out}), flush=True)
    return out


def data_loader_fraction(cfg, step_s: float) -> tuple[float | None, str | None]:
    """Time to produce one step's batches from the memory-mapped shards, as a fraction of a step; or
    (None, why not) when the config's data cannot be read. The benchmark itself trains on random
    tokens, so missing data only leaves this figure out, and the reason (which file, what to do) is
    reported; any other error is a bug and propagates."""
    from megatron_tokenformer.data import SampleSet, TrainBatches, load_meta
    from megatron_tokenformer.errors import UserError

    try:
        meta = load_meta(cfg.data.path, recipe=cfg.data.prepare, tokenizer=cfg.data.tokenizer)
    except (UserError, OSError) as e:
        return None, str(e)
    samples = SampleSet(meta, cfg.model.seq_length, "train", cfg.data.valid_fraction)
    mb = cfg.train.micro_batch_size
    batches = TrainBatches(samples, 0, mb, mb, 0, 1)
    t0 = time.perf_counter()
    for _ in range(20):
        batches.next_step()
    return (time.perf_counter() - t0) / 20 / step_s, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of all variants, medians reported (default: 15 at step "
                         "interleaving, 3 at variant interleaving)")
    ap.add_argument("--interleave", choices=["step", "variant"], default=None,
                    help="step: all variants resident, `--steps` steps of each per round (default on CPU); "
                         "variant: each round builds, times and frees each variant (default on GPUs, memory)")
    ap.add_argument("--variants", default="fused,kernels,reference,compiled",
                    help="TokenFormer variants: fused (eager, hand-written backward), kernels (fused with "
                         "compiled elementwise kernels), reference (autograd), compiled (torch.compile of the "
                         "fused model)")
    ap.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                    help="what the compiled variants compile: each block (regional) or the whole model")
    ap.add_argument("--no-compile-baseline", action="store_true")
    ap.add_argument("--check", action="store_true", help="check the fused Pattention against the reference first")
    ap.add_argument("--decode", type=int, default=0, metavar="N",
                    help="also time greedy decoding of N new tokens, with and without the KV cache")
    ap.add_argument("--decode-only", action="store_true", help="time decoding only (--decode, default 512)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.interleave = args.interleave or ("variant" if device.type == "cuda" else "step")
    args.rounds = args.rounds or (15 if args.interleave == "step" else 3)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else torch.float32
    vocab = cfg.model.vocab_size or 4096
    peak, peak_src = peak_flops(device, dtype)
    wbytes = 2 if dtype == torch.bfloat16 else 4
    result = {"config": args.config, "overrides": args.overrides, "compile_scope": args.compile_scope,
              "rounds": args.rounds, "steps": args.steps, "interleave": args.interleave,
              # at parallel.tensor of the config; the run itself is on one device
              "tp_collective_bytes_per_token": tp_bytes_per_token(cfg.model, cfg.parallel.tensor, wbytes), "device": peak_src, "dtype": str(dtype),
              "torch": torch.__version__, "micro_batch_size": cfg.train.micro_batch_size,
              "seq_length": cfg.model.seq_length, "peak_flops": peak, "date": time.strftime("%Y-%m-%d")}
    if args.check:
        result["check"] = check_fused(device)
        print(json.dumps(result["check"], indent=1), flush=True)
    if args.decode or args.decode_only:
        result["decode"] = measure_decode(cfg, vocab, device, dtype, args.decode or 512)
        result["scoring"] = measure_scoring(cfg, vocab, device, dtype)
    if args.decode_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.model.seq_length + 1), device=device)
    tf_flops, gpt_flops = model_flops_per_token(cfg.model, vocab), gpt_flops_per_token(cfg.model, vocab)

    impl = {"fused": "fused", "kernels": "compiled", "reference": "reference", "compiled": "fused"}

    def tokenformer(variant: str):
        m = cfg.model
        return lambda: TokenFormerModel(type(m)(**{**m.__dict__, "pattention_impl": impl[variant]}), vocab, seed=0)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    scope = args.compile_scope
    plan = [(f"tokenformer-{v}", tokenformer(v), tf_flops, scope if v == "compiled" else None) for v in variants]
    plan.append(("gpt-eager", lambda: GPTModel(cfg.model, vocab), gpt_flops, None))
    if not args.no_compile_baseline:
        plan.append(("gpt-compiled", lambda: GPTModel(cfg.model, vocab), gpt_flops, scope))
    runs = measure(plan, ids, device, dtype, args, peak)
    rows = [summarize(rs) for rs in runs.values()]
    ratios = {}
    for r in rows:
        if r["variant"].startswith("tokenformer"):
            base = "gpt-compiled" if r["variant"].endswith("compiled") and "gpt-compiled" in runs else "gpt-eager"
            per_round = sorted(a["step_ms"] / b["step_ms"] for a, b in zip(runs[r["variant"]], runs[base]))
            ratios[r["variant"]] = {"vs": base, "step_time": statistics.median(per_round),
                                    "step_time_min": per_round[0], "step_time_max": per_round[-1],
                                    "activation_bytes": r["activation_bytes_per_token"]
                                    / runs[base][0]["activation_bytes_per_token"]}
    result.update(rows=rows, ratios=ratios)
    fastest = min((r for r in rows if r["variant"].startswith("tokenformer")), key=lambda r: r["step_ms"], default=None)
    if fastest:
        result["data_loader_fraction"], result["data_loader_error"] = data_loader_fraction(
            cfg, fastest["step_ms"] / 1e3)
    print(table(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def table(res: dict) -> str:
    lines = [f"{res['config']} {' '.join(res['overrides'])} on {res['device']}, {res['dtype']}, "
             f"micro-batch {res['micro_batch_size']} x seq {res['seq_length']}, compiled: {res['compile_scope']}, "
             f"median of {res.get('rounds', 1)} rounds of {res.get('steps', '?')} steps, interleaved by "
             f"{res.get('interleave', 'variant')}",
             "| variant | step ms | tokens/s | TFLOP/s | MFU | act. bytes/token | peak GB | step vs baseline "
             "(min-max) | act. vs baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rt = res["ratios"].get(r["variant"], {})
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if not math.isnan(r["mfu"]) else "-"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_sec']:.0f} | {r['tflops']:.2f} | {mfu} | "
                     f"{r['activation_bytes_per_token']:.0f} | {mem} | "
                     + (f"{rt['step_time']:.3f} ({rt.get('step_time_min', rt['step_time']):.3f}-"
                        f"{rt.get('step_time_max', rt['step_time']):.3f}, {rt['vs']})" if rt else "") + " | "
                     + (f"{rt['activation_bytes']:.3f}" if rt else "") + " |")
    if res["tp_collective_bytes_per_token"]:
        lines.append(f"tensor-parallel collectives at parallel.tensor of the config: "
                     f"{res['tp_collective_bytes_per_token']:.0f} bytes sent per rank per token")
    if res.get("decode"):
        d = res["decode"]
        lines.append(f"decoding {d['new_tokens']} tokens (greedy, batch 1, random weights): "
                     f"{d['cached_tokens_per_sec']:.1f} tokens/s with the KV cache, "
                     f"{d['uncached_tokens_per_sec']:.1f} without ({d['cache_speedup']:.1f}x)")
    if res.get("scoring"):
        sc = res["scoring"]
        lines.append(f"loglikelihood scoring (lm-eval's multiple choice, batch {sc['batch_size']}): "
                     f"{sc['requests_per_sec']:.1f} requests/s")
    if res.get("data_loader_fraction") is not None:
        lines.append(f"data loader: {100 * res['data_loader_fraction']:.2f}% of the fastest step")
    elif res.get("data_loader_error"):
        lines.append(f"data loader: not measured, the config's data cannot be read: {res['data_loader_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
