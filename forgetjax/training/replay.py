"""Replay: a fixed share of every training batch's rows drawn from replay data (general instruction data or safety
refusals), a mitigation of forgetting. `train.replay: {source, fraction}` is part of TrainConfig, so it is in
every resolved run config and cell id.

Rows, not examples over the stream: with batch size B, `fraction * B` rows of every batch (a whole number; the
config is refused otherwise) come from the replay records, the other rows from the method's data; both pipelines are
shuffled under the run's seed (the replay one on its own stream) and the replay pipeline repeats without filler rows,
so the count is exact in every batch. Unpacked rows hold one example each, so the share is one of examples; packed
rows hold several, so it is one of rows (the token share is close to it). Replay rows are trained on like the others:
their tokens count towards token and FLOPs budgets, and the usage records them apart (`BudgetUsage.replay_tokens`,
`replay_examples`), as does the run's data use (`TrainResult.replay`: unique, size, epochs of the replay records).

Methods whose batches are SFT rows replay (`Method.replays`); the others (preference pairs, online rollouts) refuse a
replay config. A study resolves the named sources "general" and "safety" to records it writes once
(`forgetjax.study.matrix.resolve_replay`); a plain training run names a records file (jsonl/csv/parquet)."""
from __future__ import annotations

import dataclasses

import numpy as np

REPLAY_SOURCES = ("general", "safety")
"""Named replay sources a study resolves: helpful answers (GSM8K, EfficientQA, MBPP, MMLU dev), or the safety
stage's refusals of Do-Not-Answer requests (`forgetjax.study.safety.replay_records`)."""
REPLAY_STREAM = 7
"""The replay pipeline's seed stream (`forgetjax.data.pipeline.derived_seed(seed, 0, REPLAY_STREAM)`)."""


@dataclasses.dataclass
class ReplayConfig:
    """`source`: a records file, or (in a study) "general" / "safety"; `fraction`: share of every batch's rows."""

    source: str
    fraction: float

    def validate(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if not self.source:
            raise ValueError("source: a records file, or general / safety in a study")

    def rows(self, batch_size: int) -> int:
        """Replay rows of a batch of `batch_size` rows; ValueError unless it is a whole number in [1, batch_size)."""
        rows = self.fraction * batch_size
        if abs(rows - round(rows)) > 1e-9 or not 1 <= round(rows) < batch_size:
            raise ValueError(f"replay fraction {self.fraction} x batch_size {batch_size} = {rows:g} rows: must be "
                             f"a whole number of rows between 1 and {batch_size - 1}")
        return int(round(rows))


def concat_rows(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of two SFT batches (the batch contract of `forgetjax.data.batching`) stacked, the narrower one
    right-padded (padding is masked: zero attention, loss and segment ids)."""
    if set(first) != set(second):
        raise ValueError(f"batches with different arrays: {sorted(first)} vs {sorted(second)}")
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])

    def widen(array: np.ndarray) -> np.ndarray:
        return np.pad(array, [(0, 0), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2))

    return {key: np.concatenate([widen(first[key]), widen(second[key])]) for key in first}


def replay_counts(arrays: dict[str, np.ndarray], replay_rows: np.ndarray) -> tuple[int, int]:
    """(real tokens, examples) in the rows `replay_rows` marks: attention tokens, and segments with any of them."""
    attention = arrays["attention_mask"][replay_rows].astype(bool)
    segments = arrays["segment_ids"][replay_rows]
    examples = sum(len(np.unique(row[mask])) for row, mask in zip(segments, attention))
    return int(attention.sum()), int(examples)
