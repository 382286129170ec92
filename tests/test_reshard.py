"""Layout-independent resume: a checkpoint saved at one (tensor, pipeline, data, ZeRO) layout resumes
at every other one with the weights, Adam moments, step, LR schedule and data position of the run
that wrote it (docs/DESIGN.md section 7)."""
import shutil

import pytest
import torch

from helpers import launch, losses
from megatron_tokenformer.checkpoint import global_state

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
         "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=2",
         "train.global_batch_size=8", "train.warmup_steps=1", "log.interval=1", "log.progress=false",
         "eval.interval=0", "log.wandb_mode=disabled", "train.steps=3", "checkpoint.interval=1",
         "checkpoint.keep_last=0", "model.dropout=0"]
# name: (overrides, processes); the three the issue names, each with another ZeRO stage, and one process
LAYOUTS = {
    "tp2": (["parallel.tensor=2", "parallel.zero_stage=0"], 2),
    "pp2dp2": (["parallel.pipeline=2", "parallel.zero_stage=1"], 4),
    "tp2pp2": (["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"], 4),
    "single": (["parallel.zero_stage=2"], 1),
}
SOURCES = ["tp2", "pp2dp2", "tp2pp2"]


@pytest.fixture(scope="module")
def sources(corpus, tmp_path_factory):
    """Each source layout trains 3 steps, saving after every step."""
    out = {}
    for name in SOURCES:
        over, nproc = LAYOUTS[name]
        run = tmp_path_factory.mktemp(f"src_{name}")
        launch(MODEL + [f"data.path={corpus}", f"log.dir={run}", *over], nproc=nproc)
        out[name] = run
    return out


def _assert_states_close(got_path, want_path):
    got, got_moments, got_meta = global_state(got_path, moments=True)
    want, want_moments, want_meta = global_state(want_path, moments=True)
    assert got_meta["optimizer_step"] == want_meta["optimizer_step"] == 3
    assert got_meta["scheduler"]["last_epoch"] == want_meta["scheduler"]["last_epoch"]
    assert got_meta["consumed_samples"] == want_meta["consumed_samples"] == 24
    for name, w in want.items():
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        else:
            assert got[name] == w, name  # tau
    for k in want_moments:  # one more Adam step on carried moments: still equal to the source's
        for name, m in want_moments[k].items():
            scale = m.abs().max().item()
            torch.testing.assert_close(got_moments[k][name], m, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda msg: f"{k} of {name}: {msg}")


@pytest.mark.parametrize("source", SOURCES)
def test_resume_at_every_other_layout(corpus, sources, source, tmp_path):
    src = sources[source]
    want = losses(src)
    for target in [t for t in LAYOUTS if t != source]:
        over, nproc = LAYOUTS[target]
        run = tmp_path / target
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
        out = launch(MODEL + [f"data.path={corpus}", f"log.dir={run}", *over], nproc=nproc)
        assert "resumed from" in out.stdout + out.stderr
        got = losses(run)
        assert list(got) == [3], (target, got)
        assert abs(got[3] - want[3]) < 1e-5, (source, target, got[3], want[3])
        _assert_states_close(run / "checkpoints" / "step_00000003", src / "checkpoints" / "step_00000003")


@pytest.mark.skipif(not __import__("deepspeed.accelerator").accelerator.get_accelerator().is_bf16_supported(),
                    reason="DeepSpeed's accelerator reports no bf16 on this machine")
def test_bf16_resumes_bit_exact_at_its_layout_and_at_another(corpus, tmp_path):
    """bf16 (DeepSpeed's fp32 master weights behind bf16 working copies): the checkpoint holds the
    fp32 masters, so the same layout continues bit-exactly and another layout within bf16 rounding."""
    bf16 = MODEL + [f"data.path={corpus}", "train.precision=bf16", "parallel.zero_stage=1"]
    src = tmp_path / "src"
    launch(bf16 + [f"log.dir={src}"], launcher="python")
    want = losses(src)
    for name, over, nproc in (("same", [], 1), ("tp2", ["parallel.tensor=2"], 2)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
        launch(bf16 + [f"log.dir={run}", *over], nproc=nproc)
        got = losses(run)[3]
        assert got == want[3] if name == "same" else abs(got - want[3]) < 2e-2, (name, got, want[3])
    _, moments, _ = global_state(src / "checkpoints" / "step_00000002", moments=True)
    assert all(t.any() for t in moments["exp_avg_sq"].values())  # the fp32 moments were saved
