import pytest
import torch

from megatron_tokenformer import TokenFormerModel, load_config
from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.model import count_parameters

# DESIGN.md section 1: parameter counts of the released shapes (tied embeddings, vocab 50304).
RELEASED = {"150M": 151.9e6, "450M": 454.2e6, "900M": 903.3e6, "1.5B": 1587.2e6, "354M": 353.5e6, "757M": 756.2e6}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_parameter_count(name):
    cfg = load_config(f"configs/{name}.yml")
    with torch.device("meta"):
        model = TokenFormerModel(cfg.model, cfg.model.vocab_size)
    assert abs(count_parameters(model) - RELEASED[name]) < 0.05e6


def tiny(**kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, qkv_tokens=16, proj_tokens=16, ffn_tokens=32,
                seq_length=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_causal(norm):
    """Changing token t changes no logit before t, and does change the ones at and after it."""
    torch.manual_seed(0)
    model = TokenFormerModel(tiny(norm=norm), 64).double().eval()
    ids = torch.randint(0, 64, (2, 16))
    base = model(ids)
    ids2 = ids.clone()
    ids2[:, 9] = (ids2[:, 9] + 1) % 64
    out = model(ids2)
    torch.testing.assert_close(out[:, :9], base[:, :9], rtol=0, atol=0)
    assert (out[:, 9:] - base[:, 9:]).abs().amax(dim=-1).min() > 0


def test_structure_follows_design():
    cfg = tiny()
    model = TokenFormerModel(cfg, 64)
    block = model.blocks[0]
    assert block.ln1.weight is None and block.ln2.weight is None  # block norms are not affine
    assert model.final_norm.weight is not None
    assert block.qkv.key_tokens.shape == (3, 16, 32) and block.ffn.value_tokens.shape == (32, 32)
    assert block.rotary.dim == 2  # 25% of head_dim 8
    assert [n for n, _ in model.named_parameters() if "bias" in n] == ["final_norm.bias"]  # no projection biases
    loss = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    loss.backward()
    assert model.embed.weight.grad is not None  # the tied head sends gradient to the embedding
    # value tokens use the "wang" init 2/(L*sqrt(d)); keys N(0, 0.02)
    big = TokenFormerModel(tiny(hidden_size=256, num_heads=4, ffn_tokens=4096), 64)
    assert big.blocks[0].ffn.value_tokens.std().item() == pytest.approx(2 / (2 * 16), rel=0.05)
    assert big.blocks[0].ffn.key_tokens.std().item() == pytest.approx(0.02, rel=0.05)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = TokenFormerModel(tiny(), 64).double()
    b = TokenFormerModel(tiny(activation_checkpointing=True), 64).double()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    for m in (a, b):
        m(ids[:, :-1], ids[:, 1:]).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["150M", "450M", "757M"])
def test_gpt_baseline_has_equal_flops(name):
    from megatron_tokenformer.baseline import GPTModel, gpt_flops_per_token
    from megatron_tokenformer.model import model_flops_per_token

    cfg = load_config(f"configs/{name}.yml")
    tf = model_flops_per_token(cfg.model, 50304)
    assert abs(gpt_flops_per_token(cfg.model, 50304) - tf) / tf < 0.002
    with torch.device("meta"):
        gpt = GPTModel(cfg.model, 50304)
    # Its parameters do the same FLOPs per token: 2 per weight (non-embedding), as for Pattention tokens.
    lin = sum(p.numel() for n, p in gpt.named_parameters() if n.startswith("blocks") and p.dim() == 2)
    with torch.device("meta"):
        tfm = TokenFormerModel(cfg.model, 50304)
    tok = sum(p.numel() for n, p in tfm.named_parameters() if n.startswith("blocks"))
    assert abs(lin - tok) / tok < 0.002
