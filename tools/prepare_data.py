#!/usr/bin/env python
"""Prepare a tokenized training corpus (see megatron_tokenformer/data/prepare.py).

    python tools/prepare_data.py                       # default: Shakespeare -> data/shakespeare
    python tools/prepare_data.py --input docs/ --output data/mine --vocab-size 8192
    python tools/prepare_data.py --hf-dataset NAME --hf-split train --output data/name
    python tools/prepare_data.py --hf-dataset NAME --max-documents 100000 --output data/name-100k

The recipes for the released configs are in their data.prepare keys (configs/*.yml).
"""

from __future__ import annotations

import argparse
import sys

from megatron_tokenformer.data.dataset import DataError
from megatron_tokenformer.data.prepare import (DEFAULT_OUTPUT, DEFAULT_SHARD_SIZE,
                                               DEFAULT_VOCAB_SIZE, default_num_proc, prepare,
                                               prepare_default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help=".txt (one file = one document), .jsonl / .json (JSON records) or .parquet files, "
                             "directories (other files in them are skipped) or globs "
                             "(default: the built-in Shakespeare corpus)")
    source.add_argument("--hf-dataset", metavar="NAME", help="Hugging Face Hub dataset name (needs network)")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--streaming", action="store_true",
                        help="stream the Hub dataset (--hf-dataset) instead of downloading it whole first")
    parser.add_argument("--max-documents", type=int, metavar="N",
                        help="keep only the first N records (a Hub dataset is then streamed: only those "
                             "are downloaded)")
    parser.add_argument("--text-key", default="text", help="text column of json/parquet/Hub data (default: text)")
    parser.add_argument("--output", help=f"output directory (default for the built-in corpus: {DEFAULT_OUTPUT})")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE",
                     help="use this tokenizer instead of training one: a sentencepiece model (.model) or a "
                          "Hugging Face tokenizers file (.json, e.g. the GPT-NeoX-20B tokenizer.json of the "
                          "released TokenFormer models; end of document is its <|endoftext|>)")
    tok.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                     help=f"vocabulary size of the trained BPE tokenizer (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--num-proc", type=int, default=default_num_proc(), help="tokenization processes")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard file")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is already prepared")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, num_proc=args.num_proc,
                  shard_size=args.shard_size, force=args.force)
    try:
        if args.input is None and args.hf_dataset is None:
            if args.streaming or args.max_documents is not None:
                parser.error("--streaming and --max-documents need --input or --hf-dataset")
            prepare_default(args.output or DEFAULT_OUTPUT, **common)
        else:
            if args.output is None:
                parser.error("--output is required with --input / --hf-dataset")
            prepare(args.output, args.input, hf_dataset=args.hf_dataset, hf_split=args.hf_split,
                    streaming=args.streaming, max_documents=args.max_documents, text_key=args.text_key,
                    **common)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
