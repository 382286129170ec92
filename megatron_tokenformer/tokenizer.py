"""One tokenizer interface over the two file kinds a run can use.

- `tokenizer.model`: a sentencepiece model (ours, trained by tools/prepare_data.py); the
  end-of-document token is its EOS (`</s>`).
- `tokenizer.json`: a Hugging Face `tokenizers` file, as the released TokenFormer models use (the
  GPT-NeoX-20B BPE); the end-of-document token is `<|endoftext|>`.

A dataset directory and a checkpoint carry the file under one of those two names, so one
directory is enough to tokenize, evaluate or generate.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import sha256_file

FILE_NAMES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}
HF_EOD = "<|endoftext|>"


class TokenizerError(UserError, ValueError):
    """A tokenizer file that is missing, does not parse, or lacks an end-of-document token."""


@dataclass
class Tokenizer:
    kind: str
    """sentencepiece or hf."""
    path: Path
    """The file it was read from."""
    vocab_size: int
    """Ids the tokenizer can produce (added tokens included); the model pads its rows above it."""
    eod_id: int
    """End-of-document id, appended to every document in the token shards."""
    _impl: Any

    @property
    def file_name(self) -> str:
        """The name this kind of file has inside dataset and checkpoint directories."""
        return FILE_NAMES[self.kind]

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self._impl.encode(text)
        return self._impl.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._impl.encode(texts)
        return [e.ids for e in self._impl.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return self._impl.decode(list(ids))
        return self._impl.decode(list(ids), skip_special_tokens=False)


def kind_of(path: str | Path) -> str:
    """The kind a file name says: `.json` is a `tokenizers` file, anything else sentencepiece."""
    return "hf" if str(path).endswith(".json") else "sentencepiece"


def load_tokenizer(path: str | Path, shown_as: str | None = None) -> Tokenizer:
    """Read a tokenizer file of either kind; a file that does not parse is a TokenizerError."""
    path = Path(path)
    shown = shown_as or str(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file '{shown}' not found")
    kind = kind_of(path)
    if kind == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            impl = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"'{shown}' is not a Hugging Face tokenizers file: {str(e)[:200]}") from e
        eod = impl.token_to_id(HF_EOD)
        if eod is None:
            raise TokenizerError(f"tokenizer '{shown}' has no {HF_EOD} token, needed as end-of-document token")
        return Tokenizer(kind, path, impl.get_vocab_size(with_added_tokens=True), eod, impl)
    import sentencepiece as spm

    try:
        impl = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"'{shown}' is not a sentencepiece model: {e}") from e
    if impl.eos_id() < 0:
        raise TokenizerError(f"tokenizer '{shown}' has no EOS piece (</s>), needed as end-of-document token")
    return Tokenizer(kind, path, impl.vocab_size(), impl.eos_id(), impl)


def find_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer file a dataset or checkpoint directory carries, if any."""
    for name in FILE_NAMES.values():
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def store_tokenizer(src: str | Path, directory: str | Path) -> dict:
    """Copy a tokenizer file into a directory under its kind's name; returns {"file", "sha256"}
    for the directory's metadata."""
    name = FILE_NAMES[kind_of(src)]
    shutil.copyfile(src, Path(directory) / name)
    return {"file": name, "sha256": sha256_file(Path(directory) / name)}
