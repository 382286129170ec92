"""Data pipeline: where documents come from (``sources``), corpus preparation (``prepare``: import
``megatron_tokenformer.data.prepare``, which pulls in datatrove, so training ranks never load it), the
Megatron token format (``indexed``), training-time reading (``dataset``), several datasets mixed by weight
(``blend``)."""

from .dataset import (DataError, DatasetMeta, SampleSet, TokenStream, TrainBatches, load_meta,
                      load_tokenizer, valid_batches)
from .blend import BlendedBatches, BlendedSamples, load_data, train_batches

__all__ = ["BlendedBatches", "BlendedSamples", "DataError", "DatasetMeta", "SampleSet", "TokenStream", "TrainBatches",
           "load_data", "load_meta", "load_tokenizer", "train_batches", "valid_batches"]
