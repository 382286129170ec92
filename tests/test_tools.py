"""The measurement tools, one small real run each, checked on what they print: tools/benchmark.py,
tools/comm_volume.py, tools/bench_checkpoint.py, tools/scaling_experiment.py and tools/bench_data.py
(tools/bench_startup.py: test_inspect_data.py; tools/plan_parallelism.py: test_planner.py). Also
tools/export.py's native format: a failure mid-export leaves no half export.
"""
import errno
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT, SMALL, env, stdlib_documents
from megatron_tokenformer import TokenFormerModel, load_model
from megatron_tokenformer.checkpoint import newest_good, verify
from megatron_tokenformer.config import ModelConfig, load_config, padded_vocab_size
from megatron_tokenformer.data import load_meta
from megatron_tokenformer.model import model_flops_per_token
from megatron_tokenformer.planner import tp_bytes_per_token

SHAPE = [o for o in SMALL if o.startswith(("model.", "train."))]  # the tiny model and its batch


def tool(name: str):
    """A tool's module, imported from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


# ---------------------------------------------------------------- benchmark.py


@pytest.mark.slow
def test_benchmark_reports_its_figures_and_why_the_data_was_not_timed(corpus, tmp_path):
    """Two variants, two rounds of one step, decoding: every figure present, consistent and positive. The
    config's data.path does not exist: the table says so, naming the path and the command that builds it
    (it used to be swallowed), and the rest of the benchmark runs, as it needs no data."""
    missing = tmp_path / "no_such_data"
    out = run_tool("tools/benchmark.py", "--config", "configs/tiny.yml", *SHAPE, f"data.path={missing}",
                   "--steps", "1", "--warmup", "1", "--rounds", "2", "--variants", "fused", "--no-compile-baseline",
                   "--decode", "8", "--json", str(tmp_path / "bench.json"))
    res = json.loads((tmp_path / "bench.json").read_text())
    cfg = load_config("configs/tiny.yml", SHAPE)
    vocab = 4096  # model.vocab_size unset: the benchmark's stand-in vocabulary
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"tokenformer-fused", "gpt-eager"}
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    assert rows["tokenformer-fused"]["flops_per_token"] == model_flops_per_token(cfg.model, vocab)
    for r in rows.values():
        assert len(r["step_ms_rounds"]) == 2 and r["step_ms"] > 0
        assert r["tokens_per_sec"] == pytest.approx(tokens / (r["step_ms"] / 1e3), rel=1e-9)
        assert r["tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_sec"] / 1e12, rel=1e-9)
        assert r["activation_bytes_per_token"] > 0
        assert r["mfu"] > 0 or math.isnan(r["mfu"])  # nan: a GPU whose peak is not in the benchmark's table
        # random tokens, two steps at lr 1e-4: the loss is still about ln(vocab)
        assert abs(r["final_loss"] - math.log(vocab)) < 1.0, r["final_loss"]
    ratio = res["ratios"]["tokenformer-fused"]
    assert ratio["vs"] == "gpt-eager" and 0 < ratio["step_time_min"] <= ratio["step_time"] <= ratio["step_time_max"]
    assert ratio["activation_bytes"] == pytest.approx(rows["tokenformer-fused"]["activation_bytes_per_token"]
                                                      / rows["gpt-eager"]["activation_bytes_per_token"])
    assert res["decode"]["cached_tokens_per_sec"] > 0 and res["decode"]["uncached_tokens_per_sec"] > 0
    assert res["scoring"]["requests_per_sec"] > 0 and res["tp_collective_bytes_per_token"] == 0  # TP=1
    # the table: a row per variant, and the data loader's reason
    assert "| tokenformer-fused |" in out.stdout and "| gpt-eager |" in out.stdout
    assert res["data_loader_fraction"] is None and str(missing) in res["data_loader_error"]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("data loader:")]
    assert line.startswith("data loader: not measured, the config's data cannot be read: ") and str(missing) in line
    assert "tools/prepare_data.py" in line and "data.path" in line, line
    # with data, the figure: reading a step's batches takes a positive fraction of a step
    bench = tool("benchmark")
    fraction, error = bench.data_loader_fraction(load_config("configs/tiny.yml", SHAPE + [f"data.path={corpus}"]), 0.1)
    assert error is None and fraction > 0


# ---------------------------------------------------------------- comm_volume.py


@pytest.mark.slow
def test_comm_volume_counts_the_documented_bytes():
    """Two gloo ranks: the TokenFormer block sends what the planner's formula says (per layer, no
    embedding or loss), the Megatron block its four all-reduces of d fp32 values per token."""
    d, tp = 64, 2
    out = run_tool("tools/comm_volume.py", "--hidden", str(d), "--heads", "4", "--tp", str(tp), "--seq", "8")
    (row,) = json.loads(out.stdout)
    cfg = ModelConfig(num_layers=1, hidden_size=d, num_heads=4, qkv_tokens=d, proj_tokens=d, ffn_tokens=4 * d,
                      seq_length=8)
    tf, mg = row["tokenformer"], row["megatron"]
    assert row["tp"] == tp and tf["total"] == tf["fwd"] + tf["bwd"] and mg["total"] == mg["fwd"] + mg["bwd"]
    assert tf["total"] == pytest.approx(tp_bytes_per_token(cfg, tp, 4, layers=1, ends=False), rel=1e-12)
    assert mg["fwd"] == mg["bwd"] == pytest.approx(2 * 2 * (tp - 1) / tp * d * 4, rel=1e-12)  # 2 ring all-reduces
    assert sum(row["tokenformer_ops"].values()) == pytest.approx(tf["total"])
    assert tf["total"] / mg["total"] > 1  # TokenFormer's extra row statistics and scattered Q/K/V


# ---------------------------------------------------------------- bench_checkpoint.py + export.py


@pytest.fixture(scope="module")
def bench_checkpoint(corpus, tmp_path_factory):
    """One run of tools/bench_checkpoint.py on one process: (its JSON line, its scratch directory)."""
    scratch = tmp_path_factory.mktemp("bench_checkpoint")
    out = run_tool("tools/bench_checkpoint.py", "--config", "configs/tiny.yml", "--dir", str(scratch), "--reps", "1",
                   "--async-save", "--steps", "1", *SHAPE, f"data.path={corpus}", "log.wandb_mode=disabled")
    return json.loads(out.stdout.strip().splitlines()[-1]), scratch


@pytest.mark.slow
def test_bench_checkpoint_times_every_operation(corpus, bench_checkpoint):
    res, scratch = bench_checkpoint
    cfg = load_config("configs/tiny.yml", SHAPE)
    vocab = padded_vocab_size(cfg, load_meta(corpus).vocab_size)
    params = sum(p.numel() for p in TokenFormerModel(cfg.model, vocab).parameters())
    assert res["params"] == params and res["data_parallel"] == 1 and res["reps"] == 1
    # fp32 weights and two Adam moments, 12 bytes a parameter, plus headers, RNG state and JSON
    assert 12 * params < res["checkpoint_bytes"] < 12 * params + 256 * 1024, (res["checkpoint_bytes"], params)
    ops = {"save", "load", "async_blocked", "async_total", "steps_quiet", "steps_during_write",
           "async_wait_after_steps", "deepspeed_save", "deepspeed_load"}
    assert set(res) - {"params", "data_parallel", "zero_stage", "precision", "reps", "checkpoint_bytes"} == ops
    for op in ops:
        assert res[op]["seconds"] >= 0 and isinstance(res[op]["rss_growth_mb"], int), (op, res[op])
    # what it saved is a checkpoint like any other: intact, and it loads
    ckpt = scratch / "run" / "checkpoints"
    assert verify(ckpt / newest_good(ckpt)) is None
    assert sum(p.numel() for p in load_model(ckpt)[0].parameters()) == params


@pytest.mark.slow
def test_native_export_is_atomic(bench_checkpoint, tmp_path, monkeypatch, capsys):
    """A full disk while model.safetensors is written (injected where the file is written): no --out and
    no temporary directory are left, and the error is one line. Then the export succeeds; a second one
    into the same --out is refused and leaves the first intact."""
    export = tool("export")
    ckpt = str(bench_checkpoint[1] / "run" / "checkpoints")
    out = tmp_path / "exports" / "tiny"
    real_save = export.save_safetensors

    def disk_full(tensors, path, metadata):
        path.write_bytes(b"\0" * 1000)  # part of the file lands
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export, "save_safetensors", disk_full)
    monkeypatch.setattr(sys, "argv", ["export.py", "--load", ckpt, "--out", str(out)])
    assert export.main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {out}: [Errno {errno.ENOSPC}] No space left on device") and \
        err.count("\n") == 1, err
    assert err.rstrip().endswith("the disk is full (or a quota or file-size limit is reached): free space there or "
                                 "point --out at a disk with room"), err
    assert not out.exists() and list(out.parent.iterdir()) == []  # neither the export nor its temporary

    monkeypatch.setattr(export, "save_safetensors", real_save)
    assert export.main() == 0
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    assert sorted(files) == ["config.json", "model.safetensors"] and sorted(os.listdir(out.parent)) == ["tiny"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # an ordinary directory, not mkdtemp's 0700
    assert export.main() == 2 and "exists and is not empty; choose a new --out" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- scaling_experiment.py


@pytest.mark.slow  # it launches two training runs
def test_scaling_experiment_accounts_flops(corpus, tmp_path, monkeypatch, capsys):
    """Two arms (scratch, exact growth at half the tokens) on one seed, four steps: the summary's FLOPs
    follow from model_flops_per_token, the grown run trains for the scratch run's FLOPs (within a step),
    and the scratch run needs exactly its own FLOPs to reach its own losses. Without matplotlib (made
    unfindable here) the plot is refused before any run starts, with the fix; the run uses --no-plot."""
    args = ["tools/scaling_experiment.py", "--config", "configs/tiny.yml", "--steps", "4", "--factors", "0.5,1",
            "--grow-at", "0.5", "--seeds", "1", "--arms", "scratch,exact", "--eval-interval", "2",
            "--eval-steps", "1", "--targets", "0.5,1", "--nice", "0", "--jobs", "2", "--out", str(tmp_path / "m"),
            *SHAPE, f"data.path={corpus}"]
    scaling = tool("scaling_experiment")
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert scaling.main() == 2 and not (tmp_path / "m").exists()
    assert capsys.readouterr().err == ("error: the plot (growth_matrix.png) needs matplotlib: pip install -e "
                                       "'.[experiments]', or pass --no-plot\n")
    monkeypatch.undo()
    out = run_tool(*args, "--no-plot")
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    cfg = load_config("configs/tiny.yml", SHAPE)
    vocab = padded_vocab_size(cfg, load_meta(corpus).vocab_size)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    half = type(cfg.model)(**{**cfg.model.__dict__, "qkv_tokens": 32, "proj_tokens": 32, "ffn_tokens": 64})
    assert s["flops_per_step"] == [model_flops_per_token(half, vocab) * tokens,
                                   model_flops_per_token(cfg.model, vocab) * tokens]
    small, full = s["flops_per_step"]
    assert s["growth_steps"] == [2] and s["scratch_flops"] == 4 * full
    grown = 2 * small + (s["grown_steps"] - 2) * full
    assert abs(grown - s["scratch_flops"]) <= full / 2
    scratch, exact = s["arms"]["scratch"], s["arms"]["exact"]
    for target in scratch["targets"]:
        assert target["seeds_reached"] == 1 and target["flops_ratio"]["mean"] == 1.0
    for target in exact["targets"]:
        assert all(r > 0 for r in target["per_seed"])
    for arm in (scratch, exact):
        assert abs(arm["loss_at_scratch_flops"]["mean"] - math.log(vocab)) < 1.5
    assert exact["loss_minus_exact"]["mean"] == 0
    md = (tmp_path / "m" / "summary.md").read_text()
    assert "| scratch | 1.00 (1.00 to 1.00) |" in md and "| exact |" in md
    assert not (tmp_path / "m" / "growth_matrix.png").exists()
    assert out.stdout.rstrip().endswith(f"wrote {tmp_path / 'm' / 'summary.json'}, {tmp_path / 'm' / 'summary.md'}")


# ---------------------------------------------------------------- bench_data.py


def test_bench_data_prepare_counts_the_same_tokens(corpus, tmp_path):
    """`bench_data.py prepare` on 42 small real documents in place of the built-in works (it reuses a
    work directory's raw/ files): the preparation's tokens equal the tokenizer's own count (the tool
    asserts it), and every rate, size and ratio is present and positive."""
    work = tmp_path / "work"
    (work / "raw").mkdir(parents=True)
    for i, text in enumerate(stdlib_documents()[:42]):
        (work / "raw" / f"{i:02d}_gut.txt").write_text(text)
    out = run_tool("tools/bench_data.py", "prepare", "--copies", "1", "--rounds", "1", "--workers", "1",
                   "--tokenizer", str(corpus / "tokenizer.model"), "--work", str(work), "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(out.stdout) == report and report["workers"] == 1 and report["rounds"] == 1
    (row,) = report["runs"]
    assert row["documents"] == 42 and row["tokens"] == encoded_tokens(work, corpus)
    for key in ("encode_batch_tokens_per_s", "prepare_tokens_per_s", "rate_ratio", "tasks_rate_ratio",
                "dataset_bytes", "final_output_bytes", "peak_disk_bytes", "peak_pss_mb"):
        assert row[key] > 0, (key, row)
    assert row["final_output_bytes"] >= row["dataset_bytes"]  # the tokens, plus tokenizer and metadata


def encoded_tokens(work, corpus) -> int:
    """The documents of the bench's corpus, encoded here: ids plus one end-of-document each."""
    from megatron_tokenformer.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus / "tokenizer.model")
    docs = [f.read_text() for f in sorted((work / "corpus_x1").iterdir())]
    return sum(len(ids) + 1 for ids in tok.encode_batch(docs))
