"""SF-SFT / CF-SFT: sequence-level distillation from a same-family or cross-family teacher.

Data: the teacher (`teacher`: any source `forgetjax.load` accepts, or "self" for the student's own start model)
samples `n_samples` completions per training prompt with forgetjax's sampler (chat prompts rendered with the
TEACHER's template); the domain verifier keeps the correct ones (finished ones only, with `require_finished`;
identical texts of one prompt once, with `dedupe`; at most `max_kept_per_prompt`). The kept texts are re-tokenised
with the STUDENT's tokenizer and chat template and trained on with cross-entropy, which is what makes a teacher with
another vocabulary usable. Counts (samples, correct, kept, keep rate, prompt coverage, FLOPs) are recorded in
`<out_dir>/data/<method>/stats.json`; generation is cached per chunk and reused on resume.

Teacher stage: the teacher's sampled and verified completions depend only on the teacher, its dtype, the domain's
problems, the prompts and the sampling and verifier settings (`teacher_stage_key`), not on the student or the
seed. A study therefore generates them once per key in a shared stage directory (`build_teacher_stage`, run by the
study runner through `forgetjax.distributed.run_once`) and passes it as `teacher_data`; a cell with `teacher_data`
reads the stage's rows instead of loading the teacher, and still selects, re-tokenises and charges the stage's
generation FLOPs to its own budget (the cost of the method, as if it had generated them itself).

`sf_sft` requires the teacher's tokenizer to equal the student's (same family) and may add a token-level KD term
with weight `kd_weight`. Materialising teacher logits [B, T, V] for every example is avoided: once, after sampling,
the teacher runs over each kept sequence (student tokenisation = teacher tokenisation) and its top-`kd_top_k`
token ids and log-probs at every completion position are cached (`data/<method>/topk/topk.npz`). The KD term is the
generalised JSD (`kd_beta`; 0 = forward KL(teacher || student), 1 = reverse KL) between the teacher's and the
student's distributions both RESTRICTED to the teacher's top-k support and renormalised there, at temperature
`kd_temperature`:

    p_k = softmax(teacher_logp[top-k] / tau),   q_k = softmax(student_logits[top-k ids] / tau),   JSD_beta(p || q).

Approximation: probability mass outside the teacher's top-k (logged as `1 - kd_teacher_mass`) is ignored, and the
student is only asked to match the teacher's relative preferences on the support (its mass outside the support is
left to the cross-entropy term). With k = V this is the exact full-vocabulary loss of `forgetjax.losses.distill`.
The total loss is (CE_sum + kd_weight * KD_sum) / completion tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from forgetjax.config import config_hash
from forgetjax.data.tokenize import ExampleEncoder
from forgetjax.distributed import is_writer
from forgetjax.envs import load_training_problems
from forgetjax.errors import UserError
from forgetjax.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from forgetjax.losses.distill import generalized_jsd
from forgetjax.losses.token import LossOutput, check_rank, masked_sum_count, nll_loss
from forgetjax.methods.registry import register
from forgetjax.methods.sft import (
    Prepared,
    SFTDataArgs,
    SFTMethod,
    domain_settings,
    sft_record,
)
from forgetjax.methods.teacher_data import (
    DataCache,
    GenerationArgs,
    TeacherTopK,
    cached_records,
    generation_prompt,
    log,
    sample_and_verify,
    sampled_lengths,
    settings_difference,
    teacher_topk,
)
from forgetjax.models.vocab import logit_stats, token_stats

SELF_TEACHER = "self"
TEACHER_STAGE_VERSION = 1  # bump when the generation code changes what a teacher stage holds
TEACHER_STAGE_ARGS = ("teacher", "system", "n_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                      "prompts_per_chunk", "generation_seed", "math_timeout_s", "code_timeout_s")
TEACHER_ROWS_FILE = "rows.jsonl"
TEACHER_STAGE_FILE = "stage.json"


# ----------------------------------------------------------------------------------------------------------------
# Sparse KD on the teacher's top-k support
# ----------------------------------------------------------------------------------------------------------------


def topk_kd_loss(student_logprobs: jax.Array, teacher_logprobs: jax.Array, mask: jax.Array, beta: float = 0.0,
                 temperature: float = 1.0) -> LossOutput:
    """Token-weighted mean generalised JSD between teacher and student restricted to the teacher's top-k support
    (both renormalised there; see the module docstring). student_logprobs / teacher_logprobs [B, T, K]: log-probs
    at the teacher's top-k ids (the student's may be logits: only their differences count); mask [B, T].
    Metrics: `kd` (same as the loss), `kd_teacher_mass` (teacher probability on its support, before
    renormalisation)."""
    check_rank("student_logprobs", student_logprobs, 3)
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.shape[:2] != jnp.shape(mask):
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)}, teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} and mask {tuple(jnp.shape(mask))} must agree on [B, T] "
                         "(and K)")
    if not 0.0 <= beta <= 1.0 or not temperature > 0:
        raise ValueError(f"kd beta must be in [0, 1] and temperature > 0, got {beta}, {temperature}")
    student_log_q = jax.nn.log_softmax(student_logprobs.astype(jnp.float32) / temperature, axis=-1)
    teacher_logprobs = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))
    teacher_log_p = jax.nn.log_softmax(teacher_logprobs / temperature, axis=-1)
    kd_sum, count = masked_sum_count(generalized_jsd(teacher_log_p, student_log_q, beta), mask)
    mass_sum, _ = masked_sum_count(jnp.sum(jnp.exp(teacher_logprobs), axis=-1), mask)
    return kd_sum, count, {"kd": (kd_sum, count), "kd_teacher_mass": (mass_sum, count)}


def sparse_kd_loss(student_logits: jax.Array, teacher_ids: jax.Array, teacher_logprobs: jax.Array,
                   mask: jax.Array, beta: float = 0.0, temperature: float = 1.0) -> LossOutput:
    """:func:`topk_kd_loss` of student logits [B, T, V] given whole; teacher_ids / teacher_logprobs [B, T, K]."""
    check_rank("student_logits", student_logits, 3)
    check_rank("teacher_ids", teacher_ids, 3)
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)}, teacher_logprobs {tuple(teacher_logprobs.shape)} "
                         f"and student_logits {tuple(student_logits.shape)} must agree on [B, T] (and K)")
    student = logit_stats(student_logits, gather_ids=teacher_ids).gathered
    return topk_kd_loss(student, teacher_logprobs, mask, beta=beta, temperature=temperature)


# ----------------------------------------------------------------------------------------------------------------
# Sample selection
# ----------------------------------------------------------------------------------------------------------------


def select_kept(rows: list[dict[str, Any]], *, require_finished: bool, dedupe: bool,
                max_per_prompt: int | None) -> list[dict[str, Any]]:
    """The verified-correct samples to train on, in sample order."""
    kept, seen, per_prompt = [], set(), Counter()
    for row in rows:
        if not row["correct"] or (require_finished and not row["finished"]) or not row["text"].strip():
            continue
        key = (row["prompt_index"], row["text"].strip())
        if dedupe and key in seen:
            continue
        if max_per_prompt is not None and per_prompt[row["prompt_index"]] >= max_per_prompt:
            continue
        seen.add(key)
        per_prompt[row["prompt_index"]] += 1
        kept.append(row)
    return kept


def sample_stats(rows: list[dict[str, Any]], kept: list[dict[str, Any]], prompts: int) -> dict[str, Any]:
    """Counts and rates of a sampling + filtering stage."""
    samples = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {
        "prompts": prompts, "samples": samples, "finished": sum(r["finished"] for r in rows), "correct": correct,
        "kept": len(kept), "keep_rate": len(kept) / samples if samples else 0.0,
        "correct_rate": correct / samples if samples else 0.0,
        "prompts_with_kept": len({r["prompt_index"] for r in kept}),
        "prompt_coverage": len({r["prompt_index"] for r in kept}) / prompts if prompts else 0.0,
        "generated_tokens": int(sum(r["completion_tokens"] for r in rows)),
        "status_counts": dict(Counter(r["status"] for r in rows)),
    }


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Whether two tokenizers map every token string to the same id (logits are then aligned)."""
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def vocabulary_digest(tokenizer) -> str:
    """sha256 of a tokenizer's token -> id map: equal digests mean aligned logits (`same_vocabulary`)."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The teacher stage: generations shared by every cell with the same teacher, domain and sampling settings
# ----------------------------------------------------------------------------------------------------------------


def resolved_teacher_dtype(teacher_dtype: str, compute_dtype: str) -> str:
    """The dtype the teacher runs in: `teacher_dtype`, or the student's compute dtype for "auto"."""
    return compute_dtype if teacher_dtype == "auto" else teacher_dtype


def teacher_stage_key(method_args: Mapping[str, Any], domain: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """Everything a teacher stage's generations depend on: the teacher and its dtype, the domain's problem source
    (as configured), the prompts' system message, the sampling and verifier settings and the stage format version.
    `method_args` are a distillation method's resolved arguments; `domain` a DomainConfig as a dict."""
    return {"version": TEACHER_STAGE_VERSION, "dtype": dtype, "domain": dict(domain),
            **{name: method_args[name] for name in TEACHER_STAGE_ARGS}}


def teacher_stage_id(key: Mapping[str, Any]) -> str:
    """The stage's directory name: teacher name, domain and a hash of the whole key."""
    name = "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(str(key["teacher"])).name.lower())
    return f"teacher-{name}-{key['domain']['name']}-{config_hash(dict(key))[:10]}"


def teacher_rows(model, tokenizer, problems, args: DistillArgs, domain: str, cache: DataCache, mesh
                 ) -> list[dict[str, Any]]:
    """The teacher's sampled and verified completions of `problems`, prompted with its own chat template (chunks
    cached in `cache`)."""
    with args.make_verifier(domain) as verifier:
        prompts = [generation_prompt(tokenizer, p.prompt, args.system) for p in problems]
        return sample_and_verify(model, tokenizer, prompts, [p.reference for p in problems], verifier,
                                 args.generation_settings(), cache, mesh=mesh)


def build_teacher_stage(directory: str | Path, args: DistillArgs, domain, dtype: str) -> dict[str, Any]:
    """Sample and verify the teacher's completions of the domain's problems into `directory` (chunks written as they
    finish, so a killed build resumes), then `rows.jsonl` and `stage.json` (key, vocabulary digest, counts and
    generation FLOPs). The teacher is loaded in `dtype`, its weights sharded over every device (fsdp)."""
    import forgetjax
    from forgetjax.sharding import make_mesh

    directory = Path(directory)
    key = teacher_stage_key(dataclasses.asdict(args), dataclasses.asdict(domain), dtype)
    cache = DataCache(directory.parent, directory.name, key)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1) if jax.device_count() > 1 else None
    log(f"teacher stage {directory.name}: loading {args.teacher} ({dtype}, sharded over {jax.device_count()} "
        "devices)")
    model, tokenizer = forgetjax.load(args.teacher, dtype=jnp.dtype(dtype), mesh=mesh)
    problems = load_training_problems(domain)
    rows = teacher_rows(model, tokenizer, problems, args, domain.name, cache, mesh)
    stage = {"key": key, "vocabulary": vocabulary_digest(tokenizer), "prompts": len(problems), "samples": len(rows),
             "generation_flops": model.config.forward_flops(sampled_lengths(rows))}
    if is_writer():
        write_jsonl_atomic(directory / TEACHER_ROWS_FILE, rows)
        write_json_atomic(directory / TEACHER_STAGE_FILE, stage)
    return stage


def read_teacher_stage(directory: str | Path, key: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, stage.json) of a completed teacher stage, checked to be the stage `key` describes."""
    directory = Path(directory)
    stage_file = directory / TEACHER_STAGE_FILE
    if not stage_file.is_file():
        raise UserError(f"method_args.teacher_data: {directory} is not a completed teacher stage (no "
                        f"{TEACHER_STAGE_FILE}); the study runner builds it before the cell")
    stage = json.loads(stage_file.read_text())
    if stage.get("key") != json.loads(json.dumps(dict(key))):
        changed = ", ".join(settings_difference(stage.get("key") or {}, json.loads(json.dumps(dict(key)))))
        raise UserError(f"method_args.teacher_data: {directory} was generated with other settings (changed: "
                        f"{changed}) than this cell's")
    return read_jsonl(directory / TEACHER_ROWS_FILE), stage


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistillArgs(GenerationArgs, SFTDataArgs):
    teacher: str = "smollm2-135m-instruct"  # any forgetjax.load source, or "self" (the student's start model)
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: the student's compute dtype
    teacher_data: str | None = None  # a teacher stage directory (set by the study runner); None: generate here
    n_samples: int = 4
    temperature: float = 0.8
    dedupe: bool = True
    max_kept_per_prompt: int | None = None
    kd_weight: float = 0.0  # sf_sft only: weight of the sparse top-k KD term
    kd_top_k: int = 16
    kd_beta: float = 0.0  # generalised JSD: 0 = forward KL(teacher || student), 1 = reverse KL
    kd_temperature: float = 1.0
    kd_rows_per_forward: int = 8

    def validate(self):
        SFTDataArgs.validate(self)
        GenerationArgs.validate(self)
        if self.kd_weight < 0 or self.kd_top_k < 1 or not 0 <= self.kd_beta <= 1 or self.kd_temperature <= 0:
            raise ValueError("kd_weight must be >= 0, kd_top_k >= 1, kd_beta in [0, 1] and kd_temperature > 0")
        if self.max_kept_per_prompt is not None and self.max_kept_per_prompt < 1:
            raise ValueError(f"max_kept_per_prompt must be >= 1 or null, got {self.max_kept_per_prompt}")
        if self.kd_rows_per_forward < 1:
            raise ValueError(f"kd_rows_per_forward must be >= 1, got {self.kd_rows_per_forward}")


class TeacherDistillSFT(SFTMethod):
    """Sequence-level distillation (+ optional sparse KD for same-family teachers)."""

    def __init__(self, name: str, args: DistillArgs, domain, *, same_family: bool):
        super().__init__(name, args, domain)
        self.same_family = same_family
        if args.kd_weight > 0 and not same_family:
            raise ValueError(f"{name}: method_args.kd_weight > 0 needs a same-family teacher (same tokenizer); "
                             "cross-family teachers have another vocabulary, so use sf_sft for token-level KD")

    def loss(self, model, batch: dict, rng: jax.Array):
        args: DistillArgs = self.args
        kd = args.kd_weight > 0
        stats = token_stats(model, batch["input_ids"], batch["attention_mask"], batch["positions"],
                            batch["segment_ids"], targets=batch["targets"], argmax=True,
                            gather_ids=batch["kd_ids"] if kd else None)
        ce_sum, count, metrics = nll_loss(stats.logprobs, stats.argmax == batch["targets"], batch["loss_mask"])
        if not kd:
            return ce_sum, count, metrics
        kd_sum, _, kd_metrics = topk_kd_loss(stats.gathered, batch["kd_logprobs"], batch["loss_mask"],
                                             beta=args.kd_beta, temperature=args.kd_temperature)
        metrics.update(kd_metrics)
        return ce_sum + args.kd_weight * kd_sum, count, metrics

    def _load_teacher(self, trainer):
        args: DistillArgs = self.args
        if args.teacher == SELF_TEACHER:
            return trainer.current_model(), trainer.tokenizer
        import forgetjax

        dtype = trainer.current_model().dtype if args.teacher_dtype == "auto" else jnp.dtype(args.teacher_dtype)
        log(f"{self.name}: loading teacher {args.teacher} ({jnp.dtype(dtype).name}, sharded on the trainer's mesh)")
        return forgetjax.load(args.teacher, dtype=dtype, mesh=trainer.mesh)

    def _check_family(self, same: bool) -> bool:
        """`same` (teacher and student share a vocabulary), checked against the method's family."""
        if self.same_family and not same:
            raise ValueError(f"{self.name}: teacher {self.args.teacher!r} has a different tokenizer than the "
                             "student; sf_sft is for same-family teachers, use cf_sft for a cross-family teacher")
        return same

    def prepare(self, trainer) -> Prepared:
        args: DistillArgs = self.args
        settings = {"method": self.name, "teacher": args.teacher, "teacher_dtype": args.teacher_dtype,
                    "domain": domain_settings(self.domain), "system": args.system,
                    "generation": dataclasses.asdict(args.generation_settings()),
                    "require_finished": args.require_finished, "dedupe": args.dedupe,
                    "max_kept_per_prompt": args.max_kept_per_prompt, "teacher_data": args.teacher_data}
        cache = DataCache(self.data_dir(trainer), self.name, settings)
        teacher = functools.cache(lambda: self._load_teacher(trainer))

        def build():
            problems = load_training_problems(self.domain)
            if args.teacher_data:
                rows, same, generation_flops = self._stage_rows(trainer)
            else:
                rows, same, generation_flops = self._generate_rows(trainer, teacher, problems, cache)
            kept = select_kept(rows, require_finished=args.require_finished, dedupe=args.dedupe,
                               max_per_prompt=args.max_kept_per_prompt)
            records = [sft_record(problems[r["prompt_index"]].prompt, r["text"], args.system,
                                  id=problems[r["prompt_index"]].id, sample=r["sample"]) for r in kept]
            stats = {"teacher": args.teacher, "same_tokenizer": same, **sample_stats(rows, kept, len(problems)),
                     "generation_flops": generation_flops, "teacher_data": args.teacher_data}
            return records, stats

        records, stats = cached_records(cache, build)
        log(f"{self.name}: kept {stats['kept']}/{stats['samples']} teacher samples (keep rate "
            f"{stats['keep_rate']:.3f}, {stats['prompts_with_kept']}/{stats['prompts']} prompts covered)")
        prepared = Prepared(records, extra_flops={"teacher": stats["generation_flops"]})
        if args.kd_weight > 0 and records:
            topk, kd_flops = self._teacher_topk(trainer, cache, records, teacher)
            prepared.topk = topk
            prepared.extra_flops["teacher"] += kd_flops
        return prepared

    def _generate_rows(self, trainer, teacher, problems, cache: DataCache) -> tuple[list[dict], bool, float]:
        """(rows, same tokenizer, generation FLOPs): the teacher samples and verifies here, cached in `cache`."""
        args: DistillArgs = self.args
        model, tokenizer = teacher()
        same = self._check_family(same_vocabulary(tokenizer, trainer.tokenizer))
        rows = teacher_rows(model, tokenizer, problems, args, self.domain.name, cache, trainer.mesh)
        return rows, same, model.config.forward_flops(sampled_lengths(rows))

    def _stage_rows(self, trainer) -> tuple[list[dict], bool, float]:
        """(rows, same tokenizer, generation FLOPs) from the teacher stage `teacher_data`, without the teacher."""
        args: DistillArgs = self.args
        dtype = resolved_teacher_dtype(args.teacher_dtype, trainer.cfg.dtype)
        key = teacher_stage_key(dataclasses.asdict(args), dataclasses.asdict(self.domain), dtype)
        rows, stage = read_teacher_stage(args.teacher_data, key)
        same = self._check_family(stage["vocabulary"] == vocabulary_digest(trainer.tokenizer))
        return rows, same, stage["generation_flops"]

    def _teacher_topk(self, trainer, cache: DataCache, records: list[dict], teacher) -> tuple[TeacherTopK, float]:
        """Teacher top-k distributions on the student-tokenised kept records (cached in `<stage>/topk/`)."""
        args: DistillArgs = self.args
        settings = {"top_k": args.kd_top_k, "max_length": trainer.cfg.max_length, "chat": args.chat,
                    "truncation": args.truncation, "records": len(records)}
        stage = DataCache(cache.directory, "topk", settings)
        path = stage.path("topk.npz")
        stats = stage.read_json("stats.json")
        if stats is not None and path.is_file():
            return TeacherTopK.load(path), stats["kd_flops"]
        model, tokenizer = teacher()
        self._check_family(same_vocabulary(tokenizer, trainer.tokenizer))
        encoder = ExampleEncoder(trainer.tokenizer, max_length=trainer.cfg.max_length, chat=args.chat,
                                 truncation=args.truncation)
        examples = [e for e in encoder.encode_many(records) if e is not None]
        topk = teacher_topk(model, examples, args.kd_top_k, vocab_limit=trainer.model_config.vocab_size,
                            rows_per_forward=args.kd_rows_per_forward, chunk=trainer.cfg.logit_chunk)
        kd_flops = model.config.forward_flops(len(e) for e in examples)
        topk.save(path)
        stage.write_json("stats.json", {"examples": len(examples), "positions": int(topk.ids.shape[0]),
                                        "kd_flops": kd_flops})
        return topk, kd_flops


@register("sf_sft", DistillArgs, "same-family teacher distillation: SFT on verified teacher samples (+ sparse KD)")
def build_sf_sft(args: DistillArgs, domain) -> TeacherDistillSFT:
    return TeacherDistillSFT("sf_sft", args, domain, same_family=True)


@register("cf_sft", DistillArgs, "cross-family teacher distillation: SFT on verified, re-tokenised teacher samples")
def build_cf_sft(args: DistillArgs, domain) -> TeacherDistillSFT:
    return TeacherDistillSFT("cf_sft", args, domain, same_family=False)


__all__ = ["DistillArgs", "TeacherDistillSFT", "same_vocabulary", "select_kept", "sparse_kd_loss", "topk_kd_loss"]
