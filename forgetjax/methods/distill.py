"""SF-SFT / CF-SFT: sequence-level distillation from a same-family or cross-family teacher.

Data: the teacher (`teacher`: any source `forgetjax.load` accepts, or "self" for the student's own start model)
samples `n_samples` completions per training prompt with forgetjax's sampler (chat prompts rendered with the
TEACHER's template); the domain verifier keeps the correct ones (finished ones only, with `require_finished`;
identical texts of one prompt once, with `dedupe`; at most `max_kept_per_prompt`). The kept texts are re-tokenised
with the STUDENT's tokenizer and chat template and trained on with cross-entropy, which is what makes a teacher with
another vocabulary usable. Counts (samples, correct, kept, keep rate, prompt coverage, FLOPs) are recorded in
`<out_dir>/data/<method>/stats.json`; generation is cached per chunk and reused on resume.

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
from collections import Counter
from typing import Any, Literal

import jax
import jax.numpy as jnp

from forgetjax.data.tokenize import ExampleEncoder
from forgetjax.envs import load_training_problems
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
    teacher_topk,
)
from forgetjax.models.vocab import logit_stats, token_stats

SELF_TEACHER = "self"


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


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistillArgs(GenerationArgs, SFTDataArgs):
    teacher: str = "smollm2-135m-instruct"  # any forgetjax.load source, or "self" (the student's start model)
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: the student's compute dtype
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

    def _check_family(self, teacher_tokenizer, student_tokenizer) -> bool:
        same = same_vocabulary(teacher_tokenizer, student_tokenizer)
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
                    "max_kept_per_prompt": args.max_kept_per_prompt}
        cache = DataCache(self.data_dir(trainer), self.name, settings)
        teacher = functools.cache(lambda: self._load_teacher(trainer))

        def build():
            problems = load_training_problems(self.domain)
            model, tokenizer = teacher()
            same = self._check_family(tokenizer, trainer.tokenizer)
            verifier = args.make_verifier(self.domain.name)
            try:
                prompts = [generation_prompt(tokenizer, p.prompt, args.system) for p in problems]
                rows = sample_and_verify(model, tokenizer, prompts, [p.reference for p in problems], verifier,
                                         args.generation_settings(), cache, mesh=trainer.mesh)
            finally:
                verifier.close()
            kept = select_kept(rows, require_finished=args.require_finished, dedupe=args.dedupe,
                               max_per_prompt=args.max_kept_per_prompt)
            records = [sft_record(problems[r["prompt_index"]].prompt, r["text"], args.system,
                                  id=problems[r["prompt_index"]].id, sample=r["sample"]) for r in kept]
            stats = {"teacher": args.teacher, "same_tokenizer": same, **sample_stats(rows, kept, len(problems)),
                     "generation_flops": model.config.forward_flops(sampled_lengths(rows))}
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
        self._check_family(tokenizer, trainer.tokenizer)
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
