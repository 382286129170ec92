import ast
import re
from dataclasses import fields

import pytest

from megatron_tokenformer.config import (Config, ConfigError, TrainConfig, config_from_dict, describe, load_config,
                                         validate)


def test_yaml_and_overrides():
    cfg = load_config("configs/tiny.yml", ["train.steps=20", "train.lr=3e-4", "log.wandb_mode=disabled",
                                           "train.decay_steps=null", "model.activation_checkpointing=true"])
    assert cfg.train.steps == 20 and cfg.train.lr == 3e-4 and cfg.log.wandb_mode == "disabled"
    assert cfg.train.decay_steps is None and cfg.model.activation_checkpointing is True
    assert cfg.model.hidden_size == 128  # from the file
    assert str(cfg.run_dir) == "runs/tiny" and str(cfg.checkpoint_dir) == "runs/tiny/checkpoints"
    assert config_from_dict(cfg.to_dict()) == cfg


# A bad override, words its error must hold (the key, and what would be valid), and corrections
# the message points to: each (in place of the bad override) must load.
ERRORS = [
    (["train.stepz=3"], ["train.stepz", "keys of 'train'", "steps"], [["train.steps=3"]]),
    (["trian.steps=3"], ["trian", "sections are", "train"], [["train.steps=3"]]),
    (["train.steps=many"], ["train.steps", "not an integer"], [["train.steps=3"]]),
    (["train.precision=fp8"], ["train.precision", "fp32", "bf16", "fp16"],
     [["train.precision=fp32"], ["train.precision=bf16"], ["train.precision=fp16"]]),
    (["model.num_heads=5"], ["model.hidden_size=128", "model.num_heads=5", "pick num_heads"], [["model.num_heads=8"]]),
    (["train.global_batch_size=20"], ["train.global_batch_size=20", "train.micro_batch_size=8"],
     [["train.global_batch_size=24"], ["train.global_batch_size=20", "train.micro_batch_size=4"]]),
    (["parallel.tensor=3"], ["model.qkv_tokens=128", "parallel.tensor=3"], [["parallel.tensor=2"], ["parallel.tensor=4"]]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1", ">= 0"], [["train.warmup_steps=0"]]),
    (["steps=3"], ["section.key=value", "train.steps=20"], [["train.steps=3"]]),
    (["model.rotary_pct=0.3"], ["model.rotary_pct=0.3", "even", "change model.rotary_pct or model.num_heads"],
     [["model.rotary_pct=0.25"], ["model.rotary_pct=0.3", "model.num_heads=8"]]),
    (["train.spike_factor=0.5"], ["train.spike_factor=0.5", "> 1", "null"], [["train.spike_factor=2.0"]]),
    (["train.spike_factor=3", "parallel.pipeline=2"], ["train.spike_factor=3.0", "parallel.pipeline=2",
                                                        "train.spike_factor=null"],
     [["train.spike_factor=3.0", "parallel.pipeline=1"]]),
]


@pytest.mark.parametrize("override, words, fixes", ERRORS, ids=[e[0][0] for e in ERRORS])
def test_errors_name_the_key(override, words, fixes):
    """The error names the key and what would be valid, and the correction it points to loads."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    for fix in fixes:
        cfg = load_config("configs/tiny.yml", fix)
        for over in fix:  # the corrected value is the one in force
            key, value = over.split("=", 1)
            section, name = key.split(".")
            assert str(getattr(getattr(cfg, section), name)) == value, (over, cfg)


def _listed(message: str, pattern: str) -> list[str]:
    found = re.search(pattern, message)
    assert found, (pattern, message)
    text = found.group(1)
    return [str(v) for v in ast.literal_eval(text)] if text.startswith("[") else text.split(", ")


@pytest.mark.parametrize("override, pattern, key", [
    pytest.param(["train.precision=fp8"], r"choose one of (.+)$", "train.precision", id="precision"),
    pytest.param(["model.num_heads=5"], r"pick num_heads among (\[.*\])", "model.num_heads", id="num_heads"),
])
def test_every_value_an_error_offers_loads(override, pattern, key):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", override)
    offered = _listed(str(e.value), pattern)
    assert len(offered) >= 2, offered
    refused = {}
    for value in offered:
        try:
            load_config("configs/tiny.yml", [f"{key}={value}"])
        except ConfigError as err:
            refused[value] = str(err)
    assert not refused, refused


def test_unknown_names_list_exactly_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", ["train.stepz=3"])
    assert _listed(str(e.value), r"keys of 'train' are: (.+)$") == [f.name for f in fields(TrainConfig)]
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", ["trian.steps=3"])
    assert _listed(str(e.value), r"sections are: (.+)$") == [f.name for f in fields(Config)]


def test_layout_errors():
    """Layout errors say what would be valid, and those values validate."""
    cfg = load_config("configs/tiny.yml")
    with pytest.raises(ConfigError, match="train.global_batch_size=16 is not divisible by train.micro_batch_size=8 x data-parallel size 3") as e:
        validate(cfg, world_size=3)
    multiple = int(re.search(r"valid global batch sizes are multiples of (\d+)", str(e.value)).group(1))
    for k in (1, 2):
        validate(load_config("configs/tiny.yml", [f"train.global_batch_size={k * multiple}"]), world_size=3)
    cfg = load_config("configs/tiny.yml", ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="world size 3 does not factor") as e:
        validate(cfg, world_size=3)
    procs = int(re.search(r"launch a multiple of (\d+) processes", str(e.value)).group(1))
    validate(cfg, world_size=procs)
    validate(load_config("configs/tiny.yml"), world_size=2)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    text = describe()
    for line in text.splitlines():
        if line.startswith("  "):
            assert line.split("#", 1)[1].strip(), f"undocumented: {line}"


def test_growth_stages(tmp_path):
    f = tmp_path / "grow.yml"
    f.write_text("model: {qkv_tokens: 64, proj_tokens: 64, ffn_tokens: 128}\ntrain: {steps: 30}\n"
                 "growth:\n  - {at_step: 10, ffn_tokens: 256}\n  - {at_step: 20, qkv_tokens: 128, proj_tokens: 128}\n")
    cfg = load_config(f)
    stages = cfg.model_stages()
    assert [(m.qkv_tokens, m.proj_tokens, m.ffn_tokens) for m in stages] == [(64, 64, 128), (64, 64, 256),
                                                                            (128, 128, 256)]
    assert [cfg.segment_end(i) for i in range(3)] == [10, 20, 30]
    assert config_from_dict(cfg.to_dict()) == cfg  # stored in checkpoints and read back
    assert "growth[].at_step" in describe()
    for over, msg in ((["growth=[{at_step: 10, ffn_tokens: 64}]"], "growth\\[0\\].ffn_tokens=64 would shrink"),
                      (["growth=[{at_step: 40, ffn_tokens: 256}]"], "before train.steps=30"),
                      (["growth=[{at_step: 10, ffn_tokens: 257}]", "parallel.tensor=2"], "not divisible by parallel"),
                      (["growth=[{at_step: 10, ffn_tokens: 128}]"], "changes no token count"),
                      (["growth=[{at_step: 10, fnn_tokens: 256}]"], "unknown key 'fnn_tokens' in growth\\[0\\]"),
                      (["growth={at_step: 10}"], "must be a list of stages")):
        with pytest.raises(ConfigError, match=msg):
            load_config(f, over)


@pytest.mark.parametrize("override, hint", [
    (["train.stpes=3"], "did you mean train.steps?"),
    (["train.seq_length=128"], "did you mean model.seq_length?"),  # a key of another section
    (["trian.steps=3"], "did you mean train.steps?"),
    (["growth=[{at_step: 10, fnn_tokens: 256}]"], "did you mean growth[0].ffn_tokens?"),
    (["lr=3e-4"], "did you mean train.lr=3e-4?"),
])
def test_unknown_names_suggest_the_nearest(override, hint):
    """An unknown key or section names the nearest valid one, and that one loads."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", override)
    assert hint in str(e.value), str(e.value)
    if not override[0].startswith("growth"):
        suggested = hint.removeprefix("did you mean ").rstrip("?")
        load_config("configs/tiny.yml", [suggested if "=" in suggested else suggested + "=64"])
    with pytest.raises(ConfigError) as e:  # nothing near: no guess
        load_config("configs/tiny.yml", ["train.zzz=1"])
    assert "did you mean" not in str(e.value)


def test_unknown_names_in_a_file_suggest_the_nearest(tmp_path):
    f = tmp_path / "typo.yml"
    for text, hint in (("train:\n  stpes: 3\n", f"unknown config key 'train.stpes' ({f}); did you mean train.steps?"),
                       ("trian:\n  steps: 3\n", f"unknown config section 'trian' ({f}); did you mean train?"),
                       ("growht: []\n", f"unknown config section 'growht' ({f}); did you mean growth?")):
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert hint in str(e.value), str(e.value)


def _help_config(*args: str):
    """launch/pretrain.py --help-config ... as a user runs it."""
    import subprocess
    import sys

    from helpers import ROOT, env

    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_help_config_shows_a_configs_values_one_line_per_key(tmp_path):
    from megatron_tokenformer.config.loading import _documented

    f = tmp_path / "mine.yml"
    f.write_text("model: {hidden_size: 96}\ntrain: {lr: 0.0042}\n")
    # an override right after --help-config (argparse takes it as KEY) counts as an override
    proc = _help_config("--help-config", "train.steps=7", "--config", str(f), "log.interval=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    by_key = {line.split(" = ", 1)[0].strip(): line for line in lines if line.startswith("  ")}
    assert set(by_key) == {k for k, _, _ in _documented()} | {"deepspeed.<key>[.<key>...]"}  # every key, once
    assert by_key["model.hidden_size"].startswith("  model.hidden_size = 96 (default 128)  # ")  # from the file
    assert by_key["train.lr"].startswith("  train.lr = 0.0042 (default 0.001)  # ")
    assert by_key["train.steps"].startswith("  train.steps = 7 (default 200)  # ")  # from the command line
    assert by_key["log.interval"].startswith("  log.interval = 3 (default 10)  # ")
    assert by_key["model.num_heads"].startswith("  model.num_heads = 4  # ")  # the default: shown once
    # each key's doc in one line: its first sentence, cut at ONE_LINE characters
    assert by_key["model.num_layers"].endswith("# Number of TokenFormer blocks.")
    spike = by_key["train.spike_factor"].split("  # ", 1)[1]
    assert spike.startswith("Skip the update of a step") and len(spike) <= 110 + 4 and "resume is exact" not in spike


def test_help_config_key_prints_its_whole_text(capsys):
    from megatron_tokenformer.cli import run
    from megatron_tokenformer.config.loading import _field_docs
    from megatron_tokenformer.config.schema import TrainConfig

    proc = _help_config("--help-config", "train.spike_factor", "--config", "configs/tiny.yml", "train.spike_factor=3")
    assert proc.returncode == 0, proc.stderr
    head, *body = proc.stdout.strip().splitlines()
    assert head == "train.spike_factor: Optional[float] = None (this config: 3.0)"
    assert " ".join(" ".join(body).split()) == " ".join(_field_docs(TrainConfig)["spike_factor"].split())
    assert len(" ".join(body)) > 800 and max(map(len, body)) <= 100
    assert run(None, [], "train.stpes") == 2  # what the script returns for an unknown KEY
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ("error: --help-config train.stpes: no such config key; did you mean "
                                         "train.steps? `--help-config` alone lists them all")


def test_help_config_into_a_pipe_closed_early_is_no_error():
    """`--help-config | head`: head exits after its lines and the rest of the text meets a closed pipe;
    the script stops quietly with exit 0. Here the pipe's reader is gone before the first write."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, env

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--help-config"], cwd=ROOT,
                              env=env(), stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
