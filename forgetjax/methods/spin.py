"""SELF-SPIN: self-play fine-tuning (Chen et al., 2024) against the model's own previous iterate.

Iterations t = 0 .. K-1. At the start of iteration t the batch source takes the current model p_t
(`context.current_model()`: the starting model for t = 0, the trained parameters at the boundary afterwards),
generates y' for every training prompt (greedy by default, sampled with `temperature` > 0), pairs it with the
ground-truth completion y (real = chosen, generated = rejected; pairs with y' == y or an empty y' are dropped),
and scores both under p_t, which is the iteration's reference. Each iteration's pairs are cached in
`<out_dir>/data/self_spin/iter_<t>/` (with stats.json), so a resumed run never regenerates a finished iteration;
the iteration index is part of the source state. The loss is `forgetjax.losses.preference.spin_loss`; an
iteration runs `epochs_per_iteration` passes over its pairs, after K iterations the data is exhausted.

Ground truth y: `method_args.records` (prompt/completion records, any format `forgetjax.data.read_records`
reads), else the domain problems' worked solutions in exactly GT-SFT's target format
(`forgetjax.methods.sft.ground_truth_completion`), so SPIN and GT-SFT learn the same y.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from forgetjax.losses.preference import spin_loss
from forgetjax.methods import pairs as P
from forgetjax.methods.registry import register
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.domains import DEFAULT_MAX_NEW_TOKENS
from forgetjax.training.budget import DataUse
from forgetjax.training.method import Batch, Method, StepContext

NAME = "self_spin"
# The arguments that determine an iteration's pairs (the cache is keyed on them and the iteration index).
DATA_ARGS = ("temperature", "top_p", "top_k", "max_new_tokens", "records", "prompts_per_call", "system", "seed")


@dataclasses.dataclass
class SPINArgs:
    """Arguments of self_spin (`method_args`)."""

    beta: float = 0.1
    iterations: int = 2
    epochs_per_iteration: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    records: str | None = None
    prompts_per_call: int = 16
    reference_batch: int = 16
    system: str | None = None
    seed: int = 0

    def sampler_rows(self, batch_size: int) -> int:
        """Rows one call of the model's sampler decodes: prompts_per_call prompts, one answer each."""
        return self.prompts_per_call

    def validate(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        for name in ("iterations", "epochs_per_iteration", "max_new_tokens", "prompts_per_call", "reference_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RealExample:
    """A training prompt with its ground-truth completion."""

    id: str
    prompt: str
    completion: str
    system: str | None = None


def real_examples_from_records(path: str) -> list[RealExample]:
    """Prompt/completion records (optional id, system) from a file."""
    from forgetjax.data import read_records

    records = read_records(path, schema="sft")
    examples = []
    for index, record in enumerate(records.records):
        if "messages" in record:
            raise ValueError(f"{records.locations[index]}: SPIN needs prompt/completion records, not messages")
        examples.append(RealExample(str(record.get("id", index)), record["prompt"], record["completion"],
                                    record.get("system")))
    return examples


def spin_pair_records(examples: Sequence[RealExample], generated: Sequence[str],
                      system: str | None) -> tuple[list[dict[str, Any]], int]:
    """(chosen = real, rejected = generated) records, and the number dropped because y' is empty or equals y."""
    records = []
    for example, text in zip(examples, generated, strict=True):
        if not text.strip() or text.strip() == example.completion.strip():
            continue
        head = {"id": example.id, "prompt": example.prompt}
        chosen_system = example.system if example.system is not None else system
        if chosen_system is not None:
            head["system"] = chosen_system
        records.append({**head, "chosen": example.completion, "rejected": text})
    return records, len(examples) - len(records)


class SPINSource:
    """Iteration t's pair batches; at the end of an iteration, the next one is built from the current model."""

    def __init__(self, method: "SelfSPIN", trainer):
        self.method = method
        self.trainer = trainer
        self.iteration = 0
        self.batches: P.PairBatches | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._pairs = 0

    def _open(self, context: StepContext) -> None:
        """Load (or build with the current model) iteration `self.iteration` and position its batches."""
        data = self.method.iteration_data(self.trainer, self.iteration, context.current_model)
        args = self.method.args
        self.batches = P.PairBatches(data.train, self.trainer.tokenizer, batch_size=self.trainer.cfg.batch_size,
                                     max_length=self.trainer.cfg.max_length,
                                     seed=P.derived_seed(args.seed, self.iteration),
                                     epochs=args.epochs_per_iteration, prepare_flops=P.prepare_flops(data.stats))
        self._pairs = self.batches.size
        if self._pending_state is not None:
            self.batches.set_state(self._pending_state)
            self._pending_state = None

    def next_batch(self, context: StepContext) -> Batch | None:
        while self.iteration < self.method.args.iterations:
            if self.batches is None:
                self._open(context)
            batch = self.batches.next_batch(context)
            if batch is not None:
                batch.info["spin_iteration"] = float(self.iteration)
                return batch
            self.iteration += 1
            self.batches = None
        return None

    def data_use(self) -> DataUse | None:
        """Pairs drawn over all iterations. Every iteration pairs the same ground-truth examples, so the data size
        is one iteration's pairs and a finished iteration counts as epochs_per_iteration passes over them."""
        if not self._pairs:
            return None
        current = self.batches.data_use().consumed if self.batches is not None else 0
        return DataUse(size=self._pairs, consumed=self.iteration * self.method.args.epochs_per_iteration * self._pairs
                       + current)

    def get_state(self) -> dict:
        batches = self.batches.get_state() if self.batches is not None else self._pending_state
        return {"iteration": self.iteration, "batches": batches}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"iteration", "batches"}:
            raise ValueError(f"SPIN source state must have keys iteration and batches, got {state!r}")
        if not isinstance(state["iteration"], int) or state["iteration"] < 0:
            raise ValueError(f"SPIN source state iteration must be an int >= 0, got {state['iteration']!r}")
        self.iteration = state["iteration"]
        self.batches = None
        self._pending_state = state["batches"]


class SelfSPIN(Method):
    """SPIN on the domain's ground-truth completions (or `records`). `examples` overrides them (tests)."""

    name = NAME
    trim = "pairs"
    kl_contexts = ("chosen_", "rejected_")  # the KL to the start model is measured on these rows

    def __init__(self, args: SPINArgs, domain, *, examples: Sequence[RealExample] | None = None):
        args.validate()
        self.args = args
        self.domain = domain
        self._examples = list(examples) if examples is not None else None

    def examples(self) -> list[RealExample]:
        if self._examples is None:
            if self.args.records is not None:
                self._examples = real_examples_from_records(self.args.records)
            else:
                from forgetjax.envs import load_training_problems
                from forgetjax.methods.sft import ground_truth_completion

                problems = load_training_problems(self.domain)
                self._examples = [RealExample(p.id, p.prompt, ground_truth_completion(p)) for p in problems]
            if not self._examples:
                raise ValueError(f"{NAME}: no training examples")
        return self._examples

    def loss(self, model, batch, rng):
        real, generated = P.policy_pair_logps(model, batch)
        weights = P.pair_weights(batch)
        loss_sum, count, metrics = spin_loss(real, generated, batch["ref_chosen_logp"], batch["ref_rejected_logp"],
                                             beta=self.args.beta, pair_mask=weights)
        metrics["real_logp"] = P.mean_metric(real, weights)
        metrics["generated_logp"] = P.mean_metric(generated, weights)
        return loss_sum, count, metrics

    def iteration_directory(self, trainer, iteration: int):
        return trainer.out_dir / "data" / NAME / f"iter_{iteration:03d}"

    def fingerprint(self, trainer, iteration: int) -> str:
        args = {k: getattr(self.args, k) for k in DATA_ARGS}
        items = [(e.id, e.prompt + "\x00" + e.completion) for e in self.examples()]
        return P.settings_fingerprint({"method": NAME, "iteration": iteration, "args": args,
                                       "model": trainer.cfg.model, "max_length": trainer.cfg.max_length,
                                       "examples": P.problems_digest(items)})

    def build_iteration(self, trainer, iteration: int, model) -> P.PairData:
        """Generate y' with `model` (= p_t), pair with y, score both under p_t."""
        from forgetjax.sampling.sampler import SamplingParams

        args, examples = self.args, self.examples()
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, n=1)
        messages = [user_message(e.prompt, e.system if e.system is not None else args.system)
                    for e in examples]
        samples, generation_flops = P.cached_samples(
            P.PairCache(self.iteration_directory(trainer, iteration)).rollouts_path,
            self.fingerprint(trainer, iteration),
            lambda: P.generate_samples(model, trainer.tokenizer, messages, params,
                                       prompts_per_call=args.prompts_per_call,
                                       seed=P.derived_seed(args.seed, iteration), mesh=trainer.mesh))
        generated = [group[0].text for group in samples]
        records, identical_or_empty = spin_pair_records(examples, generated, args.system)
        scored, too_long, reference_flops = P.with_reference_logps(
            model, trainer.tokenizer, records, max_length=trainer.cfg.max_length, batch_rows=args.reference_batch,
            mesh=trainer.mesh)
        if not scored:
            raise ValueError(f"{NAME} iteration {iteration}: no pairs left out of {len(examples)} examples "
                             f"({identical_or_empty} identical/empty, {too_long} over max_length)")
        n = len(scored)
        stats = {"iteration": iteration, "examples": len(examples), "pairs": n,
                 "dropped_identical_or_empty": identical_or_empty, "dropped_too_long": too_long,
                 "finished_rate": sum(g[0].finished for g in samples) / len(samples),
                 "generated_tokens_mean": sum(g[0].tokens for g in samples) / len(samples),
                 "ref_real_logp_mean": sum(r["ref_chosen_logp"] for r in scored) / n,
                 "ref_generated_logp_mean": sum(r["ref_rejected_logp"] for r in scored) / n,
                 "generation_flops": generation_flops, "reference_flops": reference_flops,
                 "prepare_flops": generation_flops + reference_flops}
        return P.PairData(scored, [], stats)

    def iteration_data(self, trainer, iteration: int, current_model) -> P.PairData:
        """Iteration `iteration`'s cached pairs, built with `current_model()` when not cached yet."""
        cache = P.PairCache(self.iteration_directory(trainer, iteration))
        return cache.load_or_build(self.fingerprint(trainer, iteration),
                                   lambda: self.build_iteration(trainer, iteration, current_model()))

    def batch_source(self, trainer) -> SPINSource:
        self.examples()
        return SPINSource(self, trainer)


@register(NAME, SPINArgs, "SELF-SPIN: self-play fine-tuning, ground truth vs the previous iterate's generations, "
                          "regenerated every iteration")
def make_self_spin(args: SPINArgs, domain) -> SelfSPIN:
    return SelfSPIN(args, domain)


__all__ = ["RealExample", "SPINArgs", "SPINSource", "SelfSPIN", "make_self_spin", "real_examples_from_records",
           "spin_pair_records"]
