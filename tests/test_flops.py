"""model_flops_per_token (the `tflops` of the training log and tools/benchmark.py's MFU) against an
independent count: torch's FlopCounterMode on a real forward and backward of a small model."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_tokenformer.config import load_config
from megatron_tokenformer.model import TokenFormerModel, model_flops_per_token

# Every size different, so a term with a swapped dimension cannot match by accident.
SIZES = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=48",
         "model.proj_tokens=40", "model.ffn_tokens=96", "model.seq_length=32", "model.dropout=0"]
VOCAB, BATCH = 160, 3


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_model_flops_are_the_counted_matmul_flops(impl):
    """Exactly equal, and by design:
    - matmul FLOPs only (2 per multiply-add): norms, GELU, softmax, the loss and the embedding lookup
      are not counted, by either side (the MFU convention);
    - the attention core at full length (the causal mask not discounted, PaLM's and Megatron's
      convention): counted through torch's math kernel, which computes the full t x t scores (torch's
      fused CPU kernel is opaque to FlopCounterMode, which would miss exactly that term);
    - the tied head's 2*d*vocab per token;
    - backward = 2 x forward (the gradients of each matmul's two inputs), so training = 3 x forward."""
    cfg = load_config("configs/tiny.yml", SIZES + [f"model.pattention_impl={impl}"]).model
    model = TokenFormerModel(cfg, VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (BATCH, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    tokens = BATCH * cfg.seq_length
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            loss = model(ids, ids)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    per_token = model_flops_per_token(cfg, VOCAB)
    assert 3 * fwd.get_total_flops() == per_token * tokens
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()

