"""Shared machinery of the preference methods (OFF-RL DPO, SELF-SPIN): rollouts, verified pairing, reference
log-probabilities, the on-disk pair cache, the paired batch source and the policy side of the loss.

A pair record is a dict {"id", "prompt", "chosen", "rejected", optional "system", "ref_chosen_logp",
"ref_rejected_logp"}: texts plus the reference model's sequence log-probabilities of both completions (sum of the
completion-token log-probs, end-of-turn token included), computed once when the data is built. Both sides are
tokenised exactly as `forgetjax.data.make_pair_batches` does (chat template, `truncation="drop"`), so the reference
and the policy score the same tokens; pairs with a side longer than `max_length` are dropped and counted.

Completions are stored as decoded text and re-tokenised for training (the usual practice of preference pipelines);
for BPE tokenizers the re-tokenisation can differ from the sampled token sequence, which only changes which
(equivalent) token path the policy and reference score - both score the same one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forgetjax.data import ChatExample, ExampleEncoder, TokenizedExample, collate_rows, make_pair_batches
from forgetjax.data.batching import bucket_for, length_buckets
from forgetjax.distributed import is_writer, to_host
from forgetjax.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from forgetjax.losses.token import sequence_logprob
from forgetjax.training.budget import DataUse, check_extra_flops
from forgetjax.training.method import Batch, StepContext
from forgetjax.methods.teacher_data import Verifier
from forgetjax.models.vocab import token_stats

REF_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")
TRUNCATION = "drop"
Verdict = bool | None  # True correct, False incorrect, None unverifiable (e.g. the verifier timed out)
VerdictFn = Callable[[Sequence[Any], Sequence[str]], list[Verdict]]  # (problems, completions) -> verdicts


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and pairing
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sampled completion: decoded text, whether a stop token ended it, and its token count."""

    text: str
    finished: bool
    tokens: int


def derived_seed(*parts: int) -> int:
    """A 31-bit seed for a tuple of ints (unrelated for different tuples)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0] >> 1)


def generate_samples(model, tokenizer, prompts: Sequence[list[dict[str, str]]], params, *, prompts_per_call: int,
                     seed: int, mesh=None) -> tuple[list[list[Sample]], float]:
    """`params.n` samples per chat prompt with forgetjax's sampler, in chunks of `prompts_per_call` prompts (chunk
    c uses the seed derived from (seed, c)). Returns the samples per prompt and the generation FLOPs
    (`ModelConfig.forward_flops` of every row's prompt + generated tokens, prefill included)."""
    from forgetjax.sampling.sampler import Sampler

    if prompts_per_call < 1:
        raise ValueError(f"prompts_per_call must be >= 1, got {prompts_per_call}")
    sampler = Sampler(model, tokenizer, mesh=mesh)
    encoded = [sampler.encode_chat(messages) for messages in prompts]
    samples: list[list[Sample]] = []
    flops = 0.0
    for chunk_index, start in enumerate(range(0, len(encoded), prompts_per_call)):
        chunk = encoded[start:start + prompts_per_call]
        chunk_params = dataclasses.replace(params, seed=derived_seed(seed, chunk_index))
        out = sampler.generate_tokens(chunk, chunk_params)
        for i, prompt_ids in enumerate(chunk):
            rows = range(i * params.n, (i + 1) * params.n)
            samples.append([Sample(out.texts[r], bool(out.finished[r]), int(out.lengths[r])) for r in rows])
            flops += model.config.forward_flops(len(prompt_ids) + int(out.lengths[r]) for r in rows)
    return samples, flops


def pool_verifier(workers: int = 2) -> VerdictFn:
    """Verdicts of `Verifier` (its pool started for each call and closed after; timeouts -> None)."""

    def verify(problems: Sequence[Any], completions: Sequence[str]) -> list[Verdict]:
        with Verifier(workers=workers) as verifier:
            return verifier.verdicts(problems, completions)

    return verify


def pair_correct_incorrect(texts: Sequence[str], verdicts: Sequence[Verdict],
                           max_pairs: int) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs of one prompt's samples.

    Pairing rule: duplicates are removed (first occurrence kept) and samples with verdict None or blank text are
    skipped; with C the verified-correct and I the incorrect texts in sample order, pair k = (C[k mod |C|],
    I[k mod |I|]) for k < min(max_pairs, max(|C|, |I|)). Every sample is used once before any is reused, no pair
    repeats, and a prompt without a correct or without an incorrect sample gives no pair.
    """
    if len(texts) != len(verdicts):
        raise ValueError(f"texts ({len(texts)}) and verdicts ({len(verdicts)}) must have the same length")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    correct: list[str] = []
    incorrect: list[str] = []
    seen: set[str] = set()
    for text, verdict in zip(texts, verdicts):
        if verdict is None or not text.strip() or text in seen:
            continue
        seen.add(text)
        (correct if verdict else incorrect).append(text)
    if not correct or not incorrect:
        return []
    count = min(max_pairs, max(len(correct), len(incorrect)))
    return [(correct[k % len(correct)], incorrect[k % len(incorrect)]) for k in range(count)]


def heldout_prompt_ids(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The ids of round(fraction x n) prompts (at least one when fraction > 0 and n >= 2, never all of them),
    drawn with `seed`: held-out pairs come from prompts never trained on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    unique = sorted(set(ids))
    if fraction == 0.0 or len(unique) < 2:
        return set()
    count = min(max(round(fraction * len(unique)), 1), len(unique) - 1)
    return set(random.Random(seed).sample(unique, count))


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ----------------------------------------------------------------------------------------------------------------


def pair_encoder(tokenizer, max_length: int) -> ExampleEncoder:
    """The encoder `make_pair_batches` uses for pairs here (chat template, over-long sides dropped)."""
    return ExampleEncoder(tokenizer, max_length=max_length, chat=True, truncation=TRUNCATION)


def encode_pair_sides(tokenizer, records: Sequence[Mapping[str, Any]],
                      max_length: int) -> list[tuple[TokenizedExample, TokenizedExample] | None]:
    """(chosen, rejected) token examples of each pair record, or None where a side exceeds max_length."""
    encoder = pair_encoder(tokenizer, max_length)
    sides = []
    for side in ("chosen", "rejected"):
        examples = [ChatExample(prompt=r["prompt"], completion=r[side], system=r.get("system")) for r in records]
        sides.append(encoder.encode_many(examples))
    return [(c, r) if c is not None and r is not None else None for c, r in zip(*sides)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sequence_logps(graphdef, state, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, state)
    stats = token_stats(model, batch["input_ids"], batch["attention_mask"], batch["positions"], batch["segment_ids"],
                        targets=batch["targets"])
    return sequence_logprob(stats.logprobs, batch["loss_mask"])


def _pad_id(tokenizer) -> int:
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def sequence_logprobs(model, examples: Sequence[TokenizedExample], *, pad_id: int, max_length: int,
                      batch_rows: int = 16, mesh=None) -> tuple[np.ndarray, float]:
    """log p(completion | prompt) of each example under `model` (sum of the masked completion-token log-probs, in
    the training batch layout), and the forward FLOPs spent on the real tokens.

    Examples are scored longest first in fixed-size chunks of `batch_rows` rows (filler rows empty), each padded to
    the smallest length bucket of `max_length` that fits, so few shapes compile."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_rows = -(-batch_rows // shards) * shards
    buckets = length_buckets(max_length)
    graphdef, state = nnx.split(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    result = np.zeros(len(examples), np.float32)
    flops = 0.0
    for start in range(0, len(order), batch_rows):
        chunk = order[start:start + batch_rows]
        length = bucket_for(max(len(examples[i]) for i in chunk), buckets)
        rows = [[examples[i]] for i in chunk] + [[] for _ in range(batch_rows - len(chunk))]
        arrays = collate_rows(rows, length, pad_id)
        if mesh is not None:
            from forgetjax.sharding import shard_batch

            with jax.set_mesh(mesh):
                values = _sequence_logps(graphdef, state, shard_batch(arrays, mesh))
        else:
            values = _sequence_logps(graphdef, state, {k: jnp.asarray(v) for k, v in arrays.items()})
        result[chunk] = to_host(values)[:len(chunk)]
        flops += sum(model.config.flops_per_token(len(examples[i])) * len(examples[i]) for i in chunk)
    return result, flops


def score_pairs(model, tokenizer, records: Sequence[Mapping[str, Any]], *, max_length: int, batch_rows: int = 16,
                mesh=None) -> tuple[list[int], np.ndarray, np.ndarray, float]:
    """(indices of the records that fit max_length, chosen log-probs, rejected log-probs, forward FLOPs)."""
    encoded = encode_pair_sides(tokenizer, records, max_length)
    kept = [i for i, pair in enumerate(encoded) if pair is not None]
    examples = [encoded[i][0] for i in kept] + [encoded[i][1] for i in kept]
    logps, flops = sequence_logprobs(model, examples, pad_id=_pad_id(tokenizer), max_length=max_length,
                                     batch_rows=batch_rows, mesh=mesh)
    return kept, logps[:len(kept)], logps[len(kept):], flops


def with_reference_logps(model, tokenizer, records: Sequence[Mapping[str, Any]], *, max_length: int,
                         batch_rows: int = 16, mesh=None) -> tuple[list[dict[str, Any]], int, float]:
    """The records that fit max_length with `ref_chosen_logp` / `ref_rejected_logp` under `model` (the reference),
    the number dropped as too long, and the FLOPs spent."""
    kept, chosen, rejected, flops = score_pairs(model, tokenizer, records, max_length=max_length,
                                                batch_rows=batch_rows, mesh=mesh)
    out = [{**records[i], "ref_chosen_logp": float(c), "ref_rejected_logp": float(r)}
           for i, c, r in zip(kept, chosen, rejected)]
    return out, len(records) - len(kept), flops


def margin_report(model, tokenizer, pairs: Sequence[Mapping[str, Any]], *, beta: float, max_length: int,
                  batch_rows: int = 16, mesh=None) -> dict[str, float]:
    """Chosen-vs-rejected margins of `pairs` under `model`: mean log-prob margin log pi(chosen) - log pi(rejected),
    the same under the reference (from the cached ref log-probs), the DPO implicit reward margin beta x (policy
    margin - reference margin), and the share of pairs whose log-prob / reward margin is positive."""
    if not pairs:
        return {"pairs": 0.0}
    kept, chosen, rejected, _ = score_pairs(model, tokenizer, pairs, max_length=max_length, batch_rows=batch_rows,
                                           mesh=mesh)
    policy = chosen.astype(np.float64) - rejected
    reference = np.asarray([pairs[i]["ref_chosen_logp"] - pairs[i]["ref_rejected_logp"] for i in kept])
    reward = beta * (policy - reference)
    return {"pairs": float(len(kept)), "logp_margin": float(policy.mean()),
            "reference_logp_margin": float(reference.mean()), "reward_margin": float(reward.mean()),
            "logp_accuracy": float((policy > 0).mean()), "reward_accuracy": float((reward > 0).mean())}


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the settings that determine a cached dataset."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def problems_digest(items: Sequence[tuple[str, str]]) -> str:
    """sha256 over (id, prompt) of the training items, so a different problem set never reuses a cache."""
    return settings_fingerprint({"items": [list(item) for item in items]})


def cached_samples(path: str | Path, fingerprint: str,
                   generate: Callable[[], tuple[list[list[Sample]], float]]) -> tuple[list[list[Sample]], float]:
    """The rollouts stored in `path` for these settings, else `generate()`d and stored there at once (atomically),
    so a run killed after generation - the expensive part - never samples again. Returns (samples, FLOPs)."""
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            samples = [[Sample(**sample) for sample in group] for group in stored["samples"]]
            return samples, float(stored["generation_flops"])
    samples, flops = generate()
    if is_writer():
        write_json_atomic(path, {"fingerprint": fingerprint, "generation_flops": flops,
                                 "samples": [[dataclasses.asdict(sample) for sample in group] for group in samples]})
    return samples, flops


@dataclasses.dataclass
class PairData:
    """A built (or cached) pair dataset: training and held-out pairs, and statistics incl. `prepare_flops`."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    stats: dict[str, Any]


class PairCache:
    """One dataset under `directory`: train.jsonl, heldout.jsonl, then stats.json (written last: its presence
    marks a complete cache). A cache built with other settings is an error, never silently reused. The raw
    rollouts are kept in rollouts.json (see `cached_samples`) while the dataset is being built."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @property
    def stats_path(self) -> Path:
        return self.directory / "stats.json"

    def load(self, fingerprint: str) -> PairData | None:
        if not self.stats_path.is_file():
            return None
        stats = json.loads(self.stats_path.read_text())
        if stats.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.directory} holds pair data built with other settings (fingerprint "
                             f"{str(stats.get('fingerprint'))[:12]} != {fingerprint[:12]}); use a new out_dir or "
                             "delete that directory to rebuild it")
        return PairData(read_jsonl(self.directory / "train.jsonl"), read_jsonl(self.directory / "heldout.jsonl"),
                        stats)

    def save(self, data: PairData, fingerprint: str) -> PairData:
        stats = {**data.stats, "fingerprint": fingerprint}
        if is_writer():
            write_jsonl_atomic(self.directory / "train.jsonl", data.train)
            write_jsonl_atomic(self.directory / "heldout.jsonl", data.heldout)
            write_json_atomic(self.stats_path, stats)
        return PairData(data.train, data.heldout, stats)

    @property
    def rollouts_path(self) -> Path:
        return self.directory / "rollouts.json"

    def load_or_build(self, fingerprint: str, build: Callable[[], PairData]) -> PairData:
        cached = self.load(fingerprint)
        if cached is not None:
            return cached
        start = time.perf_counter()
        data = build()
        data.stats["build_seconds"] = time.perf_counter() - start
        return self.save(data, fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# Batches and the policy side of the loss
# ----------------------------------------------------------------------------------------------------------------


def prepare_flops(stats: Mapping[str, Any]) -> dict[str, float]:
    """The FLOPs of building a pair dataset by component: sampling the pairs' completions (rollout) and scoring them
    with the reference model (reference)."""
    return {"rollout": float(stats["generation_flops"]), "reference": float(stats["reference_flops"])}


class PairBatches:
    """Batches over one pair dataset (`make_pair_batches` with the cached reference log-probs as float fields).

    Both sides' real tokens count as training tokens, real pairs as examples. The FLOPs spent preparing the data
    (`prepare_flops`: the sampling and reference-scoring FLOPs of `PairData.stats`, see `prepare_flops`) are charged
    once, on the first batch; whether they were is part of the state."""

    def __init__(self, pairs: Sequence[Mapping[str, Any]], tokenizer, *, batch_size: int, max_length: int,
                 seed: int, epochs: int | None, prepare_flops: Mapping[str, float] | None = None):
        self.iterator = make_pair_batches(list(pairs), tokenizer, batch_size=batch_size, max_length=max_length,
                                          seed=seed, epochs=epochs, float_fields=REF_FIELDS, truncation=TRUNCATION,
                                          num_threads=0, prefetch=0)
        self.prepare_flops = check_extra_flops(dict(prepare_flops or {}))
        self.size = len(pairs)
        self.charged = False

    def next_batch(self, context: StepContext | None = None) -> Batch | None:
        try:
            arrays = next(self.iterator)
        except StopIteration:
            return None
        tokens = int(arrays["chosen_attention_mask"].sum() + arrays["rejected_attention_mask"].sum())
        extra = {} if self.charged else dict(self.prepare_flops)
        self.charged = True
        return Batch(arrays=arrays, tokens=tokens, examples=int(arrays["pair_mask"].sum()), extra_flops=extra)

    def data_use(self) -> DataUse:
        return DataUse(size=self.size, consumed=self.iterator.items_drawn())

    def get_state(self) -> dict:
        return {"iterator": self.iterator.get_state(), "charged": self.charged}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"iterator", "charged"}:
            raise ValueError(f"pair batch state must have keys iterator and charged, got {state!r}")
        self.iterator.set_state(state["iterator"])
        self.charged = bool(state["charged"])


def policy_pair_logps(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs [B] of the chosen and rejected sides under `model`, in one forward over both sides."""
    fields = ("input_ids", "attention_mask", "positions", "segment_ids", "targets", "loss_mask")
    both = {f: jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]], axis=0) for f in fields}
    stats = token_stats(model, both["input_ids"], both["attention_mask"], both["positions"], both["segment_ids"],
                        targets=both["targets"])
    logps = sequence_logprob(stats.logprobs, both["loss_mask"])
    rows = batch["chosen_input_ids"].shape[0]
    return logps[:rows], logps[rows:]


def pair_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[B] weights of the pairs that count: real pairs (pair_mask) whose two sides both still have completion
    tokens (a row masked out by budget trimming drops out of the loss and its count)."""
    has_tokens = lambda side: jnp.sum(batch[f"{side}_loss_mask"], axis=-1) > 0  # noqa: E731
    return batch["pair_mask"].astype(jnp.float32) * (has_tokens("chosen") & has_tokens("rejected"))


def mean_metric(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted sum, weight total) of per-pair values, for exact accumulation over micro-batches."""
    return jnp.sum(jnp.where(weights > 0, values * weights, 0.0)), jnp.sum(weights)
