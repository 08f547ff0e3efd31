"""Rows of tokenised examples -> the training batch contract, with length buckets and first-fit packing.

A batch is a dict of NumPy arrays, all [B, T]:
  input_ids       int32   tokens (pad id on padding)
  targets         int32   next token within the same segment; pad id at each segment's last position and padding
  loss_mask       float32 1.0 where targets[t] is a completion token to learn (incl. the end-of-turn token)
  attention_mask  bool    True on real tokens
  positions       int32   0, 1, ... restarting for each packed segment; 0 on padding
  segment_ids     int32   1, 2, ... per example in the row; 0 on padding
A row is a list of examples (one when padding, several when packing, none for an empty filler row).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from forgetjax.data.tokenize import TokenizedExample

CONTRACT_FIELDS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "segment_ids")
CONTRACT_DTYPES = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32,
                   "attention_mask": np.bool_, "positions": np.int32, "segment_ids": np.int32}


def length_buckets(max_length: int, min_bucket: int = 64) -> tuple[int, ...]:
    """Powers of two from `min_bucket` below `max_length`, then `max_length` itself (a few compiled shapes)."""
    if max_length < 1 or min_bucket < 1:
        raise ValueError(f"max_length and min_bucket must be >= 1, got {max_length}, {min_bucket}")
    buckets = []
    size = min_bucket
    while size < max_length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_length,)


def check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """Sorted unique buckets; the largest must be max_length so every example fits one."""
    result = tuple(sorted(set(int(b) for b in buckets)))
    if not result or result[0] < 1:
        raise ValueError(f"buckets must be positive lengths, got {list(buckets)}")
    if result[-1] != max_length:
        raise ValueError(f"the largest bucket must equal max_length={max_length}, got buckets {list(result)}")
    return result


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def first_fit_rows(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit packing: each example (in `order`) goes into the first row with room, else a new row.
    Returns rows of example indices; examples are never split, rows appear in the order they were opened."""
    remaining = np.zeros(len(order), dtype=np.int64)
    rows: list[list[int]] = []
    for index in order:
        length = int(lengths[index])
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens > row capacity {capacity}")
        fits = remaining[:len(rows)] >= length
        row = int(np.argmax(fits)) if len(rows) and fits.any() else -1
        if row < 0:
            row = len(rows)
            rows.append([])
            remaining[row] = capacity
        rows[row].append(int(index))
        remaining[row] -= length
    return rows


def collate_rows(rows: Sequence[Sequence[TokenizedExample]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lay examples out row by row (segments back to back) into the [B, length] batch contract."""
    batch_size = len(rows)
    input_ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    targets = np.full((batch_size, length), pad_id, dtype=np.int32)
    loss_mask = np.zeros((batch_size, length), dtype=np.float32)
    positions = np.zeros((batch_size, length), dtype=np.int32)
    segment_ids = np.zeros((batch_size, length), dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            n = len(example)
            end = start + n
            if end > length:
                raise ValueError(f"row {r} holds {end} tokens > batch length {length}")
            input_ids[r, start:end] = example.input_ids
            targets[r, start:end - 1] = example.input_ids[1:]
            loss_mask[r, start:end - 1] = example.completion_mask[1:]
            positions[r, start:end] = np.arange(n, dtype=np.int32)
            segment_ids[r, start:end] = segment
            start = end
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "attention_mask": segment_ids > 0, "positions": positions, "segment_ids": segment_ids}
