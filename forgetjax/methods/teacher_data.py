"""Data that SFT-family methods generate before training: sampled and verified completions, teacher top-k
distributions, and the resumable on-disk cache they live in.

Everything here runs once, before the first training step, and is cached under `<out_dir>/data/<stage>/`:

  settings.json   what produced the data (teacher, sampling settings, problems); a later run with different settings
                  in the same directory is an error instead of silently mixing data
  chunks/NNNNN.jsonl  generation + verification results of one chunk of prompts, written as soon as the chunk is
                  done, so a run killed during generation resumes at the next chunk
  records.jsonl   the final SFT records;  stats.json  counts (keep rate, tokens, FLOPs); topk.npz  teacher top-k

All files are written atomically (temp file + rename). FLOPs outside the train step are counted with
`ModelConfig.forward_flops` (real tokens only, each sequence at its own length); a sampled row pays for its own
prefill (the sampler repeats the prompt for each of the n samples).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from forgetjax.data.tokenize import END_OF_TURN_TOKENS, TokenizedExample
from forgetjax.distributed import is_writer, only_on_writer, to_host
from forgetjax.errors import UserError
from forgetjax.io import atomic_open, read_jsonl, write_json_atomic, write_jsonl_atomic
from forgetjax.models.vocab import token_stats
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.domains import DEFAULT_MAX_NEW_TOKENS

CHUNK_DIGITS = 5


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two settings dicts (missing on one side counts as different)."""
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def changed_values(old: Any, new: Any, key: str = "", limit: int = 3) -> list[str]:
    """Up to `limit` 'dotted.key: old -> new' lines for the leaves that differ between two settings values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        lines: list[str] = []
        for name in sorted(set(old) | set(new)):
            lines += changed_values(old.get(name), new.get(name), f"{key}.{name}" if key else str(name), limit)
        return lines[:limit]
    return [] if old == new else [f"{key}: {json.dumps(old)[:80]} -> {json.dumps(new)[:80]}"]


class DataCache:
    """One stage directory `<root>/<name>` guarded by the settings that produced it (written by the writer
    process only; the others compute the same data and keep it in memory)."""

    def __init__(self, root: str | Path, name: str, settings: Mapping[str, Any]):
        self.directory = Path(root) / name
        self.settings = json.loads(json.dumps(dict(settings)))
        settings_path = self.directory / "settings.json"
        if settings_path.is_file():
            old = json.loads(settings_path.read_text())
            changed = settings_difference(old, self.settings)
            if changed:
                details = "; ".join(changed_values(old, self.settings))
                raise UserError(
                    f"{self.directory} holds data generated with different settings (changed: {', '.join(changed)}): "
                    f"{details}; use a new train.out_dir, or delete that directory to regenerate")
        elif is_writer():
            write_json_atomic(settings_path, self.settings)

    def path(self, name: str) -> Path:
        return self.directory / name

    def chunk_path(self, index: int) -> Path:
        return self.directory / "chunks" / f"{index:0{CHUNK_DIGITS}d}.jsonl"

    def read_jsonl(self, path: Path) -> list[dict[str, Any]] | None:
        return read_jsonl(path) if path.is_file() else None

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    @only_on_writer
    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.path(name), obj)

    @only_on_writer
    def write_jsonl(self, name: str, rows: Sequence[Any]) -> None:
        write_jsonl_atomic(self.path(name), rows)


def cached_records(cache: DataCache, build: Callable[[], tuple[list[dict], dict]]) -> tuple[list[dict], dict]:
    """(records, stats) from the cache, or from `build()` (then written: records first, stats last, so stats.json
    marks a complete stage)."""
    stats = cache.read_json("stats.json")
    records = cache.read_jsonl(cache.path("records.jsonl"))
    if stats is not None and records is not None:
        return records, stats
    records, stats = build()
    cache.write_jsonl("records.jsonl", records)
    cache.write_json("stats.json", stats)
    return records, stats


def log(message: str) -> None:
    print(f"forgetjax: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Sampling + verification
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationArgs:
    """Method arguments for sampling and verifying completions (shared by teacher distillation and SDFT)."""

    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    prompts_per_chunk: int = 16
    generation_seed: int = 0
    require_finished: bool = True  # drop completions cut off by max_new_tokens
    reward_workers: int = 2
    math_timeout_s: float = 5.0
    code_timeout_s: float = 10.0

    def generation_settings(self) -> "GenerationSettings":
        return GenerationSettings(n=self.n_samples, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  max_new_tokens=self.max_new_tokens, prompts_per_chunk=self.prompts_per_chunk,
                                  seed=self.generation_seed)

    def validate(self):
        self.generation_settings()
        if self.reward_workers < 1 or self.math_timeout_s <= 0 or self.code_timeout_s <= 0:
            raise ValueError("reward_workers must be >= 1 and math_timeout_s, code_timeout_s > 0")

    def make_verifier(self, domain: str) -> "Verifier":
        return Verifier(domain, workers=self.reward_workers, math_timeout_s=self.math_timeout_s,
                        code_timeout_s=self.code_timeout_s)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled: n per prompt, sampling filters, length budget, chunking and seed."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    prompts_per_chunk: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.prompts_per_chunk < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n_samples, prompts_per_chunk and max_new_tokens must be >= 1, got n={self.n}, "
                             f"prompts_per_chunk={self.prompts_per_chunk}, max_new_tokens={self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")


def end_of_turn_ids(tokenizer, model_config) -> tuple[int, ...]:
    """Stop tokens: the model's EOS ids, the tokenizer's EOS and every known end-of-turn token in the vocabulary."""
    ids = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return tuple(sorted(ids))


def chunk_seed(seed: int, chunk: int) -> int:
    """An independent 31-bit sampling seed per (seed, chunk), the same on every machine."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0] & 0x7FFFFFFF)


class Verifier:
    """The methods' one wrapper around the domain verifiers: a RewardPool started on first use; close() (or a with
    block) ends it. `domain` is the domain `details` scores in."""

    def __init__(self, domain: str | None = None, *, workers: int = 2, math_timeout_s: float = 5.0,
                 code_timeout_s: float = 10.0):
        self.domain = domain
        self.kwargs = dict(max_workers=workers, math_timeout_s=math_timeout_s, code_timeout_s=code_timeout_s)
        self._pool = None

    def details(self, completions: Sequence[str], references: Sequence[Any]):
        """One RewardDetail per (completion, reference) of this verifier's domain."""
        if self.domain is None:
            raise ValueError("Verifier.details needs the verifier's domain")
        return self._score([(self.domain, c, r) for c, r in zip(completions, references)])

    def verdicts(self, problems: Sequence[Any], completions: Sequence[str]) -> list[bool | None]:
        """Each completion checked against its problem's domain and reference: True or False, None when the check
        timed out."""
        details = self._score([(p.domain, c, p.reference) for p, c in zip(problems, completions)])
        return [None if detail.timed_out else bool(detail.correct) for detail in details]

    def _score(self, items: list[tuple[str, str, Any]]):
        if not items:
            return []
        if self._pool is None:
            from forgetjax.verifiers.rewards import RewardPool

            self._pool = RewardPool(**self.kwargs)
        return self._pool.score_details(items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def generation_prompt(tokenizer, prompt: str, system: str | None) -> list[dict[str, str]] | str:
    """Chat messages when the generating model's tokenizer has a chat template, else the plain prompt text."""
    if not getattr(tokenizer, "chat_template", None):
        if system is not None:
            raise ValueError("a system message needs a tokenizer with a chat template")
        return prompt
    return user_message(prompt, system)


def sample_and_verify(model, tokenizer, prompts: Sequence[list[dict[str, str]] | str], references: Sequence[Any],
                      verifier: Verifier, settings: GenerationSettings, cache: DataCache, *, mesh=None
                      ) -> list[dict[str, Any]]:
    """Sample `settings.n` completions per prompt (chat messages, or plain text for models without a chat template)
    and verify each; one row per sample, in prompt order:
    {prompt_index, sample, text, finished, prompt_tokens, completion_tokens, correct, status}.

    Chunks of `prompts_per_chunk` prompts are generated, verified and written to the cache one at a time; chunks
    already on disk are read back instead of generated again."""
    from forgetjax.sampling.sampler import Sampler, SamplingParams

    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    sampler = None
    rows: list[dict[str, Any]] = []
    chunks = range(0, len(prompts), settings.prompts_per_chunk)
    for chunk, start in enumerate(chunks):
        path = cache.chunk_path(chunk)
        cached = cache.read_jsonl(path)
        if cached is not None:
            rows.extend(cached)
            continue
        if sampler is None:
            sampler = Sampler(model, tokenizer, mesh=mesh)
            stop_ids = end_of_turn_ids(tokenizer, model.config)
        stop = min(start + settings.prompts_per_chunk, len(prompts))
        token_prompts = [sampler.encode_text(p) if isinstance(p, str) else sampler.encode_chat(p)
                         for p in prompts[start:stop]]
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k, n=settings.n, stop_token_ids=stop_ids,
                                seed=chunk_seed(settings.seed, chunk))
        completions = sampler.generate_tokens(token_prompts, params)
        chunk_references = [references[start + row // settings.n] for row in range(len(completions.texts))]
        details = verifier.details(completions.texts, chunk_references)
        chunk_rows = []
        for row, (text, detail) in enumerate(zip(completions.texts, details)):
            index = start + row // settings.n
            chunk_rows.append({"prompt_index": index, "sample": row % settings.n, "text": text,
                               "finished": bool(completions.finished[row]),
                               "prompt_tokens": len(token_prompts[row // settings.n]),
                               "completion_tokens": int(completions.lengths[row]),
                               "correct": bool(detail.correct), "status": detail.status})
        if is_writer():
            write_jsonl_atomic(path, chunk_rows)
        log(f"{cache.directory.name}: chunk {chunk + 1}/{len(chunks)} done "
            f"({sum(r['correct'] for r in chunk_rows)}/{len(chunk_rows)} verified)")
        rows.extend(chunk_rows)
    return rows


def sampled_lengths(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The tokens each sampled row passed through the model (its prefill plus its generated tokens), for
    `ModelConfig.forward_flops`."""
    return [r["prompt_tokens"] + r["completion_tokens"] for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# Teacher top-k distributions (sparse token-level KD)
# ----------------------------------------------------------------------------------------------------------------


def example_key(input_ids: np.ndarray) -> str:
    """Content key of a token sequence (how a batch segment finds its teacher distributions)."""
    return hashlib.sha1(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes()).hexdigest()


@dataclasses.dataclass
class TeacherTopK:
    """Teacher top-k next-token ids and log-probs for every completion position of each example.

    For an example of length L whose completion starts at index p, rows `offsets[i]:offsets[i + 1]` hold the teacher
    distribution at positions p - 1 ... L - 2 (the positions whose targets are the completion tokens)."""

    input_ids: np.ndarray    # [sum L] int32, examples back to back
    id_offsets: np.ndarray   # [N + 1]
    starts: np.ndarray       # [N] completion start p of each example
    ids: np.ndarray          # [sum (L - p), K] int32
    logprobs: np.ndarray     # [sum (L - p), K] float32
    offsets: np.ndarray      # [N + 1]

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @only_on_writer
    def save(self, path: str | Path) -> None:
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "TeacherTopK":
        with np.load(path) as data:
            return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})

    def lookup(self) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        """{example key: (completion start, ids [C, K], logprobs [C, K])}."""
        table = {}
        for i in range(len(self.starts)):
            ids = self.input_ids[self.id_offsets[i]:self.id_offsets[i + 1]]
            rows = slice(self.offsets[i], self.offsets[i + 1])
            table[example_key(ids)] = (int(self.starts[i]), self.ids[rows], self.logprobs[rows])
        return table


def _topk_fn(k: int, vocab_limit: int, chunk: int | None):
    @jax.jit
    def topk(model, input_ids, attention_mask):
        stats = token_stats(model, input_ids, attention_mask, chunk=chunk, top_k=k, top_k_limit=vocab_limit)
        return stats.top_logprobs, stats.top_ids

    return topk


def teacher_topk(teacher, examples: Sequence[TokenizedExample], k: int, *, vocab_limit: int | None = None,
                 rows_per_forward: int = 8, length_multiple: int = 64, chunk: int | None = None) -> TeacherTopK:
    """Run the teacher over each (student-tokenised, same vocabulary) example and keep its top-k log-probs at the
    completion positions. Only ids below `vocab_limit` (the student's vocabulary size) are candidates; their
    log-probs are still normalised over the teacher's whole vocabulary. Examples are right-padded in groups of
    `rows_per_forward` to a multiple of `length_multiple` (few compiled shapes); the teacher's logits are reduced
    `chunk` tokens at a time (`forgetjax.models.vocab`; None: the teacher's setting)."""
    vocab_limit = min(vocab_limit or teacher.config.vocab_size, teacher.config.vocab_size)
    if k < 1 or k > vocab_limit:
        raise ValueError(f"kd_top_k must be in [1, {vocab_limit}], got {k}")
    topk = _topk_fn(k, vocab_limit, chunk)
    starts = [int(np.argmax(e.completion_mask)) for e in examples]
    if any(start < 1 for start in starts):
        raise ValueError("every example needs at least one prompt token before its completion")
    ids_out: list[np.ndarray] = [np.zeros((0, k), np.int32)]
    logp_out: list[np.ndarray] = [np.zeros((0, k), np.float32)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for group_start in range(0, len(order), rows_per_forward):
        group = order[group_start:group_start + rows_per_forward]
        longest = max(len(examples[i]) for i in group)
        width = -(-longest // length_multiple) * length_multiple
        batch_ids = np.zeros((rows_per_forward, width), np.int32)
        batch_mask = np.zeros((rows_per_forward, width), bool)
        batch_mask[:, 0] = True  # filler rows: one attended token so attention is defined
        for row, i in enumerate(group):
            batch_ids[row, :len(examples[i])] = examples[i].input_ids
            batch_mask[row, :len(examples[i])] = True
        logp, ids = to_host(topk(teacher, batch_ids, batch_mask))
        for row, i in enumerate(group):
            span = slice(starts[i] - 1, len(examples[i]) - 1)
            results[i] = (np.asarray(ids[row, span], np.int32), np.asarray(logp[row, span], np.float32))
    for i in range(len(examples)):
        ids_out.append(results[i][0])
        logp_out.append(results[i][1])
    lengths = [len(e) for e in examples]
    spans = [length - start for length, start in zip(lengths, starts)]
    return TeacherTopK(
        input_ids=np.concatenate([e.input_ids for e in examples]).astype(np.int32) if examples
        else np.zeros((0,), np.int32),
        id_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        starts=np.asarray(starts, np.int64),
        ids=np.concatenate(ids_out), logprobs=np.concatenate(logp_out),
        offsets=np.concatenate([[0], np.cumsum(spans)]).astype(np.int64))


def kd_arrays(batch: Mapping[str, np.ndarray], table: Mapping[str, tuple[int, np.ndarray, np.ndarray]], k: int
              ) -> dict[str, np.ndarray]:
    """`kd_ids` / `kd_logprobs` [B, T, K] aligned with `targets` (position t holds the teacher's distribution over
    the token at targets[t]) for every segment of a (padded or packed) SFT batch; zeros elsewhere."""
    input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]
    b, t = input_ids.shape
    ids = np.zeros((b, t, k), np.int32)
    logprobs = np.zeros((b, t, k), np.float32)
    for row in range(b):
        for segment in np.unique(segment_ids[row]):
            if segment == 0:
                continue
            where = np.flatnonzero(segment_ids[row] == segment)
            first, last = int(where[0]), int(where[-1]) + 1
            key = example_key(input_ids[row, first:last])
            if key not in table:
                raise KeyError(f"batch row {row} segment {segment} has no teacher top-k entry (was the data "
                               "re-tokenised with other settings than the cached teacher distributions?)")
            start, seg_ids, seg_logp = table[key]
            ids[row, first + start - 1:last - 1] = seg_ids
            logprobs[row, first + start - 1:last - 1] = seg_logp
    return {"kd_ids": ids, "kd_logprobs": logprobs}
