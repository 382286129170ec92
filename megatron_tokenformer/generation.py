"""Autoregressive decoding on one process, with a KV cache (model.KVCache).

    ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

    text = generate_text(model, tokenizer, "To be, or", max_new_tokens=64).text

The prompt is encoded once; each new token then costs one position's forward pass through the
cache. With `use_cache=False` every step recomputes the whole sequence: the reference the cache
is tested against, and the baseline of the decode benchmark.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import UserError
from .model import KVCache


class GenerationError(UserError, ValueError):
    """A prompt or setting that cannot be decoded; the message says which option to change."""


@dataclass
class Sampling:
    greedy: bool = False
    """Take the most likely token at every step (ignores temperature, top_k, top_p)."""
    temperature: float = 1.0
    """Divide the logits by this before sampling; must be > 0."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to at least p (1: all)."""
    seed: int | None = None
    """Seed of the sampling generator (None: nondeterministic)."""

    def check(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise GenerationError(f"temperature={self.temperature} must be > 0 (use greedy for argmax decoding)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class Generated:
    tokens: list[int]
    """The new tokens (the prompt not included)."""
    stopped: str
    """Why decoding ended: eod, stop, length (max_new_tokens) or context (the model's seq_length)."""
    prompt_tokens: int = 0
    seconds: float = 0.0
    text: str = ""
    """The new tokens decoded (generate_text only)."""

    @property
    def tokens_per_sec(self) -> float:
        """New tokens per second of the whole call (the prompt's forward pass included)."""
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    if s.greedy:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling | None = None, *,
             vocab_size: int | None = None, eod_id: int | None = None, stop=None,
             use_cache: bool = True) -> Generated:
    """Continue `prompt_ids` with up to `max_new_tokens` tokens from a single-process model.

    vocab_size: the tokenizer's vocab; rows above it (padding) are never sampled.
    eod_id: end decoding when the model emits it (not included in the result).
    stop: optional callable(new_tokens) -> bool, checked after each token (e.g. a stop string).
    Decoding also ends at the model's context length (`model.cfg.seq_length`)."""
    s = sampling or Sampling()
    s.check()
    context = model.cfg.seq_length
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(prompt_ids) > context:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                              f"{context} (model.seq_length); shorten it")
    device = next(model.parameters()).device
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=device).manual_seed(s.seed)
    start = time.perf_counter()
    ids = list(prompt_ids)
    cache = KVCache() if use_cache else None
    new: list[int] = []
    stopped = "length"
    step_input = ids
    while len(new) < max_new_tokens:
        if len(ids) > context:  # the next forward would see more positions than the model trained on
            stopped = "context"
            break
        x = torch.tensor([step_input], device=device)
        logits = model(x, cache=cache)[0, -1]
        if vocab_size is not None:
            logits = logits[:vocab_size]
        tok = _pick(logits, s, gen)
        if eod_id is not None and tok == eod_id:
            stopped = "eod"
            break
        new.append(tok)
        ids.append(tok)
        step_input = [tok] if use_cache else ids
        if stop is not None and stop(new):
            stopped = "stop"
            break
    return Generated(new, stopped, len(prompt_ids), time.perf_counter() - start)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, sampling: Sampling | None = None, *,
                  use_cache: bool = True) -> Generated:
    """Continue the text `prompt` with a single-process model and its tokenizer (`tokenizer.Tokenizer`).

    The prompt is encoded as is (no end-of-document token before it); decoding ends at the
    tokenizer's end-of-document token, at `max_new_tokens`, or at the model's context. A prompt
    longer than the context is refused (GenerationError), not truncated. Returns `Generated`
    with `text`, the decoded continuation."""
    out = generate(model, tokenizer.encode(prompt), max_new_tokens, sampling, vocab_size=tokenizer.vocab_size,
                   eod_id=tokenizer.eod_id, use_cache=use_cache)
    out.text = tokenizer.decode(out.tokens)
    return out
