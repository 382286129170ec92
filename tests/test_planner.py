"""The layout planner: its memory figures against what a real model holds on the CPU, its step time
against what its documentation says it is, and the documented example against the tool."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tokenformer import TokenFormerModel, load_config
from megatron_tokenformer.model import model_flops_per_token
from megatron_tokenformer.planner import (GB, block_activation_bytes, estimate, plans, saved_tensor_bytes,
                                          tp_bytes_per_token)

ROOT = Path(__file__).resolve().parent.parent


def plan_tool():
    """tools/plan_parallelism.py as a module, to run its main() in this process (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("plan_parallelism_tool", ROOT / "tools" / "plan_parallelism.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
        "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=4",
        "train.global_batch_size=4"]


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_memory_figures_match_a_real_model(impl):
    cfg = load_config("configs/tiny.yml", TINY + [f"model.pattention_impl={impl}"])
    vocab = 512
    act = block_activation_bytes(cfg.model, torch.float32)
    plan = estimate(cfg, vocab, 1, 1, 1, 1, False, act, 1e12, 8, 300, 25)
    torch.manual_seed(0)
    model = TokenFormerModel(cfg.model, vocab)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.weights_gb * GB == pytest.approx(weights, rel=1e-6)
    assert plan.grads_gb * GB == pytest.approx(weights, rel=1e-6)
    ids = torch.randint(0, vocab, (4, 65))
    loss, saved = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:])
    assert plan.activations_gb * GB == pytest.approx(saved, rel=0.15), (plan.activations_gb * GB, saved)
    loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert plan.optimizer_gb * GB == pytest.approx(moments, rel=1e-6)  # fp32 training: moments only


def test_zero_and_checkpointing_reduce_memory():
    cfg = load_config("configs/450M.yml")
    act = block_activation_bytes(cfg.model, torch.bfloat16, seq=64)
    z = {s: estimate(cfg, 50304, 1, 1, 8, s, False, act, 4e14, 8, 300, 25) for s in (0, 1, 2)}
    assert z[1].optimizer_gb == pytest.approx(z[0].optimizer_gb / 8)  # ZeRO-1 shards the moments over 8 ranks
    assert z[1].optimizer_gb == z[2].optimizer_gb and z[2].grads_gb == pytest.approx(z[1].grads_gb / 8)
    assert z[0].weights_gb == z[1].weights_gb == z[2].weights_gb
    ck = estimate(cfg, 50304, 1, 1, 8, 1, True, act, 4e14, 8, 300, 25)
    assert ck.activations_gb < z[1].activations_gb / 3 and ck.step_s > z[1].step_s


def test_best_first_and_refusal():
    cfg = load_config("configs/1.5B.yml")
    fit, every = plans(cfg, 50304, 16, 40, 4e14)
    assert fit and [p.step_s for p in fit] == sorted(p.step_s for p in fit)
    assert {p.zero_stage for p in every} <= {0, 1, 2}  # only what the config accepts
    assert all(p.total_gb <= 36 for p in fit) and len(every) > len(fit)
    out = subprocess.run([sys.executable, "tools/plan_parallelism.py", "--config", "configs/1.5B.yml", "--gpus", "2",
                          "--gpu-memory", "8GB"], capture_output=True, text=True)
    assert out.returncode == 1 and "no layout fits" in out.stdout


# ---------------------------------------------------------------- the step time


def test_step_time_is_compute_stretched_by_the_bubble_plus_every_collective():
    """What planner.py and docs/PERFORMANCE.md say the step time is: model FLOPs over GPUs x achieved
    FLOP/s (x 4/3 with activation checkpointing: the forward again), stretched by the 1F1B bubble, plus
    the tensor-parallel bytes (tp_bytes_per_token, which test_tensor_parallel holds to mappings.py's
    counter), the pipeline sends and the gradient reduction, each over the link its group spans, none
    overlapped."""
    cfg = load_config("configs/450M.yml")
    m, t = cfg.model, cfg.train
    vocab, flops_per_gpu, inf = 50304, 4e14, float("inf")
    act = block_activation_bytes(m, torch.bfloat16, seq=64)
    tokens = t.global_batch_size * m.seq_length
    flops = model_flops_per_token(m, vocab) * tokens

    def plan(tp, pp, dp, ckpt=False, intra=300.0, inter=25.0, per_node=8):
        return estimate(cfg, vocab, tp, pp, dp, 1, ckpt, act, flops_per_gpu, per_node, intra, inter)

    one = plan(1, 1, 1)
    assert one.step_s == pytest.approx(flops / flops_per_gpu, rel=1e-12) and one.bubble == 0  # compute alone
    assert one.tokens_per_sec == pytest.approx(tokens / one.step_s, rel=1e-12)
    assert plan(1, 1, 1, ckpt=True).step_s == pytest.approx(flops * 4 / 3 / flops_per_gpu, rel=1e-12)
    # 4 stages over endless links: the compute of 4 GPUs stretched by the bubble (P-1)/(M+P-1)
    pp = plan(1, 4, 1, intra=inf, inter=inf)
    micro = t.global_batch_size // t.micro_batch_size
    assert pp.micro_batches == micro and pp.bubble == pytest.approx(3 / (micro + 3), rel=1e-12)
    assert pp.step_s == pytest.approx(flops / (4 * flops_per_gpu) / (1 - pp.bubble), rel=1e-12)
    # TP=2 x DP=4 in one node: the collectives add to the compute, over the node's link
    wbytes = 2  # bf16
    tp_dp = plan(2, 1, 4)
    tp_s = tp_bytes_per_token(m, 2, wbytes) * tokens / 4 / 300e9  # each replica's share of the tokens
    dp_s = 2 * 3 / 4 * tp_dp.weights_gb * GB / 300e9  # reduce-scatter + all-gather of the gradients
    assert tp_dp.step_s == pytest.approx(flops / (8 * flops_per_gpu) + tp_s + dp_s, rel=1e-9)
    assert plan(2, 1, 4, intra=inf).step_s == pytest.approx(flops / (8 * flops_per_gpu), rel=1e-12)
    # TP=8 on nodes of 8 GPUs is inside a node (README: "parallel.tensor up to the GPUs per node does that")
    assert plan(8, 1, 1).step_s == pytest.approx(flops / (8 * flops_per_gpu) + tp_bytes_per_token(m, 8, wbytes)
                                                 * tokens / 300e9, rel=1e-9)
    # 2 GPUs a node: a TP=4 group spans two nodes, so only the link between nodes times its collectives
    across = plan(4, 1, 1, per_node=2)
    assert across.step_s == plan(4, 1, 1, per_node=2, intra=1e-3).step_s
    assert across.step_s == pytest.approx(flops / (4 * flops_per_gpu) + tp_bytes_per_token(m, 4, wbytes) * tokens
                                          / 25e9, rel=1e-9)


def test_tool_takes_the_speed_from_a_benchmark(tmp_path, monkeypatch, capsys):
    """--benchmark takes the fastest TokenFormer row of a tools/benchmark.py JSON (never the GPT
    baseline's), the same as giving that figure with --tflops; without either, 45% of an H100's peak."""
    tool = plan_tool()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{"variant": "tokenformer-fused", "tflops": 210.0},
                                          {"variant": "tokenformer-compiled", "tflops": 300.0},
                                          {"variant": "gpt-compiled", "tflops": 900.0}]}))
    base = ["plan_parallelism.py", "--config", "configs/450M.yml", "--gpus", "8", "--top", "3"]
    out = {}
    for name, extra in (("bench", ["--benchmark", str(bench)]), ("given", ["--tflops", "300"]), ("default", [])):
        monkeypatch.setattr(sys, "argv", base + extra + ["--json", str(tmp_path / f"{name}.json")])
        assert tool.main() == 0
        out[name] = (capsys.readouterr().out.splitlines()[0], json.loads((tmp_path / f"{name}.json").read_text()))
    assert "300 TFLOP/s per GPU (measured in " + str(bench) + ")" in out["bench"][0]
    assert "300 TFLOP/s per GPU (given)" in out["given"][0] and out["bench"][1] == out["given"][1]
    assert "445 TFLOP/s per GPU (45% of H100 bf16 peak)" in out["default"][0]
    for a, b in zip(out["given"][1], out["default"][1]):  # the same layouts: compute alone scales
        assert b["step_s"] < a["step_s"]
    # the H200 measurement docs/PERFORMANCE.md names: 460 TFLOP/s
    monkeypatch.setattr(sys, "argv", base + ["--benchmark", "docs/perf/bench_450M_model.json"])
    assert tool.main() == 0
    assert "460 TFLOP/s per GPU (measured in docs/perf/bench_450M_model.json)" in capsys.readouterr().out


def test_documented_example_is_what_the_tool_prints(monkeypatch, capsys):
    """docs/PERFORMANCE.md's example table (1.5B, 16 GPUs of 40 GB) is the tool's output for it, row for row."""
    doc = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    example = doc[doc.index("Example (1.5B, 16 GPUs of 40 GB, 8 per node, 45% of H100 peak):"):]
    table = [ln for ln in example.split("\n\n")[1].splitlines() if ln.startswith("|")]
    tool = plan_tool()
    monkeypatch.setattr(sys, "argv", ["plan_parallelism.py", "--config", "configs/1.5B.yml", "--gpus", "16",
                                      "--gpu-memory", "40GB", "--top", str(len(table) - 2)])
    assert tool.main() == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert [ln.replace("|---", "|") for ln in printed] == [ln.replace("|---", "|") for ln in table]
