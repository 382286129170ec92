"""Pipeline parallelism: the compute-balanced partitioner and training parity on gloo."""
import itertools
import os

import pytest
import torch

from dist_utils import run_on_ranks
from helpers import launch, losses, metrics
from megatron_tokenformer.config import ConfigError, load_config, padded_vocab_size
from megatron_tokenformer.data import load_meta
from megatron_tokenformer.pipeline import describe_partition, layer_costs, partition

CONFIGS = ["150M", "450M", "900M", "1.5B", "354M", "757M"]


def _feasible(costs, stages, limit):
    """Independent check: can `costs` be cut into <= stages contiguous parts each <= limit? (greedy)"""
    parts, load = 1, 0
    for c in costs:
        if c > limit:
            return False
        if load + c > limit:
            parts, load = parts + 1, c
        else:
            load += c
    return parts <= stages


@pytest.mark.parametrize("name, stages", list(itertools.product(CONFIGS, [2, 4, 8])))
def test_partition_balanced_by_compute(name, stages):
    cfg = load_config(f"configs/{name}.yml")
    costs = layer_costs(cfg.model, cfg.model.vocab_size)
    parts = partition(costs, stages)
    assert parts[0] == 0 and parts[-1] == len(costs) and all(a < b for a, b in zip(parts, parts[1:]))
    loads = [sum(costs[a:b]) for a, b in zip(parts, parts[1:])]
    mean = sum(costs) / stages
    # Within 15% of the mean, or no split at layer granularity has a smaller bottleneck.
    assert max(loads) <= 1.15 * mean or not _feasible(costs, stages, max(loads) - 1), loads


def test_partition_follows_growth():
    """Growing the tokens (354M -> 757M shapes) changes block costs against the head: the cut moves."""
    small, big = load_config("configs/354M.yml"), load_config("configs/757M.yml")
    c_small, c_big = layer_costs(small.model, 50304), layer_costs(big.model, 50304)
    assert c_big[1] > 2 * c_small[1] and c_big[-1] == c_small[-1]
    p_small, p_big = partition(c_small, 4), partition(c_big, 4)
    assert p_small != p_big  # the head weighs less against grown blocks: the last stage takes more blocks
    assert p_big[-2] < p_small[-2]


def test_head_is_weighed_not_counted():
    """A stage holding the vocab head gets fewer blocks than a uniform split by layer count."""
    cfg = load_config("configs/150M.yml")
    parts = partition(layer_costs(cfg.model, 50304), 4)
    blocks_last = parts[4] - parts[3] - 2  # minus final norm and head
    assert blocks_last < 12 / 4


def test_zero2_with_pipeline_is_refused():
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 with parallel.pipeline=2.*set parallel.zero_stage=1"):
        load_config("configs/tiny.yml", ["parallel.pipeline=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.precision=bf16 needs parallel.zero_stage>=1"):
        load_config("configs/tiny.yml", ["parallel.pipeline=2", "parallel.zero_stage=0", "train.precision=bf16"])


DEEP = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
        "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "log.interval=1", "log.progress=false", "eval.interval=0",
        "log.wandb_mode=disabled", "checkpoint.interval=0", "train.steps=5"]


@pytest.fixture(scope="module")
def pp1_losses(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp1")
    launch(DEEP + [f"data.path={corpus}", f"log.dir={run}"], nproc=1)
    return losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("tensor, pipeline, nproc, extra", [
    (1, 2, 2, []), (1, 4, 4, []), (2, 2, 8, []), (1, 2, 2, ["model.activation_checkpointing=true"])])
def test_pipeline_matches_single_rank(corpus, tmp_path, pp1_losses, tensor, pipeline, nproc, extra):
    out = launch(DEEP + [f"data.path={corpus}", f"log.dir={tmp_path}", f"parallel.tensor={tensor}",
                         f"parallel.pipeline={pipeline}", *extra], nproc=nproc)
    text = out.stdout + out.stderr
    # The run reports the compute-balanced cut (test_stage_modules_hold_the_compute_balanced_partition
    # checks that the stage modules are built that way).
    cfg = load_config("configs/tiny.yml", DEEP + [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}"])
    costs = layer_costs(cfg.model, padded_vocab_size(cfg, load_meta(corpus).vocab_size))
    assert describe_partition(partition(costs, pipeline), costs, cfg.model.num_layers) in text, text[-3000:]
    got = losses(tmp_path)
    for step in pp1_losses:
        assert got[step] == pytest.approx(pp1_losses[step], rel=1e-5, abs=1e-5), (step, got, pp1_losses)


def _bf16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_bf16_supported())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not _bf16_supported(), reason="DeepSpeed's accelerator reports no bf16 (training would refuse it)"))])
def test_pipeline_exact_resume(corpus, tmp_path, precision):
    common = DEEP + [f"data.path={corpus}", "parallel.pipeline=2", "train.decay_steps=6",
                     f"train.precision={precision}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(common + [f"log.dir={straight}", "train.steps=6"], nproc=2)
    launch(common + [f"log.dir={resumed}", "train.steps=3"], nproc=2)
    launch(common + [f"log.dir={resumed}", "train.steps=6"], nproc=2)
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]


def _stage_layers(module, num_layers: int) -> dict[int, torch.nn.Module]:
    """The layers a DeepSpeed PipelineModule built on this rank, by index in
    [embedding, block x L, final norm, tied head] (the tied embedding and head share one module)."""
    held = {int(name): m for name, m in module.named_children() if name.isdigit()}
    for i in (0, num_layers + 2):
        if module._local_start <= i < module._local_stop:
            held[i] = module.tied_modules["embed"]
    return held


def _stages_hold_their_partition(rank, world, cases):
    import deepspeed

    from megatron_tokenformer.distributed import Grid, ParallelState
    from megatron_tokenformer.model import TokenFormerModel
    from megatron_tokenformer.pipeline import build_pipeline

    os.environ["LOCAL_RANK"] = "0"  # PipelineModule reads it (CPU: one device for all)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # joins the gloo group run_on_ranks made
    ps = ParallelState.build(Grid(rank, world, tensor=1, pipeline=world))
    for name, overrides, vocab in cases:
        cfg = load_config("configs/tiny.yml", overrides + [f"parallel.pipeline={world}"])
        m, L = cfg.model, cfg.model.num_layers
        parts = partition(layer_costs(m, vocab), world)
        module, _ = build_pipeline(cfg, vocab, ps)
        held = _stage_layers(module, L)
        assert sorted(held) == list(range(parts[rank], parts[rank + 1])), (name, rank, sorted(held), parts)
        # ... and they are the single-process model's layers, initialised alike.
        ref = TokenFormerModel(m, vocab, seed=cfg.train.seed)
        ref_layers = [ref.embed, *ref.blocks, ref.final_norm, ref.embed]
        for i, layer in held.items():
            got, want = layer.state_dict(), ref_layers[i].state_dict()
            assert got.keys() == want.keys(), (name, i, got.keys(), want.keys())
            for k, v in want.items():  # tensors, and Pattention's extra state (its tau)
                same = torch.equal(got[k].cpu(), v) if isinstance(v, torch.Tensor) else got[k] == v
                assert same, (name, rank, i, k)


@pytest.mark.slow
def test_stage_modules_hold_the_compute_balanced_partition():
    """Two gloo ranks build the real pipeline module: each stage holds exactly the layers that
    partition(layer_costs(...)) gives it, with the single-process model's initial values. Shapes:
    the DEEP model of the parity runs, and one whose vocab head outweighs several blocks (where a
    split by layer count, DeepSpeed's default, would cut elsewhere)."""
    from deepspeed.runtime.utils import partition_uniform

    heavy_head = ("heavy head", DEEP + ["model.vocab_size=8192"], 8192)
    cases = [("DEEP", DEEP, 512), heavy_head]
    cfg = load_config("configs/tiny.yml", heavy_head[1])
    costs = layer_costs(cfg.model, heavy_head[2])
    assert partition(costs, 2) != partition_uniform(len(costs), 2), "the heavy-head case would not tell the splits apart"
    run_on_ranks(2, _stages_hold_their_partition, cases)
