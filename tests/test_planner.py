"""The layout planner: its memory figures against what a real model holds on the CPU."""
import subprocess
import sys

import pytest
import torch

from megatron_tokenformer import TokenFormerModel, load_config
from megatron_tokenformer.planner import GB, block_activation_bytes, estimate, plans, saved_tensor_bytes

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
