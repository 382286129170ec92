"""megatron_tokenformer: pretraining and growing TokenFormer language models, Megatron-style."""
from .checkpoint import load_model
from .config import Config, ConfigError, load_config
from .model import TokenFormerModel
from .pattention import Pattention

__all__ = ["Config", "ConfigError", "load_config", "load_model", "Pattention", "TokenFormerModel"]
__version__ = "0.1.0"
