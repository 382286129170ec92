"""Continue a prompt with a trained checkpoint, using the tokenizer the checkpoint carries.

    python tools/generate.py --load runs/tiny/checkpoints --prompt "To be, or not" --max-new-tokens 100
    python tools/generate.py --load runs/tiny/checkpoints --prompt "KING" --greedy --no-cache

Prints the continuation on stdout, then one line on stderr with the new tokens, the time and
tokens/s (the prompt's forward pass included) and why decoding stopped (length, eod, context).
Sampling by default (temperature 1, all tokens); --greedy takes the most likely token. A prompt
longer than the model's context (model.seq_length) is refused, not truncated; the continuation
stops at the context.
"""
import argparse
import sys

import torch

from megatron_tokenformer.checkpoint import checkpoint_tokenizer, load_model
from megatron_tokenformer.errors import UserError
from megatron_tokenformer.generation import Sampling, generate_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint.dir of a run, or one step_* directory in it")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--greedy", action="store_true", help="take the most likely token (ignores the sampling options)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens summing to p")
    ap.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: nondeterministic)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    try:
        tokenizer = checkpoint_tokenizer(args.load)  # first: a checkpoint without one fails before loading
        model, _ = load_model(args.load, device=args.device)
        sampling = Sampling(args.greedy, args.temperature, args.top_k, args.top_p, args.seed)
        out = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, sampling,
                            use_cache=not args.no_cache)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.text, flush=True)
    print(f"{len(out.tokens)} new tokens after {out.prompt_tokens} prompt tokens in {out.seconds:.2f} s: "
          f"{out.tokens_per_sec:.1f} tokens/s ({'no ' if args.no_cache else ''}KV cache, {args.device}; "
          f"stopped: {out.stopped})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
