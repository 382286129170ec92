#!/usr/bin/env python
"""Prepare a tokenized training corpus (see megatron_tokenformer/data/prepare.py).

    python tools/prepare_data.py                       # default: Shakespeare -> data/shakespeare
    python tools/prepare_data.py --input docs/ --output data/mine --vocab-size 8192
    python tools/prepare_data.py --input pile/*.jsonl.zst --tokenizer tokenizer.json --output data/pile --tasks 30
    python tools/prepare_data.py --hf-dataset NAME --hf-split train --output data/name
    python tools/prepare_data.py --input 0.7:web/ 0.3:code/ --output data/mix   # a mixture -> data/mix/blend.yml
    python tools/prepare_data.py --input pile/ ... --executor slurm --partition cpu --time 12:00:00
    python tools/prepare_data.py --convert data/old                # a format_version 1 directory, in place

The output is Megatron indexed datasets (NNNNN_tokens.bin/.idx, one pair per task), the tokenizer and
metadata.json, written last. Killed, the same command resumes: finished tasks are not done again.
The recipes for the released configs are in their data.prepare keys (configs/*.yml).
"""

from __future__ import annotations

import argparse
import re
import sys

from megatron_tokenformer.data.dataset import DataError
from megatron_tokenformer.data.prepare import (DEFAULT_OUTPUT, DEFAULT_VOCAB_SIZE, convert_v1, prepare,
                                               prepare_default, prepare_mixture)

WEIGHTED = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(.+)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help=".txt (one file = one document), .jsonl / .jsonl.zst / .jsonl.gz / .json (JSON "
                             "records) or .parquet files, directories (other files in them are skipped) or globs "
                             "(default: the built-in Shakespeare corpus). WEIGHT:PATH for each makes a mixture: "
                             "each source prepared into OUTPUT/source_NN, and OUTPUT/blend.yml for data.blend")
    source.add_argument("--hf-dataset", metavar="NAME", help="Hugging Face Hub dataset name, streamed (needs network)")
    source.add_argument("--convert", metavar="OLD_DIR",
                        help="rewrite a dataset of the old format (format_version 1) as this one, same tokens; "
                             "in place, or into --output")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--streaming", action="store_true",
                        help="accepted for old commands: a Hub dataset is always streamed")
    parser.add_argument("--max-documents", type=int, metavar="N",
                        help="keep only the first N records (read by one task)")
    parser.add_argument("--text-key", default="text", help="text column of json/parquet/Hub data (default: text)")
    parser.add_argument("--output", help=f"output directory (default for the built-in corpus: {DEFAULT_OUTPUT})")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE",
                     help="use this tokenizer instead of training one: a sentencepiece model (.model) or a "
                          "Hugging Face tokenizers file (.json, e.g. the GPT-NeoX-20B tokenizer.json of the "
                          "released TokenFormer models; end of document is its <|endoftext|>)")
    tok.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                     help=f"vocabulary size of the trained BPE tokenizer (default {DEFAULT_VOCAB_SIZE})")
    run = parser.add_argument_group("how the work is spread")
    run.add_argument("--tasks", type=int, metavar="N",
                     help="split the input into N tasks, by files (one output pair each; default: --workers, at "
                          "most one per file)")
    run.add_argument("--workers", "--num-proc", type=int, metavar="K",
                     help="tasks running at once (local: processes on this machine, default all cores; slurm: "
                          "array tasks at once, default no limit)")
    run.add_argument("--executor", choices=["local", "slurm", "ray"], default="local",
                     help="local processes, a SLURM job array (submitted with sbatch), or a running Ray cluster")
    run.add_argument("--partition", help="SLURM partition (--executor slurm)")
    run.add_argument("--time", help="SLURM time limit per task, e.g. 12:00:00 (--executor slurm)")
    run.add_argument("--cpus-per-task", type=int, help="SLURM cpus per task (--executor slurm, default 1)")
    run.add_argument("--slurm-arg", action="append", default=[], metavar="NAME=VALUE",
                     help="any other sbatch option, without its --, e.g. --slurm-arg account=proj (repeatable)")
    filt = parser.add_argument_group("filters")
    filt.add_argument("--min-chars", type=int, default=0, metavar="N", help="drop documents shorter than N characters")
    filt.add_argument("--dedup", action="store_true",
                      help="drop exact duplicates (hash of the text), keeping the first")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is already prepared")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    slurm = {"partition": args.partition, "time": args.time, "cpus_per_task": args.cpus_per_task,
             "args": args.slurm_arg, "workers": args.workers}
    common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, tasks=args.tasks, workers=args.workers,
                  executor=args.executor, slurm=slurm, force=args.force)
    try:
        if args.convert:
            convert_v1(args.convert, args.output)
        elif args.input is None and args.hf_dataset is None:
            if args.max_documents is not None or args.min_chars or args.dedup:
                parser.error("--max-documents, --min-chars and --dedup need --input or --hf-dataset")
            prepare_default(args.output or DEFAULT_OUTPUT, **common)
        else:
            if args.output is None:
                parser.error("--output is required with --input / --hf-dataset")
            options = dict(max_documents=args.max_documents, text_key=args.text_key, min_chars=args.min_chars,
                           dedup=args.dedup, **common)
            weighted = [WEIGHTED.match(p) for p in args.input or []]
            if args.input and any(weighted):
                if not all(weighted):
                    parser.error("--input: give a weight to every source (WEIGHT:PATH) or to none")
                prepare_mixture(args.output, [(float(m.group(1)), m.group(2)) for m in weighted], **options)
            else:
                prepare(args.output, args.input, hf_dataset=args.hf_dataset, hf_split=args.hf_split, **options)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
