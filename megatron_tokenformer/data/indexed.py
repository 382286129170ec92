"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): the token format of Megatron-LM, GPT-NeoX,
NeMo and datatrove, and the one ``tools/prepare_data.py`` writes.

``PREFIX.bin`` holds the tokens of every sequence back to back; ``PREFIX.idx`` is, little-endian: the magic
``MMIDIDX\\0\\0``, version u64 (1), dtype code u8, sequence count S u64, document count D u64, then
int32 lengths[S], int64 byte offsets[S], int64 document indices[D] (sequence boundaries, from 0).

We read it with our own code, not megatron-core's ``IndexedDataset``, because:
- Pythia's Pile ships its ``document.bin`` cut into byte ranges over 21 files
  (``document-000NN-of-00020.bin``) beside one ``document.idx``; ``IndexedDataset`` maps one file per
  prefix and cannot read them in place (Pythia's own answer is a 602 GB concatenation);
- a directory of prefixes (datatrove writes one pair per task) is read as one token stream;
- importing ``megatron.core`` takes seconds and warns about Transformer Engine and Apex on every rank.
The format is six fields; ``tests/test_indexed.py`` checks this reader against megatron-core's reader on
files written by megatron-core's ``IndexedDatasetBuilder`` and by datatrove.

Nothing here reads the tokens, or the index arrays, at open time: both are read with pread, only the
entries and bytes of the sequences asked for.
"""
from __future__ import annotations

import os
import re
import struct
from array import array
from pathlib import Path

import numpy as np

from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
PIECE = re.compile(r"-(\d+)-of-(\d+)\.bin$")  # Pythia's byte-split pieces of one .bin


class IndexedError(UserError, ValueError):
    """A Megatron dataset file that is missing, truncated or inconsistent (the message names it)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary (Megatron's choice)."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.int32)


class Index:
    """One ``.idx`` file. Its arrays are read with pread, a few entries at a time, never mapped: at the
    Pile's size they are 1.76 GB, and pages of a map touched over a run (or around each fault, as large
    folios) would all count in every rank's resident memory."""

    def __init__(self, path: Path, dtype: np.dtype, num_sequences: int, num_documents: int):
        self.path, self.dtype = path, dtype
        self.num_sequences, self.num_documents = num_sequences, num_documents
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, offset: int, dtype: type, start: int, stop: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        data = os.pread(self._fd, (stop - start) * size, offset + start * size)
        if len(data) != (stop - start) * size:
            raise IndexedError(f"'{self.path}' ended early: it changed while the run reads it")
        return np.frombuffer(data, dtype)

    def lengths(self, start: int, stop: int) -> np.ndarray:
        """int32: tokens in sequences [start, stop)."""
        return self._read(HEADER_BYTES, np.int32, start, stop)

    def pointers(self, start: int, stop: int) -> np.ndarray:
        """int64: byte offsets in the .bin of sequences [start, stop)."""
        return self._read(HEADER_BYTES + 4 * self.num_sequences, np.int64, start, stop)

    def documents(self, start: int, stop: int) -> np.ndarray:
        """int64: document boundaries [start, stop) (sequence numbers)."""
        return self._read(HEADER_BYTES + 12 * self.num_sequences, np.int64, start, stop)

    @property
    def num_bytes(self) -> int:
        """Bytes of the .bin this index describes (where its last sequence ends)."""
        if not self.num_sequences:
            return 0
        s = self.num_sequences
        return int(self.pointers(s - 1, s)[0]) + int(self.lengths(s - 1, s)[0]) * self.dtype.itemsize


def read_index(path: str | Path) -> Index:
    """Parse and check an ``.idx`` header and size (O(1): only the ends of its arrays are read)."""
    path = Path(path)
    if not path.is_file():
        raise IndexedError(f"index file '{path}' not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        raise IndexedError(f"'{path}' is not a Megatron index (.idx) file: wrong header (magic "
                           f"{head[:len(MAGIC)]!r}, expected {MAGIC!r})")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise IndexedError(f"'{path}' is a Megatron index of version {version}; only version {VERSION} is read")
    if code not in DTYPES:
        raise IndexedError(f"'{path}' names dtype code {code}, which is none of Megatron's {sorted(DTYPES)}")
    expected = HEADER_BYTES + 12 * seqs + 8 * docs
    if size != expected:
        raise IndexedError(f"'{path}' has {size} bytes where its header ({seqs} sequences, {docs} document "
                           f"boundaries) needs {expected}: the file is truncated or damaged")
    index = Index(path, np.dtype(DTYPES[code]), seqs, docs)
    # The ends of the arrays, not all of them: enough to catch a header written for other arrays.
    if seqs and (int(index.pointers(0, 1)[0]) != 0 or int(index.lengths(seqs - 1, seqs)[0]) < 0
                 or int(index.pointers(seqs - 1, seqs)[0]) < 0):
        raise IndexedError(f"'{path}' is inconsistent (first offset {int(index.pointers(0, 1)[0])}, last length "
                           f"{int(index.lengths(seqs - 1, seqs)[0])}): the file is damaged")
    # Document indices are sequence boundaries from 0; most writers end them at S, but Pythia's Pile has
    # just [0] (its 146M rows are one "document"), so only the range is checked. We never read them.
    first, last = (int(index.documents(0, 1)[0]), int(index.documents(docs - 1, docs)[0])) if docs else (0, 0)
    if docs and (first != 0 or not 0 <= last <= seqs):
        raise IndexedError(f"'{path}' is inconsistent: its document indices run from {first} to {last}, outside 0 "
                           f"to its {seqs} sequences")
    return index


def bin_files(prefix: str | Path) -> list[Path]:
    """The files holding ``PREFIX``'s tokens: ``PREFIX.bin``, or Pythia's byte-split pieces
    ``PREFIX-000NN-of-000MM.bin`` in order."""
    prefix = Path(prefix)
    whole = prefix.with_name(prefix.name + ".bin")
    if whole.is_file():
        return [whole]
    pieces = {}
    for f in prefix.parent.glob(prefix.name + "-*-of-*.bin"):
        m = PIECE.search(f.name)
        if m and f.name == f"{prefix.name}{m.group(0)}":
            pieces[int(m.group(1))] = f
    if not pieces:
        return []
    missing = [i for i in range(max(pieces) + 1) if i not in pieces]
    if missing:
        raise IndexedError(f"'{prefix}' is split into pieces, but piece {missing[0]} "
                           f"('{prefix.name}-{missing[0]:05d}-of-...bin') is missing")
    return [pieces[i] for i in sorted(pieces)]


class Prefix:
    """One dataset: its index and its token bytes (one file or several consecutive pieces)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.index = read_index(self.prefix.with_name(self.prefix.name + ".idx"))
        self.files = bin_files(self.prefix)
        if not self.files:
            raise IndexedError(f"'{self.prefix}.bin' not found (the tokens of '{self.index.path}')")
        sizes = [f.stat().st_size for f in self.files]
        if sum(sizes) != self.index.num_bytes:
            shown = (f"'{self.files[0]}' has" if len(self.files) == 1
                     else f"the {len(self.files)} pieces of '{self.prefix}' hold")
            raise IndexedError(f"{shown} {sum(sizes)} bytes where '{self.index.path}' describes "
                               f"{self.index.num_bytes}: truncated, or not the tokens of that index")
        itemsize = self.index.dtype.itemsize
        self.starts = np.cumsum([0] + sizes)  # byte offset of each piece
        self.num_tokens = int(self.starts[-1]) // itemsize
        self._fds: list[int | None] = [None] * len(self.files)

    def __del__(self):
        for fd in getattr(self, "_fds", []):
            if fd is not None:
                os.close(fd)

    @property
    def dtype(self) -> np.dtype:
        return self.index.dtype

    def read_bytes(self, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) of the (possibly split) .bin, as uint8.

        Read with pread, not a memory map: a shuffled order reads a few KB here and there, and a page
        fault on a map pulls the kernel's read-ahead (MBs) with it, ten to a hundred times the bytes
        needed (measured: 578 ms instead of a few for a step of the Pile from disk); pread reads what
        is asked, takes no memory beyond the page cache, and is safe from the prefetch thread."""
        out = np.empty(end - start, np.uint8)
        pos = start
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            hi = min(end, int(self.starts[k + 1]))
            if self._fds[k] is None:
                self._fds[k] = os.open(self.files[k], os.O_RDONLY)
            got = os.preadv(self._fds[k], [memoryview(out)[pos - start:hi - start]], pos - int(self.starts[k]))
            if got != hi - pos:
                raise IndexedError(f"'{self.files[k]}' ended early (read {got} of {hi - pos} bytes at offset "
                                   f"{pos - int(self.starts[k])}): it changed while the run reads it")
            pos, k = hi, k + 1
        return out

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the token stream (sequences back to back), in the stored dtype."""
        size = self.dtype.itemsize
        return self.read_bytes(start * size, end * size).view(self.dtype)

    def sequence(self, i: int) -> np.ndarray:
        ptr, n = int(self.index.pointers(i, i + 1)[0]), int(self.index.lengths(i, i + 1)[0])
        return self.read_bytes(ptr, ptr + n * self.dtype.itemsize).view(self.dtype)


def find_prefixes(path: str | Path) -> list[Path]:
    """``path`` as a list of prefixes: ``PREFIX`` itself (``PREFIX.idx`` exists), or every ``*.idx`` in
    a directory, in name order."""
    path = Path(path)
    if path.is_dir():
        return [f.with_suffix("") for f in sorted(path.glob("*.idx"))]
    if path.with_name(path.name + ".idx").is_file():
        return [path]
    if path.suffix in (".bin", ".idx") and path.is_file():
        return [path.with_suffix("")]
    return []


class IndexWriter:
    """Write one ``PREFIX.bin`` + ``PREFIX.idx`` pair, one sequence per ``add`` (one document each, as
    datatrove and Megatron's preprocess_data write). The lengths are kept in memory (4 bytes per
    sequence) and the index is written by ``close``."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} is not one of Megatron's")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._bin = open(self.bin_path, "wb")
        self._lengths = array("i")

    def add(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self._lengths.append(len(tokens))

    def close(self) -> None:
        self._bin.close()
        write_index(self.idx_path, self.dtype, np.frombuffer(self._lengths, np.int32))


def write_index(path: str | Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """An ``.idx`` for sequences of ``lengths`` stored back to back, one document each."""
    lengths = np.asarray(lengths, np.int32)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, CODES[np.dtype(dtype)], len(lengths), len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
