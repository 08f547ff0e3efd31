"""SELF-SDFT: self-distillation fine-tuning (Yang et al., 2024): the model rewrites each ground-truth solution in
its own words, and is fine-tuned on the rewrites, which stay close to its own output distribution.

For every training problem the start model (greedy by default) answers a rewrite prompt (`rewrite_template` with
`{question}`: the problem's prompt, `{reference}`: its ground-truth completion, see `sft.ground_truth_completion`).
A rewrite is kept if it passes the domain verifier, finished within `max_new_tokens` (with `require_finished`) and
contains none of the `leak_phrases` (case-insensitive; phrases that show the model copying or talking about the
reference instead of solving the problem, listed in LEAK_PHRASES). Otherwise the original ground truth is used. The
SFT prompt is the plain problem prompt (never the reference). Counts (rewrite keep rate, fallback reasons) are
recorded in `<out_dir>/data/self_sdft/stats.json`; generation is cached per chunk and reused on resume.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from forgetjax.envs import load_training_problems
from forgetjax.methods.registry import register
from forgetjax.methods.sft import (
    Prepared,
    SFTDataArgs,
    SFTMethod,
    domain_settings,
    ground_truth_completion,
    sft_record,
)
from forgetjax.methods.teacher_data import (
    DataCache,
    GenerationArgs,
    cached_records,
    generation_prompt,
    log,
    sample_and_verify,
    sampled_lengths,
)

QUESTION, REFERENCE = "{question}", "{reference}"
REWRITE_TEMPLATE = (
    "{question}\n\n"
    "For reference, here is a correct solution:\n\n{reference}\n\n"
    "Now write your own solution to the problem above, step by step and in your own words, as if you were solving "
    "it for the first time. Do not mention that you were shown a solution. End with the final answer in the format "
    "the problem asks for."
)
# Phrases that betray a rewrite referring to the shown solution rather than solving the problem.
LEAK_PHRASES = (
    "reference solution", "reference answer", "the reference", "as given", "given solution", "provided solution",
    "the provided answer", "solution provided", "solution above", "original solution", "the solution you",
    "your solution", "the shown solution", "according to the solution", "in my own words", "in your own words",
    "rewrite", "rewritten",
)


def find_leak(text: str, phrases: tuple[str, ...] | list[str] = LEAK_PHRASES) -> str | None:
    """The first leak phrase found in `text` (case-insensitive), or None."""
    lowered = text.lower()
    return next((phrase for phrase in phrases if phrase.lower() in lowered), None)


def rewrite_prompt(template: str, question: str, reference: str) -> str:
    """The template with its placeholders filled (no str.format: prompts contain braces such as \\boxed{})."""
    return template.replace(QUESTION, question).replace(REFERENCE, reference)


def choose_rewrite(rows: list[dict[str, Any]], *, require_finished: bool, leak_phrases) -> tuple[str | None, str]:
    """(the first acceptable rewrite among one problem's samples, or None; the reason of the last rejection or
    "kept")."""
    reason = "no_sample"
    for row in rows:
        if require_finished and not row["finished"]:
            reason = "unfinished"
        elif not row["correct"]:
            reason = "incorrect"
        elif find_leak(row["text"], leak_phrases) is not None:
            reason = "leak"
        elif not row["text"].strip():
            reason = "empty"
        else:
            return row["text"], "kept"
    return None, reason


@dataclasses.dataclass
class SdftArgs(GenerationArgs, SFTDataArgs):
    rewrite_template: str = REWRITE_TEMPLATE
    leak_phrases: list[str] = dataclasses.field(default_factory=lambda: list(LEAK_PHRASES))

    def sampler_rows(self, batch_size: int) -> int:
        """Rows one call of the model's sampler decodes: prompts_per_chunk rewrite prompts x n_samples."""
        return self.prompts_per_chunk * self.n_samples

    def validate(self):
        SFTDataArgs.validate(self)
        GenerationArgs.validate(self)
        for placeholder in (QUESTION, REFERENCE):
            if placeholder not in self.rewrite_template:
                raise ValueError(f"rewrite_template must contain the placeholder {placeholder}")


class SelfDistillSFT(SFTMethod):
    def prepare(self, trainer) -> Prepared:
        args: SdftArgs = self.args
        settings = {"method": self.name, "domain": domain_settings(self.domain), "system": args.system,
                    "rewrite_template": args.rewrite_template, "leak_phrases": list(args.leak_phrases),
                    "generation": dataclasses.asdict(args.generation_settings()),
                    "require_finished": args.require_finished}
        cache = DataCache(self.data_dir(trainer), self.name, settings)

        def build():
            problems = load_training_problems(self.domain)
            originals = [ground_truth_completion(p) for p in problems]
            prompts = [generation_prompt(trainer.tokenizer, rewrite_prompt(args.rewrite_template, p.prompt, gt),
                                         args.system) for p, gt in zip(problems, originals)]
            model = trainer.current_model()
            verifier = args.make_verifier(self.domain.name)
            try:
                rows = sample_and_verify(model, trainer.tokenizer, prompts, [p.reference for p in problems],
                                         verifier, args.generation_settings(), cache, mesh=trainer.mesh)
            finally:
                verifier.close()
            by_prompt: list[list[dict]] = [[] for _ in problems]
            for row in rows:
                by_prompt[row["prompt_index"]].append(row)
            records, reasons = [], Counter()
            for problem, original, samples in zip(problems, originals, by_prompt):
                rewrite, reason = choose_rewrite(samples, require_finished=args.require_finished,
                                                 leak_phrases=args.leak_phrases)
                reasons[reason] += 1
                records.append(sft_record(problem.prompt, rewrite if rewrite is not None else original, args.system,
                                          id=problem.id, origin="rewrite" if rewrite is not None else "original"))
            kept = reasons["kept"]
            stats = {"problems": len(problems), "samples": len(rows), "rewrites_kept": kept,
                     "rewrite_keep_rate": kept / len(problems) if problems else 0.0,
                     "fallbacks": len(problems) - kept, "reasons": dict(reasons),
                     "correct_rate": sum(r["correct"] for r in rows) / len(rows) if rows else 0.0,
                     "generated_tokens": int(sum(r["completion_tokens"] for r in rows)),
                     "generation_flops": model.config.forward_flops(sampled_lengths(rows))}
            return records, stats

        records, stats = cached_records(cache, build)
        log(f"{self.name}: kept {stats['rewrites_kept']}/{stats['problems']} rewrites (keep rate "
            f"{stats['rewrite_keep_rate']:.3f}; fallbacks: {stats['reasons']})")
        return Prepared(records, extra_flops={"rollout": stats["generation_flops"]})


@register("self_sdft", SdftArgs, "self-distillation fine-tuning: SFT on the model's verified rewrites of the ground "
                                 "truth (original solution as fallback)")
def build_self_sdft(args: SdftArgs, domain) -> SelfDistillSFT:
    return SelfDistillSFT("self_sdft", args, domain)


__all__ = ["LEAK_PHRASES", "REWRITE_TEMPLATE", "SdftArgs", "SelfDistillSFT", "choose_rewrite", "find_leak",
           "rewrite_prompt"]
