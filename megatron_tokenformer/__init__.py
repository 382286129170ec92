"""megatron_tokenformer: pretraining and growing TokenFormer language models, Megatron-style."""
import importlib

# Imported on first use (PEP 562), so tools that need no torch (tools/prepare_data.py) do not pay ~1.3 s
# of importing it at every start.
_LAZY = {"load_model": "checkpoint", "Config": "config", "ConfigError": "config", "load_config": "config",
         "TokenFormerModel": "model", "Pattention": "pattention"}

__all__ = ["Config", "ConfigError", "load_config", "load_model", "Pattention", "TokenFormerModel"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
