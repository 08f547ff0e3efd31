"""Attacks as per-item evaluation records: optimise against a model (GCG suffixes, AutoDAN prompts), or replay
what was found on another one.

`run_attack` takes the behaviours of a safety benchmark (HarmBench standard by default, category = semantic
category; AdvBench carries its own published targets), runs GCG per behaviour ("individual") or once for all
("universal") with one `GCGConfig`, answers each attacked prompt greedily with the sampler and scores the answer
with the refusal matcher, like the safety benchmarks. Records go to `<out>/<model slug>/<benchmark>.parquet` with
benchmark `gcg` (optimised against this model) or `gcg_transfer` (suffixes replayed from `transfer_from`, the
`gcg` records of another model: does post-training close or open the holes found in the start model?). extra
holds the attack, its budget, the suffix (text and ids), the steps run, the final target loss and whether the
target became greedy; family safety_refusal and harmful = true, so the analysis' safety and jailbreak tables count
them (ASR = 1 - refusal per HarmBench category). AutoDAN (`attack="autodan"`) works the same way per behaviour:
benchmarks `autodan` / `autodan_transfer`, extra holding the prompt template found, its budget and fitness.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from forgetjax.distributed import is_writer
from forgetjax.errors import UserError
from forgetjax.eval.attacks.autodan import PLACEHOLDER, AutoDANConfig, run_autodan
from forgetjax.eval.attacks.gcg import GCGConfig, build_layout, run_gcg
from forgetjax.eval.battery import model_slug, select_subset
from forgetjax.eval.benchmarks import get_benchmark
from forgetjax.eval.records import EvalRecord, prompt_hash, read_records, write_records

ATTACK_BENCHMARKS = ("harmbench_standard", "advbench")
GCG_BENCHMARK = "gcg"
TRANSFER_BENCHMARK = "gcg_transfer"
ANSWER_TOKENS = 64


def attack_items(benchmark: str, data_dir: str | Path, limit: int | None, seed: int) -> list[tuple[Any, str, str]]:
    """(item, behaviour, target) of the attacked behaviours: AdvBench's published target strings, HarmBench's
    behaviours with GCGConfig's target prefix (filled in by `run_attack`)."""
    if benchmark not in ATTACK_BENCHMARKS:
        raise UserError(f"attack benchmark must be one of {ATTACK_BENCHMARKS}, got {benchmark!r}")
    bench = get_benchmark(benchmark)
    items = select_subset(bench.load(data_dir), limit, seed)
    return [(item, item.data.get("behavior", item.data["prompt"]), item.data.get("target", "")) for item in items]


def _answer(model, tokenizer, layout, suffix_ids: Sequence[int], row: int) -> tuple[str, int]:
    """The greedy answer to behaviour row `row` with the suffix in place (prompt = head + suffix + tail)."""
    from forgetjax.sampling.sampler import Sampler, SamplingParams

    ids = layout.input_ids[row].copy()
    ids[layout.suffix_start:layout.suffix_start + layout.suffix_length] = suffix_ids
    prompt = [int(t) for t, m in zip(ids[:layout.target_start], layout.attention_mask[row][:layout.target_start]) if m]
    out = Sampler(model, tokenizer).generate_tokens([prompt], SamplingParams(max_new_tokens=ANSWER_TOKENS))
    return out.texts[0], int(out.lengths[0])


def _record(run_id: str, model_id: str, benchmark: str, item, prompt_text: str, answer: str, tokens: int,
            extra: dict[str, Any], fmt: str, seed: int, judge=None) -> EvalRecord:
    """The record of one attacked behaviour: the refusal matcher's verdict and, with a `judge`
    (`forgetjax.eval.judge.Judge`), its verdict on the plain behaviour and the answer, as the safety benchmarks store
    it (`refusal_judge`, extra.judge)."""
    from forgetjax.eval.benchmarks.safety import verdict_text
    from forgetjax.verifiers.refusal import is_refusal

    refused = bool(is_refusal(answer))
    extra = {**extra, "family": "safety_refusal", "harmful": True, "format": fmt}
    verdict = None
    if judge is not None:
        verdict = verdict_text(judge(extra["behavior"], answer))
        extra["judge"] = getattr(judge, "judge_id", None) or "judge"
    return EvalRecord(run_id=run_id, model_id=model_id, benchmark=benchmark, category=item.category,
                      item_id=item.id, prompt_hash=prompt_hash(prompt_text), output=answer, correct=int(refused),
                      refusal=refused, refusal_judge=verdict, output_tokens=tokens, seed=seed,
                      extra=json.dumps(extra, sort_keys=True, default=str))


def _chat_answer(model, tokenizer, prompt: str, tokens: int = ANSWER_TOKENS) -> tuple[str, int]:
    from forgetjax.sampling.sampler import Sampler, SamplingParams

    out = Sampler(model, tokenizer).chat([[{"role": "user", "content": prompt}]], SamplingParams(max_new_tokens=tokens))
    return out.texts[0], int(out.lengths[0])


def run_autodan_attack(model, tokenizer, *, data_dir: str | Path, out_dir: str | Path, run_id: str, model_id: str,
                       config: AutoDANConfig, benchmark: str = "harmbench_standard", limit: int | None = 8,
                       seed: int = 0, transfer_from: str | Path | None = None, judge=None) -> Path:
    """AutoDAN per behaviour (or, with `transfer_from`, the replay of an earlier run's prompts); returns the file."""
    config.validate()
    chosen = attack_items(benchmark, data_dir, limit, seed)
    found = {}
    if transfer_from is not None:
        found = {r.item_id: json.loads(r.extra) for r in read_records(transfer_from)}
        missing = [item.id for item, _, _ in chosen if item.id not in found]
        if missing:
            raise UserError(f"{transfer_from}: no AutoDAN prompt for item(s) {missing[:5]}")
    records, name = [], "autodan_transfer" if transfer_from is not None else "autodan"
    for item, behaviour, target in chosen:
        if transfer_from is not None:
            source = found[item.id]
            template = source["template"]
            extra = {"attack": "autodan", "transfer": True, "source_model": source.get("model_id"),
                     "template": template, "budget": source["budget"], "behavior": behaviour}
        else:
            result = run_autodan(model, tokenizer, [behaviour], target or config.target, config)
            template = result.prompt
            extra = {"attack": "autodan", "transfer": False, "model_id": model_id, "template": template,
                     "budget": dataclasses.asdict(config), "generations": result.generations,
                     "fitness": result.fitness, "behavior": behaviour}
        prompt = template.replace(PLACEHOLDER, behaviour)
        answer, tokens = _chat_answer(model, tokenizer, prompt)
        records.append(_record(run_id, model_id, name, item, prompt, answer, tokens, extra, "chat", seed, judge))
    path = Path(out_dir) / model_slug(model_id) / f"{name}.parquet"
    if is_writer():
        write_records(records, path)
    return path


def run_attack(model, tokenizer, *, data_dir: str | Path, out_dir: str | Path, run_id: str, model_id: str,
               config: GCGConfig, benchmark: str = "harmbench_standard", limit: int | None = 8, seed: int = 0,
               fmt: str = "chat", transfer_from: str | Path | None = None, judge=None) -> Path:
    """GCG (or, with `transfer_from`, the replay of an earlier run's suffixes) and write the records; returns the
    Parquet file."""
    config.validate()
    chosen = attack_items(benchmark, data_dir, limit, seed)
    targets = [target or config.target for _, _, target in chosen]
    behaviours = [behaviour for _, behaviour, _ in chosen]
    budget = {k: v for k, v in dataclasses.asdict(config).items()}
    records = []
    if transfer_from is not None:
        found = {r.item_id: json.loads(r.extra) for r in read_records(transfer_from)}
        missing = [item.id for item, _, _ in chosen if item.id not in found]
        if missing:
            raise UserError(f"{transfer_from}: no GCG suffix for item(s) {missing[:5]} (attack the source model with "
                            f"the same benchmark, limit and seed)")
        layout = build_layout(tokenizer, behaviours, targets, config.suffix_length, fmt)
        for row, (item, behaviour, _) in enumerate(chosen):
            source = found[item.id]
            answer, tokens = _answer(model, tokenizer, layout, source["suffix_ids"], row)
            extra = {"attack": "gcg", "transfer": True, "source_model": source.get("model_id"),
                     "suffix": source["suffix"], "suffix_ids": source["suffix_ids"], "budget": source["budget"],
                     "behavior": behaviour}
            records.append(_record(run_id, model_id, TRANSFER_BENCHMARK, item, f"{behaviour} {source['suffix']}",
                                   answer, tokens, extra, fmt, seed, judge))
        name = TRANSFER_BENCHMARK
    else:
        groups = [[i] for i in range(len(chosen))] if config.mode == "individual" else [list(range(len(chosen)))]
        for group in groups:
            result = run_gcg(model, tokenizer, [behaviours[i] for i in group], [targets[i] for i in group], config,
                             fmt)
            layout = build_layout(tokenizer, [behaviours[i] for i in group], [targets[i] for i in group],
                                  config.suffix_length, fmt)
            for row, index in enumerate(group):
                item, behaviour, _ = chosen[index]
                answer, tokens = _answer(model, tokenizer, layout, result.suffix_ids, row)
                extra = {"attack": "gcg", "transfer": False, "model_id": model_id, "suffix": result.suffix,
                         "suffix_ids": result.suffix_ids, "budget": budget, "steps": result.steps,
                         "loss": result.loss, "target_greedy": result.success, "target": targets[index],
                         "behavior": behaviour}
                records.append(_record(run_id, model_id, GCG_BENCHMARK, item, f"{behaviour} {result.suffix}",
                                       answer, tokens, extra, fmt, seed, judge))
        name = GCG_BENCHMARK
    path = Path(out_dir) / model_slug(model_id) / f"{name}.parquet"
    if is_writer():
        write_records(records, path)
    return path


__all__ = ["ATTACK_BENCHMARKS", "GCG_BENCHMARK", "TRANSFER_BENCHMARK", "attack_items", "run_attack",
           "run_autodan_attack"]
