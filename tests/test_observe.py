"""What a run reports beyond its loss (README "Monitoring"): each key's presence and meaning, on real
runs with real DeepSpeed engines, gloo groups and W&B (offline)."""
import importlib.util
import json
import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_on_ranks
from helpers import ROOT, SMALL, launch, metrics
from megatron_tokenformer import observe
from megatron_tokenformer.checkpoint.reader import global_state_dict
from megatron_tokenformer.config import ModelConfig, load_config
from megatron_tokenformer.model import TokenFormerModel, model_flops_per_token
from wandb_records import history as wandb_history
from wandb_records import records as wandb_records

PROJ = ("q", "k", "v", "proj", "ffn")
TOKENS_PER_STEP = 8 * 64  # SMALL: global batch 8 x seq_length 64


def alerts(run_dir) -> list[tuple[str, str]]:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [(r.alert.title, r.alert.text) for r in wandb_records(path) if r.WhichOneof("record_type") == "alert"]


@pytest.mark.slow
def test_each_row_holds_the_breakdown_memory_mfu_norms_tokens_and_alerts(corpus, tmp_path):
    """4 steps logged every 2: batches delayed 40 ms by the test hook, a spike forced at step 3
    (skipped: two alerts), and the final save fails (the checkpoint directory is a file: an alert)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    overrides = SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=4", "log.interval=2",
                         "train.spike_factor=3", "train.spike_window=1", "log.alert_skipped_steps=1",
                         "log.zero_grads=true", "log.peak_tflops=1", "log.token_stats_interval=2",
                         "log.wandb_mode=offline", "log.wandb_project=tests"]
    proc = launch(overrides, launcher="python", check=False,
                  hooks={"data_delay_ms": 40, "spikes": [3]})
    assert proc.returncode != 0 and "checkpoints" in proc.stderr, proc.stderr[-3000:]
    cfg = load_config("configs/tiny.yml", overrides)
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    flops_per_token = model_flops_per_token(cfg.model, 512)
    for r in rows:
        parts = [r[f"step_ms/{p}"] for p in ("data", "forward_backward", "optimizer", "other")]
        assert sum(parts) == pytest.approx(r["step_ms"], rel=1e-9) and min(parts) >= 0, r
        assert r["step_ms/data"] >= 40 and r["step_ms/forward_backward"] > 0 and r["step_ms/optimizer"] > 0, r
        # a step is part of its window's time: never more than the time per step tokens/s implies
        assert r["step_ms"] <= 1e3 * TOKENS_PER_STEP / r["tokens_per_sec"] * (1 + 1e-9), r
        assert 0.05 < r["mem/rss_gb"] and "mem/max_allocated_gb" not in r  # a CPU run: host memory only
        assert r["mfu"] == pytest.approx(r["tflops"], rel=1e-9)  # peak 1 TFLOP/s, one device
        assert "loss_scale" not in r  # fp32
        assert r["train_tokens"] == r["samples"] * 64
        assert r["train_flops"] == pytest.approx(r["train_tokens"] * flops_per_token)
        assert r["params_norm"] > 0 and r["zero_grads"] == 0  # every parameter gets gradient here
        for block in (0, 1):
            for proj in PROJ:
                n = 128 if proj == "ffn" else 64
                assert 1 < r[f"tokens/block{block}/{proj}/effective"] <= n * (1 + 1e-9), (block, proj, r)
        for proj in PROJ:
            assert r[f"tokens/mean/{proj}/effective"] == pytest.approx(
                (r[f"tokens/block0/{proj}/effective"] + r[f"tokens/block1/{proj}/effective"]) / 2)
        assert not [k for k in r if "share_stage" in k]  # no growth
    assert rows[1]["params_norm"] != rows[0]["params_norm"]
    # W&B holds the same rows; the spike, the run of skipped steps and the failed save were alerts.
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    hist = {h["_step"]: h for h in wandb_history(path) if "step_ms" in h}
    assert sorted(hist) == [2, 4] and hist[4]["tokens/mean/ffn/effective"] == rows[1]["tokens/mean/ffn/effective"]
    titles = [t for t, _ in alerts(run)]
    assert titles == ["loss spike", "skipped steps", "checkpoint save failed"], alerts(run)
    assert "step 3" in alerts(run)[0][1] and "step 4" in alerts(run)[2][1]


@pytest.mark.slow
def test_token_usage_after_a_growth(corpus, tmp_path):
    """A growth at step 2 appends tokens with zero keys: at the growth the usage is unchanged and the
    new tokens get exactly none of the attention (gelu(0) = 0), nor their values any gradient; two
    steps later they get some. params_norm is the norm of the checkpoint's weights."""
    run = tmp_path / "run"
    launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=4", "log.token_stats_interval=2",
                    "log.zero_grads=true", "checkpoint.keep_last=0",
                    "growth=[{at_step: 2, qkv_tokens: 96, ffn_tokens: 160}]"],
           launcher="python")
    rows = metrics(run)
    before, event, at_growth = rows[1:4]
    assert before["step"] == event["step"] == at_growth["step"] == 2 and event["event"] == "growth", rows
    after = rows[-1]
    assert after["step"] == 4
    for block in (0, 1):
        for proj in PROJ:
            key = f"tokens/block{block}/{proj}"
            assert at_growth[f"{key}/effective"] == pytest.approx(before[f"{key}/effective"], rel=1e-6)
            if proj == "proj":  # did not grow: only its stage-0 tokens
                assert at_growth[f"{key}/share_stage0"] == pytest.approx(1, rel=1e-12)
                assert f"{key}/share_stage1" not in at_growth
                continue
            assert at_growth[f"{key}/share_stage1"] == 0 and at_growth[f"{key}/share_stage0"] == pytest.approx(1)
            assert 0 < after[f"{key}/share_stage1"] < 1, (key, after)
            assert after[f"{key}/share_stage0"] + after[f"{key}/share_stage1"] == pytest.approx(1, rel=1e-9)
    # step 3, the first after the growth: the new value tokens' gradients are exactly zero
    step3 = next(r for r in rows if r["step"] == 3)
    assert step3["zero_grads"] == 2 * (3 * 32 + 32) * 64, step3  # 2 blocks x (q, k, v and ffn: 32 new) x 64 wide
    state, _ = global_state_dict(run / "checkpoints" / "step_00000002")
    norm = math.sqrt(sum(t.double().square().sum().item() for k, t in state.items() if not k.endswith("_extra_state")))
    assert before["params_norm"] == pytest.approx(norm, rel=1e-9)


@pytest.mark.slow
def test_a_stop_by_time_limit_is_an_alert(corpus, tmp_path):
    run = tmp_path / "run"
    launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=50", "train.exit_after_minutes=0.0001",
                    "log.wandb_mode=offline", "log.wandb_project=tests"], launcher="python")
    ((title, text),) = alerts(run)
    assert title == "run stopped" and text.startswith("step 1: train.exit_after_minutes") and "saved, at step 1" in text


def _usage_at(rank, world, lineage):
    """Token usage of a TP=world model against the TP=1 model of the same seed (it holds the TP=1
    numbers, sliced), on the same batch, for each normalisation; shares for two growths."""
    group = dist.new_group(list(range(world)))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    for norm in ("l2_norm_gelu", "gelu_l2_norm", "softmax"):
        cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, qkv_tokens=16, proj_tokens=8, ffn_tokens=32,
                          seq_length=16, norm=norm)
        ref = TokenFormerModel(cfg, 96, seed=3).eval()
        want = observe.token_usage(ref, lambda: ref(ids), lineage)
        for sp in (False, True):  # with sequence parallelism a layer's input is this rank's part of the sequence
            tp = TokenFormerModel(cfg, 96, tp_group=group, seed=3, sequence_parallel=sp).eval()
            got = observe.token_usage(tp, lambda: tp(ids), lineage)
            assert got.keys() == want.keys() and len(want) == 3 * 4 + 2 + 4, sorted(want)  # proj never grew
            for k, v in want.items():
                assert got[k] == pytest.approx(v, rel=1e-5), (norm, sp, k, got[k], v)


def _scaler(rank, world):
    """A real fp32 ZeRO-1 engine with DeepSpeed's dynamic loss scaler put in it: loss_scale reads the
    scaler's value as it changes (the fp16 run below reads it end to end)."""
    import deepspeed
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # adopts the test's process group
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config={"train_batch_size": world, "zero_optimization": {"stage": 1},
                                              "zero_allow_untested_optimizer": True})
    assert observe.loss_scale(engine) == 1.0  # fp32: DeepSpeed's static scaler of 1
    engine.optimizer.loss_scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1,
                                                     delayed_shift=1, consecutive_hysteresis=False)
    assert observe.loss_scale(engine) == 2.0**16
    engine.optimizer.loss_scaler.update_scale(True)  # an overflow halves it
    assert observe.loss_scale(engine) == 2.0**15


def _growth(before: tuple, after: tuple, shards: int) -> dict:
    keys = ("qkv_tokens", "proj_tokens", "ffn_tokens")
    return {"tokens_before": dict(zip(keys, before)), "tokens_after": dict(zip(keys, after)), "shards": shards}


# Two growths to the test model's (16, 8, 32) tokens; the second's over 2 shards interleaves its tokens.
LINEAGE = [_growth((8, 8, 16), (12, 8, 24), 1), _growth((12, 8, 24), (16, 8, 32), 2)]


@pytest.mark.slow
def test_token_usage_is_the_same_at_any_tensor_size():
    run_on_ranks(2, _usage_at, LINEAGE)


def test_stage_labels_follow_the_grown_order():
    """The growth stage of each token, against the freeze's independent rule for the old rows."""
    from megatron_tokenformer.growth.freeze import old_rows

    # growth 1 appends 4 to the 8: [0]*8 + [1]*4; growth 2 appends 2 after each half of those 12
    assert observe.stage_labels(LINEAGE, 16, "qkv_tokens").tolist() == [0] * 6 + [2] * 2 + [0] * 2 + [1] * 4 + [2] * 2
    assert observe.stage_labels(LINEAGE, 8, "proj_tokens").tolist() == [0] * 8
    for shards in (1, 2, 4):
        labels = observe.stage_labels([_growth((64, 64, 128), (96, 64, 160), shards)], 160, "ffn_tokens")
        assert torch.equal(labels == 0, old_rows(128, 160, shards, 0, 1)), shards
    assert observe.stage_labels([{**LINEAGE[0], "shards": None}], 12, "qkv_tokens") is None  # an older lineage


@pytest.mark.slow
def test_loss_scale_reads_deepspeeds_scaler():
    run_on_ranks(1, _scaler)


@pytest.mark.slow
def test_fp16_rows_log_the_loss_scale_of_deepspeeds_scaler(corpus, tmp_path):
    # fp16 on any CPU: the test hook lets DeepSpeed's CPU accelerator accept it (tests/hooked_pretrain.py)
    launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=3", "train.precision=fp16"],
           launcher="python", hooks={"fp16": True})
    rows = metrics(tmp_path)
    meta = json.loads((tmp_path / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert all(r["loss_scale"] > 0 for r in rows) and rows[-1]["loss_scale"] == meta["loss_scaler"]["cur_scale"]


def test_rss_grows_when_a_big_buffer_is_held():
    before = observe.memory(torch.device("cpu"))["mem/rss_gb"]
    buffer = torch.ones(64 * 2**20)  # 256 MiB, touched
    after = observe.memory(torch.device("cpu"))["mem/rss_gb"]
    assert after - before >= 0.9 * buffer.numel() * 4 / 2**30, (before, after)


def test_peak_table_and_mfu():
    assert observe.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert observe.peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert observe.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert observe.peak_flops("NVIDIA A10", "bf16") == 125e12  # not the A100's
    assert observe.peak_flops("NVIDIA GH200 480GB", "bf16") == 989.4e12
    assert observe.peak_flops("cpu", "fp32") is None and observe.peak_flops("cpu", "fp32", 2.5) == 2.5e12
    assert observe.mfu(6e9, 1e4, 1e15) == pytest.approx(0.06)


def test_plot_run_draws_a_run_with_a_growth(tmp_path, capsys):
    """From metrics.jsonl alone: one PNG per run, and one comparing two runs."""
    runs = []
    for name, grow in (("a", 3), ("b", None)):
        d = tmp_path / name
        d.mkdir()
        lines = []
        for step in range(1, 7):
            row = {"step": step, "loss": 6 - step / 3, "train_tokens": step * 512, "train_flops": step * 1e9,
                   "tokens_per_sec": 1000.0, "step_ms": 10.0, "step_ms/data": 1.0, "step_ms/forward_backward": 7.0,
                   "step_ms/optimizer": 1.5, "step_ms/other": 0.5, "tokens/mean/ffn/effective": 50 + step}
            if grow and step >= grow:
                row |= {"tokens/mean/ffn/share_stage0": 0.9, "tokens/mean/ffn/share_stage1": 0.1}
            lines.append(row)
            if step == grow:
                lines.append({"step": step, "event": "growth", "ffn_tokens": 160, "params": 1})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(d)
    plot_run = _tool("plot_run")  # in this process: matplotlib is imported once
    assert plot_run.main([str(runs[0])]) == 0
    png = runs[0] / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in capsys.readouterr().out
    out = tmp_path / "compare.png"
    assert plot_run.main([*map(str, runs), "--out", str(out)]) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_run.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing' / 'metrics.jsonl'} does not exist" in err and "Traceback" not in err


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
