import pytest

from megatron_tokenformer.config import ConfigError, config_from_dict, describe, load_config, validate


def test_yaml_and_overrides():
    cfg = load_config("configs/tiny.yml", ["train.steps=20", "train.lr=3e-4", "log.wandb_mode=disabled",
                                           "train.decay_steps=null", "model.activation_checkpointing=true"])
    assert cfg.train.steps == 20 and cfg.train.lr == 3e-4 and cfg.log.wandb_mode == "disabled"
    assert cfg.train.decay_steps is None and cfg.model.activation_checkpointing is True
    assert cfg.model.hidden_size == 128  # from the file
    assert str(cfg.run_dir) == "runs/tiny" and str(cfg.checkpoint_dir) == "runs/tiny/checkpoints"
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, words", [
    (["train.stepz=3"], ["train.stepz", "keys of 'train'", "steps"]),
    (["trian.steps=3"], ["trian", "sections are"]),
    (["train.steps=many"], ["train.steps", "not an integer"]),
    (["train.precision=fp8"], ["train.precision", "fp32", "bf16", "fp16"]),
    (["model.num_heads=5"], ["model.hidden_size=128", "model.num_heads=5", "pick num_heads"]),
    (["train.global_batch_size=20"], ["train.global_batch_size=20", "train.micro_batch_size=8"]),
    (["parallel.tensor=3"], ["parallel.tensor=3"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1"]),
    (["steps=3"], ["section.key=value"]),
    (["model.rotary_pct=0.3"], ["model.rotary_pct"]),
])
def test_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yml", override)
    for w in words:
        assert w in str(e.value)


def test_layout_errors():
    cfg = load_config("configs/tiny.yml")
    with pytest.raises(ConfigError, match="train.global_batch_size=16 is not divisible by train.micro_batch_size=8 x data-parallel size 3"):
        validate(cfg, world_size=3)
    cfg = load_config("configs/tiny.yml", ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="world size 3 does not factor"):
        validate(cfg, world_size=3)
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
