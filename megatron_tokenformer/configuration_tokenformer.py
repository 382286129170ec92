"""The Hugging Face config of an exported TokenFormer (`AutoConfig` with trust_remote_code).

Shipped verbatim in every export directory (`megatron_tokenformer.hf_export`), next to
`modeling_tokenformer.py` and the model's own modules; it imports transformers only.
The fields are the model section of our config under their own names (HF's usual names are
aliases), the embedding rows (`vocab_size`), the tokenizer's vocab (`tokenizer_vocab_size`: the
rows above it are padding), and each Pattention's tau, which is part of the function.
"""
from transformers import PretrainedConfig

# The fields TokenFormerModel reads from its config (megatron_tokenformer.config.ModelConfig).
MODEL_FIELDS = ("num_layers", "hidden_size", "num_heads", "qkv_tokens", "proj_tokens", "ffn_tokens", "seq_length",
                "norm", "rotary_pct", "rotary_base", "dropout", "norm_eps", "init_std")


class TokenFormerConfig(PretrainedConfig):
    """TokenFormer's shape, vocab and per-layer tau, as transformers reads and writes it."""

    model_type = "tokenformer"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "seq_length"}

    def __init__(self, vocab_size: int = 50304, tokenizer_vocab_size: int | None = None, num_layers: int = 2,
                 hidden_size: int = 128, num_heads: int = 4, qkv_tokens: int = 128, proj_tokens: int = 128,
                 ffn_tokens: int = 512, seq_length: int = 128, norm: str = "l2_norm_gelu", rotary_pct: float = 0.25,
                 rotary_base: float = 10000.0, dropout: float = 0.0, norm_eps: float = 1e-5, init_std: float = 0.02,
                 tau: dict | None = None, use_cache: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size if tokenizer_vocab_size is not None else vocab_size
        self.num_layers, self.hidden_size, self.num_heads = num_layers, hidden_size, num_heads
        self.qkv_tokens, self.proj_tokens, self.ffn_tokens = qkv_tokens, proj_tokens, ffn_tokens
        self.seq_length, self.norm, self.rotary_pct, self.rotary_base = seq_length, norm, rotary_pct, rotary_base
        self.dropout, self.norm_eps, self.init_std = dropout, norm_eps, init_std
        self.tau = dict(tau or {})  # Pattention module name (in TokenFormerModel) -> tau; else the default
        self.use_cache = use_cache
        # The output head is the input embedding itself (one tensor), so there is nothing for
        # transformers to tie.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
