#!/usr/bin/env python
"""See what a dataset holds and what a run trained on (Pythia's batch_viewer, and more).

    python tools/inspect_data.py --config configs/150M.yml --step 1234          # the batch of step 1234, as text
    python tools/inspect_data.py --config configs/tiny.yml data.path=data/x --step 7 --json   # its token ids
    python tools/inspect_data.py data/shakespeare                               # a summary of the dataset
    python tools/inspect_data.py data/shakespeare --documents 0:3 [--json]      # stored documents 0, 1, 2
    python tools/inspect_data.py data/pythia_pile/document --tokenizer data/pythia_pile/tokenizer.json --documents 0:1
    python tools/inspect_data.py data/shakespeare --verify [--part 1/4]         # sha256 against metadata.json

--step N reads the config exactly as launch/pretrain.py does (the same overrides apply) and prints the
global batch of the step logged as N (metrics.jsonl, a loss-spike line): positions (N-1)*B ... N*B-1 of
the training order, sample by sample, each under a header naming its place in the batch and the stored
row or token window it is. --json prints a JSON list of lists of ints instead (each sample's
model.seq_length + 1 tokens, in the batch's order). End-of-document tokens are shown in the text.

PATH is a directory from tools/prepare_data.py, or a Megatron prefix or directory of them (then
--tokenizer names its tokenizer, as data.tokenizer does). --verify checksums every file metadata.json
records, one line per file; --part K/N checks the K-th of N shares of about equal bytes, to split the
work over machines.
A mismatch prints one line naming the file and exits with code 2, as bad input does.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_tokenformer.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", metavar="PATH | OVERRIDE",
                    help="without --config: the dataset; with --config: section.key=value overrides")
    ap.add_argument("--config", help="the run's YAML config (with --step)")
    ap.add_argument("--step", type=int, help="the step logged as N (counted from 1)")
    ap.add_argument("--tokenizer", help="tokenizer file of a Megatron dataset that carries none")
    ap.add_argument("--documents", metavar="A:B", help="print stored sequences A ... B-1")
    ap.add_argument("--verify", action="store_true", help="checksum every recorded file")
    ap.add_argument("--part", metavar="K/N",
                    help="with --verify: only the K-th of N shares of the files (of about equal bytes)")
    ap.add_argument("--json", action="store_true", help="token ids as JSON instead of text")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.config is not None:
        if a.step is None or a.documents or a.verify or a.tokenizer:
            ap.error("--config goes with --step only (set data.tokenizer=... as an override)")
    elif a.step is not None:
        ap.error("--step needs --config (the run's config, and its overrides)")
    elif len(a.args) != 1:
        ap.error("give one dataset PATH (or --config CFG --step N)")
    if a.part and not a.verify:
        ap.error("--part goes with --verify")
    if a.json and not (a.step is not None or a.documents):
        ap.error("--json goes with --step or --documents")
    try:
        from megatron_tokenformer.data import inspect as I

        if a.config is not None:
            from megatron_tokenformer.config import load_config

            batch = I.step_batch(load_config(a.config, a.args), a.step)
            if a.json:
                print(json.dumps(batch.tokens.tolist()))
                return 0
            for j, (ids, label) in enumerate(zip(batch.tokens, batch.labels)):
                print(f"=== step {batch.step}, sample {j} of {len(batch.tokens)} (position {batch.first + j}): "
                      f"{label} ===")
                print(I.render(batch.tokenizer, ids))
            return 0
        from megatron_tokenformer.data.dataset import load_meta, load_tokenizer, verify_files

        meta = load_meta(a.args[0], tokenizer=a.tokenizer)
        if a.verify:
            part, parts = I.parse_part(a.part)
            n = 0
            for f, digest in verify_files(meta, part, parts):
                print(f"ok {f} sha256 {digest}", flush=True)
                n += 1
            if not meta.files:
                print(f"nothing to verify: {meta.path} records no checksums (a Megatron dataset from elsewhere)")
            else:
                print(f"verified {n} of {len(meta.files)} files" + (f" (part {a.part})" if a.part else ""))
        elif a.documents:
            rows = I.parse_range(a.documents, meta.num_documents)
            docs = I.documents(meta, rows)
            if a.json:
                print(json.dumps([d.tolist() for d in docs]))
            else:
                tok = load_tokenizer(meta)
                for i, ids in zip(rows, docs):
                    print(f"=== document {i} of {meta.num_documents} ({len(ids)} tokens) ===")
                    print(I.render(tok, ids))
        else:
            print("\n".join(I.summary(meta)))
    except (UserError, OSError) as e:
        # The data errors name config keys; on this command line data.tokenizer is --tokenizer.
        hint = " (here: --tokenizer FILE)" if a.config is None and "set data.tokenizer" in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
