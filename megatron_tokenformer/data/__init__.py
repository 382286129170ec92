"""Data pipeline: where documents come from (``sources``), corpus preparation (``prepare``) and
training-time reading (``dataset``), several datasets mixed by weight (``blend``)."""

from .dataset import (DataError, DatasetMeta, SampleSet, TokenStream, TrainBatches, load_meta,
                      load_tokenizer, valid_batches)
from .blend import BlendedBatches, BlendedSamples, load_data, train_batches
from .prepare import prepare, prepare_default

__all__ = ["BlendedBatches", "BlendedSamples", "DataError", "DatasetMeta", "SampleSet", "TokenStream", "TrainBatches",
           "load_data", "load_meta", "load_tokenizer", "train_batches", "valid_batches", "prepare", "prepare_default"]
