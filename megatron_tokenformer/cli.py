"""Error handling shared by the launch scripts: a bad input prints one clear line, not a traceback."""
from __future__ import annotations

import os
import sys

from .errors import UserError


def run(config_path: str | None, overrides: list[str], help_config: bool | str = False) -> int:
    """help_config: True lists every key (with config_path's and overrides' values when given); a
    key name prints that key's whole text."""
    from .config import help_text, load_config

    if help_config:
        try:
            print(help_text(config_path, overrides, None if help_config is True else help_config), flush=True)
        except BrokenPipeError:  # `--help-config | head`: the reader has what it wanted, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush goes nowhere
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0
    if config_path is None:
        print("error: no --config given; pass one, e.g. --config configs/tiny.yml (configs/ holds the tiny demo "
              "and the released shapes; `--help-config` lists every key)", file=sys.stderr, flush=True)
        return 2
    try:
        cfg = load_config(config_path, overrides)
        from .training import pretrain

        pretrain(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
