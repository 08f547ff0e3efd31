"""Grain pipelines: records -> tokenised examples -> per-epoch shuffled, padded or packed global batches.

Stages: records are tokenised and masked once up front (a grain `MapDataset.source(...).batch(..., batch_fn=encode)`
map over chunks, so over-long/dropped counts and steps per epoch are known before training). Each epoch's order
sorts the examples by a SplitMix64 hash keyed by a seed derived from (seed, epoch) with `numpy.random.SeedSequence`,
so seeds and epochs give unrelated orders that are identical on every machine (grain's index shuffle costs
milliseconds per element on small datasets). Batches are then planned per epoch:
  padding: consecutive chunks of `batch_size` examples, padded to the smallest length bucket that fits the longest
           example of the global batch (so every host sees the same shape);
  packing: greedy first-fit of the epoch's examples into rows of `max_length` tokens (never splitting one), the
           rows shuffled again (so long examples are not bunched at the end of the epoch) and chunked into batches.
The last batch of an epoch is filled with empty rows (loss_mask 0), unless `drop_remainder`. Batches never span
epochs; every kept example appears exactly once per epoch.

The batch stream is `grain.MapDataset.range(num_batches).map(make_batch).to_iter_dataset(...)`: batch i is a pure
function of i, so an iterator's state is just the index of the next batch (plus a fingerprint of the data and
settings, checked on restore) and a resumed run sees the identical sequence. Multi-host: batch i is a global batch
of `batch_size` rows; the process with `shard_index` of `shard_count` gets rows
[shard_index * B / shard_count, (shard_index + 1) * B / shard_count).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from forgetjax.data.batching import bucket_for, check_buckets, collate_rows, first_fit_rows, length_buckets
from forgetjax.data.records import RecordSet, Schema, read_records, records_from_memory
from forgetjax.data.tokenize import ChatExample, ExampleEncoder, TokenizedExample, Truncation

INFINITE_BATCHES = 2**62
ENCODE_CHUNK = 256
_ORDER_STREAM, _ROW_STREAM = 0, 1
Batch = dict[str, np.ndarray]
RecordsLike = RecordSet | str | Path | Sequence[str | Path] | Sequence[Mapping[str, Any] | ChatExample]


@dataclass
class DataStats:
    """What the pipeline kept and why it lost anything (report these with the run). batches_per_epoch is that of
    epoch 0 (with packing it varies slightly between epochs)."""

    records: int
    skipped_malformed: int
    examples: int
    truncated: int
    dropped: int
    tokens: int
    completion_tokens: int
    batches_per_epoch: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 64-bit seed for (seed, epoch, stream) via SeedSequence hashing: unrelated for different inputs (unlike
    seed + epoch, where seed 1 epoch 0 would equal seed 0 epoch 1)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0])


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of uint64 values (wrapping arithmetic): a fixed, well-mixed 64-bit hash."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shuffled_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n): indices sorted by SplitMix64(seed + golden * (i + 1)). Pure integer arithmetic,
    so the order is identical on every machine and NumPy version."""
    with np.errstate(over="ignore"):
        keys = np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15) * np.arange(1, n + 1, dtype=np.uint64)
    return np.argsort(splitmix64(keys), kind="stable").tolist()


class BatchSchedule:
    """The rows (lists of item indices) of every global batch: batch index -> (epoch, batch in epoch) -> rows.
    Epoch plans are computed lazily, cached (a few at a time) and thread-safe."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int, epochs: int | None, packing: bool,
                 capacity: int, drop_remainder: bool, cache_epochs: int = 2):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.packing = packing
        self.capacity = capacity
        self.drop_remainder = drop_remainder
        self._cache: OrderedDict[int, list[list[list[int]]]] = OrderedDict()
        self._cache_epochs = cache_epochs
        self._counts: dict[int, int] = {}
        self._ends: list[int] = []
        self._lock = threading.RLock()
        if self.epoch_batches(0) == 0:
            raise ValueError(f"{len(self.lengths)} examples give no batch of {batch_size} "
                             f"(drop_remainder={drop_remainder})")

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        order = shuffled_order(len(self.lengths), derived_seed(self.seed, epoch, _ORDER_STREAM))
        if self.packing:
            rows = first_fit_rows(self.lengths, order, self.capacity)
            rows = [rows[i] for i in shuffled_order(len(rows), derived_seed(self.seed, epoch, _ROW_STREAM))]
        else:
            rows = [[i] for i in order]
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if batches and len(batches[-1]) < self.batch_size:
            if self.drop_remainder:
                batches.pop()
            else:
                batches[-1] = batches[-1] + [[] for _ in range(self.batch_size - len(batches[-1]))]
        return batches

    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        with self._lock:
            if epoch not in self._cache:
                self._cache[epoch] = self._plan(epoch)
                self._counts[epoch] = len(self._cache[epoch])
                while len(self._cache) > self._cache_epochs:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(epoch)
            return self._cache[epoch]

    def epoch_batches(self, epoch: int) -> int:
        """Number of batches in `epoch`."""
        if not self.packing:
            full, rest = divmod(len(self.lengths), self.batch_size)
            return full + (1 if rest and not self.drop_remainder else 0)
        with self._lock:
            if epoch not in self._counts:
                self._epoch_plan(epoch)
            return self._counts[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global batch `index`; IndexError past the last epoch."""
        if index < 0:
            raise IndexError(f"batch index must be >= 0, got {index}")
        if not self.packing:
            epoch, local = divmod(index, self.epoch_batches(0))
        else:
            with self._lock:
                while not self._ends or self._ends[-1] <= index:
                    if self.epochs is not None and len(self._ends) >= self.epochs:
                        break
                    self._ends.append((self._ends[-1] if self._ends else 0) + self.epoch_batches(len(self._ends)))
                epoch = int(np.searchsorted(self._ends, index, side="right"))
                local = index - (self._ends[epoch - 1] if epoch else 0)
        if self.epochs is not None and epoch >= self.epochs:
            raise IndexError(f"batch {index} is past the end ({self.total} batches)")
        return epoch, local

    def rows(self, index: int) -> list[list[int]]:
        """Item indices of each row of global batch `index` (an empty list is a filler row)."""
        epoch, local = self.locate(index)
        return self._epoch_plan(epoch)[local]

    @property
    def total(self) -> int | None:
        """Number of batches over all epochs (None when epochs is None: repeat forever)."""
        if self.epochs is None:
            return None
        return sum(self.epoch_batches(e) for e in range(self.epochs))


class DataIterator:
    """Iterator over this process's share of every global batch, with exact save/restore.

    `get_state()` is a JSON-serialisable dict {"next_index", "fingerprint"}; `set_state` on a new iterator built
    from the same data and settings (any shard) continues with the identical batch sequence."""

    def __init__(self, schedule: BatchSchedule, collate: Callable[[list[list[int]], int], Batch], *,
                 buckets: Sequence[int], fingerprint: str, stats: DataStats, shard_index: int, shard_count: int,
                 num_threads: int, prefetch: int):
        self.schedule = schedule
        self.buckets = tuple(buckets)
        self.fingerprint = fingerprint
        self.stats = stats
        self.shard_index = shard_index
        self.shard_count = shard_count
        self._collate = collate
        self._rows_per_shard = schedule.batch_size // shard_count
        total = schedule.total
        self.num_batches: int | None = total
        dataset = grain.MapDataset.range(total if total is not None else INFINITE_BATCHES).map(self.make_batch)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch if num_threads else 0)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def make_batch(self, index: int) -> Batch:
        """This shard's rows of global batch `index`, padded to the bucket fitting the whole global batch."""
        rows = self.schedule.rows(index)
        longest = max((int(sum(self.schedule.lengths[i] for i in row)) for row in rows), default=0)
        length = bucket_for(max(longest, 1), self.buckets)
        start = self.shard_index * self._rows_per_shard
        return self._collate(rows[start:start + self._rows_per_shard], length)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    @property
    def position(self) -> int:
        """Index of the next global batch (= batches consumed so far)."""
        return int(self._iterator.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (the number of epochs once exhausted)."""
        if self.num_batches is not None and self.position >= self.num_batches:
            return self.schedule.epochs
        return self.schedule.locate(self.position)[0]

    def items_drawn(self) -> int:
        """Items (examples or pairs, repeats counted) in the global batches consumed so far."""
        return sum(len(row) for index in range(self.position) for row in self.schedule.rows(index))

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self.position, "fingerprint": self.fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"next_index", "fingerprint"}:
            raise ValueError(f"data iterator state must be a dict with next_index and fingerprint, got {state!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("data iterator state comes from a different pipeline (data or settings changed): "
                             f"fingerprint {state['fingerprint'][:12]} != {self.fingerprint[:12]}")
        index = state["next_index"]
        if not isinstance(index, int) or index < 0 or (self.num_batches is not None and index > self.num_batches):
            raise ValueError(f"data iterator state next_index must be in [0, {self.num_batches}], got {index!r}")
        self._iterator.set_state({"next_index": index})


def _as_record_set(records: RecordsLike, *, schema: Schema, fields: Mapping[str, str] | None,
                   skip_malformed: bool, numeric_fields: Sequence[str]) -> RecordSet:
    """Read paths, or validate in-memory records, into a RecordSet."""
    if isinstance(records, RecordSet):
        return records
    if isinstance(records, (str, Path)) or (
            isinstance(records, Sequence) and records and all(isinstance(r, (str, Path)) for r in records)):
        return read_records(records, fields=fields, schema=schema, numeric_fields=numeric_fields,
                            skip_malformed=skip_malformed)
    rows = [asdict(r) if isinstance(r, ChatExample) else r for r in records]
    return records_from_memory(rows, schema=schema, numeric_fields=numeric_fields)


def _encode_all(items: Sequence[Any], locations: Sequence[str], encode_chunk: Callable) -> list[Any]:
    """Run `encode_chunk` over chunks of (item, location) pairs as a grain batch map; flatten the results."""
    dataset = grain.MapDataset.source(list(zip(items, locations))).batch(ENCODE_CHUNK, batch_fn=encode_chunk)
    return [result for i in range(len(dataset)) for result in dataset[i]]


def _fingerprint(settings: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _check_common(batch_size: int, max_length: int, seed: int, epochs: int | None, shard_index: int,
                  shard_count: int, num_threads: int, prefetch: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (repeat forever), got {epochs}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count), got {shard_index} of {shard_count}")
    if batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} (global) is not divisible by shard_count {shard_count}")
    if num_threads < 0 or prefetch < 0:
        raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads}, {prefetch}")


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def make_sft_pipeline(
    records: RecordsLike,
    tokenizer,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    packing: bool = False,
    chat: bool = True,
    epochs: int | None = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    truncation: Truncation = "left",
    buckets: Sequence[int] | None = None,
    drop_remainder: bool = False,
    fields: Mapping[str, str] | None = None,
    skip_malformed: bool = False,
    end_of_turn: str | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
) -> DataIterator:
    """SFT batches (the batch contract of `forgetjax.data.batching`) from records, paths or ChatExamples.

    batch_size is global (all shards); `buckets` default to `length_buckets(max_length)` (ignored when packing:
    rows are always max_length); epochs=None repeats forever. `fields`/`skip_malformed` apply when reading paths.
    """
    _check_common(batch_size, max_length, seed, epochs, shard_index, shard_count, num_threads, prefetch)
    record_set = _as_record_set(records, schema="sft", fields=fields, skip_malformed=skip_malformed,
                                numeric_fields=())
    encoder = ExampleEncoder(tokenizer, max_length=max_length, chat=chat, truncation=truncation,
                             end_of_turn=end_of_turn)

    def encode_chunk(chunk: Sequence[tuple[Any, str]]) -> list[TokenizedExample | None]:
        return encoder.encode_many([r for r, _ in chunk], [w for _, w in chunk])

    encoded = _encode_all(record_set.records, record_set.locations, encode_chunk)
    examples = [e for e in encoded if e is not None]
    if not examples:
        raise ValueError(f"no examples left out of {len(record_set)} records (dropped {encoder.stats.dropped} "
                         f"over max_length={max_length})")
    buckets = (max_length,) if packing else check_buckets(buckets or length_buckets(max_length), max_length)
    schedule = BatchSchedule([len(e) for e in examples], batch_size=batch_size, seed=seed, epochs=epochs,
                             packing=packing, capacity=max_length, drop_remainder=drop_remainder)
    pad_id = _pad_id(tokenizer)

    def collate(rows: list[list[int]], length: int) -> Batch:
        return collate_rows([[examples[i] for i in row] for row in rows], length, pad_id)

    settings = {"kind": "sft", "batch_size": batch_size, "max_length": max_length, "seed": seed,
                "packing": packing, "epochs": epochs, "buckets": list(buckets), "drop_remainder": drop_remainder,
                "pad_id": pad_id}
    arrays = [a for e in examples for a in (e.input_ids, e.completion_mask)]
    stats = DataStats(records=len(record_set) + record_set.skipped, skipped_malformed=record_set.skipped,
                      examples=len(examples), truncated=encoder.stats.truncated, dropped=encoder.stats.dropped,
                      tokens=encoder.stats.tokens, completion_tokens=encoder.stats.completion_tokens,
                      batches_per_epoch=schedule.epoch_batches(0))
    return DataIterator(schedule, collate, buckets=buckets, fingerprint=_fingerprint(settings, arrays), stats=stats,
                        shard_index=shard_index, shard_count=shard_count, num_threads=num_threads,
                        prefetch=prefetch)


def make_pair_batches(
    pairs: RecordsLike,
    tokenizer,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    chat: bool = True,
    epochs: int | None = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    float_fields: Sequence[str] = (),
    truncation: Truncation = "left",
    buckets: Sequence[int] | None = None,
    drop_remainder: bool = False,
    fields: Mapping[str, str] | None = None,
    skip_malformed: bool = False,
    end_of_turn: str | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
) -> DataIterator:
    """Preference-pair batches for DPO/SPIN from records with `prompt`, `chosen`, `rejected` (optional `system`).

    Each batch has `chosen_<field>` and `rejected_<field>` for every contract field, both padded to the same bucket
    (the smallest fitting the longest sequence of the global batch), each `float_fields` entry as a float32 [B]
    array (e.g. `ref_chosen_logp`), and `pair_mask` [B] float32 (0 on filler rows of the last batch). A pair is
    dropped if either side is dropped by the truncation policy.
    """
    _check_common(batch_size, max_length, seed, epochs, shard_index, shard_count, num_threads, prefetch)
    float_fields = tuple(float_fields)
    record_set = _as_record_set(pairs, schema="pair", fields=fields, skip_malformed=skip_malformed,
                                numeric_fields=float_fields)
    encoder = ExampleEncoder(tokenizer, max_length=max_length, chat=chat, truncation=truncation,
                             end_of_turn=end_of_turn)

    def encode_chunk(chunk: Sequence[tuple[Mapping[str, Any], str]]):
        sides = []
        for side in ("chosen", "rejected"):
            examples = [ChatExample(prompt=r["prompt"], completion=r[side], system=r.get("system")) for r, _ in chunk]
            sides.append(encoder.encode_many(examples, [f"{w} ({side})" for _, w in chunk]))
        floats = [np.asarray([r[name] for name in float_fields], np.float32) for r, _ in chunk]
        return [(c, r, f) if c is not None and r is not None else None for c, r, f in zip(*sides, floats)]

    encoded = _encode_all(record_set.records, record_set.locations, encode_chunk)
    kept = [p for p in encoded if p is not None]
    if not kept:
        raise ValueError(f"no pairs left out of {len(record_set)} records (over max_length={max_length})")
    buckets = check_buckets(buckets or length_buckets(max_length), max_length)
    schedule = BatchSchedule([max(len(c), len(r)) for c, r, _ in kept], batch_size=batch_size, seed=seed,
                             epochs=epochs, packing=False, capacity=max_length, drop_remainder=drop_remainder)
    pad_id = _pad_id(tokenizer)

    def collate(rows: list[list[int]], length: int) -> Batch:
        batch: Batch = {}
        for side, position in (("chosen", 0), ("rejected", 1)):
            side_batch = collate_rows([[kept[i][position] for i in row] for row in rows], length, pad_id)
            batch.update({f"{side}_{key}": value for key, value in side_batch.items()})
        for column, name in enumerate(float_fields):
            batch[name] = np.asarray([kept[row[0]][2][column] if row else 0.0 for row in rows], np.float32)
        batch["pair_mask"] = np.asarray([1.0 if row else 0.0 for row in rows], np.float32)
        return batch

    settings = {"kind": "pair", "batch_size": batch_size, "max_length": max_length, "seed": seed,
                "epochs": epochs, "buckets": list(buckets), "drop_remainder": drop_remainder, "pad_id": pad_id,
                "float_fields": list(float_fields)}
    arrays = [a for c, r, f in kept for a in (c.input_ids, c.completion_mask, r.input_ids, r.completion_mask, f)]
    stats = DataStats(records=len(record_set) + record_set.skipped, skipped_malformed=record_set.skipped,
                      examples=len(kept), truncated=encoder.stats.truncated, dropped=len(record_set) - len(kept),
                      tokens=sum(len(c) + len(r) for c, r, _ in kept),
                      completion_tokens=sum(int(c.completion_mask.sum() + r.completion_mask.sum())
                                            for c, r, _ in kept),
                      batches_per_epoch=schedule.epoch_batches(0))
    return DataIterator(schedule, collate, buckets=buckets, fingerprint=_fingerprint(settings, arrays), stats=stats,
                        shard_index=shard_index, shard_count=shard_count, num_threads=num_threads,
                        prefetch=prefetch)
