"""GT-SFT: token-level cross-entropy on verified ground-truth solutions, and the SFT machinery the other
SFT-family methods (teacher distillation, SDFT) share.

Ground truth per domain (see `ground_truth_completion`): GSM8K worked solutions with the `<<expr=value>>`
calculator annotations removed and the `#### x` line replaced by "The answer is \\boxed{x}." (the evaluation prompt
asks for the final answer in \\boxed{}), MBPP reference code in a ```python block, EfficientQA's first short answer, a
safety domain's target (its safe answer, or a refusal: `forgetjax.tasks.safety_domains`).
Each completion is checked by the domain verifier before training (`verify`); failures are dropped and counted.
Alternatively `records` names jsonl/csv/parquet files of prompt/completion (or messages) records, with `fields`
renaming their columns. Records are tokenised with the student's chat template through `make_sft_pipeline`
(padded or packed), shuffled per epoch, and repeated until the budget ends (`epochs: null`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from forgetjax.data import make_sft_pipeline, read_records
from forgetjax.data.pipeline import derived_seed
from forgetjax.distributed import data_shard, is_writer
from forgetjax.envs import default_data_dir, load_training_problems
from forgetjax.envs.problems import GENERATED
from forgetjax.errors import UserError
from forgetjax.losses.token import sft_loss
from forgetjax.training.budget import DataUse, check_extra_flops
from forgetjax.training.method import Batch, Method, StepContext
from forgetjax.training.replay import REPLAY_STREAM, concat_rows
from forgetjax.methods.registry import register
from forgetjax.methods.teacher_data import DataCache, Verifier, cached_records, kd_arrays, log
from forgetjax.tasks.prompts import strip_calculator_annotations
from forgetjax.tasks.safety_domains import is_safety_domain
from forgetjax.verifiers.math import gsm8k_reference
from forgetjax.verifiers.rewards import has_answer_format

ANSWER_SENTENCE = "The answer is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------------------------------------------
# Ground-truth completions
# ----------------------------------------------------------------------------------------------------------------


def format_gsm8k_solution(answer: str) -> str:
    """A GSM8K `answer` field as a clean worked solution: calculator annotations removed, blank lines dropped, and
    the `#### x` line replaced by "The answer is \\boxed{x}." (x without thousands separators)."""
    final = gsm8k_reference(answer)
    body = strip_calculator_annotations(answer).rsplit("####", 1)[0]
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return "\n".join(lines + [ANSWER_SENTENCE.format(answer=final)])


def ground_truth_completion(problem) -> str:
    """The verified-format target of a training problem (see the module docstring)."""
    solution = problem.metadata.get("solution")
    if problem.domain == "qa":
        return problem.reference[0]
    if solution is None or not str(solution).strip():
        raise ValueError(f"problem {problem.id!r} has no worked solution in its data; GT-SFT on this source needs "
                         "method_args.records")
    if is_safety_domain(problem.domain):
        return solution
    if problem.domain == "code":
        return f"```python\n{solution.strip()}\n```"
    if "####" in solution:
        return format_gsm8k_solution(solution)
    if has_answer_format("math", solution):
        return solution.strip()
    reference = problem.reference if isinstance(problem.reference, str) else problem.reference[0]
    return solution.strip() + "\n" + ANSWER_SENTENCE.format(answer=reference)


def domain_settings(domain) -> dict[str, Any]:
    """The DomainConfig as cache settings, its data_dir resolved to an absolute path (None for generated sources),
    so data prepared from one data directory is never reused for another."""
    settings = dataclasses.asdict(domain)
    settings["data_dir"] = (None if domain.source in GENERATED
                            else str(Path(domain.data_dir or default_data_dir()).resolve()))
    return settings


def sft_record(prompt: str, completion: str, system: str | None, **extra: Any) -> dict[str, Any]:
    record = {"prompt": prompt, "completion": completion, **extra}
    if system is not None:
        record["system"] = system
    return record


# ----------------------------------------------------------------------------------------------------------------
# Shared SFT machinery
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTDataArgs:
    """How the SFT records become batches (shared by every SFT-family method)."""

    packing: bool = False
    epochs: int | None = None  # None: repeat until the budget ends
    chat: bool = True
    truncation: Literal["left", "drop", "error"] = "left"
    system: str | None = None
    shuffle_seed: int | None = None  # default: train.seed

    def validate(self):
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or null, got {self.epochs}")


@dataclasses.dataclass
class Prepared:
    """What a method prepared before training: SFT records, FLOPs spent on them by component
    (`budget.EXTRA_COMPONENTS`), optional teacher top-k. `extra_flops` is the run's own preparation, charged at once;
    `prorated_flops` is the cost of data that cells share (a teacher stage's generations and scores), charged pro rata
    as the run first draws its examples: a cell pays for the share of that data it trains on."""

    records: list[dict[str, Any]]
    extra_flops: dict[str, float] = dataclasses.field(default_factory=dict)
    topk: Any = None  # TeacherTopK
    prorated_flops: dict[str, float] = dataclasses.field(default_factory=dict)


class SFTBatchSource:
    """Batches of an SFT pipeline. The FLOPs spent preparing the data are charged to the first batch (once: the
    state remembers it, so a resumed run does not charge them again); `prorated_flops` are charged as the share of
    distinct examples drawn grows (min(1, drawn / size) of them by the end of each batch, so repeats cost nothing).
    With a teacher top-k table, each batch also carries `kd_ids` / `kd_logprobs` [B, T, K]. Batches are process-local: in multi-process runs the pipeline loads
    only this process's rows of each global batch (`forgetjax.distributed.data_shard`). With a `replay` iterator
    (`train.replay`), each process's rows are its rows of the method's batch followed by its rows of the replay batch
    (`Batch.replay_rows` marks them); the data use counts the method's data only (`replay_use` the replay data)."""

    def __init__(self, iterator, upfront_flops: dict[str, float] | None = None, kd_table: dict | None = None,
                 kd_k: int = 0, prorated_flops: dict[str, float] | None = None, replay=None):
        self.iterator = iterator
        self.replay = replay
        self.upfront_flops = check_extra_flops(upfront_flops or {})
        self.prorated_flops = check_extra_flops(prorated_flops or {})
        self.charged = False
        self.prorated_share = 0.0
        self.kd_table = kd_table
        self.kd_k = kd_k

    def next_batch(self, context: StepContext | None) -> Batch | None:
        index = self.iterator.position
        if self.iterator.num_batches is not None and index >= self.iterator.num_batches:
            return None
        epoch = self.iterator.schedule.locate(index)[0]
        rows = self.iterator.schedule.rows(index)
        lengths = self.iterator.schedule.lengths
        tokens = int(sum(int(lengths[i]) for row in rows for i in row))
        examples = sum(len(row) for row in rows)
        arrays = dict(next(self.iterator))
        if self.kd_table is not None:
            arrays.update(kd_arrays(arrays, self.kd_table, self.kd_k))
        replay_rows = None
        if self.replay is not None:
            replay = self.replay.schedule.rows(self.replay.position)
            tokens += int(sum(int(self.replay.schedule.lengths[i]) for row in replay for i in row))
            examples += sum(len(row) for row in replay)
            local = len(arrays["input_ids"])
            arrays = concat_rows(arrays, dict(next(self.replay)))
            replay_rows = np.arange(len(arrays["input_ids"])) >= local
        extra = {} if self.charged else dict(self.upfront_flops)
        self.charged = True
        use = self.data_use()
        share = min(1.0, use.consumed / use.size) if use.size else 1.0
        for name, value in self.prorated_flops.items():
            extra[name] = extra.get(name, 0.0) + value * (share - self.prorated_share)
        self.prorated_share = max(share, self.prorated_share)
        return Batch(arrays=arrays, tokens=tokens, examples=examples, extra_flops=extra, info={"epoch": float(epoch)},
                     process_local=True, replay_rows=replay_rows)

    def data_use(self) -> DataUse:
        return DataUse(size=len(self.iterator.schedule.lengths), consumed=self.iterator.items_drawn())

    def replay_use(self) -> DataUse | None:
        if self.replay is None:
            return None
        return DataUse(size=len(self.replay.schedule.lengths), consumed=self.replay.items_drawn())

    def get_state(self) -> dict:
        state = {"data": self.iterator.get_state(), "charged": self.charged, "prorated_share": self.prorated_share}
        if self.replay is not None:
            state["replay"] = self.replay.get_state()
        return state

    def set_state(self, state: dict) -> None:
        keys = {"data", "charged", "prorated_share"} | ({"replay"} if self.replay is not None else set())
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"SFT batch source state must be a dict with {', '.join(sorted(keys))}, got {state!r}")
        self.iterator.set_state(state["data"])
        if self.replay is not None:
            self.replay.set_state(state["replay"])
        self.charged = bool(state["charged"])
        self.prorated_share = float(state["prorated_share"])


class SFTMethod(Method):
    """Cross-entropy on prepared prompt/completion records; subclasses implement `prepare`."""

    trim = "tokens"
    replays = True

    def __init__(self, name: str, args: SFTDataArgs, domain):
        self.name = name
        self.args = args
        self.domain = domain

    def loss(self, model, batch: dict, rng: jax.Array):
        return sft_loss(model, batch)

    def prepare(self, trainer) -> Prepared:
        raise NotImplementedError

    def data_dir(self, trainer):
        return trainer.out_dir / "data"

    def batch_source(self, trainer) -> SFTBatchSource:
        prepared = self.prepare(trainer)
        if not prepared.records:
            raise ValueError(f"{self.name}: no training records were produced (see {self.data_dir(trainer)})")
        args = self.args
        seed = trainer.cfg.seed if args.shuffle_seed is None else args.shuffle_seed
        replay_cfg = trainer.cfg.replay
        replay_rows = replay_cfg.rows(trainer.cfg.batch_size) if replay_cfg is not None else 0
        rows = trainer.cfg.batch_size - replay_rows
        shard_index, shard_count = data_shard(trainer.mesh, trainer.cfg.batch_size)
        if replay_rows and (rows % shard_count or replay_rows % shard_count):
            raise UserError(f"train.replay: {rows} method rows and {replay_rows} replay rows per batch must each "
                            f"split evenly over the {shard_count} processes loading data")
        iterator = make_sft_pipeline(
            prepared.records, trainer.tokenizer, batch_size=rows, max_length=trainer.cfg.max_length,
            seed=seed, packing=args.packing, chat=args.chat, epochs=args.epochs, truncation=args.truncation,
            shard_index=shard_index, shard_count=shard_count)
        stats = iterator.stats.as_dict()
        log(f"{self.name}: {stats['examples']} examples ({stats['dropped']} dropped, {stats['truncated']} truncated "
            f"over max_length), {stats['batches_per_epoch']} batches per epoch")
        if is_writer():
            from forgetjax.io import write_json_atomic

            write_json_atomic(self.data_dir(trainer) / self.name / "pipeline_stats.json", stats)
        table = prepared.topk.lookup() if prepared.topk is not None else None
        replay = None
        if replay_rows:
            if table is not None:
                raise UserError(f"train.replay: {self.name} with teacher top-k distillation (kd_weight > 0) cannot "
                                "replay (replay rows have no teacher distributions); set kd_weight: 0")
            replay = make_sft_pipeline(
                [replay_cfg.source], trainer.tokenizer, batch_size=replay_rows,
                max_length=trainer.cfg.max_length, seed=derived_seed(seed, 0, REPLAY_STREAM), packing=args.packing,
                chat=args.chat, epochs=None, truncation=args.truncation, drop_remainder=True,
                shard_index=shard_index, shard_count=shard_count)
            log(f"{self.name}: replay {replay_rows} of {trainer.cfg.batch_size} rows per batch from "
                f"{replay_cfg.source} ({replay.stats.examples} examples)")
        return SFTBatchSource(iterator, prepared.extra_flops, table, prepared.topk.k if table is not None else 0,
                              prorated_flops=prepared.prorated_flops, replay=replay)


# ----------------------------------------------------------------------------------------------------------------
# GT-SFT
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GtSftArgs(SFTDataArgs):
    records: list[str] | None = None  # record files instead of the domain's ground truth
    fields: dict[str, str] | None = None  # source field -> prompt/completion/system/messages
    skip_malformed: bool = False
    verify: bool = True  # check every ground-truth completion with the domain verifier, drop failures
    reward_workers: int = 2


def verified_ground_truth(problems, system: str | None, verify: bool, verifier: Verifier
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, stats): one record per problem whose ground-truth completion passes the verifier."""
    completions = [ground_truth_completion(p) for p in problems]
    passed = [True] * len(problems)
    if verify:
        passed = [d.correct for d in verifier.details(completions, [p.reference for p in problems])]
    records = [sft_record(p.prompt, c, system, id=p.id) for p, c, ok in zip(problems, completions, passed) if ok]
    failed = [p.id for p, ok in zip(problems, passed) if not ok]
    stats = {"problems": len(problems), "kept": len(records), "failed_verification": len(failed),
             "failed_ids": failed[:20], "verified": verify}
    return records, stats


class GroundTruthSFT(SFTMethod):
    def prepare(self, trainer) -> Prepared:
        args: GtSftArgs = self.args
        if args.records:
            record_set = read_records(args.records, fields=args.fields, skip_malformed=args.skip_malformed)
            cache = DataCache(self.data_dir(trainer), self.name, {"records": list(args.records),
                                                                  "fields": args.fields})
            records = [dict(r, system=args.system) if args.system is not None and "messages" not in r else dict(r)
                       for r in record_set]
            cache.write_json("stats.json", {"records": len(records), "skipped_malformed": record_set.skipped,
                                            "problems": record_set.problems})
            return Prepared(records)
        settings = {"method": self.name, "domain": domain_settings(self.domain), "verify": args.verify,
                    "system": args.system}
        cache = DataCache(self.data_dir(trainer), self.name, settings)

        def build():
            verifier = Verifier(self.domain.name, workers=args.reward_workers)
            try:
                return verified_ground_truth(load_training_problems(self.domain), args.system, args.verify, verifier)
            finally:
                verifier.close()

        records, stats = cached_records(cache, build)
        log(f"{self.name}: {stats['kept']}/{stats['problems']} ground-truth solutions kept "
            f"({stats['failed_verification']} failed verification)")
        return Prepared(records)


@register("gt_sft", GtSftArgs, "SFT (masked cross-entropy) on verified ground-truth solutions or a records file")
def build_gt_sft(args: GtSftArgs, domain) -> GroundTruthSFT:
    return GroundTruthSFT("gt_sft", args, domain)


__all__ = ["GroundTruthSFT", "GtSftArgs", "Prepared", "SFTBatchSource", "SFTDataArgs", "SFTMethod",
           "format_gsm8k_solution", "ground_truth_completion", "sft_loss",
           "verified_ground_truth"]
