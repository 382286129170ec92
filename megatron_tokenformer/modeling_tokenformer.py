"""TokenFormer as a transformers causal LM (`AutoModelForCausalLM` with trust_remote_code).

This is a thin wrapper over the package's own `TokenFormerModel`: the export directory holds this
file, configuration_tokenformer.py and model.py, pattention.py, mappings.py, seeding.py and
vocab_parallel.py copied verbatim from the package, so the model has one source. Only relative
imports of those files and absolute imports of torch and transformers are used here, because
transformers' loader copies the files that `from .x import` lines name and demands every absolute
import be installed.

- The cache is transformers' own (`DynamicCache`): TokenFormerModel takes any object with its
  `update(k, v, layer_idx)` and `get_seq_length()`.
- Logits cover every embedding row, as in training and `load_model`, so logits and loss are the
  model's own. The rows above the tokenizer's vocab are padding: the export's
  generation_config.json lists them in `suppress_tokens`, so `generate()` (greedy, sampling,
  beam) never produces them.
- attention_mask: all ones, or the same left padding in every row (a single padded prompt, or
  equal-length prompts), starting from an empty cache. The pad positions are dropped before the
  model sees them, so the output equals that of the unpadded prompt. Rows padded differently are
  refused: the model has no per-row positions or key mask.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tokenformer import MODEL_FIELDS, TokenFormerConfig
from .mappings import group_size  # noqa: F401  (model.py reaches mappings through `from . import`,
# which transformers' loader does not follow; this line makes it copy mappings.py too)
from .model import Rotary, TokenFormerModel
from .pattention import Pattention

# transformers 5 calls the cache `cache`, 4.x `past_key_values`; the output field follows the version.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_config(config: TokenFormerConfig) -> SimpleNamespace:
    """The config TokenFormerModel reads, from the HF config (the eager fused Pattention, no
    activation checkpointing: transformers has its own switches for training)."""
    return SimpleNamespace(**{k: getattr(config, k) for k in MODEL_FIELDS}, pattention_impl="fused",
                           activation_checkpointing=False)


def _pad_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int) -> int:
    """How many leading columns of `input_ids` are left padding to drop (checking the mask has a
    form the model can honour: the same left padding in every row, none of it in the cache)."""
    if attention_mask is None:
        return 0
    mask = attention_mask.bool()
    pad = (~mask).int().cumprod(-1).sum(-1)  # leading zeros per row
    if not bool((mask.sum(-1) + pad == mask.shape[-1]).all()):
        raise ValueError("TokenFormer supports left padding only (attention_mask zeros before the ones)")
    if bool((pad == mask.shape[-1]).any()):
        raise ValueError("a row of attention_mask is all padding")
    if not bool((pad == pad[0]).all()):
        raise ValueError("TokenFormer needs the same left padding in every row: pad the prompts to equal length "
                         "with equal padding, or generate one prompt at a time")
    p, total, t = int(pad[0]), mask.shape[-1], input_ids.shape[-1]
    if past != max(0, total - t - p):
        raise ValueError(f"the cache holds {past} positions but the attention_mask says {max(0, total - t - p)} "
                         "real tokens precede input_ids")
    return max(0, p - (total - t))


def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.endswith("._extra_state")]:
        del state_dict[key]


def _keep_extra_state(module, state_dict, prefix, *args) -> None:
    for name, m in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, Pattention):
            state_dict.setdefault(f"{name}._extra_state", m.get_extra_state())


class TokenFormerForCausalLM(PreTrainedModel, GenerationMixin):
    """`forward(input_ids, attention_mask, past_key_values|cache, labels, use_cache)` ->
    CausalLMOutputWithPast (logits over every embedding row)."""

    config_class = TokenFormerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: pass Cache objects, not tuples

    def __init__(self, config: TokenFormerConfig):
        super().__init__(config)
        self.model = TokenFormerModel(model_config(config), config.vocab_size)
        for name, module in self.model.named_modules():
            if isinstance(module, Pattention) and name in config.tau:
                module.tau = float(config.tau[name])
        # tau travels in config.json. Pattention also keeps it as extra state (a dict), which has no
        # place in safetensors and which transformers' loader cannot place: leave it out of the
        # state dict, and let a state dict without it load.
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_drop_extra_state)
        self.register_load_state_dict_pre_hook(_keep_extra_state)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # The weights all come from model.safetensors. What transformers leaves unset is the
        # rotary frequencies (a buffer outside the state dict): recompute them with the model's code.
        if isinstance(module, Rotary):
            with torch.device("cpu"):
                fresh = Rotary(module.dim, self.config.rotary_base)
            module.inv_freq.copy_(fresh.inv_freq)

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, cache=None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of every position; with `labels` (input_ids, -100 where ignored) the mean loss
        of predicting each next token. With `use_cache` the returned cache continues the sequence."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        drop = _pad_columns(input_ids, attention_mask, cache.get_seq_length() if cache is not None else 0)
        if drop:
            input_ids = input_ids[:, drop:]
            labels = labels[:, drop:] if labels is not None else None
        logits = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if drop:  # one row of logits per input column, as callers index them; pad columns get zeros
            logits = torch.cat((logits.new_zeros(logits.shape[0], drop, logits.shape[-1]), logits), 1)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
