"""Typed run configuration: YAML file + `section.key=value` overrides, validated before any work.

Every field has a docstring (the string literal under it); `describe()` prints them. The same
config object travels into the run directory, every checkpoint and the W&B run, so the
sections already carry what tensor/pipeline parallelism and growth need.

    schema.py      the sections (ModelConfig, ParallelConfig, ...) and Config
    loading.py     YAML and overrides -> Config, describe() / help_text() for --help-config
    validation.py  validate(), padded_vocab_size()
"""
from .loading import config_from_dict, describe, describe_key, help_text, load_config, parse_override
from .schema import (TOKEN_KEYS, BlendSource, CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig,
                     GrowthStage, LogConfig, ModelConfig, ParallelConfig, TrainConfig)
from .validation import padded_vocab_size, validate

__all__ = ["TOKEN_KEYS", "BlendSource", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "GrowthStage", "LogConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "config_from_dict", "describe",
           "describe_key", "help_text",
           "load_config", "parse_override", "padded_vocab_size", "validate"]
