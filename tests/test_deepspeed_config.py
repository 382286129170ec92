"""The `deepspeed:` section: DeepSpeed settings our config does not model reach the engine; keys
our sections own, and combinations that break our checkpoints, are refused by name."""
import json

import pytest

from dist_utils import run_on_ranks
from helpers import SMALL, launch, losses
from megatron_tokenformer.config import ConfigError, config_from_dict, describe, load_config
from megatron_tokenformer.config.validation import DEEPSPEED_DEFAULTS, DEEPSPEED_OWNED, _leaves

OVERLAP = ["deepspeed.zero_optimization.overlap_comm=true", "deepspeed.zero_optimization.contiguous_gradients=true",
           "deepspeed.zero_optimization.reduce_bucket_size=5e3", "deepspeed.zero_optimization.allgather_bucket_size=5e3"]


def test_nested_overrides_merge_and_round_trip(tmp_path):
    (tmp_path / "c.yml").write_text("deepspeed:\n  zero_optimization:\n    reduce_bucket_size: 5e8\n"
                                    "  comms_logger: {enabled: false}\n")
    cfg = load_config(tmp_path / "c.yml", ["deepspeed.zero_optimization.overlap_comm=true",
                                           "deepspeed.comms_logger={enabled: true, verbose: false}"])
    # the command line adds to the file's section key by key; YAML's 5e8 string becomes DeepSpeed's number
    assert cfg.deepspeed == {"zero_optimization": {"reduce_bucket_size": 500000000, "overlap_comm": True},
                             "comms_logger": {"enabled": True, "verbose": False}}
    assert config_from_dict(cfg.to_dict()) == cfg  # checkpoints store the config and read it back
    assert "deepspeed.<key>" in describe()
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_optimization\.overlap_comm is a value, not a section"):
        load_config(None, ["deepspeed.zero_optimization.overlap_comm=true",
                           "deepspeed.zero_optimization.overlap_comm.x=1"])


def test_every_key_the_engine_config_sets_is_owned_and_refused():
    from megatron_tokenformer.engine import deepspeed_config

    for prec in ("fp32", "bf16", "fp16"):
        cfg = load_config(None, [f"train.precision={prec}"])
        for path in _leaves(deepspeed_config(cfg, 1)):
            assert path in DEEPSPEED_OWNED or path in DEEPSPEED_DEFAULTS, path
    for path, owner in DEEPSPEED_OWNED.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"deepspeed.{path}=1"])
        assert f"deepspeed.{path} is set by {owner}" in str(e.value)
    # a default that only prints may be changed
    assert deepspeed_config(load_config(None, ["deepspeed.steps_per_print=5"]), 1)["steps_per_print"] == 5


@pytest.mark.parametrize("override, reason", [
    ("deepspeed.zero_optimization.offload_param.device=cpu", "only under ZeRO-3"),
    ("deepspeed.zero_optimization.offload_optimizer.device=nvme", "CPU memory only"),
    ("deepspeed.bf16.bf16_master_weights_and_grads=true", "checkpoints store and reshard them in fp32"),
])
def test_combinations_that_break_checkpoints_are_refused(override, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="parallel.zero_stage=1 or 2"):
        load_config(None, ["parallel.zero_stage=0", "deepspeed.zero_optimization.offload_optimizer.device=cpu"])


def test_unknown_top_level_keys_are_found_from_deepspeeds_own_reader():
    from megatron_tokenformer.deepspeed_adapter import known_config_keys
    from megatron_tokenformer.engine import unknown_deepspeed_keys

    assert {"zero_optimization", "flops_profiler", "comms_logger", "activation_checkpointing"} <= known_config_keys()
    cfg = load_config(None, ["deepspeed.zero_optimisation.overlap_comm=true", "deepspeed.flops_profiler.enabled=true"])
    assert unknown_deepspeed_keys(cfg) == ["zero_optimisation"]


def _engine_reads_passthrough(rank, world):
    from test_deepspeed_adapter import _check_engine, _engine

    engine, _ = _engine(world, rank, ["parallel.zero_stage=2", *OVERLAP])
    assert engine.zero_overlap_comm() and engine.zero_contiguous_gradients()
    assert engine.zero_reduce_bucket_size() == 5000 and engine.zero_allgather_bucket_size() == 5000
    assert engine._config.zero_config.offload_optimizer is None
    # ZeRO-Offload (optimizer state in CPU memory) under ZeRO-1/2: checkpoints read and write each
    # parameter's fp32 master and both Adam moments exactly through it, in fp32 and bf16
    offload = ["deepspeed.zero_optimization.offload_optimizer.device=cpu"]
    for extra in (["parallel.zero_stage=2"], ["parallel.zero_stage=1", "train.precision=bf16"]):
        engine, _ = _engine(world, rank, extra + offload)
        assert engine.zero_cpu_offload()
        _check_engine(rank, world, extra + offload)


@pytest.mark.slow
def test_passthrough_reaches_the_engine_and_offload_keeps_checkpoints_exact():
    run_on_ranks(2, _engine_reads_passthrough)


@pytest.mark.slow
def test_conflict_is_one_line_naming_both_keys(corpus, tmp_path):
    proc = launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "deepspeed.zero_optimization.stage=2"],
                  launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: deepspeed.zero_optimization.stage is set by parallel.zero_stage; set that instead"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_overlap_and_small_buckets_train_alike_and_resume_across_a_change(corpus, tmp_path):
    base = SMALL + [f"data.path={corpus}", "parallel.zero_stage=2", "train.steps=5"]
    launch(base + [f"log.dir={tmp_path / 'plain'}"], nproc=2)
    # DeepSpeed's comms logger rides along: it times, it does not change the numbers
    proc = launch(base + [f"log.dir={tmp_path / 'overlap'}", *OVERLAP, "deepspeed.comms_logger.enabled=true"], nproc=2)
    assert "Comm. Op" in proc.stdout and "all_reduce" in proc.stdout  # its table, printed at the end
    plain, overlap = losses(tmp_path / "plain"), losses(tmp_path / "overlap")
    assert sorted(plain) == sorted(overlap) == [1, 2, 3, 4, 5]
    for s in plain:
        assert overlap[s] == pytest.approx(plain[s], abs=1e-5), (s, plain, overlap)
    written = json.loads((tmp_path / "overlap" / "deepspeed_config.json").read_text())
    assert written["comms_logger"] == {"enabled": True}
    assert written["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                            "reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
    assert written["train_batch_size"] == 8 and written["gradient_accumulation_steps"] == 1

    # 3 steps with the buckets, then on to 5 with other buckets and without overlap: the losses continue
    run = tmp_path / "resumed"
    proc = launch(base + [f"log.dir={run}", "train.steps=3", *OVERLAP, "deepspeed.flops_profiler.enabled=true",
                          "deepspeed.flops_profiler.profile_step=2"], nproc=2)
    assert "DeepSpeed Flops Profiler" in proc.stdout and "Profile Summary at step" in proc.stdout
    proc = launch(base + [f"log.dir={run}", "deepspeed.zero_optimization.reduce_bucket_size=2e4"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = losses(run)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for s in resumed:
        assert resumed[s] == pytest.approx(plain[s], abs=1e-5), (s, plain, resumed)
    written = json.loads((run / "deepspeed_config.json").read_text())
    assert written["zero_optimization"]["reduce_bucket_size"] == 20000

