"""Incremental decoding with the KV cache equals recomputing the whole sequence."""
import pytest
import torch

from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.generation import GenerationError, Sampling, generate
from megatron_tokenformer.model import KVCache, TokenFormerModel


def model(norm: str = "l2_norm_gelu", seq: int = 48) -> TokenFormerModel:
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=32, ffn_tokens=64,
                      seq_length=seq, norm=norm, rotary_pct=0.5)
    return TokenFormerModel(cfg, 200, seed=1).double().eval()


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "softmax"])
def test_cached_logits_equal_full_forward(norm):
    m = model(norm)
    x = torch.randint(0, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(x)
        cache = KVCache()
        parts = [m(x[:, a:b], cache=cache) for a, b in [(0, 11), (11, 12), (12, 13), (13, 30)]]
    assert cache.get_seq_length() == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)


def test_greedy_with_cache_equals_recompute():
    m = model()
    prompt = [5, 17, 42, 9]
    cached = generate(m, prompt, 100, Sampling(greedy=True))
    recomputed = generate(m, prompt, 100, Sampling(greedy=True), use_cache=False)
    assert cached.tokens == recomputed.tokens
    # Decoding ends at the context: the last forward sees exactly seq_length positions.
    assert cached.stopped == "context" and len(prompt) + len(cached.tokens) == m.cfg.seq_length + 1


def test_sampling_is_seeded_and_respects_limits():
    m = model()
    s = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=7)
    a, b = generate(m, [1, 2, 3], 20, s), generate(m, [1, 2, 3], 20, s)
    assert a.tokens == b.tokens and len(a.tokens) == 20 and a.stopped == "length"
    # top_k=1 is greedy; ids at or above vocab_size (padding rows) are never produced.
    assert generate(m, [1, 2, 3], 20, Sampling(top_k=1, seed=0)).tokens == \
        generate(m, [1, 2, 3], 20, Sampling(greedy=True)).tokens
    assert max(generate(m, [1, 2, 3], 30, Sampling(seed=1), vocab_size=50).tokens) < 50


def test_eod_and_stop_end_decoding():
    m = model()
    first = generate(m, [3, 4], 1, Sampling(greedy=True)).tokens[0]
    out = generate(m, [3, 4], 10, Sampling(greedy=True), eod_id=first)
    assert out.tokens == [] and out.stopped == "eod"
    out = generate(m, [3, 4], 10, Sampling(greedy=True), stop=lambda new: len(new) == 3)
    assert len(out.tokens) == 3 and out.stopped == "stop"


def test_bad_input_is_named():
    m = model(seq=16)
    with pytest.raises(GenerationError, match="more than the model's context of 16"):
        generate(m, list(range(17)), 4)
    with pytest.raises(GenerationError, match="temperature"):
        generate(m, [1], 4, Sampling(temperature=0))
    with pytest.raises(GenerationError, match="empty"):
        generate(m, [], 4)
