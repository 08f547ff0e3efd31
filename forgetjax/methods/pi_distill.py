"""π-Distill (privileged-information distillation, arXiv 2602.04942): teacher and student share the parameters.

The teacher sees the prompt plus privileged information and samples ``group_size`` completions per prompt; the student
sees the prompt only. The privileged information comes from the domain (:data:`DEFAULT_PRIVILEGED_TEMPLATES`): math the
ground-truth final answer, code the reference program, qa the gold answers; a template may use any placeholder its
domain provides (:data:`DOMAIN_PLACEHOLDERS`), checked when the method is built.
The same sampled tokens are scored under both contexts in the loss (two forward passes: the teacher-context rows
``input_ids`` ... and the student-context rows ``student_input_ids`` ..., laid out so that completion tokens share
columns, see :mod:`forgetjax.methods.rollout`), and :func:`forgetjax.losses.pi_distill.pi_distill_loss` combines
them as alpha * J_teacher + (1 - alpha) * J_student with group advantages of the teacher's rewards. alpha = 1 trains
the teacher only, alpha = 0 the student only. The logged rewards are the teacher's (its samples are the rollouts).
"""
from __future__ import annotations

import dataclasses

import jax

from forgetjax.envs import load_training_problems
from forgetjax.losses.pi_distill import pi_distill_loss
from forgetjax.losses.token import masked_sum_count
from forgetjax.training.method import Method
from forgetjax.methods.registry import register
from forgetjax.methods.rollout import (
    OnlineSource,
    RolloutArgs,
)
from forgetjax.models.vocab import token_stats
from forgetjax.tasks.prompts import user_message

STUDENT = "student"
DEFAULT_PRIVILEGED_TEMPLATES = {
    "math": "{prompt}\n\nThe correct final answer is {answer}.",
    "code": "{prompt}\n\nA correct reference solution:\n```python\n{solution}\n```",
    "qa": "{prompt}\n\nThe correct answer is {answer}.",
}
DOMAIN_PLACEHOLDERS = {
    "math": ("{answer}", "{solution}"),  # final answer; worked solution
    "code": ("{solution}", "{tests}"),  # reference program; the reference's tests as text
    "qa": ("{answer}",),  # the gold answers, "a" or "b"
}
"""The privileged-information placeholders each domain's problems can fill; {prompt} is the student's message."""


@dataclasses.dataclass
class PIDistillArgs(RolloutArgs):
    """π-Distill settings. ``privileged_template`` builds the teacher's user message from ``{prompt}`` (the
    student's message) and the domain's privileged information (:data:`DOMAIN_PLACEHOLDERS`); None takes the
    domain's default (:data:`DEFAULT_PRIVILEGED_TEMPLATES`). ``beta`` weighs the k3 teacher-student KL terms; the
    clip ranges are those of pi_distill_loss."""

    alpha: float = 0.5
    beta: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    student_clip_low: float | None = 0.2
    student_clip_high: float | None = 0.2
    privileged_template: str | None = None

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method_args.alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"method_args.beta must be >= 0, got {self.beta}")
        if self.privileged_template is not None and "{prompt}" not in self.privileged_template:
            raise ValueError("method_args.privileged_template must contain {prompt}")


def domain_template(template: str | None, domain: str) -> str:
    """The privileged template for ``domain`` (its default when None), checked to use only placeholders the domain's
    problems provide and at least one of them."""
    if domain not in DEFAULT_PRIVILEGED_TEMPLATES:
        raise ValueError(f"pi_distill: no privileged information is defined for domain {domain!r}; known: "
                         f"{sorted(DEFAULT_PRIVILEGED_TEMPLATES)}")
    if template is None:
        return DEFAULT_PRIVILEGED_TEMPLATES[domain]
    allowed = DOMAIN_PLACEHOLDERS[domain]
    foreign = [p for placeholders in DOMAIN_PLACEHOLDERS.values() for p in placeholders
               if p in template and p not in allowed]
    if foreign:
        raise ValueError(f"method_args.privileged_template uses {sorted(set(foreign))}, which domain {domain!r} "
                         f"does not provide; use {' or '.join(allowed)}")
    if not any(p in template for p in allowed):
        raise ValueError(f"method_args.privileged_template must contain the privileged information of domain "
                         f"{domain!r}: {' or '.join(allowed)}")
    return template


def code_tests_text(reference) -> str:
    """A code reference's tests as text: assert lines (after any setup code), HumanEval's check function, or
    stdin/stdout examples."""
    kind = reference["kind"]
    if kind == "assert":
        return "\n".join(filter(None, [reference["setup_code"].strip(), *reference["tests"]]))
    if kind == "humaneval":
        return reference["test"].strip()
    return "\n\n".join(f"Input:\n{i}\nOutput:\n{o}" for i, o in zip(reference["inputs"], reference["outputs"]))


def privileged_prompt(template: str, problem) -> str:
    """The teacher's user message: the template with {prompt} and the problem's privileged information filled in
    (no str.format, prompts contain braces). A problem lacking what the template asks for (a worked solution) is an
    error naming it."""
    text = template.replace("{prompt}", problem.prompt)
    if "{answer}" in text:
        answers = [problem.reference] if isinstance(problem.reference, str) else list(problem.reference)
        text = text.replace("{answer}", " or ".join(f'"{a}"' for a in answers) if problem.domain == "qa"
                            else answers[0])
    if "{tests}" in text:
        text = text.replace("{tests}", code_tests_text(problem.reference))
    if "{solution}" in text:
        solution = problem.metadata.get("solution")
        if not isinstance(solution, str) or not solution.strip():
            raise ValueError(f"problem {problem.id!r} has no worked solution for {{solution}} in "
                             "method_args.privileged_template (code: use {tests})")
        text = text.replace("{solution}", solution.strip())
    return text


class PIDistill(Method):
    """π-Distill on verifier rewards. ``reward_pool`` may be replaced as in :class:`forgetjax.methods.grpo.GRPO`."""

    name = "pi_distill"
    trim = "none"
    kl_contexts = (f"{STUDENT}_",)  # the KL to the start model is measured on these rows

    def __init__(self, args: PIDistillArgs, domain):
        args.validate()
        self.args = args
        self.domain = domain
        self.privileged_template = domain_template(args.privileged_template, domain.name)
        self.advantage_mode = args.advantage or "grpo"
        self.reward_pool = None

    def sample_messages(self, problem):
        return user_message(privileged_prompt(self.privileged_template, problem), self.args.system_prompt)

    def extra_contexts(self, problem):
        return {STUDENT: user_message(problem.prompt, self.args.system_prompt)}

    def batch_source(self, trainer) -> OnlineSource:
        return OnlineSource(trainer, load_training_problems(self.domain), self.domain.name, self.args, self,
                            advantage_mode=self.advantage_mode, reward_pool=self.reward_pool)

    def loss(self, model, batch, rng):
        args = self.args
        teacher = token_stats(model, batch["input_ids"], batch["attention_mask"], batch["positions"],
                              batch["segment_ids"], targets=batch["targets"], entropy=True)
        student = token_stats(model, batch[f"{STUDENT}_input_ids"], batch[f"{STUDENT}_attention_mask"],
                              batch[f"{STUDENT}_positions"], batch[f"{STUDENT}_segment_ids"], targets=batch["targets"],
                              entropy=True)
        loss_sum, count, metrics = pi_distill_loss(
            teacher.logprobs, student.logprobs, batch["old_logp"], batch["advantages"], batch["loss_mask"],
            alpha=args.alpha, beta=args.beta, clip_low=args.clip_low, clip_high=args.clip_high,
            student_clip_low=args.student_clip_low, student_clip_high=args.student_clip_high)
        metrics = dict(metrics)
        metrics["teacher_entropy"] = masked_sum_count(jax.lax.stop_gradient(teacher.entropy), batch["loss_mask"])
        metrics["student_entropy"] = masked_sum_count(jax.lax.stop_gradient(student.entropy), batch["loss_mask"])
        return loss_sum, count, metrics


@register("pi_distill", PIDistillArgs, "π-Distill: shared-parameter teacher (prompt + privileged info) and student "
          "(prompt only) trained jointly, alpha * J_teacher + (1 - alpha) * J_student")
def build(args: PIDistillArgs, domain) -> PIDistill:
    return PIDistill(args, domain)
