"""Shared machinery of the online methods (GRPO / Dr.GRPO / FRPO and π-Distill): rollouts from the current policy,
rewards from the verifiers, group advantages, and the training arrays of prompt + completion rows.

One rollout step (:meth:`OnlineSource.next_batch`):

1. the next ``prompts_per_step`` problems in a deterministic, per-epoch shuffled order (the source state is the
   index of the next problem);
2. ``group_size`` completions per prompt sampled from the current parameters with the on-device sampler, seeded from
   the step's key; the sampler's log-prob of every sampled token is kept as the old-policy log-prob;
3. the completions go to a shared :class:`~forgetjax.verifiers.rewards.RewardPool` without waiting (in multi-process
   runs every process sees every completion, scores the rows its devices hold, and the verdicts are gathered, so
   all processes build the same global batch); meanwhile the
   training arrays are laid out and, when a KL penalty needs them, reference log-probs are computed with a jitted
   forward of the frozen starting parameters;
4. group advantages from the rewards; rows are reordered so that every micro-batch of the trainer holds whole
   groups (:func:`micro_batch_row_order`).

Row layout (the batch contract of ``forgetjax.data.batching`` plus method fields): every prompt is left-padded to a
common width ``W`` (the longest prompt of the step over all contexts) and its completion starts at column ``W``; rows
are right-padded to a multiple of 64 columns (:func:`row_length`). ``logits[:, t]`` predicts ``targets[:, t]``, and
completion token ``k`` is the target at column ``W - 1 + k`` in *every* context of the row. Extra contexts (π-Distill's
student sees the prompt without privileged information) are laid out with the same ``W`` under ``<name>_input_ids``,
``<name>_attention_mask``, ``<name>_positions`` and ``<name>_segment_ids``, and share ``targets`` / ``loss_mask``.
Method fields: ``old_logp`` [B, T] (sampler log-probs aligned with targets), ``advantages`` [B], ``rewards`` [B]
and, with a reference model, ``ref_logp`` [B, T].

Several updates per rollout (``updates_per_batch`` > 1, PPO-style reuse with the ratio against ``old_logp``) return
the same arrays for that many consecutive steps; the rollout is cached under ``<out_dir>/data/rollouts`` so a run
resumed in the middle of a reuse cycle trains on the identical rollout.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forgetjax.data.pipeline import derived_seed, shuffled_order
from forgetjax.distributed import gather_rows, is_writer, process_rows, to_host
from forgetjax.io import atomic_open, write_json_atomic
from forgetjax.losses.policy_gradient import group_advantages
from forgetjax.models.vocab import token_stats
from forgetjax.sampling.sampler import Completions, Sampler, SamplingParams
from forgetjax.tasks.domains import DEFAULT_MAX_NEW_TOKENS
from forgetjax.training.budget import DataUse
from forgetjax.training.method import Batch, StepContext
from forgetjax.verifiers.rewards import RewardDetail, RewardPool

Messages = list[dict[str, str]]
CONTEXT_FIELDS = ("input_ids", "attention_mask", "positions", "segment_ids")
_ORDER_STREAM = 0


@dataclasses.dataclass
class RolloutArgs:
    """Rollout and reward settings shared by the online methods. The trainer's ``batch_size`` is the number of
    completion rows per step: ``batch_size / group_size`` prompts, each sampled ``group_size`` times. The old-policy
    log-probs are the model's own (temperature 1, unfiltered), so sampling with temperature != 1 or top-p/top-k makes
    the first update slightly off-policy, as in common GRPO implementations. ``advantage`` None takes the method's
    default; the reward settings are those of :class:`~forgetjax.verifiers.rewards.RewardPool`."""

    group_size: int = 4
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    updates_per_batch: int = 1
    advantage: Literal["grpo", "drgrpo"] | None = None
    system_prompt: str | None = None
    reward_workers: int = 2
    math_timeout_s: float = 5.0
    code_timeout_s: float = 10.0
    format_penalty: float = 0.0
    qa_metric: Literal["exact_match", "f1"] = "exact_match"

    def sampler_rows(self, batch_size: int) -> int:
        """Rows one call of the policy's sampler decodes: the whole step's batch (prompts x group_size)."""
        return batch_size

    def validate(self) -> None:
        positive = {"group_size": self.group_size, "max_new_tokens": self.max_new_tokens,
                    "updates_per_batch": self.updates_per_batch, "reward_workers": self.reward_workers}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"method_args.{name} must be >= 1, got {value}")
        if self.group_size < 2:
            raise ValueError(f"method_args.group_size must be >= 2 (group baselines need two samples), "
                             f"got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"method_args.temperature must be > 0 (on-policy sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method_args.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"method_args.top_k must be >= 0, got {self.top_k}")


class RewardScorer(Protocol):
    """What the source needs of a reward pool (a RewardPool, or a scripted stand-in in tests)."""

    def submit_details(self, batch: Sequence[Sequence[Any]]): ...


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def micro_batch_row_order(rows: int, micro_batches: int) -> np.ndarray:
    """Permutation ``order`` so that ``arrays[order]`` puts group-major rows where the trainer's strided
    micro-batching (micro-batch m = rows m, m + M, m + 2M, ...) gives micro-batch m the contiguous block
    ``[m * rows / M, (m + 1) * rows / M)`` of the group-major order: whole groups, in order, when the block size is a
    multiple of the group size."""
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"rows={rows} must be a positive multiple of micro_batches={micro_batches}")
    return np.arange(rows).reshape(micro_batches, rows // micro_batches).T.reshape(-1)


def sampling_seed(key: jax.Array) -> int:
    """A non-negative int32 sampler seed derived from a PRNG key."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


ROW_MULTIPLE = 64


def row_length(width: int, longest_completion: int, multiple: int = ROW_MULTIPLE) -> int:
    """Columns of a training row: the prompt width plus the longest completion, rounded up to a multiple of
    ``multiple`` so that only a few shapes compile (at most max_length / multiple) with little padding."""
    return int(math.ceil((width + max(longest_completion, 1)) / multiple) * multiple)


def context_arrays(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray, width: int,
                   total: int, pad_id: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / positions / segment_ids [B, total] of rows [pad | prompt | completion | pad]:
    each prompt right-aligned at column ``width``, completion ``i`` (``lengths[i]`` tokens) starting there."""
    rows = len(prompts)
    input_ids = np.full((rows, total), pad_id, np.int32)
    mask = np.zeros((rows, total), bool)
    for i, prompt in enumerate(prompts):
        n, length = len(prompt), int(lengths[i])
        if n > width or width + length > total:
            raise ValueError(f"row {i}: prompt of {n} tokens and completion of {length} do not fit "
                             f"width {width} / total {total}")
        input_ids[i, width - n:width] = prompt
        input_ids[i, width:width + length] = completions[i, :length]
        mask[i, width - n:width + length] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": mask, "positions": positions,
            "segment_ids": mask.astype(np.int32)}


def completion_targets(completions: np.ndarray, lengths: np.ndarray, width: int, total: int,
                       pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets int32, loss_mask float32) [B, total]: completion token k is the target of column width - 1 + k."""
    rows = completions.shape[0]
    targets = np.full((rows, total), pad_id, np.int32)
    loss_mask = np.zeros((rows, total), np.float32)
    for i in range(rows):
        length = int(lengths[i])
        targets[i, width - 1:width - 1 + length] = completions[i, :length]
        loss_mask[i, width - 1:width - 1 + length] = 1.0
    return targets, loss_mask


def align_to_targets(values: np.ndarray, lengths: np.ndarray, width: int, total: int) -> np.ndarray:
    """Per-completion-token values [B, M] (e.g. sampler log-probs) placed at their target columns [B, total]."""
    out = np.zeros((values.shape[0], total), np.float32)
    for i in range(values.shape[0]):
        length = int(lengths[i])
        out[i, width - 1:width - 1 + length] = values[i, :length]
    return out


def reward_statistics(details: Sequence[RewardDetail], lengths: np.ndarray, finished: np.ndarray,
                      group_size: int) -> dict[str, float]:
    """Logged rollout statistics: reward mean/median/std, pass rate (correct completions), group pass rate
    (prompts with at least one correct completion), groups with identical rewards (zero advantage), formatted
    rate, mean response length and the fraction cut by the token budget."""
    rewards = np.asarray([d.reward for d in details], np.float64)
    correct = np.asarray([d.correct for d in details], bool)
    grouped = rewards.reshape(-1, group_size)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_median": float(np.median(rewards)),
        "reward_std": float(rewards.std()),
        "pass_rate": float(correct.mean()),
        "group_pass_rate": float(correct.reshape(-1, group_size).any(axis=1).mean()),
        "zero_advantage_groups": float((grouped.max(axis=1) == grouped.min(axis=1)).mean()),
        "formatted_rate": float(np.mean([d.formatted for d in details])),
        "response_length": float(np.mean(lengths)),
        "truncated_rate": float(1.0 - np.mean(finished)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _context_logprobs(graphdef, trainable, frozen, arrays: dict) -> jax.Array:
    model = nnx.merge(graphdef, trainable, frozen)
    return token_stats(model, arrays["input_ids"], arrays["attention_mask"], arrays["positions"],
                       arrays["segment_ids"], targets=arrays["targets"]).logprobs


class ReferenceModel:
    """The frozen starting parameters (`Trainer.start_parameters`: a copy in the compute dtype and the parameters'
    sharding, so a bf16 run's reference costs half the float32 master weights) whose token log-probs anchor the KL
    penalty."""

    def __init__(self, graphdef, trainable, frozen, mesh=None):
        self.graphdef = graphdef
        self.trainable = trainable
        self.frozen = frozen
        self.mesh = mesh

    def logprobs(self, arrays: Mapping[str, np.ndarray], chunk_rows: int) -> np.ndarray:
        """log p_ref(targets) [B, T] computed ``chunk_rows`` rows at a time."""
        rows = arrays["input_ids"].shape[0]
        keys = ("input_ids", "attention_mask", "positions", "segment_ids", "targets")
        pieces = []
        for start in range(0, rows, chunk_rows):
            chunk = {k: np.asarray(arrays[k][start:start + chunk_rows]) for k in keys}
            if self.mesh is not None:
                from forgetjax.sharding import shard_batch

                with jax.set_mesh(self.mesh):
                    out = _context_logprobs(self.graphdef, self.trainable, self.frozen, shard_batch(chunk, self.mesh))
            else:
                out = _context_logprobs(self.graphdef, self.trainable, self.frozen, chunk)
            pieces.append(np.asarray(to_host(out), np.float32))
        return np.concatenate(pieces, axis=0)


# ---------------------------------------------------------------------------------------------------------------
# The online batch source
# ---------------------------------------------------------------------------------------------------------------


class RolloutSpec(Protocol):
    """What a method decides about its rollouts."""

    def sample_messages(self, problem) -> Messages:
        """The chat context completions are sampled in."""

    def extra_contexts(self, problem) -> dict[str, Messages]:
        """Further contexts the same completions are scored under in the loss, by array-name prefix."""


class OnlineSource:
    """Batch source of the online methods (see the module docstring). State: the index of the next problem, the
    rollout counter and how many more updates the current rollout serves."""

    def __init__(self, trainer, problems: Sequence, domain: str, args: RolloutArgs, spec: RolloutSpec, *,
                 advantage_mode: str, reference: ReferenceModel | None = None,
                 reward_pool: RewardScorer | None = None):
        cfg = trainer.cfg
        if cfg.batch_size % args.group_size:
            raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of method_args.group_size="
                             f"{args.group_size} (rows = prompts per step x group size)")
        self.prompts_per_step = cfg.batch_size // args.group_size
        if self.prompts_per_step % cfg.micro_batches:
            raise ValueError(f"train.micro_batches={cfg.micro_batches} must divide the prompts per step "
                             f"(batch_size / group_size = {self.prompts_per_step}) so micro-batches hold whole "
                             "groups")
        if not problems:
            raise ValueError("no training problems")
        self.problems = list(problems)
        self.domain = domain
        self.args = args
        self.spec = spec
        self.advantage_mode = advantage_mode
        self.reference = reference
        self.tokenizer = trainer.tokenizer
        self.model_config = trainer.model_config
        self.micro_batches = cfg.micro_batches
        self.max_length = cfg.max_length
        self.seed = cfg.seed
        self.chunk_rows = cfg.batch_size // cfg.micro_batches
        self.cache_dir = Path(trainer.out_dir) / "data" / "rollouts"
        # rollouts a kept checkpoint may still be reusing: keep x every steps back, plus the current one
        self.keep_rollouts = max(cfg.checkpoint.keep, 1) * math.ceil(cfg.checkpoint.every / args.updates_per_batch) + 2
        self.next_problem = 0
        self.rollout_id = 0
        self.reuse_left = 0
        self.skipped_prompts = 0
        self._current: Batch | None = None
        self._order: list[int] = []
        self._order_epoch = -1
        self._encoded: dict[tuple[str, str], list[int]] = {}
        if reward_pool is None:
            pool = RewardPool(args.reward_workers, args.math_timeout_s, args.code_timeout_s,
                              format_penalty=args.format_penalty, qa_metric=args.qa_metric)
            weakref.finalize(self, pool.close)
            reward_pool = pool
        self.reward_pool = reward_pool
        if is_writer():
            write_json_atomic(Path(trainer.out_dir) / "data" / "online_source.json", {
                "problems": len(self.problems), "domain": domain, "prompts_per_step": self.prompts_per_step,
                "group_size": args.group_size, "updates_per_batch": args.updates_per_batch,
                "advantage": advantage_mode, "reference_model": reference is not None,
            })

    # -- state ------------------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {"next_problem": self.next_problem, "rollout_id": self.rollout_id, "reuse_left": self.reuse_left,
                "skipped_prompts": self.skipped_prompts}

    def data_use(self) -> DataUse:
        """Problems drawn (skipped ones included) over the problem set: epochs are passes over its shuffled order."""
        return DataUse(size=len(self.problems), consumed=self.next_problem)

    def set_state(self, state: dict) -> None:
        expected = {"next_problem", "rollout_id", "reuse_left", "skipped_prompts"}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"online source state must have keys {sorted(expected)}, got {state!r}")
        self.next_problem, self.rollout_id = int(state["next_problem"]), int(state["rollout_id"])
        self.reuse_left, self.skipped_prompts = int(state["reuse_left"]), int(state["skipped_prompts"])
        self._current = self._load_rollout(self.rollout_id) if self.reuse_left > 0 else None

    # -- problems and prompts ---------------------------------------------------------------------------------

    def problem_at(self, index: int):
        """The problem at global position ``index`` of the endless per-epoch shuffled order."""
        epoch, offset = divmod(index, len(self.problems))
        if self._order_epoch != epoch:
            self._order = shuffled_order(len(self.problems), derived_seed(self.seed, epoch, _ORDER_STREAM))
            self._order_epoch = epoch
        return self.problems[self._order[offset]]

    def _encode(self, problem_id: str, name: str, messages: Messages) -> list[int]:
        key = (problem_id, name)
        if key not in self._encoded:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self._encoded[key] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._encoded[key]

    def _prompt_contexts(self, problem) -> dict[str, list[int]]:
        """Token ids of every context of one problem: "" (sampling context) and each extra context."""
        contexts = {"": self.spec.sample_messages(problem), **self.spec.extra_contexts(problem)}
        return {name: self._encode(problem.id, name, messages) for name, messages in contexts.items()}

    def _next_problems(self) -> list[tuple[Any, dict[str, list[int]]]]:
        """The next prompts_per_step problems whose every context leaves room for max_new_tokens."""
        chosen, skipped_in_a_row = [], 0
        while len(chosen) < self.prompts_per_step:
            problem = self.problem_at(self.next_problem)
            self.next_problem += 1
            contexts = self._prompt_contexts(problem)
            if max(len(ids) for ids in contexts.values()) + self.args.max_new_tokens > self.max_length:
                self.skipped_prompts += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= len(self.problems):
                    raise ValueError(f"every prompt plus max_new_tokens={self.args.max_new_tokens} exceeds "
                                     f"train.max_length={self.max_length}")
                continue
            skipped_in_a_row = 0
            chosen.append((problem, contexts))
        return chosen

    # -- one step ---------------------------------------------------------------------------------------------

    def next_batch(self, context: StepContext) -> Batch:
        if self.reuse_left > 0 and self._current is not None:
            self.reuse_left -= 1
            update = self.args.updates_per_batch - self.reuse_left - 1
            info = {**self._current.info, "rollout_s": 0.0, "reward_s": 0.0, "reward_wait_s": 0.0,
                    "reference_s": 0.0, "rollout_update": float(update)}
            return dataclasses.replace(self._current, extra_flops={}, info=info)
        batch = self._rollout(context)
        self.rollout_id += 1
        self.reuse_left = self.args.updates_per_batch - 1
        if self.reuse_left > 0:
            self._save_rollout(self.rollout_id, batch)
            self._current = batch
        return batch

    def _rollout(self, context: StepContext) -> Batch:
        args, group = self.args, self.args.group_size
        chosen = self._next_problems()
        sampler = Sampler(context.current_model(), self.tokenizer, mesh=context.mesh)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, n=group, seed=sampling_seed(context.rng))
        start = time.perf_counter()
        completions: Completions = sampler.generate_tokens([contexts[""] for _, contexts in chosen], params)
        rollout_s = time.perf_counter() - start

        rows = [(problem, contexts) for problem, contexts in chosen for _ in range(group)]
        scored_at = {}
        submitted = time.perf_counter()
        pending = self.submit_rewards(context.mesh, [problem for problem, _ in rows], completions.texts)
        pending[0].add_done_callback(lambda _: scored_at.setdefault("done", time.perf_counter()))

        arrays, prompt_lengths = self._layout(rows, completions, sampler.pad_id)
        extra_flops = {"rollout": self.model_config.forward_flops(np.add(prompt_lengths, completions.lengths))}
        reference_s = 0.0
        if self.reference is not None:
            start = time.perf_counter()
            arrays["ref_logp"] = self.reference.logprobs(arrays, self.chunk_rows)
            reference_s = time.perf_counter() - start
            extra_flops["reference"] = self.model_config.forward_flops(arrays["attention_mask"].sum(axis=1))

        host_done = time.perf_counter()
        details = self.gather_rewards(*pending)
        reward_done = time.perf_counter()
        rewards = np.asarray([d.reward for d in details], np.float32)
        arrays["rewards"] = rewards
        arrays["advantages"] = np.asarray(group_advantages(jnp.asarray(rewards), group, self.advantage_mode))
        order = micro_batch_row_order(len(rows), self.micro_batches)
        arrays = {name: value[order] for name, value in arrays.items()}

        info = reward_statistics(details, completions.lengths, completions.finished, group)
        info.update({"rollout_s": rollout_s, "reward_s": scored_at.get("done", reward_done) - submitted,
                     "reward_wait_s": reward_done - host_done,
                     "reference_s": reference_s, "rollout_update": 0.0,
                     "skipped_prompts": float(self.skipped_prompts)})
        tokens = int(sum(v.sum() for k, v in arrays.items() if k.endswith("attention_mask")))
        return Batch(arrays=arrays, tokens=tokens, examples=len(rows), extra_flops=extra_flops, info=info)

    def submit_rewards(self, mesh, problems: Sequence, texts: Sequence[str]):
        """Send each completion (row i: ``texts[i]`` answering ``problems[i]``) this process's devices hold to the
        reward pool without waiting; the pending result for :meth:`gather_rewards`."""
        held = process_rows(mesh, len(problems))
        future = self.reward_pool.submit_details(
            [(self.domain, text, problem.reference) for problem, text in zip(problems[held], texts[held])])
        return future, held, len(problems)

    def gather_rewards(self, future, held, rows: int) -> list[RewardDetail]:
        """Every row's verdict, gathered from the processes that scored them."""
        details: list[RewardDetail] = future.result()
        if jax.process_count() > 1:
            details = [RewardDetail(**d) for d in gather_rows([dataclasses.asdict(d) for d in details], held, rows)]
        return details

    def _layout(self, rows, completions: Completions, pad_id: int) -> tuple[dict[str, np.ndarray], list[int]]:
        """Training arrays of every context (common prompt width, completions aligned) plus old_logp."""
        names = list(rows[0][1])
        width = max(len(contexts[name]) for _, contexts in rows for name in names)
        total = row_length(width, int(completions.lengths.max()))
        tokens, lengths = completions.tokens, completions.lengths
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            prefix = f"{name}_" if name else ""
            laid_out = context_arrays([contexts[name] for _, contexts in rows], tokens, lengths, width, total, pad_id)
            arrays.update({prefix + field: value for field, value in laid_out.items()})
        arrays["targets"], arrays["loss_mask"] = completion_targets(tokens, lengths, width, total, pad_id)
        arrays["old_logp"] = align_to_targets(completions.logprobs, lengths, width, total)
        return arrays, [len(contexts[""]) for _, contexts in rows]

    # -- rollout cache (resuming inside a reuse cycle) ---------------------------------------------------------

    def _rollout_path(self, rollout_id: int) -> Path:
        return self.cache_dir / f"{rollout_id:08d}.npz"

    def _save_rollout(self, rollout_id: int, batch: Batch) -> None:
        if not is_writer():
            return
        meta = {"tokens": batch.tokens, "examples": batch.examples,
                **{f"flops_{name}": value for name, value in batch.extra_flops.items()}}
        payload = {f"array/{k}": v for k, v in batch.arrays.items()}
        payload.update({f"info/{k}": np.float64(v) for k, v in batch.info.items()})
        payload.update({f"meta/{k}": np.float64(v) for k, v in meta.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **payload)
        with atomic_open(self._rollout_path(rollout_id)) as handle:
            handle.write(buffer.getvalue())
        for old in self.cache_dir.glob("*.npz"):
            if old.stem.isdigit() and int(old.stem) <= rollout_id - self.keep_rollouts:
                old.unlink(missing_ok=True)

    def _load_rollout(self, rollout_id: int) -> Batch:
        path = self._rollout_path(rollout_id)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the rollout being reused at the checkpoint is missing, so the run "
                                    "cannot resume inside its reuse cycle")
        with np.load(path) as data:
            arrays = {k.removeprefix("array/"): data[k] for k in data.files if k.startswith("array/")}
            info = {k.removeprefix("info/"): float(data[k]) for k in data.files if k.startswith("info/")}
            meta = {k.removeprefix("meta/"): float(data[k]) for k in data.files if k.startswith("meta/")}
        return Batch(arrays=arrays, tokens=int(meta["tokens"]), examples=int(meta["examples"]),
                     extra_flops={k.removeprefix("flops_"): v for k, v in meta.items() if k.startswith("flops_")},
                     info=info)



def reference_from_trainer(trainer) -> ReferenceModel:
    """The trainer's starting parameters (taken before any step or restore) as a reference model."""
    return ReferenceModel(trainer.graphdef, trainer.start_parameters(), trainer.state.frozen, mesh=trainer.mesh)
