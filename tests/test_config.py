import pytest

from megatron_tokenformer.config import ConfigError, config_from_dict, describe, load_config, validate


def test_yaml_and_overrides():
    cfg = load_config("configs/tiny.yml", ["train.steps=20", "train.lr=3e-4", "log.wandb_mode=disabled",
                                           "train.decay_steps=null", "model.activation_checkpointing=true"])
    assert cfg.train.steps == 20 and cfg.train.lr == 3e-4 and cfg.log.wandb_mode == "disabled"
    assert cfg.decay_steps == 20 and cfg.model.activation_checkpointing is True
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
