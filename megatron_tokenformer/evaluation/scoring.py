"""Token-level scoring, as lm-eval's Hugging Face backend (`HFLM._loglikelihood_tokens`) does it.

    score_continuations(forward, [(context_ids, continuation_ids), ...], max_length)
        -> [(log-probability of the continuation, whether greedy decoding produces it), ...]
    score_rolling(forward, [token_ids, ...], prefix_id, max_length)
        -> [log-probability of the whole sequence, ...]

`forward` is any callable taking (B, T) token ids to (B, T, rows) logits: a single-process
TokenFormerModel, or the copy of a live model that evaluation during training builds. Turning text
into those token lists (trailing whitespace of the context moved to the continuation, the
continuation as the tail of the whole encoding, the EOD token as context of an empty one) is
lm-eval's own `TemplateLM.loglikelihood`, which the backend (lm_backend.py) inherits.

The softmax runs over every logit row the model has, padding rows above the tokenizer's vocab
included, as lm-eval's HF backend does on an exported model (a trained model gives those rows
almost no probability).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


def _window(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The model's input for one request: context + continuation without its last token, cut from
    the left to max_length (HF's left truncation when a request is longer than the model's context)."""
    return (context + continuation)[-(max_length + 1):][:-1]


def score_continuations(forward: Forward, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                        batch_size: int = 16, device: str | torch.device = "cpu",
                        progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, is_greedy) of each continuation given its context, in request order.

    Requests run in batches sorted longest first (the first batch shows at once whether memory
    suffices; equal lengths pad least), right-padded: a causal model's logits at a position do not
    depend on what follows. A continuation longer than the model's context (HF's backend refuses
    it; it happens with a small seq_length) is scored in pieces of max_length tokens, each given
    the tokens before it. `progress(n)` is called after each batch with the pieces it scored."""
    pieces, owner = [], []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation (lm-eval's "
                             "loglikelihood puts the EOD token before an empty context)")
        for j in range(0, len(cont), max_length):
            pieces.append((ctx + cont[:j], cont[j:j + max_length]))
            owner.append(i)
    scored = _score(forward, pieces, max_length, batch_size, device, progress)
    results = [(0.0, True)] * len(requests)
    for i, (logp, greedy) in zip(owner, scored):
        results[i] = (results[i][0] + logp, results[i][1] and greedy)
    return results


@torch.no_grad()
def _score(forward: Forward, requests, max_length: int, batch_size: int, device, progress):
    """score_continuations for continuations of at most max_length tokens."""
    # HF's order: longest first, ties by the tokens themselves (deterministic).
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]),
                                                        tuple(requests[i][0] + requests[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = [_window(*requests[i], max_length) for i in chunk]
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            batch[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        logits = forward(batch.to(device))
        for row, i in enumerate(chunk):
            cont = requests[i][1]
            end = len(inputs[row])
            # Only the continuation's positions: a log_softmax over the whole batch's logits would
            # double their memory (B x T x vocab).
            logp = F.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            greedy = bool((logp.argmax(-1) == target).all())
            results[i] = (float(logp.gather(1, target[:, None]).double().sum()), greedy)
        if progress is not None:
            progress(len(chunk))
    return results


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token of `tokens` once: the first
    conditioned on `prefix_id` (the EOD token), each later one on as much preceding text as fits
    (lm-eval's get_rolling_token_windows with context_len=1, then make_disjoint_window)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix_id, max_seq_len=max_length, context_len=1)]


def score_rolling(forward: Forward, sequences: Sequence[list[int]], prefix_id: int, max_length: int,
                  batch_size: int = 16, device: str | torch.device = "cpu",
                  progress: Callable[[int], None] | None = None) -> list[float]:
    """Log-probability of each whole token sequence, however long, scored in rolling windows of
    the model's context (lm-eval's loglikelihood_rolling; perplexity tasks)."""
    owners, windows = [], []
    for i, seq in enumerate(sequences):
        for w in rolling_windows(list(seq), prefix_id, max_length):
            owners.append(i)
            windows.append(w)
    scores = _score(forward, windows, max_length, batch_size, device, progress)
    totals = [0.0] * len(sequences)
    for i, (logp, _) in zip(owners, scores):
        totals[i] += logp
    return totals
