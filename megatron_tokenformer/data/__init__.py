"""Data pipeline: where documents come from (``sources``), corpus preparation (``prepare``) and
training-time reading (``dataset``)."""

from .dataset import (DataError, DatasetMeta, SampleSet, TokenStream, TrainBatches, load_meta,
                      load_tokenizer, valid_batches)
from .prepare import prepare, prepare_default

__all__ = ["DataError", "DatasetMeta", "SampleSet", "TokenStream", "TrainBatches", "load_meta",
           "load_tokenizer", "valid_batches", "prepare", "prepare_default"]
