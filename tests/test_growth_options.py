"""Per-growth options of the `growth` list: the reference recipe in one launch (the function changes,
the moments are zeroed), the LR re-warmup length, and freezing the old tokens for K steps (bit for bit,
weights and Adam moments, then they train; a resume inside the window stays exact; the same from a
checkpoint grown by tools/expand_params.py --freeze-old-steps). Layouts: tensor 2 (the growth
run and its resume), data 2 under ZeRO-1 (the run from the grown checkpoint), one process (unit)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, env, launch, losses, metrics
from megatron_tokenformer import load_model
from megatron_tokenformer.checkpoint import global_state
from megatron_tokenformer.config import ConfigError, load_config, validate
from megatron_tokenformer.growth.freeze import old_rows

RUN = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.qkv_tokens=16",
       "model.proj_tokens=16", "model.ffn_tokens=32", "model.seq_length=32", "train.micro_batch_size=4",
       "train.global_batch_size=8", "train.warmup_steps=3", "log.interval=1", "log.progress=false",
       "eval.interval=0", "log.wandb_mode=disabled", "checkpoint.interval=1", "checkpoint.keep_last=0"]
# step 2: exact, old tokens frozen for steps 3-4, no re-warmup; step 5: the reference recipe
GROWTH = ("growth=[{at_step: 2, ffn_tokens: 64, freeze_old_steps: 2, warmup_steps: 0},"
          " {at_step: 5, qkv_tokens: 32, key_init: normal, tau: sqrt-n, reset_optimizer: true}]")
NAME = "blocks.1.ffn.key_tokens"  # 32 -> 64 at step 2 over 2 tensor shards: rows 0-15 and 32-47 old
OLD = old_rows(32, 64, 2, 0, 1)


def _ckpt(run, tag):
    return global_state(run / "checkpoints" / tag, moments=True)


def _old_equal(a, b, rows=OLD):
    """The old rows of every ffn key/value, weights and both moments, bit for bit."""
    (wa, ma, _), (wb, mb, _) = a, b
    names = [n for n in wa if ".ffn." in n and n.endswith("_tokens")]
    return all(torch.equal(x[n][rows], y[n][rows]) for n in names
               for x, y in ((wa, wb), *((ma[k], mb[k]) for k in ma)))


@pytest.fixture(scope="module")
def grown_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("opts") / "run"
    launch(RUN + [f"data.path={corpus}", f"log.dir={run}", "train.steps=7", "parallel.tensor=2", GROWTH], nproc=2)
    return run


@pytest.mark.slow
def test_options_reach_the_growth_and_the_freeze_is_exact(grown_run):
    run = grown_run
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))

    def rel(a, b):
        with torch.no_grad():
            x, y = load_model(run / "checkpoints" / a)[0](ids), load_model(run / "checkpoints" / b)[0](ids)
        return ((x - y).abs().max() / y.abs().max()).item()

    assert rel("step_00000002_grown", "step_00000002") < 1e-6  # exact keeps the function
    assert rel("step_00000005_grown", "step_00000005") > 1e-3  # the reference recipe changes it
    _, reset_m, reset_meta = _ckpt(run, "step_00000005_grown")
    assert reset_meta["optimizer_step"] == 0 and not any(t.any() for m in reset_m.values() for t in m.values())
    assert reset_meta["lineage"][-1]["options"]["key_init"] == "normal"

    grown = _ckpt(run, "step_00000002_grown")
    assert grown[2]["freeze_old"] == {"until_step": 4, "shards": 2,
                                      "tokens": {"qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32}}
    for step in (3, 4):  # frozen: the old rows as at the growth; the new ones train
        now = _ckpt(run, f"step_{step:08d}")
        assert _old_equal(now, grown), step
        assert now[0][NAME][~OLD].ne(grown[0][NAME][~OLD]).all(-1).all()  # every new token trains
        assert now[0]["embed.weight"].ne(grown[0]["embed.weight"]).any()  # the rest trains
    assert not _old_equal(_ckpt(run, "step_00000005"), grown)  # the window ended after step 4
    lrs = {m["step"]: m["lr"] for m in metrics(run) if "lr" in m}
    assert lrs[3] == pytest.approx(2e-3) and lrs[6] == pytest.approx(2e-3 / 3)  # warmup 0, then train.warmup_steps


@pytest.mark.slow
def test_resume_inside_the_freeze_window_is_exact(corpus, grown_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(grown_run, run, ignore=shutil.ignore_patterns("metrics.jsonl"))
    for d in (run / "checkpoints").iterdir():
        if d.is_dir() and d.name > "step_00000003" and d.name != "step_00000002_grown":
            shutil.rmtree(d)
    (run / "checkpoints" / "latest").write_text("step_00000003")
    launch(RUN + [f"data.path={corpus}", f"log.dir={run}", "train.steps=7", "parallel.tensor=2", GROWTH], nproc=2)
    assert losses(run) == {s: v for s, v in losses(grown_run).items() if s > 3}
    a, b = _ckpt(run, "step_00000007"), _ckpt(grown_run, "step_00000007")
    assert all(torch.equal(a[0][n], b[0][n]) for n in a[0] if isinstance(a[0][n], torch.Tensor))
    assert all(torch.equal(a[1][k][n], b[1][k][n]) for k in a[1] for n in a[1][k])


@pytest.mark.slow
def test_expand_tool_records_the_freeze_and_the_run_obeys(corpus, grown_run, tmp_path):
    dst = tmp_path / "grown"
    src = grown_run / "checkpoints" / "step_00000001"
    out = subprocess.run([sys.executable, "tools/expand_params.py", "--load", src, "--save", dst, "--ffn-tokens", "64",
                          "--freeze-old-steps", "1"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    meta = json.loads((dst / "step_00000001" / "meta.json").read_text())
    assert meta["freeze_old"]["until_step"] == 2
    run = tmp_path / "run"  # at data=2 (ZeRO-1 partitions) from a tensor=2 source
    launch(RUN + [f"data.path={corpus}", f"log.dir={run}", "train.steps=3", "model.ffn_tokens=64",
                  f"checkpoint.load={dst}"], nproc=2)
    start = global_state(dst, moments=True)
    assert _old_equal(_ckpt(run, "step_00000002"), start) and not _old_equal(_ckpt(run, "step_00000003"), start)


def test_old_rows_follow_the_shards():
    # 2 source shards of 4 old tokens grown to 12: [o o n n n n o o n n n n]... per shard 2 old of 6
    assert old_rows(4, 12, 2, 0, 1).tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert old_rows(4, 12, 2, 1, 2).tolist() == [1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("entry, key", [("key_init: ones", "growth[0].key_init"), ("tau: 3", "growth[0].tau"),
                                        ("warmup_steps: -1", "growth[0].warmup_steps"),
                                        ("freeze_old_steps: 9", "growth[0].freeze_old_steps"),
                                        ("freeze_old_steps: -1", "growth[0].freeze_old_steps")])
def test_bad_growth_options_are_named(entry, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(load_config(ROOT / "configs" / "tiny.yml",
                             ["train.steps=10", f"growth=[{{at_step: 5, ffn_tokens: 1024, {entry}}}]"]))


def test_freeze_is_refused_where_untested():
    piped = ["train.steps=10", "parallel.pipeline=2", "growth=[{at_step: 5, ffn_tokens: 1024, freeze_old_steps: 2}]"]
    with pytest.raises(ConfigError, match=r"growth\[0\].freeze_old_steps: not supported with parallel.pipeline"):
        validate(load_config(ROOT / "configs" / "tiny.yml", piped))
