"""Pretrain a TokenFormer: `deepspeed launch/pretrain.py --config configs/tiny.yml [section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N` and as plain `python` (one process).
"""
import argparse
import logging
import os
import sys

import torch

# Name the accelerator for DeepSpeed on a machine without a GPU, or it probes, guesses "cpu" and
# warns so on every import (three lines per rank).
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from megatron_tokenformer.cli import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file, e.g. configs/tiny.yml")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    parser.add_argument("--help-config", nargs="?", const=True, default=False, metavar="KEY",
                        help="list every config key with its meaning (with --config and overrides: their values); "
                             "with KEY, e.g. train.spike_factor, that key's whole text")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=20 parallel.zero_stage=2")
    args = parser.parse_args()
    code = run(args.config, args.overrides, args.help_config)
    # The run is over and saved: leave without the interpreter's teardown, where a C++ thread left by
    # DeepSpeed's engine (seen on gloo) can abort the process ("terminate called without an active
    # exception") and turn a finished run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
