"""On-policy RL from verifier rewards: GRPO, Dr.GRPO and FRPO (registered as on_rl_grpo, on_rl_drgrpo, on_rl_frpo).

Each step samples ``group_size`` completions per prompt from the current policy (sampler log-probs kept as the
old-policy log-probs), scores them with the domain's verifier, turns rewards into group advantages and applies the
clipped-ratio loss of :func:`forgetjax.losses.policy_gradient.policy_loss` (variant fixed by the method name), with a
k3 KL penalty to the frozen starting model when ``beta > 0`` (``beta = 0`` skips the reference model entirely).
GRPO's and Dr.GRPO's losses are token-local, so they take their sum and gradient from one pass over the vocabulary
(:func:`forgetjax.models.vocab.head_loss`); FRPO's couples a group's tokens and differentiates chunked log-probs.
Rollouts, rewards and the row layout are in :mod:`forgetjax.methods.rollout`.

Logged per step: reward mean/median/std, pass rate, group pass rate, response length, clip fraction, ratio, KL
(with a reference), entropy (full-vocabulary, masked token mean) and the time split rollout_s / reward_s
(verifier wall time, overlapped with the host work) / reward_wait_s / reference_s; the update time is the
trainer's step_seconds.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from forgetjax.envs import load_training_problems
from forgetjax.losses.policy_gradient import clipped_token_loss, policy_loss, token_scale
from forgetjax.losses.token import masked_sum_count
from forgetjax.training.method import Method
from forgetjax.methods.registry import register
from forgetjax.methods.rollout import (
    OnlineSource,
    RolloutArgs,
    reference_from_trainer,
)
from forgetjax.models.vocab import head_loss, token_stats
from forgetjax.tasks.prompts import user_message

Variant = Literal["grpo", "drgrpo", "frpo"]
DEFAULT_ADVANTAGE = {"grpo": "grpo", "drgrpo": "drgrpo", "frpo": "grpo"}


@dataclasses.dataclass
class GRPOArgs(RolloutArgs):
    """GRPO-family settings: KL weight (k3 estimator; 0 = no reference model), PPO clip range, FRPO's lambda and
    jackknife correction. ``advantage`` defaults to std-normalised ("grpo") for GRPO/FRPO and mean-centred
    ("drgrpo") for Dr.GRPO."""

    beta: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    frpo_lambda: float = 1.0
    frpo_jackknife: bool = False

    @property
    def keeps_start(self) -> bool:
        """The KL penalty's reference is the frozen start (beta > 0)."""
        return self.beta > 0

    def validate(self) -> None:
        super().validate()
        if self.beta < 0:
            raise ValueError(f"method_args.beta must be >= 0, got {self.beta}")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"method_args.clip_low must be in [0, 1) and clip_high >= 0, got "
                             f"{self.clip_low}, {self.clip_high}")
        if self.frpo_lambda <= 0:
            raise ValueError(f"method_args.frpo_lambda must be > 0, got {self.frpo_lambda}")


class GRPO(Method):
    """GRPO / Dr.GRPO / FRPO on verifier rewards. ``reward_pool`` may be set to any object with RewardPool's
    ``submit_details`` before training (tests use scripted rewards); by default the source builds a RewardPool."""

    trim = "none"

    def __init__(self, args: GRPOArgs, domain, variant: Variant):
        args.validate()
        self.args = args
        self.domain = domain
        self.variant = variant
        self.name = {"grpo": "on_rl_grpo", "drgrpo": "on_rl_drgrpo", "frpo": "on_rl_frpo"}[variant]
        self.advantage_mode = args.advantage or DEFAULT_ADVANTAGE[variant]
        self.reward_pool = None

    def sample_messages(self, problem):
        return user_message(problem.prompt, self.args.system_prompt)

    def extra_contexts(self, problem):
        return {}

    def batch_source(self, trainer) -> OnlineSource:
        reference = reference_from_trainer(trainer) if self.args.beta > 0 else None
        return OnlineSource(trainer, load_training_problems(self.domain), self.domain.name, self.args, self,
                            advantage_mode=self.advantage_mode, reference=reference, reward_pool=self.reward_pool)

    def loss(self, model, batch, rng):
        args = self.args
        policy_args = dict(variant=self.variant, beta=args.beta, clip_low=args.clip_low, clip_high=args.clip_high,
                           generation_budget=args.max_new_tokens, frpo_lambda=args.frpo_lambda,
                           frpo_jackknife=args.frpo_jackknife, group_size=args.group_size)
        old_logp, ref_logp, advantages, mask = (batch["old_logp"], batch.get("ref_logp"), batch["advantages"],
                                                batch["loss_mask"])
        if self.variant == "frpo":  # a group's loss couples its tokens: log-probs first, then the loss
            stats = token_stats(model, batch["input_ids"], batch["attention_mask"], batch["positions"],
                                batch["segment_ids"], targets=batch["targets"], entropy=True)
            loss_sum, count, metrics = policy_loss(stats.logprobs, old_logp, ref_logp, advantages, mask,
                                                   **policy_args)
        else:  # token-local: the loss and its gradient in one pass over the vocabulary
            hidden, _, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"], batch["positions"],
                                                batch["segment_ids"])
            token_loss = functools.partial(clipped_token_loss, beta=args.beta, clip_low=args.clip_low,
                                           clip_high=args.clip_high)
            scale = token_scale(mask, self.variant, args.max_new_tokens)
            row_advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
            loss_sum, stats = head_loss(model, hidden, token_loss, (old_logp, ref_logp, row_advantages, scale),
                                        targets=batch["targets"], entropy=True)
            _, count, metrics = policy_loss(stats.logprobs, old_logp, ref_logp, advantages, mask, **policy_args)
        metrics = dict(metrics)
        metrics["entropy"] = masked_sum_count(jax.lax.stop_gradient(stats.entropy), mask)
        return loss_sum, count, metrics


def _factory(variant: Variant):
    def build(args: GRPOArgs, domain) -> GRPO:
        return GRPO(args, domain, variant)

    return build


register("on_rl_grpo", GRPOArgs, "GRPO: group-normalised advantages, clipped ratio, per-sequence token mean, "
         "optional k3 KL to the start model")(_factory("grpo"))
register("on_rl_drgrpo", GRPOArgs, "Dr.GRPO: mean-centred advantages, constant max_new_tokens normaliser")(
    _factory("drgrpo"))
register("on_rl_frpo", GRPOArgs, "FRPO (arXiv 2602.08813): robust max-min GRPO with temperature frpo_lambda")(
    _factory("frpo"))
