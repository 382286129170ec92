#!/usr/bin/env python
"""Zero-shot evaluation of a checkpoint on the paper's tasks, offline (docs/EVAL.md).

    python tools/prepare_eval_data.py                  # once: the task files -> data/eval
    python tools/evaluate.py --load runs/tiny/checkpoints --tasks all --limit 50

Writes <out>/results.json (scores, documents per task, seconds, lm-eval's task configs) and
<out>/results.md (a table); --out defaults to runs/eval/<checkpoint step>. Prompts and metrics are
lm-eval 0.4's own (acc, acc_norm; LAMBADA perplexity and acc), the model is read with the tokenizer
the checkpoint carries. Any lm-eval task on the Hub's datasets: `python -m megatron_tokenformer.evaluation
--model megatron_tokenformer --model_args path=CKPT --tasks NAME`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_tokenformer.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint.dir of a run, or one step_* directory in it")
    ap.add_argument("--tasks", default="all", help="all, or a comma-separated list (lambada_openai, hellaswag, "
                                                   "piqa, arc_easy, arc_challenge, winogrande)")
    ap.add_argument("--limit", type=int, help="score only the first N documents of each task")
    ap.add_argument("--out", help="directory for results.json and results.md (default: runs/eval/<step>)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    ap.add_argument("--data-dir", help="the prepared task files (default: $MEGATRON_TOKENFORMER_EVAL_DATA, "
                                       "else data/eval)")
    ap.add_argument("--bootstrap-iters", type=int, default=0,
                    help="lm-eval's resampling for the stderr of LAMBADA perplexity (default 0: none)")
    args = ap.parse_args(argv)
    try:
        try:
            from megatron_tokenformer.evaluation import harness
        except ImportError as e:
            print(f"error: evaluation needs lm-eval ({e}); install it with pip install -e '.[eval]'", file=sys.stderr)
            return 2
        out = harness.evaluate_checkpoint(args.load, args.tasks, args.limit, args.batch_size, args.device,
                                          args.data_dir, args.bootstrap_iters)
        dst = Path(args.out or Path("runs/eval") / Path(out["checkpoint"]).name)
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "results.json").write_text(json.dumps(out, indent=1, default=str))
        table = harness.markdown_table(out["tasks"], out["documents"])
        (dst / "results.md").write_text(f"Checkpoint `{out['checkpoint']}`, zero-shot"
                                        + (f", first {args.limit} documents per task" if args.limit else "")
                                        + f", {out['seconds']:.0f} s.\n\n{table}\n")
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"{out['seconds']:.1f} s; wrote {dst / 'results.json'} and {dst / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
