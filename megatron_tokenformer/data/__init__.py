"""Data pipeline: where documents come from (``sources``), corpus preparation (``prepare``: import
``megatron_tokenformer.data.prepare``, which pulls in datatrove, so training ranks never load it), the
Megatron token format (``indexed``), training-time reading (``dataset``), several datasets mixed by weight
(``blend``)."""
import importlib

# Imported on first use (PEP 562): preparation imports this package without torch.
_LAZY = {"DataError": "dataset", "DatasetMeta": "dataset", "SampleSet": "dataset", "TokenStream": "dataset",
         "TrainBatches": "dataset", "load_meta": "dataset", "load_tokenizer": "dataset", "valid_batches": "dataset",
         "BlendedBatches": "blend", "BlendedSamples": "blend", "load_data": "blend", "train_batches": "blend"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
