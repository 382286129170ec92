"""tools/inspect_data.py: the batch of a step is what the training loop consumed (tensor, pipeline and data
parallel layouts, shuffled, blended and stored order, a loss spike's step), stored documents round-trip,
--verify finds a flipped byte, bad input is one line; and the released configs name Pythia's Pile.

The datasets are written here, not by prepare_data.py: a directory in prepare_data.py's format
(format_version 2, our IndexWriter) and a foreign Megatron prefix written by megatron-core's own
IndexedDatasetBuilder. The text is real English (Python's docstrings), the tokenizer a byte-level BPE
trained on it (exact round trip, nothing downloaded).
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import ROOT, env, launch, metrics, stdlib_documents
from megatron_tokenformer.config import load_config
from megatron_tokenformer.data.indexed import IndexWriter, token_dtype
from megatron_tokenformer.fileio import sha256_file
from megatron_tokenformer.tokenizer import load_tokenizer

SEQ = 32
B = 8
STEPS = 3
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.qkv_tokens=32",
        "model.proj_tokens=32", "model.ffn_tokens=64", f"model.seq_length={SEQ}", "train.micro_batch_size=2",
        f"train.global_batch_size={B}", f"train.steps={STEPS}", "train.warmup_steps=1", "log.interval=1",
        "log.progress=false", "eval.interval=0", "log.wandb_mode=disabled", "checkpoint.interval=0"]
MODULES = ["argparse", "textwrap", "json", "collections", "functools", "itertools", "logging", "dataclasses",
           "shutil", "random", "statistics", "subprocess", "pathlib", "tarfile", "zipfile", "csv"]


def _tool():
    spec = importlib.util.spec_from_file_location("inspect_data_tool", ROOT / "tools" / "inspect_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


TOOL = _tool()


def inspect_json(capsys, argv) -> list:
    """Run the tool in this process (its real main) and read its JSON."""
    capsys.readouterr()
    assert TOOL.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def inspect_cli(*args) -> subprocess.CompletedProcess:
    """Run the tool as a user does."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_data.py"), *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_documents(MODULES)


@pytest.fixture(scope="module")
def data(tmp_path_factory, docs):
    """A byte-level BPE trained on the documents, and the datasets built from them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("inspect")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(root / "tokenizer.json"))
    tok = load_tokenizer(root / "tokenizer.json")
    ids = [t + [tok.eod_id] for t in tok.encode_batch(docs)]
    half = len(docs) // 2
    # The training corpus in prepare_data.py's format (two prefixes: reads cross a file boundary), a
    # second one for a blend, and a validation set.
    write_ours(root / "ours", ids[:half], ids[half:], tok=tok, source="docstrings, first part")
    write_ours(root / "other", ids[half:][::-1], tok=tok, source="docstrings, reversed")
    write_ours(root / "valid", ids[:40], tok=tok, source="docstrings, validation")
    # Pythia-style rows: the token stream cut into sequences of exactly SEQ + 1 tokens, written by
    # megatron-core (independent of our writer), read with data.tokenizer.
    stream = np.concatenate([np.asarray(t) for t in ids])
    rows = stream[:len(stream) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)
    (root / "pile").mkdir()
    megatron_core_write(root / "pile" / "document", rows)
    shutil.copyfile(root / "tokenizer.json", root / "pile" / "tokenizer.json")
    return {"root": root, "tok": tok, "ids": ids, "half": half, "rows": rows, "docs": docs}


def write_ours(path: Path, *parts, tok, source: str) -> None:
    """A dataset directory as prepare_data.py writes it (format_version 2): NNNNN_tokens.bin/.idx pairs,
    the tokenizer, metadata.json with every file's size and sha256."""
    path.mkdir()
    dtype = token_dtype(tok.vocab_size)
    prefixes = []
    for k, part in enumerate(parts):
        w = IndexWriter(path / f"{k:05d}_tokens", dtype)
        for doc in part:
            w.add(np.asarray(doc))
        w.close()
        prefixes.append(f"{k:05d}_tokens")
    shutil.copyfile(tok.path, path / "tokenizer.json")
    files = {f"{p}.{ext}": {"bytes": (path / f"{p}.{ext}").stat().st_size, "sha256": sha256_file(path / f"{p}.{ext}")}
             for p in prefixes for ext in ("bin", "idx")}
    every = [t for part in parts for doc in part for t in doc]
    meta = {"format_version": 2, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "dtype": str(dtype),
            "num_tokens": len(every), "num_documents": sum(len(p) for p in parts), "max_token_id": max(every),
            "tokenizer_file": "tokenizer.json", "tokenizer_sha256": sha256_file(path / "tokenizer.json"),
            "source": source, "prefixes": prefixes, "files": files,
            "stats": {"documents_per_file": [len(p) for p in parts]}}
    (path / "metadata.json").write_text(json.dumps(meta, indent=1))


def megatron_core_write(prefix: Path, rows: np.ndarray) -> None:
    """One document per row, written with megatron-core's own builder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for row in rows:
        builder.add_item(torch.tensor(row.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


# ---------------------------------------------------------------- --step against the training loop


def train_and_compare(capsys, tmp_path, overrides, nproc, dp, hooks=None) -> dict[int, np.ndarray]:
    """Train with the record hook on; check every rank's recorded micro-batches of every step against
    --step N --json; returns {step: the global batch}."""
    rec = tmp_path / "batches"
    rec.mkdir()
    launch(TINY + overrides + [f"log.dir={tmp_path / 'run'}"], nproc=nproc,
           hooks={"record_batches": str(rec), **(hooks or {})})  # tests/hooked_pretrain.py
    files = sorted(rec.glob("*.npy"))
    seen, batches = set(), {}
    for step in range(1, STEPS + 1):
        batches[step] = np.asarray(inspect_json(capsys, ["--config", "configs/tiny.yml", *TINY, *overrides,
                                                         "--step", str(step), "--json"]))
        assert batches[step].shape == (B, SEQ + 1)
    mbs = 2
    for f in files:
        step, r = (int(x) for x in re.match(r"step(\d+)_dp(\d+)_tp\d+_pp\d+\.npy", f.name).groups())
        got = np.load(f)
        assert got.shape == (B // (mbs * dp), mbs, SEQ + 1), f.name
        for m, micro in enumerate(got):  # rank r's micro-batch m: positions (m*dp + r)*mbs ... from the step's first
            first = (m * dp + r) * mbs
            assert np.array_equal(micro, batches[step][first:first + mbs]), (f.name, m)
        seen.add((step, r))
    assert seen == {(s, r) for s in range(1, STEPS + 1) for r in range(dp)}  # every step, every data rank
    return batches


@pytest.mark.slow
def test_step_is_what_tensor_parallel_trained_on(capsys, tmp_path, data):
    """Shuffled order over a two-file dataset, TP=2: both tensor ranks read the batch --step shows."""
    ours = data["root"] / "ours"
    batches = train_and_compare(capsys, tmp_path, [f"data.path={ours}", "parallel.tensor=2"], nproc=2, dp=1)
    assert len(list((tmp_path / "batches").glob("*_tp1_*.npy"))) == STEPS
    # Shuffled windows: each sample is L + 1 consecutive tokens of the documents joined, and the order
    # is not the stored one.
    stream = np.concatenate([np.asarray(t) for t in data["ids"][:data["half"]] + data["ids"][data["half"]:]])
    windows = {tuple(stream[k * SEQ:k * SEQ + SEQ + 1]) for k in range((len(stream) - 1) // SEQ)}
    assert all(tuple(s) in windows for b in batches.values() for s in b)
    assert not np.array_equal(batches[1][:, 0], stream[0:B * SEQ:SEQ])


@pytest.mark.slow
def test_step_is_what_pipeline_parallel_trained_on_from_a_blend(capsys, tmp_path, data):
    """A blend of two datasets, PP=2: every stage's batch is the one --step shows; the text form names
    each sample's source."""
    root = data["root"]
    blend = f"data.blend=[{{path: {root / 'ours'}, weight: 0.6}}, {{path: {root / 'other'}, weight: 0.4}}]"
    batches = train_and_compare(capsys, tmp_path, [blend, "parallel.pipeline=2"], nproc=2, dp=1)
    assert len(list((tmp_path / "batches").glob("*_pp1.npy"))) == STEPS
    capsys.readouterr()
    assert TOOL.main(["--config", "configs/tiny.yml", *TINY, blend, "--step", "2"]) == 0
    heads = re.findall(r"^=== step 2, sample (\d+) of 8 \(position (\d+)\): data\.blend\[(\d)\]: sample \d+ of (\S+) ",
                       capsys.readouterr().out, re.M)
    assert [(int(j), int(p)) for j, p, _, _ in heads] == [(j, B + j) for j in range(B)]
    assert {s for _, _, s, _ in heads} == {"0", "1"}  # 0.6 / 0.4 of 8: both sources in every batch
    assert all(str(root / ("ours" if s == "0" else "other")) == p for _, _, s, p in heads)
    assert batches[2].shape == (B, SEQ + 1)


@pytest.mark.slow
def test_step_is_what_data_parallel_trained_on_in_stored_order_and_a_spike_names_its_step(capsys, tmp_path, data):
    """Pythia's order (data.order=stored, a megatron-core prefix, a separate data.valid_path), DP=2: the
    step logged as N trains rows (N-1)*B ... N*B-1; a loss spike's metrics row names a step whose batch
    --step shows as text, row by row."""
    root = data["root"]
    prefix = root / "pile" / "document"
    run = [f"data.path={prefix}", f"data.tokenizer={root / 'pile' / 'tokenizer.json'}", "data.order=stored",
           f"data.valid_path={root / 'valid'}", "train.spike_factor=3", "train.spike_window=2"]
    batches = train_and_compare(capsys, tmp_path, run, nproc=2, dp=2,
                                hooks={"spikes": [3]})
    rows = data["rows"]
    for n, batch in batches.items():
        assert np.array_equal(batch, rows[(n - 1) * B:n * B])  # the rows as written, not as we read them
    (spike,) = [r for r in metrics(tmp_path / "run") if "spike_loss" in r]
    assert spike["step"] == 3
    capsys.readouterr()
    assert TOOL.main(["--config", "configs/tiny.yml", *TINY, *run, "--step", str(spike["step"])]) == 0
    out = capsys.readouterr().out
    parts = re.split(r"^=== step 3, sample (\d+) of 8 \(position (\d+)\): row (\d+) of (\S+) ===\n", out, flags=re.M)
    assert parts[0] == ""
    tok = data["tok"]
    for j in range(B):
        sample, position, row, path, text = parts[1 + 5 * j:6 + 5 * j]
        assert (int(sample), int(position), int(row), path) == (j, 2 * B + j, 2 * B + j, str(prefix))
        ids = [int(t) for t in rows[2 * B + j]]
        # the text shows the documents' boundaries as the tokenizer's <|endoftext|>
        assert text == tok.decode(ids) + "\n"
        assert text.count("<|endoftext|>") == ids.count(tok.eod_id)


def test_pythias_own_index_layout_is_read(capsys, tmp_path, data):
    """Pythia's document.idx has a single document index entry (its size is 34 + 12*S + 8 bytes), beside
    byte-split pieces: --documents (and training) must read its rows."""
    import struct

    from megatron_tokenformer.data.indexed import MAGIC

    rows = data["rows"][:10]
    prefix = tmp_path / "document"
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", 1, 8, len(rows), 1))
        f.write(np.full(len(rows), SEQ + 1, np.int32).tobytes())
        f.write((np.arange(len(rows), dtype=np.int64) * (SEQ + 1) * 2).tobytes())
        f.write(np.zeros(1, np.int64).tobytes())
    raw = rows.astype(np.uint16).tobytes()
    (tmp_path / "document-00000-of-00001.bin").write_bytes(raw[:len(raw) // 3])
    (tmp_path / "document-00001-of-00001.bin").write_bytes(raw[len(raw) // 3:])
    assert (tmp_path / "document.idx").stat().st_size == 34 + 12 * len(rows) + 8
    got = inspect_json(capsys, [str(prefix), "--tokenizer", str(data["root"] / "tokenizer.json"),
                                "--documents", "0:10", "--json"])
    assert got == rows.tolist()


# ---------------------------------------------------------------- --documents, summary, --verify


def test_documents_round_trip(capsys, data):
    ours, tok, docs, ids, half = data["root"] / "ours", data["tok"], data["docs"], data["ids"], data["half"]
    lo, hi = half - 2, half + 3  # across the boundary of the two files
    got = inspect_json(capsys, [str(ours), "--documents", f"{lo}:{hi}", "--json"])
    assert got == [tok.encode(d) + [tok.eod_id] for d in docs[lo:hi]] == ids[lo:hi]
    capsys.readouterr()
    assert TOOL.main([str(ours), "--documents", f"{lo}:{hi}"]) == 0
    parts = re.split(r"^=== document (\d+) of (\d+) \((\d+) tokens\) ===\n", capsys.readouterr().out, flags=re.M)
    assert parts[0] == "" and len(parts) == 1 + 4 * (hi - lo)
    for k, i in enumerate(range(lo, hi)):
        number, total, count, text = parts[1 + 4 * k:5 + 4 * k]
        assert (int(number), int(total), int(count)) == (i, len(docs), len(ids[i]))
        assert text == docs[i] + "<|endoftext|>\n"  # the document, its end token, print's newline
    # A foreign prefix with --tokenizer: its stored rows; the end of the range may be left out.
    pile = data["root"] / "pile"
    rows = data["rows"]
    got = inspect_json(capsys, [str(pile / "document"), "--tokenizer", str(pile / "tokenizer.json"),
                                "--documents", f"{len(rows) - 2}:", "--json"])
    assert got == rows[-2:].tolist()


def test_summary(capsys, data):
    ours = data["root"] / "ours"
    capsys.readouterr()
    assert TOOL.main([str(ours)]) == 0
    out = capsys.readouterr().out.splitlines()
    n = sum(len(d) for d in data["ids"])
    assert f"tokens: {n}" in out and f"sequences: {len(data['docs'])}" in out and "dtype: uint16" in out
    assert "source: docstrings, first part" in out
    assert f"stats.documents_per_file: [{data['half']}, {len(data['docs']) - data['half']}]" in out
    assert sum(line.startswith("file: ") for line in out) == 2
    assert any(line.startswith(f"tokenizer: {ours / 'tokenizer.json'} (hf, 400 ids, end of document 0") for line in out)
    pile = data["root"] / "pile"
    assert TOOL.main([str(pile / "document"), "--tokenizer", str(pile / "tokenizer.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"sequences: {len(data['rows'])}" in out
    assert "checksums: none recorded (a Megatron dataset from elsewhere)" in out


@pytest.mark.slow
def test_verify_finds_a_flipped_byte_and_splits_the_work(tmp_path, data):
    ours = tmp_path / "ours"
    shutil.copytree(data["root"] / "ours", ours)
    names = sorted(json.loads((ours / "metadata.json").read_text())["files"])
    proc = inspect_cli(ours, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")] == \
        [str(ours / n) for n in names]
    shares = []
    for k in (1, 2):
        out = inspect_cli(ours, "--verify", "--part", f"{k}/2")
        assert out.returncode == 0, out.stderr
        shares.append({line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")})
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {str(ours / n) for n in names}
    for share in shares:  # the work is split by bytes: each share has one of the two large .bin files
        assert sum(Path(f).suffix == ".bin" for f in share) == 1
    # One byte flipped in the second file, its size unchanged: start-up's checks pass, --verify does not.
    bad = ours / "00001_tokens.bin"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    proc = inspect_cli(ours, "--verify")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: checksum mismatch for ") and f"'{bad}'" in line and "Traceback" not in proc.stderr
    which = [k for k in (1, 2) if str(bad) in shares[k - 1]][0]
    assert inspect_cli(ours, "--verify", "--part", f"{3 - which}/2").returncode == 0  # the other share is good
    assert inspect_cli(ours, "--verify", "--part", f"{which}/2").returncode == 2


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_verify_shares_cover_every_file_once_and_balance_the_bytes(parts):
    """Pythia-like sizes (21 pieces of 30 GB but the last, one large index) and a datatrove-like directory."""
    from megatron_tokenformer.data.dataset import shares

    files = {f"document-{k:05d}-of-00020.bin": {"bytes": 30_000_000_000} for k in range(20)}
    files |= {"document-00020-of-00020.bin": {"bytes": 78_336_000}, "document.idx": {"bytes": 1_757_184_042}}
    files |= {f"{k:05d}_tokens.{e}": {"bytes": 10 ** (9 if e == "bin" else 6) + k}
              for k in range(5) for e in ("bin", "idx")}
    got = shares(files, parts)
    assert sorted(n for share in got for n in share) == sorted(files)  # every file, once
    loads = [sum(files[n]["bytes"] for n in share) for share in got]
    assert max(loads) - min(loads) <= max(f["bytes"] for f in files.values())  # no share a file heavier than another
    assert shares(files, parts) == got  # the same on every machine


@pytest.mark.parametrize("args, says", [
    (["{root}/missing"], "does not exist"),
    (["{root}/pile/document"], "without a tokenizer; set data.tokenizer"),
    (["{root}/pile/document", "--documents", "0:1"], "(here: --tokenizer FILE)"),
    (["{root}/ours", "--documents", "x:y"], "is not a range A:B"),
    (["{root}/ours", "--documents", "5:5"], "selects none"),
    (["{root}/ours", "--verify", "--part", "3/2"], "--part 3/2"),
    (["--config", "configs/tiny.yml", "data.path={root}/missing", "--step", "1"], "does not exist"),
    (["--config", "configs/tiny.yml", "data.path={root}/ours", "--step", "0"], "counted from 1"),
    (["--config", "configs/tiny.yml", "data.order=sorted", "--step", "1"], "data.order='sorted' is not valid"),
])
def test_bad_input_is_one_line(data, args, says):
    proc = inspect_cli(*[a.format(root=data["root"]) for a in args])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and says in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the released configs


PILE_CONFIGS = ["150M", "450M", "900M", "1.5B"]
PYTHIA_ROWS = 146_432_000


def _commands(recipe: str) -> list[list[str]]:
    return [shlex.split(c) for c in recipe.split("&&")]


def _options(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag`` pairs of a command line, checked against the flags tools/prepare_data.py
    declares (read from its source: its import needs the data preparation code, being rewritten beside)."""
    declared = set(re.findall(r'add_argument\("(--[a-z][a-z-]*)"', (ROOT / "tools" / "prepare_data.py").read_text()))
    out = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            assert a in declared, (a, sorted(declared))
            out[a] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    return out


@pytest.mark.parametrize("name", PILE_CONFIGS)
def test_released_config_trains_on_pythias_pile(name):
    """150M-1.5B train on Pythia's preshuffled deduplicated Pile in stored order, as the paper's recipe
    does; data.prepare downloads it and the tokenizer to where data.path and data.tokenizer point, and
    prepares the Pile's validation split with that tokenizer into data.valid_path."""
    path = ROOT / "configs" / f"{name}.yml"
    cfg = load_config(path)
    d = cfg.data
    assert d.order == "stored" and Path(d.path).name == "document" and d.tokenizer.endswith("tokenizer.json")
    # 2049-token rows, 1024 a step, 143,000 steps: every one of Pythia's rows once, nothing held out.
    assert cfg.model.seq_length + 1 == 2049 and cfg.train.global_batch_size == 1024
    assert cfg.train.steps * cfg.train.global_batch_size == PYTHIA_ROWS and d.valid_path and not d.blend
    assert d.prepare == yaml.safe_load(path.read_text())["data"]["prepare"]
    commands = _commands(d.prepare)
    fetched = {}  # what the downloads put where: {local file or prefix: (repo, repo type)}
    for c in commands:
        if c[:2] == ["hf", "download"]:
            repo, rest, opts, files = c[2], c[3:], {}, []
            while rest:  # hf download REPO [FILES ...] [--option value ...]
                if rest[0].startswith("--"):
                    opts[rest[0]], rest = rest[1], rest[2:]
                else:
                    files, rest = files + [rest[0]], rest[1:]
            for f in files or [opts["--include"].rstrip("*")]:  # "document*": the prefix
                fetched[Path(opts["--local-dir"]) / f] = (repo, opts.get("--repo-type", "model"))
    assert fetched[Path(d.path)] == ("EleutherAI/pile-deduped-pythia-preshuffled", "dataset")
    assert fetched[Path(d.tokenizer)] == ("EleutherAI/gpt-neox-20b", "model")
    (valid,) = [c for c in commands if c[:2] == ["python", "tools/prepare_data.py"]]
    opts = _options(valid[2:])
    assert opts["--output"] == d.valid_path and opts["--tokenizer"] == d.tokenizer
    assert fetched[Path(opts["--input"])] == ("monology/pile-uncopyrighted", "dataset")
    assert opts["--input"].endswith("val.jsonl.zst")  # the Pile's validation split, not its training data
    assert commands.index(valid) == len(commands) - 1  # after the downloads it reads


def test_missing_pile_names_the_download(tmp_path, monkeypatch):
    """Before the download, a released config's error names its data.prepare (the download command)."""
    from megatron_tokenformer.data import DataError, load_data

    cfg = load_config(ROOT / "configs" / "150M.yml")
    monkeypatch.chdir(tmp_path)  # nothing downloaded here
    with pytest.raises(DataError) as e:
        load_data(cfg.data, cfg.model.seq_length)
    assert "(config key data.prepare)" in str(e.value)
    assert "hf download EleutherAI/pile-deduped-pythia-preshuffled" in str(e.value)


@pytest.mark.parametrize("name", ["354M", "757M"])
def test_openwebtext_configs_keep_their_recipe(name):
    """354M and 757M (OpenWebText2, not the Pile) keep a prepare_data.py recipe that writes data.path and
    trains a tokenizer that fits the embedding (what test_data.py's test_released_config_names_its_data_recipe
    checked for every released config)."""
    path = ROOT / "configs" / f"{name}.yml"
    raw = yaml.safe_load(path.read_text())
    argv = shlex.split(raw["data"]["prepare"])
    assert argv[:2] == ["python", "tools/prepare_data.py"]
    opts = _options(argv[2:])
    assert opts["--output"] == raw["data"]["path"]
    assert "--tokenizer" not in opts and int(opts.get("--vocab-size") or 0) <= raw["model"]["vocab_size"]
    assert "--hf-dataset" not in opts or "--streaming" in opts or "--max-documents" in opts
    assert load_config(path).data.prepare == raw["data"]["prepare"]


# ---------------------------------------------------------------- the start-up benchmark runs


def test_bench_startup_measures_both_orders(tmp_path, data):
    """tools/bench_startup.py end to end on a tiny sparse corpus: both orders start and read the first
    batch in fresh processes, over the training split the config leaves (2% held out for validation)."""
    spec = importlib.util.spec_from_file_location("bench_startup_tool", ROOT / "tools" / "bench_startup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "startup.json"
    assert bench.main(["--dir", str(tmp_path / "corpora"), "--sizes", "0.01", "--repeat", "1", "--dp", "8",
                       "--tokenizer", str(data["root"] / "tokenizer.json"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    rows = int(0.01e9) // (2049 * 2)
    assert [(r["order"], r["rows"]) for r in results] == [("stored", rows), ("shuffled", rows)]
    assert results[0]["samples"] == rows - round(rows * 0.02)  # stored: a row is a sample
    assert results[1]["samples"] == (rows * 2049 - 1) // 2048 - round((rows * 2049 - 1) // 2048 * 0.02)
    corpus = tmp_path / "corpora" / "0_01"
    assert (corpus / "document.bin").stat().st_size == rows * 2049 * 2
    assert (corpus / "document.bin").stat().st_blocks == 0  # sparse: nothing written
    for r in results:
        assert 0 < r["data_s"] < r["total_s"] and r["peak_mb"] >= r["peak_after_imports_mb"] > 0
