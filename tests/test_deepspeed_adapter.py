"""The DeepSpeed internals this package relies on (megatron_tokenformer/deepspeed_adapter.py) are
there and behave as the adapter assumes, on real engines: a DeepSpeed upgrade that moves them
fails here, by name, before it corrupts a checkpoint. (The pipeline cut through
`PipelineModule._partition_layers` is checked in test_pipeline.py.)"""
import pytest
import torch

from dist_utils import run_on_ranks
from hooked_pretrain import fp16_on_cpu

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.qkv_tokens=16",
         "model.proj_tokens=16", "model.ffn_tokens=32", "model.seq_length=16", "train.micro_batch_size=2",
         "train.global_batch_size=4"]


def _engine(world, rank, overrides):
    import deepspeed

    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.distributed import Grid, ParallelState
    from megatron_tokenformer.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # adopts the test's process group
    cfg = load_config("configs/tiny.yml", SMALL + overrides)
    ps = ParallelState.build(Grid(rank, world, cfg.parallel.tensor, cfg.parallel.pipeline))
    return build_engine(cfg, 64, ps, (0, 10))[0], cfg


def _check_engine(rank, world, overrides):
    from megatron_tokenformer.deepspeed_adapter import OptimizerState, check_internals, engine_counters

    engine, _ = _engine(world, rank, overrides)
    check_internals(engine)
    assert set(engine_counters(engine)) == {"global_steps", "global_samples", "skipped_steps"}
    opt = OptimizerState(engine)
    opt.prepare(step=3)  # the Adam state torch would create at the first step, linked into ZeRO's partitions
    assert opt.step() == 3
    gen = torch.Generator().manual_seed(0)  # every rank passes the same full tensors, as a load does
    for p in engine.module.parameters():
        got = opt.get(p)
        assert torch.equal(got["exp_avg"], torch.zeros_like(got[""]))
        assert torch.allclose(got[""].to(p.dtype), p.detach().cpu())  # the master is the working copy's source
        new = {k: torch.randn(p.shape, generator=gen) for k in ("", "exp_avg", "exp_avg_sq")}
        new["exp_avg_sq"] = new["exp_avg_sq"].abs()
        opt.set(p, new)
        back = opt.get(p)
        for k in new:  # the fp32 master and both moments round-trip exactly, whatever the working dtype
            assert torch.equal(back[k], new[k]), k
        # this rank's part, read without communication, is its range of the full tensors, and the
        # ranks' ranges tile the parameter exactly (a checkpoint holds every value once)
        part = opt.local(p, rank, world)
        ranges = [None] * world
        torch.distributed.all_gather_object(ranges, None if part is None else (part[0], part[1][""].numel()))
        if part is not None:
            for k in new:
                assert torch.equal(part[1][k], new[k].reshape(-1)[part[0]:part[0] + part[1][k].numel()]), k
        ends = 0
        for start, n in sorted(r for r in ranges if r is not None):
            assert start == ends and n > 0
            ends = start + n
        assert ends == p.numel()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["parallel.zero_stage=0"], ["parallel.zero_stage=1"],
                                       ["parallel.zero_stage=2"], ["parallel.zero_stage=1", "train.precision=bf16"]])
def test_optimizer_state_round_trip(overrides):
    run_on_ranks(2, _check_engine, overrides)


def test_internals_are_present_without_an_engine():
    from megatron_tokenformer.deepspeed_adapter import check_internals

    check_internals()


def _check_skip(rank, world):
    """step_without_update leaves the working weights, fp32 masters, Adam moments and step count, and the
    LR schedule exactly as they were, and counts the step as skipped; the next ordinary step updates."""
    from megatron_tokenformer.deepspeed_adapter import OptimizerState, step_without_update

    fp16_on_cpu()  # this rank only: fp16 on any CPU (DeepSpeed's accelerator asks for avx512_fp16/AMX-FP16)
    layouts = [["parallel.zero_stage=0"], ["parallel.zero_stage=1"], ["parallel.zero_stage=2"],
               ["parallel.zero_stage=1", "train.precision=bf16"],
               ["parallel.zero_stage=1", "train.precision=fp16"]]  # the loss scaler's path too
    for overrides in layouts:
        engine, cfg = _engine(world, rank, overrides)
        gen = torch.Generator().manual_seed(rank)
        accum = cfg.grad_accum_steps(world)

        def batch(last_step):
            for i in range(accum):
                ids = torch.randint(0, 64, (cfg.train.micro_batch_size, cfg.model.seq_length + 1), generator=gen)
                engine.backward(engine(ids[:, :-1], ids[:, 1:]))
                (last_step if i == accum - 1 else engine.step)()

        def state():
            opt = OptimizerState(engine)
            out = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            for n, p in engine.module.named_parameters():
                out.update({f"{k}/{n}": v for k, v in opt.get(p).items()})  # collectives: every rank, same order
            return out, opt.step(), engine.lr_scheduler.state_dict()["last_epoch"], engine.get_lr()[0]

        batch(engine.step)  # the moments exist
        before, skipped = state(), engine.skipped_steps
        batch(lambda: step_without_update(engine))
        after = state()
        for k, v in before[0].items():
            assert torch.equal(v, after[0][k]), (overrides, k)
        assert before[1:] == after[1:], overrides  # Adam's step count, the LR schedule's position and the LR
        assert engine.skipped_steps == skipped + 1 and engine.global_steps == 2, overrides
        batch(engine.step)
        changed = state()
        assert changed[1] == before[1] + 1 and not torch.equal(changed[0]["embed.weight"], before[0]["embed.weight"])
        del engine


@pytest.mark.slow
def test_a_skipped_update_changes_nothing_at_every_zero_stage():
    run_on_ranks(2, _check_skip)
