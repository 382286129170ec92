"""Sequence parallelism against plain tensor parallelism on real gloo groups: a Pattention of each
kind and the whole model give the same outputs and gradients (dropout and activation checkpointing
included), while the input each Pattention keeps for backward is this rank's shard only."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_on_ranks
from megatron_tokenformer import Pattention, TokenFormerModel
from megatron_tokenformer import mappings as M
from megatron_tokenformer.config import ModelConfig
from test_tensor_parallel import close


def _saved_bytes(module, fn) -> int:
    """Bytes of the distinct tensors, other than module's parameters (or views of them), that autograd
    keeps for backward while fn runs."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _layers(rank, world, group):
    x_full = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(7))
    feat = slice(rank * 16 // world, (rank + 1) * 16 // world)
    seq = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for impl in ("fused", "compiled", "reference"):
        for kw in (dict(groups=3, output="scatter"), dict(input="sharded"), dict()):
            torch.manual_seed(0)
            tp = Pattention(16, 16, 8, tp_group=group, impl=impl, **kw)
            torch.manual_seed(0)
            sp = Pattention(16, 16, 8, tp_group=group, impl=impl, sequence_parallel=True, **kw)
            sharded_in = kw.get("input") == "sharded"
            x_tp = (x_full[..., feat] if sharded_in else x_full).clone().requires_grad_()
            x_sp = (x_full[..., feat] if sharded_in else x_full[:, seq]).clone().requires_grad_()
            y_tp = tp(x_tp)
            y_sp, kept = _saved_bytes(sp, lambda: sp(x_sp))
            w = torch.randn(y_tp.shape, generator=torch.Generator().manual_seed(3))  # arbitrary upstream grad
            (y_tp * w).sum().backward()
            if kw.get("output") == "scatter":  # heads: the whole sequence, as without sequence parallelism
                close(y_sp, y_tp, f"{impl} {kw} output")
                (y_sp * w).sum().backward()
            else:
                close(y_sp, y_tp[:, seq], f"{impl} {kw} output")
                (y_sp * w[:, seq]).sum().backward()
            close(x_sp.grad, x_tp.grad if sharded_in else x_tp.grad[:, seq], f"{impl} {kw} input grad")
            for name, p in sp.named_parameters():
                close(p.grad, dict(tp.named_parameters())[name].grad, f"{impl} {kw} grad {name}")
            if impl != "reference":  # the input kept for backward is the shard, never the gathered whole
                scores = 2 * 8 * kw.get("groups", 1) * 8 // world * 4
                stats = 2 * 8 * kw.get("groups", 1) * 4
                assert kept == x_sp.numel() * 4 + scores + stats, (kw, kept)


def _model(rank, world, group, norm, checkpointing):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, qkv_tokens=16, proj_tokens=16, ffn_tokens=32,
                      seq_length=8, norm=norm, dropout=0.1)
    torch.manual_seed(0)
    tp = TokenFormerModel(cfg, 64, tp_group=group, seed=5)
    sp = TokenFormerModel(dataclasses.replace(cfg, activation_checkpointing=checkpointing), 64, tp_group=group,
                          seed=5, sequence_parallel=True)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (tp, sp):
        torch.manual_seed(11)  # the same dropout stream on both (and on every tensor rank)
        with M.count_comm() as comm:
            loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
        losses.append(loss)
    close(losses[1], losses[0], "loss")
    if not checkpointing:  # (its recompute repeats the forward collectives) the planner's formula is the count
        from megatron_tokenformer.planner import norm_grad_bytes, tp_bytes_per_token

        want = tp_bytes_per_token(cfg, world, 4, sequence_parallel=True) * ids[:, :-1].numel()
        assert sum(comm.values()) == pytest.approx(want + norm_grad_bytes(cfg, world, 4), rel=1e-9), dict(comm)
    assert losses[0].item() != pytest.approx(tp.eval()(ids[:, :-1], ids[:, 1:]).item(), abs=1e-6)  # dropout acted
    for (name, p), q in zip(sp.named_parameters(), tp.parameters()):
        close(p.grad, q.grad, f"grad {name}")
    with torch.no_grad():  # evaluation: the logits of the whole sequence
        close(sp.eval()(ids[:, 1:]), tp.eval()(ids[:, 1:]), "logits")


def _all(rank, world):
    group = dist.new_group(list(range(world)))
    _layers(rank, world, group)
    _model(rank, world, group, "l2_norm_gelu", checkpointing=True)
    _model(rank, world, group, "softmax", checkpointing=False)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_tensor_parallel(world):
    run_on_ranks(world, _all)


@pytest.mark.parametrize("override, words, fix", [
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=true", "parallel.tensor=1"],
     ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (["parallel.tensor=4", "parallel.sequence_parallel=true", "model.seq_length=66"],
     ["model.seq_length=66", "parallel.tensor=4", "multiple of 4"],
     ["parallel.tensor=4", "parallel.sequence_parallel=true", "model.seq_length=64"]),
])
def test_config_errors(override, words, fix):
    """Sequence parallelism needs tensor ranks and a sequence they divide: one error naming both values,
    and the fix it suggests loads."""
    from megatron_tokenformer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert load_config("configs/tiny.yml", fix).parallel.sequence_parallel


# ---- training through the launcher -----------------------------------------------------------
GROWTH = "growth=[{at_step: 5, qkv_tokens: 128, proj_tokens: 96, ffn_tokens: 256}]"


def _train(corpus, run, over, nproc=2):
    """The losses of 10 steps, with the validation loss of step 10 as step 0."""
    from helpers import SMALL, launch, losses, metrics

    launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=10", "parallel.tensor=2", *over],
           nproc=nproc)
    valid = [m["valid_loss"] for m in metrics(run) if "valid_loss" in m]
    return {**losses(run), **({0: valid[-1]} if valid else {})}


def _same(got, want, what, steps=range(1, 11)):
    assert sorted(got) == list(steps), (what, sorted(got))
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5, (what, s, got[s], want[s])


@pytest.mark.slow
def test_training_equals_tensor_parallel(corpus, tmp_path):
    """10 steps with sequence parallelism log the losses of plain tensor parallelism (within 1e-5): at
    TP=2 with dropout, activation checkpointing and growth in the launch; at TP=4 with dropout; at
    TP=2 x PP=2 and TP=2 x DP=2 (ZeRO-2) without dropout, and the validation loss of an evaluation
    during training at TP=2 x PP=2. Resumed with it from a checkpoint written without it, and without
    it from one written with it, the first step is bit-exact (a forward from the same weights: at TP=2
    each sum over the tensor ranks is a + b, whichever collective takes it) and the rest within 1e-5
    (the final norm's gradient is summed per shard first: the same bits on the machine where this was
    written, but not by construction)."""
    SP = "parallel.sequence_parallel=true"
    drop = ["model.dropout=0.1", GROWTH]
    _same(_train(corpus, tmp_path / "sp_drop", [*drop, SP, "model.activation_checkpointing=true"]),
          _train(corpus, tmp_path / "tp_drop", drop), "TP=2, dropout, growth")
    tp4 = ["parallel.tensor=4", "model.dropout=0.1"]  # each rank a quarter of the sequence, dropout on
    _same(_train(corpus, tmp_path / "sp4", [*tp4, SP], nproc=4), _train(corpus, tmp_path / "tp4", tp4, nproc=4),
          "TP=4, dropout")
    evals = ["eval.interval=10", "eval.steps=2"]  # evaluation during training: the same validation loss
    plain = _train(corpus, tmp_path / "tp", ["checkpoint.interval=5", *evals])
    at_5 = tmp_path / "tp" / "checkpoints" / "step_00000005"
    resumed = _train(corpus, tmp_path / "resumed", [SP, f"checkpoint.load={at_5}", "checkpoint.interval=8"])
    _same(resumed, plain, "resumed with it", range(6, 11))
    assert resumed[6] == plain[6], (resumed[6], plain[6])
    # and the other way: its checkpoint of step 8, written with it, resumed without it
    at_8 = tmp_path / "resumed" / "checkpoints" / "step_00000008"
    off = _train(corpus, tmp_path / "off", [f"checkpoint.load={at_8}"])
    _same(off, resumed, "resumed without it", range(9, 11))
    assert off[9] == resumed[9], (off[9], resumed[9])
    _same(_train(corpus, tmp_path / "pp", [SP, "parallel.pipeline=2", *evals], nproc=4), plain, "TP=2 x PP=2",
          range(0, 11))
    _same(_train(corpus, tmp_path / "dp", [SP, "parallel.zero_stage=2"], nproc=4), plain, "TP=2 x DP=2")


def test_planner_counts_the_sharded_activations():
    """The planner offers sequence parallelism at every tensor size > 1, with everything a block keeps
    split by the tensor size (without it, only the Pattention scores are), at the cost of time."""
    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.planner import block_activation_bytes, estimate, plans

    cfg = load_config("configs/450M.yml")
    act = block_activation_bytes(cfg.model, torch.bfloat16, seq=64)
    s, r = act["scores"], act["rest"]
    args = (cfg, 50304, 4, 1, 2, 1, False, act, 4e14, 8, 300, 25)
    plain, sp = estimate(*args), estimate(*args, sequence_parallel=True)
    logits = cfg.train.micro_batch_size * cfg.model.seq_length * 50304 / 4 * 6 / 2**30  # the same either way
    assert (sp.activations_gb - logits) / (plain.activations_gb - logits) == pytest.approx((s + r) / 4 / (s / 4 + r))
    assert sp.weights_gb == plain.weights_gb and sp.step_s > plain.step_s  # the backward re-gathers
    _, every = plans(cfg, 50304, 8, 80, 4e14)
    twins = {(p.tensor, p.pipeline, p.zero_stage, p.activation_checkpointing): p for p in every if p.sequence_parallel}
    assert {t[0] for t in twins} == {2, 4, 8}
    for p in every:
        if p.tensor > 1 and not p.sequence_parallel:
            twin = twins[(p.tensor, p.pipeline, p.zero_stage, p.activation_checkpointing)]
            assert twin.activations_gb < p.activations_gb
