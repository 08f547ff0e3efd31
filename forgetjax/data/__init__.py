"""Training data: records (jsonl/json/csv/parquet/HF) -> tokenised, masked examples -> padded or packed batches
through grain pipelines with exact save/restore. See `batching` for the batch contract."""
from forgetjax.data.batching import CONTRACT_FIELDS, collate_rows, first_fit_rows, length_buckets
from forgetjax.data.pipeline import DataIterator, DataStats, make_pair_batches, make_sft_pipeline
from forgetjax.data.records import RecordError, RecordSet, read_records
from forgetjax.data.tokenize import ChatExample, ExampleEncoder, TemplateError, TokenizedExample

__all__ = [
    "CONTRACT_FIELDS", "ChatExample", "DataIterator", "DataStats", "ExampleEncoder", "RecordError", "RecordSet",
    "TemplateError", "TokenizedExample", "collate_rows", "first_fit_rows", "length_buckets", "make_pair_batches",
    "make_sft_pipeline", "read_records",
]
