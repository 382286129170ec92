"""Data pipeline: where documents come from (``sources``), corpus preparation (``prepare``), the Megatron
token format (``indexed``), training-time reading (``dataset``), several datasets mixed by weight
(``blend``)."""

from .dataset import (DataError, DatasetMeta, SampleSet, TokenStream, TrainBatches, load_meta,
                      load_tokenizer, valid_batches)
from .blend import BlendedBatches, BlendedSamples, load_data, train_batches

__all__ = ["BlendedBatches", "BlendedSamples", "DataError", "DatasetMeta", "SampleSet", "TokenStream", "TrainBatches",
           "load_data", "load_meta", "load_tokenizer", "train_batches", "valid_batches", "prepare", "prepare_default"]


def __getattr__(name: str):
    # Preparation pulls in datatrove and datasets: imported when asked for, not by every training rank.
    if name in ("prepare", "prepare_default"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.prepare"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
