"""OFF-RL: DPO (Rafailov et al., 2023) on preference pairs from the starting model's own verified rollouts.

Data (built once before training, cached in `<out_dir>/data/off_rl_dpo/`, reused on resume):
  1. for every training problem of the domain, `samples_per_prompt` completions from the starting model;
  2. each is checked by the domain verifier (math answer equivalence, code tests, QA match); unfinished samples
     (that hit `max_new_tokens`) are skipped when `require_finished`, verifier timeouts always;
  3. per prompt, (verified-correct, incorrect) pairs by the rule of `pairs.pair_correct_incorrect`, at most
     `max_pairs_per_prompt` (prompts without a correct or without an incorrect sample give none);
  4. a `heldout_fraction` of the prompts that have pairs is set aside: their pairs are never trained on and measure
     the chosen-vs-rejected margin before and after training (`OffRLDPO.heldout_report`);
  5. reference log-probs of both sides under the starting model (= the DPO reference), computed once.
`stats.json` records the counts (samples, correct/finished rates, prompts with pairs, dropped pairs) and FLOPs.

Loss: sigmoid DPO with optional conservative label smoothing (`forgetjax.losses.preference.dpo_loss`) on the
policy's sequence log-probs (sum of completion-token log-probs) of chosen and rejected. The generation and
reference FLOPs are charged as extra FLOPs on the first batch.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from forgetjax.distributed import is_writer
from forgetjax.io import write_json_atomic
from forgetjax.losses.preference import dpo_loss
from forgetjax.methods import pairs as P
from forgetjax.methods.registry import register
from forgetjax.methods.sft import ground_truth_completion
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.domains import DEFAULT_MAX_NEW_TOKENS
from forgetjax.training.budget import DataUse
from forgetjax.training.method import Batch, Method, StepContext

NAME = "off_rl_dpo"
# The arguments that determine the pair dataset (the cache is keyed on them; beta, epochs etc. may change freely).
DATA_ARGS = ("samples_per_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "max_pairs_per_prompt",
             "require_finished", "heldout_fraction", "prompts_per_call", "system", "seed", "chosen_fallback")


@dataclasses.dataclass
class DPOArgs:
    """Arguments of off_rl_dpo (`method_args`)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_pairs_per_prompt: int = 2
    require_finished: bool = True
    heldout_fraction: float = 0.1
    heldout_every: int = 0
    epochs: int = 1
    prompts_per_call: int = 16
    reference_batch: int = 16
    verifier_workers: int = 2
    system: str | None = None
    seed: int = 0
    chosen_fallback: Literal["none", "reference"] = "none"  # reference: a prompt with no verified-correct sample is
    # paired with the domain's reference completion (GT-SFT's target) as chosen against its incorrect samples

    def sampler_rows(self, batch_size: int) -> int:
        """Rows one call of the start model's sampler decodes: prompts_per_call prompts x samples_per_prompt."""
        return self.prompts_per_call * self.samples_per_prompt

    def validate(self):
        if self.chosen_fallback not in ("none", "reference"):
            raise ValueError(f"chosen_fallback must be 'none' or 'reference', got {self.chosen_fallback!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to form pairs, got {self.samples_per_prompt}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for name in ("max_new_tokens", "max_pairs_per_prompt", "epochs", "prompts_per_call", "reference_batch",
                     "verifier_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_every < 0:
            raise ValueError(f"heldout_every must be >= 0 (0: off), got {self.heldout_every}")


def build_pair_records(problems: Sequence[Any], samples: Sequence[Sequence[P.Sample]],
                       verdicts: Sequence[Sequence[P.Verdict]], *, max_pairs: int, require_finished: bool,
                       system: str | None = None, reference_chosen: Callable[[Any], str] | None = None
                       ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pair records (id, prompt, chosen, rejected[, system]) of every problem from its verified samples, and
    counts: samples, finished, correct, incorrect, unverified, prompts with a correct / an incorrect sample / a
    pair, pairs, reference_pairs.

    With `reference_chosen` (a problem -> its reference completion), a prompt with incorrect samples but no
    verified-correct one is paired as if the reference were its one correct sample (pairs marked chosen_source =
    "reference"); a prompt with a correct sample keeps the self-generated pairs only."""
    records: list[dict[str, Any]] = []
    counts = dict.fromkeys(("samples", "finished", "correct", "incorrect", "unverified", "prompts_with_correct",
                            "prompts_with_incorrect", "prompts_with_pairs", "reference_pairs"), 0)
    for problem, problem_samples, problem_verdicts in zip(problems, samples, verdicts, strict=True):
        usable = [(s, v) for s, v in zip(problem_samples, problem_verdicts, strict=True)
                  if s.finished or not require_finished]
        counts["samples"] += len(problem_samples)
        counts["finished"] += sum(s.finished for s in problem_samples)
        counts["correct"] += sum(v is True for _, v in usable)
        counts["incorrect"] += sum(v is False for _, v in usable)
        counts["unverified"] += sum(v is None for _, v in usable)
        counts["prompts_with_correct"] += any(v is True for _, v in usable)
        counts["prompts_with_incorrect"] += any(v is False for _, v in usable)
        texts, labels = [s.text for s, _ in usable], [v for _, v in usable]
        source = "self"
        if reference_chosen is not None and not any(v is True for v in labels) and any(v is False for v in labels):
            texts, labels, source = [reference_chosen(problem), *texts], [True, *labels], "reference"
        pairs = P.pair_correct_incorrect(texts, labels, max_pairs)
        counts["prompts_with_pairs"] += bool(pairs)
        counts["reference_pairs"] += len(pairs) if source == "reference" else 0
        head = {"id": problem.id, "prompt": problem.prompt} | ({"system": system} if system is not None else {})
        records.extend({**head, "chosen": chosen, "rejected": rejected, "chosen_source": source}
                       for chosen, rejected in pairs)
    counts["pairs"] = len(records)
    return records, counts


class DPOSource:
    """Pair batches of the training split; every `heldout_every` steps (0: never) the held-out margins of the
    current model (before this step's update) are added to the step's logged metrics as `heldout_*`."""

    def __init__(self, method: "OffRLDPO", trainer, data: P.PairData):
        self.method = method
        self.trainer = trainer
        self.heldout = data.heldout
        self.batches = P.PairBatches(data.train, trainer.tokenizer, batch_size=trainer.cfg.batch_size,
                                     max_length=trainer.cfg.max_length, seed=method.args.seed,
                                     epochs=method.args.epochs, prepare_flops=P.prepare_flops(data.stats))

    def next_batch(self, context: StepContext) -> Batch | None:
        batch = self.batches.next_batch(context)
        every = self.method.args.heldout_every
        if batch is not None and every and self.heldout and context.step % every == 0:
            report = self.method.heldout_report(context.current_model(), self.trainer, self.heldout)
            batch.info.update({f"heldout_{k}": v for k, v in report.items()})
        return batch

    def data_use(self) -> DataUse:
        return self.batches.data_use()

    def get_state(self) -> dict:
        return self.batches.get_state()

    def set_state(self, state: dict) -> None:
        self.batches.set_state(state)


class OffRLDPO(Method):
    """DPO on verified self-generated pairs. `problems` / `verifier` override the domain's problems and the
    RewardPool verifier (tests use scripted ones)."""

    name = NAME
    trim = "pairs"
    kl_contexts = ("chosen_", "rejected_")  # the KL to the start model is measured on these rows

    def __init__(self, args: DPOArgs, domain, *, problems: Sequence[Any] | None = None,
                 verifier: P.VerdictFn | None = None):
        args.validate()
        self.args = args
        self.domain = domain
        self._problems = list(problems) if problems is not None else None
        self.verifier = verifier or P.pool_verifier(args.verifier_workers)
        self.data: P.PairData | None = None

    def problems(self) -> list[Any]:
        if self._problems is None:
            from forgetjax.envs import load_problems, require_training_pool

            d = self.domain
            self._problems = load_problems(d.name, d.source, d.data_dir, d.split, d.limit, d.seed,
                                           template=d.template)
            require_training_pool(self._problems)
        return self._problems

    def loss(self, model, batch, rng):
        chosen, rejected = P.policy_pair_logps(model, batch)
        weights = P.pair_weights(batch)
        loss_sum, count, metrics = dpo_loss(chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"],
                                            beta=self.args.beta, label_smoothing=self.args.label_smoothing,
                                            pair_mask=weights)
        metrics["chosen_logp"] = P.mean_metric(chosen, weights)
        metrics["rejected_logp"] = P.mean_metric(rejected, weights)
        return loss_sum, count, metrics

    def data_directory(self, trainer):
        return trainer.out_dir / "data" / NAME

    def fingerprint(self, trainer) -> str:
        args = {k: getattr(self.args, k) for k in DATA_ARGS}
        items = [(p.id, p.prompt) for p in self.problems()]
        return P.settings_fingerprint({"method": NAME, "args": args, "model": trainer.cfg.model,
                                       "max_length": trainer.cfg.max_length, "problems": P.problems_digest(items)})

    def build_data(self, trainer) -> P.PairData:
        """Sample (rollouts cached as soon as they exist), verify, pair, split and score with the reference (= the
        trainer's current, starting model)."""
        from forgetjax.sampling.sampler import SamplingParams

        args, problems = self.args, self.problems()
        model = trainer.current_model()
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, n=args.samples_per_prompt)
        messages = [user_message(p.prompt, args.system) for p in problems]
        samples, generation_flops = P.cached_samples(
            P.PairCache(self.data_directory(trainer)).rollouts_path, self.fingerprint(trainer),
            lambda: P.generate_samples(model, trainer.tokenizer, messages, params,
                                       prompts_per_call=args.prompts_per_call, seed=args.seed, mesh=trainer.mesh))
        flat_problems = [p for p, group in zip(problems, samples) for _ in group]
        flat_verdicts = self.verifier(flat_problems, [s.text for group in samples for s in group])
        verdicts, start = [], 0
        for group in samples:
            verdicts.append(flat_verdicts[start:start + len(group)])
            start += len(group)
        reference = ground_truth_completion if args.chosen_fallback == "reference" else None
        records, counts = build_pair_records(problems, samples, verdicts, max_pairs=args.max_pairs_per_prompt,
                                             require_finished=args.require_finished, system=args.system,
                                             reference_chosen=reference)
        scored, too_long, reference_flops = P.with_reference_logps(
            model, trainer.tokenizer, records, max_length=trainer.cfg.max_length, batch_rows=args.reference_batch,
            mesh=trainer.mesh)
        heldout_ids = P.heldout_prompt_ids([r["id"] for r in scored], args.heldout_fraction, args.seed)
        train = [r for r in scored if r["id"] not in heldout_ids]
        heldout = [r for r in scored if r["id"] in heldout_ids]
        if not train:
            raise ValueError(f"{NAME}: no training pairs from {len(problems)} prompts ({counts}); raise "
                             "samples_per_prompt, temperature or the number of problems (domain.limit)")
        stats = {"prompts": len(problems), **counts, "dropped_too_long": too_long, "train_pairs": len(train),
                 "heldout_pairs": len(heldout), "heldout_prompts": len(heldout_ids),
                 "correct_rate": counts["correct"] / max(counts["samples"], 1),
                 "finished_rate": counts["finished"] / max(counts["samples"], 1),
                 "pair_prompt_rate": counts["prompts_with_pairs"] / max(len(problems), 1),
                 "generation_flops": generation_flops, "reference_flops": reference_flops,
                 "prepare_flops": generation_flops + reference_flops}
        return P.PairData(train, heldout, stats)

    def prepare(self, trainer) -> P.PairData:
        """The cached dataset of this run (built on first use)."""
        cache = P.PairCache(self.data_directory(trainer))
        self.data = cache.load_or_build(self.fingerprint(trainer), lambda: self.build_data(trainer))
        return self.data

    def batch_source(self, trainer) -> DPOSource:
        return DPOSource(self, trainer, self.prepare(trainer))

    def heldout_report(self, model, trainer, heldout: Sequence[dict] | None = None) -> dict[str, float]:
        """Margins of the held-out pairs under `model` (see `pairs.margin_report`)."""
        pairs = self.data.heldout if heldout is None else heldout
        return P.margin_report(model, trainer.tokenizer, pairs, beta=self.args.beta,
                               max_length=trainer.cfg.max_length, batch_rows=self.args.reference_batch,
                               mesh=trainer.mesh)

    def on_train_end(self, trainer) -> dict[str, float]:
        """Held-out margins before (the reference) and after training, written to heldout_margins.json."""
        if self.data is None:
            self.prepare(trainer)
        after = self.heldout_report(trainer.current_model(), trainer)
        before = {"logp_margin": after.get("reference_logp_margin", 0.0), "reward_margin": 0.0}
        report = {"before": before, "after": after, "steps": int(trainer.state.step)}
        if is_writer():
            write_json_atomic(self.data_directory(trainer) / "heldout_margins.json", report)
        print(f"forgetjax: {NAME} held-out margin {before['logp_margin']:.4f} -> {after.get('logp_margin', 0.0):.4f}"
              f" over {int(after['pairs'])} pairs", file=sys.stderr)
        return {f"heldout_{k}": v for k, v in after.items()}


@register(NAME, DPOArgs, "OFF-RL: sigmoid DPO on (verified-correct, incorrect) pairs from the starting model's own "
                         "rollouts, reference log-probs cached")
def make_off_rl_dpo(args: DPOArgs, domain) -> OffRLDPO:
    return OffRLDPO(args, domain)


__all__ = ["DPOArgs", "DPOSource", "OffRLDPO", "build_pair_records", "make_off_rl_dpo"]
