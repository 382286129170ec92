"""End-to-end pretraining on real text with real DeepSpeed engines and gloo process groups."""
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, SMALL, env, launch, losses, metrics
from megatron_tokenformer.config import load_config, padded_vocab_size
from megatron_tokenformer.engine import lr_lambda
from megatron_tokenformer.model import TokenFormerModel, model_flops_per_token
from wandb_records import config as wandb_config
from wandb_records import history as wandb_history

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks


def test_loss_falls_on_real_text_and_is_logged_everywhere(corpus, tmp_path):
    run = tmp_path / "run"
    overrides = SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=60", "train.lr=3e-3",
                         "train.warmup_steps=5", "log.interval=5", "eval.interval=30", "checkpoint.interval=30",
                         "log.wandb_mode=offline", "log.wandb_project=tests"]
    started = time.perf_counter()
    proc = launch(overrides, launcher="python")
    wall = time.perf_counter() - started
    cfg = load_config("configs/tiny.yml", overrides)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    # The terminal shows each validation and ends with a summary of the run, in the logged numbers.
    for r in rows:
        if "valid_loss" in r:
            assert f"step {r['step']}: validation loss {r['valid_loss']:.4f}" in proc.stdout
    last = rows[-1]
    assert "done: step 60 (60 steps in" in proc.stdout
    assert (f"training loss {last['loss']:.4f}, validation loss {last['valid_loss']:.4f}, "
            f"perplexity {last['valid_ppl']:.2f}") in proc.stdout
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000060'}" in proc.stdout
    assert f"W&B run:    {run / 'wandb'}" in proc.stdout
    # ... and nothing else's chatter: DeepSpeed's accelerator probe, W&B's own lines
    assert "Setting accelerator" not in proc.stdout + proc.stderr and "wandb:" not in proc.stdout + proc.stderr
    # The mean over each logged window of 5 steps: one batch of 8 samples is too noisy (+-0.1) to compare.
    assert rows[-1]["loss_avg"] < rows[0]["loss_avg"] - 1.0, rows
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0] < math.log(512) - 0.5
    assert rows[-1]["valid_ppl"] == pytest.approx(math.exp(valid[1]))

    # Every logged value is what it must be.
    schedule = lr_lambda(cfg)  # multiplier of train.lr after k optimizer steps
    vocab = json.loads((run / "checkpoints" / "step_00000060" / "meta.json").read_text())["vocab_size"]
    flops_per_token = model_flops_per_token(cfg.model, vocab)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    for r in rows:
        assert r["samples"] == r["step"] * cfg.train.global_batch_size, r
        # the lr the step ran with: the schedule after step - 1 optimizer steps
        assert r["lr"] == pytest.approx(cfg.train.lr * schedule(r["step"] - 1), rel=1e-12), r
        # the gradient norm before clipping (train.grad_clip=1.0): finite and positive, not capped
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
        # throughput: model FLOPs are tokens times the model's training FLOPs per token
        assert r["tokens_per_sec"] > 0 and math.isfinite(r["tokens_per_sec"]), r
        assert r["tflops"] == pytest.approx(r["tokens_per_sec"] * flops_per_token / 1e12, rel=1e-9), r
        assert r["skipped_steps"] == 0 and r["loss_avg"] > 0, r
    assert rows[0]["lr"] == pytest.approx(cfg.train.lr)  # step 5 ran at the end of the 5-step warmup
    assert rows[-1]["lr"] < rows[1]["lr"]  # then the cosine decay
    # The training time the rates imply (tokens of each 5-step window / its rate) fits in the run's
    # wall time (true at any speed: the windows are timed inside the process).
    implied = sum(tokens_per_step * cfg.log.interval / r["tokens_per_sec"] for r in rows)
    assert implied < wall, (implied, wall)
    assert rows[-1]["samples"] == 60 * 8

    # W&B (offline) holds the same history and the resolved config with the git revision.
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    hist = [h for h in wandb_history(wandb_file) if "loss" in h]
    assert [(h["_step"], h["loss"]) for h in hist] == [(r["step"], r["loss"]) for r in rows]
    wcfg = wandb_config(wandb_file)
    assert wcfg["model"]["hidden_size"] == 64 and "git" in wcfg["run_info"]

    # The run directory and every checkpoint carry the resolved config and the git revision.
    assert (run / "config.yml").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert "git" in info
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000030", "step_00000060"]
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["step"] == 60 and meta["consumed_samples"] == 480 and meta["config"]["model"]["hidden_size"] == 64
    assert meta["run_info"]["git"] == info["git"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000060"


@pytest.fixture(scope="module")
def dp1_run(corpus, tmp_path_factory):
    """5 steps of SMALL on one rank, fp32 (every step logged)."""
    run = tmp_path_factory.mktemp("dp1")
    launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=5"], nproc=1)
    return run


@pytest.fixture(scope="module")
def dp1_losses(dp1_run):
    return losses(dp1_run)


def test_first_step_logs_the_loss_and_unclipped_grad_norm_of_its_batch(corpus, dp1_run):
    """Step 1 recomputed in this process (same seed, same first global batch, 2 micro-batches
    averaged): the run logged its loss and its global gradient norm before clipping."""
    from megatron_tokenformer.data import SampleSet, TrainBatches, load_meta

    cfg = load_config("configs/tiny.yml", SMALL + [f"data.path={corpus}", "train.steps=5"])
    t = cfg.train
    meta = load_meta(corpus)
    model = TokenFormerModel(cfg.model, padded_vocab_size(cfg, meta.vocab_size), seed=t.seed)
    samples = SampleSet(meta, cfg.model.seq_length, "train", cfg.data.valid_fraction)
    micros = TrainBatches(samples, t.seed, t.global_batch_size, t.micro_batch_size, 0, 1).next_step()
    loss = sum(model(m[:, :-1], m[:, 1:]) for m in micros) / len(micros)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    first = metrics(dp1_run)[0]
    assert first["step"] == 1 and first["samples"] == t.global_batch_size
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-5)
    # (the norm here is about 1.5, above train.grad_clip=1.0: a clipped norm would read 1.0)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-4), (first, norm, t.grad_clip)
    assert first["lr"] == pytest.approx(t.lr * lr_lambda(cfg)(0), rel=1e-12)


@pytest.mark.parametrize("zero_stage, launcher", [(1, "torchrun"), (2, "deepspeed")])
def test_dp2_matches_dp1(corpus, tmp_path, dp1_losses, zero_stage, launcher):
    """Same global batch of 8: one rank accumulating 2 micro-batches == two ranks with one each."""
    launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=5",
                    f"parallel.zero_stage={zero_stage}"], nproc=2, launcher=launcher)
    dp2 = losses(tmp_path)
    assert dp2.keys() == dp1_losses.keys() == {1, 2, 3, 4, 5}
    for step in dp2:
        assert dp2[step] == pytest.approx(dp1_losses[step], rel=1e-5, abs=1e-5), (step, dp2, dp1_losses)
    assert dp2[5] < dp2[1]


@pytest.mark.parametrize("tensor, nproc", [(2, 2), (2, 4), (4, 4), (4, 8)])
def test_tensor_parallel_training_matches_single_rank(corpus, tmp_path, dp1_losses, tensor, nproc):
    """TP=2, TP=2 x DP=2, TP=4 (one head per rank) and TP=4 x DP=2 log the losses of TP=1 x DP=1 over
    5 steps (fp32, within 1e-5)."""
    out = launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=5",
                          f"parallel.tensor={tensor}"], nproc=nproc)
    assert f"tensor {tensor} x pipeline 1 x data {nproc // tensor}" in out.stdout
    tp = losses(tmp_path)
    assert tp.keys() == dp1_losses.keys() == {1, 2, 3, 4, 5}
    for step in dp1_losses:
        assert tp[step] == pytest.approx(dp1_losses[step], rel=1e-5, abs=1e-5), (step, tp, dp1_losses)


def test_exact_resume(corpus, tmp_path):
    """4 steps, then resumed to 8 (same decay_steps) == 8 steps straight, bit for bit, on 2 ranks.

    Dropout is on, so the resumed run must also restore the RNG streams."""
    common = SMALL + [f"data.path={corpus}", "train.decay_steps=8", "train.warmup_steps=2", "model.dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(common + [f"log.dir={straight}", "train.steps=8"], nproc=2)
    launch(common + [f"log.dir={resumed}", "train.steps=4"], nproc=2)
    out = launch(common + [f"log.dir={resumed}", "train.steps=8"], nproc=2)
    assert "resumed from" in out.stdout + out.stderr
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))  # no step logged twice
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["lr"], ra["grad_norm"], ra["samples"]) == (rb["loss"], rb["lr"], rb["grad_norm"], rb["samples"])


def test_no_config_is_refused(tmp_path):
    """Without --config a run would silently train the code's defaults: it stops and says so."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), f"log.dir={tmp_path}"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no --config given" in proc.stderr and "configs/tiny.yml" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, words", [
    (["data.path=/nonexistent/corpus"], ["data.path", "prepare_data.py"]),
    (["model.vocab_size=256"], ["model.vocab_size=256", "512"]),
    (["train.stepz=4"], ["train.stepz"]),
    (["train.global_batch_size=10"], ["train.global_batch_size=10", "train.micro_batch_size=4"]),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, overrides, words):
    proc = launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", *overrides], launcher="python",
                  check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_compiled_training_matches_eager(corpus, tmp_path, dp1_losses):
    """train.compile (blocks compiled) with the compiled Pattention kernels trains the same model."""
    launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=5", "train.compile=true",
                    "model.pattention_impl=compiled"], nproc=1)
    got = losses(tmp_path)
    for step in dp1_losses:
        assert got[step] == pytest.approx(dp1_losses[step], rel=1e-5, abs=1e-5), (step, got, dp1_losses)


def _accelerator_support(precision: str) -> tuple[bool, str]:
    """Whether DeepSpeed's accelerator supports `precision` (the check training makes before it
    builds anything), and what decides it, in words for skip reasons."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = bool(acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported())
    return supported, f"DeepSpeed's {acc.device_name()} accelerator reports {precision} supported={supported}"


FP16, FP16_WHY = _accelerator_support("fp16")  # the hardware's answer (fp16 training runs anyway: below)
BF16, BF16_WHY = _accelerator_support("bf16")


@pytest.mark.skipif(not BF16, reason=BF16_WHY)
def test_bf16_trains_close_to_fp32(corpus, tmp_path, dp1_losses):
    launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=5", "train.precision=bf16"], nproc=1)
    bf16 = losses(tmp_path)
    assert bf16.keys() == dp1_losses.keys()
    for step, loss in bf16.items():
        # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 2e-3 per value); the losses of these
        # 5 steps differ from fp32 by at most 9e-4 here (2-core x86 CPU): 5e-3 leaves room for other
        # CPUs' bf16 kernels (AMX, emulated) rounding differently.
        assert loss == pytest.approx(dp1_losses[step], abs=5e-3), (step, bf16, dp1_losses)


def test_fp16_unsupported_is_a_clear_error(corpus, tmp_path):
    """Where the accelerator has no fp16 (a CPU without avx512_fp16/AMX-FP16), the run refuses
    train.precision=fp16 in one line before building anything. (Where it has fp16, the test tells it
    otherwise, in the launched process only: tests/hooked_pretrain.py.)"""
    proc = launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.precision=fp16"], launcher="python",
                  check=False, hooks={"fp16": False} if FP16 else None)
    assert proc.returncode == 2 and "train.precision=fp16 is not supported" in proc.stderr, proc.stderr[-3000:]
    assert "use train.precision=bf16 or fp32" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_fp16_trains_close_to_fp32_and_resumes(corpus, tmp_path, dp1_losses):
    """fp16 with dynamic loss scaling trains like fp32 (5 steps, 3 then resumed to 5), and the loss
    scaler's state is carried across the resume. Runs on every CPU: DeepSpeed's CPU accelerator
    refuses fp16 without avx512_fp16/AMX-FP16, but torch computes it anyway (slowly), so the launched
    process is told fp16 is supported (tests/hooked_pretrain.py; the user-facing refusal is tested above)."""
    common = SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.precision=fp16", "parallel.zero_stage=1",
                      "train.decay_steps=5"]  # the 5-step schedule of dp1_losses, in both launches
    launch(common + ["train.steps=3"], launcher="python", hooks={"fp16": True})
    out = launch(common + ["train.steps=5"], launcher="python", hooks={"fp16": True})
    assert "resumed from" in out.stdout + out.stderr
    fp16 = losses(tmp_path)
    assert fp16.keys() == dp1_losses.keys() == {1, 2, 3, 4, 5}
    for step, loss in fp16.items():
        # fp16 keeps 11 bits of mantissa (relative rounding 2**-12 = 2.4e-4 per value), with fp32 master
        # weights: these losses differ from fp32 by at most 1.1e-4 here (2-core x86 CPU); 1e-3 leaves
        # room for other CPUs' fp16 kernels.
        assert loss == pytest.approx(dp1_losses[step], abs=1e-3), (step, fp16, dp1_losses)
    assert all(r["skipped_steps"] == 0 for r in metrics(tmp_path))
    # fp16's dynamic loss scaler ran (an fp32 run saves none) and counted on from the checkpoint.
    scaler = {s: json.loads((tmp_path / "checkpoints" / f"step_0000000{s}" / "meta.json").read_text())["loss_scaler"]
              for s in (3, 5)}
    assert scaler[3]["cur_iter"] == 3 and scaler[5]["cur_iter"] == 5, scaler
    assert scaler[5]["cur_scale"] > 0
