"""Validation is a property of the data, not of the layout; a finished run launched again says so."""
import dataclasses
import json

import pytest
import torch

from helpers import SMALL, launch, metrics
from megatron_tokenformer.config import load_config
from megatron_tokenformer.data import SampleSet, load_meta, valid_batches
from megatron_tokenformer.data.blend import BlendedSamples, BlendedValid
from megatron_tokenformer.monitor import report_finished

SEQ = 64
# DeepSpeed's lines that say nothing about the run (deepspeed_adapter.quiet_start)
NOISE = ("built successfully", "all_gather_into_tensor` is deprecated")


def _pass(samples, gbs: int, mbs: int, dp: int, steps: int) -> list[list[torch.Tensor]]:
    return [list(valid_batches(samples, mbs, r, dp, steps, global_batch_size=gbs)) for r in range(dp)]


def test_valid_batches_read_the_same_samples_at_every_layout(corpus):
    meta = load_meta(corpus)
    plain = SampleSet(meta, SEQ, "valid", valid_fraction=0.1)
    blend = BlendedValid(BlendedSamples([SampleSet(meta, SEQ, "valid", 0.1), SampleSet(meta, SEQ, "valid", 0.05)],
                                        ["a", "b"], [0.7, 0.3]))
    for samples in (plain, blend):
        gbs, steps = 12, 3
        expected = samples.batch(range(gbs * steps))  # the first eval.steps global batches, in order
        for dp, mbs in [(1, 12), (1, 4), (2, 6), (2, 2), (3, 4), (4, 3)]:
            ranks = _pass(samples, gbs, mbs, dp, steps)
            assert {len(r) for r in ranks} == {gbs // (mbs * dp) * steps}  # as many micro-batches on every rank
            assert all(m.shape == (mbs, SEQ + 1) for r in ranks for m in r)
            # global batch k as a training batch is split: rank r's micro-batch m is its (m*dp + r)-th
            accum = len(ranks[0]) // steps
            got = torch.cat([ranks[r][k * accum + m] for k in range(steps) for m in range(accum) for r in range(dp)])
            assert torch.equal(got, expected), (dp, mbs)
    # A set shorter than one global batch is read around to fill it, the same at every layout.
    short = SampleSet(meta, SEQ, "valid", valid_fraction=0.0)
    assert len(short) == 1
    for dp, mbs in [(1, 4), (2, 2), (4, 1)]:
        rows = torch.cat([m for r in _pass(short, 4, mbs, dp, 5) for m in r])
        assert rows.shape[0] == 4 and all(torch.equal(row, torch.from_numpy(short[0])) for row in rows)
    with pytest.raises(ValueError, match="global_batch_size=10"):  # not whole micro-batches per rank
        next(valid_batches(plain, 4, 0, 2, 1, global_batch_size=10))


def _run(corpus, run_dir, layout=(), nproc=1, steps=2, extra=()):
    args = SMALL + [f"data.path={corpus}", f"log.dir={run_dir}", f"train.steps={steps}", "eval.interval=1",
                    "eval.steps=2", *layout, *extra]
    return launch(args, nproc=nproc, launcher="python" if nproc == 1 else "torchrun")


@pytest.fixture(scope="module")
def one_rank(corpus, tmp_path_factory):
    """2 steps on one process (2 micro-batches per step), validation after each; finished."""
    run = tmp_path_factory.mktemp("one_rank")
    return run, _run(corpus, run)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor=1"], ["parallel.tensor=2"], ["parallel.pipeline=2"]],
                         ids=["dp2", "tp2", "pp2"])
def test_valid_loss_is_the_same_at_every_layout(corpus, tmp_path, one_rank, layout):
    """The first evaluation (after step 1) at DP=2, TP=2 and PP=2 equals one process's within 1e-5 (it read
    other samples at DP=2 before: 6.8518 vs 6.8596); and no rank prints DeepSpeed's noise."""
    base, base_proc = one_rank
    proc = _run(corpus, tmp_path / "run", layout, nproc=2, steps=1)
    want = {r["step"]: r for r in metrics(base) if "valid_loss" in r}[1]
    (got,) = [r for r in metrics(tmp_path / "run") if "valid_loss" in r]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert abs(got["valid_loss"] - want["valid_loss"]) < 1e-5, (got, want)
    for out in (proc.stdout + proc.stderr, base_proc.stdout + base_proc.stderr):
        assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out
    if layout == ["parallel.tensor=1"]:  # 8 samples per step over 2 ranks of 4
        assert "1 micro-batch/step" in proc.stdout
    else:
        assert "2 micro-batches/step" in proc.stdout


@pytest.mark.slow
def test_a_finished_run_says_what_it_ended_with_and_what_it_will_not_do(corpus, one_rank):
    """Launched again with new work (zero-shot tasks, a growth it did not do) and W&B offline: it prints
    its last logged losses and how to do that work, builds nothing, writes nothing, starts no W&B run."""
    run, _ = one_rank
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    last = metrics(run)[-1]
    proc = _run(corpus, run, extra=["eval.tasks=[piqa,hellaswag]", "eval.tasks_limit=200",
                                    "growth=[{at_step: 1, ffn_tokens: 256}]",
                                    "log.wandb_mode=offline", "log.wandb_project=tests"])
    out = proc.stdout
    ckpt = run / "checkpoints"
    assert (f"nothing to train: the checkpoint {ckpt / 'step_00000002'} is at step 2 and train.steps=2 "
            "(the run is finished)") in out
    assert (f"training loss {last['loss']:.4f}, validation loss {last['valid_loss']:.4f}, "
            f"perplexity {last['valid_ppl']:.2f}") in out
    assert (f"not done: eval.tasks=[piqa, hellaswag] (the tasks run during training, and this run has no steps "
            f"left); score the checkpoint with `python tools/evaluate.py --load {ckpt} --tasks piqa,hellaswag "
            "--limit 200`, or raise train.steps") in out
    assert "not done: growth[0] (at step 1): this run ended at step 2 without it" in out
    assert "to train on: raise train.steps above 2; for a new run: log.run_name=NAME log.dir=runs/NAME" in out
    assert "TokenFormer:" not in out  # nothing was built
    assert not (run / "wandb").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert (ckpt / "latest").read_text() == "step_00000002"


def test_a_finished_report_names_only_the_work_not_done(tmp_path, capsys):
    cfg = load_config("configs/tiny.yml", [f"log.dir={tmp_path}", "train.steps=4", "eval.tasks=[piqa,hellaswag]",
                                           "eval.tasks_limit=50"])
    meta = {"step": 4, "config": {"model": dataclasses.asdict(cfg.model)}}
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    assert report_finished(cfg, ckpt, meta) == {}
    assert "  no losses logged in this run directory" in capsys.readouterr().out
    rows = [{"step": 3, "loss": 5.0, "valid_loss": 5.5, "valid_ppl": 244.7},
            {"step": 4, "loss": 4.0, "eval/piqa/acc": 0.5}]  # piqa was scored at the end, hellaswag not
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report_finished(cfg, ckpt, meta) == rows[1]
    out = capsys.readouterr().out
    assert "  last logged: training loss 4.0000, validation loss 5.5000, perplexity 244.70" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("not done")]
    assert line.startswith("not done: eval.tasks=[hellaswag] ") and line.endswith(
        f"`python tools/evaluate.py --load {ckpt.parent} --tasks hellaswag --limit 50`, or raise train.steps")
