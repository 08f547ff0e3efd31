"""SELF online (``self_sdft_online``): iterative self-distillation in the environment with the ground-truth signal.

Each step, from the CURRENT parameters:

1. the next ``batch_size / group_size`` training problems; ``group_size`` completions per prompt sampled in the
   environment (the plain problem prompt) and scored by the domain verifier;
2. a completion becomes a training target when it is verified correct (and finished, with ``require_finished``);
3. a prompt none of whose samples is correct gets ``group_size`` self-rewrites instead, as in SDFT
   (:mod:`forgetjax.methods.sdft`): the model answers the rewrite prompt that shows it the ground-truth solution, and
   each rewrite that is verified correct, finished and free of leak phrases becomes the target of one of that
   prompt's rows (``rewrite: false`` leaves such prompts untrained);
4. SFT cross-entropy on the targets under the plain prompt, completion tokens only; rows without a target are
   masked out (they still count as examples of the step).

This is SDFT made online and iterative (the offline ``self_sdft`` rewrites once, with the start model, before
training) and, for problems the model already solves, rejection-sampling fine-tuning on its own verified samples;
the rewrite fallback is STaR's rationalisation with SDFT's rewrite prompt. It is a separate method rather than a
mode of ``self_sdft`` because the batch source (rollouts of the current model each step), the arguments (rollout
settings) and the budget charging (rollout FLOPs every step) are those of the online methods.

Budget: the tokens of the trained rows (prompt + target) like every online method, plus the forward FLOPs of the
sampled and rewritten sequences (``ModelConfig.forward_flops`` at each sequence's length) as extra FLOPs.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from forgetjax.envs import load_training_problems
from forgetjax.losses.token import sft_loss
from forgetjax.methods.registry import register
from forgetjax.methods.rollout import (
    OnlineSource,
    RolloutArgs,
    completion_targets,
    context_arrays,
    micro_batch_row_order,
    reward_statistics,
    row_length,
    sampling_seed,
)
from forgetjax.methods.sdft import LEAK_PHRASES, QUESTION, REFERENCE, REWRITE_TEMPLATE, find_leak, rewrite_prompt
from forgetjax.methods.sft import ground_truth_completion
from forgetjax.sampling.sampler import Sampler, SamplingParams
from forgetjax.tasks.prompts import user_message
from forgetjax.training.method import Batch, Method, StepContext

REWRITE = "rewrite"
_REWRITE_STREAM = 1


@dataclasses.dataclass
class SelfOnlineArgs(RolloutArgs):
    """Online SELF settings: the rollout settings of the online methods, plus SDFT's rewrite prompt and leak
    phrases for prompts with no correct sample. ``require_finished``: truncated completions never become targets."""

    rewrite: bool = True
    rewrite_template: str = REWRITE_TEMPLATE
    leak_phrases: list[str] = dataclasses.field(default_factory=lambda: list(LEAK_PHRASES))
    require_finished: bool = True

    def validate(self) -> None:
        super().validate()
        for placeholder in (QUESTION, REFERENCE):
            if placeholder not in self.rewrite_template:
                raise ValueError(f"method_args.rewrite_template must contain the placeholder {placeholder}")


def choose_targets(correct: np.ndarray, finished: np.ndarray, rewrite_ok: np.ndarray | None, group_size: int,
                   require_finished: bool) -> np.ndarray:
    """Per row (group-major): 0 = no target, 1 = its own sample, 2 = the rewrite of the same index in its group.

    A sample is a target when correct (and finished if required); a group with no such sample takes its rows'
    rewrites where ``rewrite_ok`` (per row; None = no rewrites)."""
    own = np.asarray(correct, bool) & (np.asarray(finished, bool) | (not require_finished))
    choice = own.astype(np.int32)
    failing = ~own.reshape(-1, group_size).any(axis=1)
    if rewrite_ok is not None:
        use = np.repeat(failing, group_size) & np.asarray(rewrite_ok, bool)
        choice[use] = 2
    return choice


class SelfOnlineSource(OnlineSource):
    """The online source with SELF's batch: verified own samples, else verified self-rewrites, as SFT targets."""

    def _rollout(self, context: StepContext) -> Batch:
        args, group = self.args, self.args.group_size
        chosen = self._next_problems()
        sampler = Sampler(context.current_model(), self.tokenizer, mesh=context.mesh)
        start = time.perf_counter()
        samples = sampler.generate_tokens([contexts[""] for _, contexts in chosen], self._params(context.rng))
        rollout_s = time.perf_counter() - start
        rows = [problem for problem, _ in chosen for _ in range(group)]
        prompts = [contexts[""] for _, contexts in chosen for _ in range(group)]
        details = self.gather_rewards(*self.submit_rewards(context.mesh, rows, samples.texts))
        correct = np.asarray([d.correct for d in details], bool)
        extra_flops = {"rollout": self.model_config.forward_flops(np.add([len(p) for p in prompts], samples.lengths))}

        choice = choose_targets(correct, samples.finished, None, group, args.require_finished)
        failing = [i for i in range(len(chosen)) if not choice[i * group:(i + 1) * group].any()]
        rewrites, rewrite_ok, rewrite_s = None, None, 0.0
        if args.rewrite and failing:
            start = time.perf_counter()
            key = jax.random.fold_in(context.rng, _REWRITE_STREAM)
            rewrites = sampler.generate_tokens([chosen[i][1][REWRITE] for i in failing], self._params(key))
            rewrite_s = time.perf_counter() - start
            rewritten = [chosen[i][0] for i in failing for _ in range(group)]
            verdicts = self.gather_rewards(*self.submit_rewards(context.mesh, rewritten, rewrites.texts))
            extra_flops["rollout"] += self.model_config.forward_flops(
                np.add([len(chosen[i][1][REWRITE]) for i in failing for _ in range(group)], rewrites.lengths))
            rewrite_ok = np.zeros(len(rows), bool)
            for j, (verdict, text, finished) in enumerate(zip(verdicts, rewrites.texts, rewrites.finished)):
                row = failing[j // group] * group + j % group
                rewrite_ok[row] = (verdict.correct and (finished or not args.require_finished) and bool(text.strip())
                                   and find_leak(text, args.leak_phrases) is None)
            choice = choose_targets(correct, samples.finished, rewrite_ok, group, args.require_finished)

        arrays = self._target_arrays(prompts, choice, samples, rewrites, failing, sampler.pad_id)
        order = micro_batch_row_order(len(rows), self.micro_batches)
        arrays = {name: value[order] for name, value in arrays.items()}
        info = reward_statistics(details, samples.lengths, samples.finished, group)
        info.update({"rollout_s": rollout_s, "rewrite_s": rewrite_s, "target_rate": float(np.mean(choice > 0)),
                     "own_target_rate": float(np.mean(choice == 1)),
                     "rewrite_prompts": float(len(failing) if rewrites is not None else 0),
                     "rewrite_target_rate": float(np.mean(choice == 2)),
                     "skipped_prompts": float(self.skipped_prompts)})
        tokens = int(arrays["attention_mask"].sum())
        return Batch(arrays=arrays, tokens=tokens, examples=len(rows), extra_flops=extra_flops, info=info)

    def _params(self, key) -> SamplingParams:
        args = self.args
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, n=args.group_size, seed=sampling_seed(key))

    def _target_arrays(self, prompts: Sequence[Sequence[int]], choice: np.ndarray, samples, rewrites,
                       failing: list[int], pad_id: int) -> dict[str, np.ndarray]:
        """SFT rows [pad | plain prompt | target] (``forgetjax.methods.rollout`` layout); a row without a target
        holds its prompt only and no loss tokens."""
        group = self.args.group_size
        width_out = max(samples.tokens.shape[1], 0 if rewrites is None else rewrites.tokens.shape[1])
        tokens = np.full((len(prompts), width_out), pad_id, np.int32)
        lengths = np.zeros(len(prompts), np.int64)
        for row, kind in enumerate(choice):
            if kind == 1:
                source, index = samples, row
            elif kind == 2:
                source, index = rewrites, failing.index(row // group) * group + row % group
            else:
                continue
            lengths[row] = source.lengths[index]
            tokens[row, :lengths[row]] = source.tokens[index, :lengths[row]]
        width = max(len(p) for p in prompts)
        total = row_length(width, int(lengths.max()))
        arrays = context_arrays(prompts, tokens, lengths, width, total, pad_id)
        arrays["targets"], arrays["loss_mask"] = completion_targets(tokens, lengths, width, total, pad_id)
        return arrays


class SelfSdftOnline(Method):
    """Online SELF (module docstring). ``reward_pool`` may be replaced as in :class:`forgetjax.methods.grpo.GRPO`."""

    name = "self_sdft_online"
    trim = "none"

    def __init__(self, args: SelfOnlineArgs, domain):
        args.validate()
        self.args = args
        self.domain = domain
        self.reward_pool = None

    def sample_messages(self, problem):
        return user_message(problem.prompt, self.args.system_prompt)

    def extra_contexts(self, problem):
        """The rewrite prompt, so that only problems whose rewrite also fits ``max_length`` are drawn."""
        if not self.args.rewrite:
            return {}
        prompt = rewrite_prompt(self.args.rewrite_template, problem.prompt, ground_truth_completion(problem))
        return {REWRITE: user_message(prompt, self.args.system_prompt)}

    def batch_source(self, trainer) -> SelfOnlineSource:
        return SelfOnlineSource(trainer, load_training_problems(self.domain), self.domain.name, self.args, self,
                                advantage_mode="grpo", reward_pool=self.reward_pool)

    def loss(self, model, batch, rng):
        return sft_loss(model, batch)


@register("self_sdft_online", SelfOnlineArgs, "online SELF: each step SFT on the current model's verified samples, "
          "or on its verified rewrites of the ground truth where no sample is correct")
def build(args: SelfOnlineArgs, domain) -> SelfSdftOnline:
    return SelfSdftOnline(args, domain)


__all__ = ["SelfOnlineArgs", "SelfOnlineSource", "SelfSdftOnline", "choose_targets"]
