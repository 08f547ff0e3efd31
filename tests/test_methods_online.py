"""Online methods (GRPO / Dr.GRPO / FRPO, π-Distill): first-update gradient = REINFORCE with a group baseline written
out by hand, row layout under micro-batching, the reward pipeline on scripted completions, rollout reuse and resume,
π-Distill for alpha in {0, 0.5, 1}; and (slow) learning checks on SmolLM2-135M-Instruct."""
import dataclasses
import json
import os
from concurrent.futures import Future
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import forgetjax
from forgetjax.losses.policy_gradient import policy_loss
from forgetjax.methods.registry import build_method
from forgetjax.methods.rollout import (
    align_to_targets,
    completion_targets,
    context_arrays,
    micro_batch_row_order,
    row_length,
)
from forgetjax.methods.run import DomainConfig, load_run_config
from forgetjax.sampling.sampler import Completions, Sampler
from forgetjax.sharding import make_mesh
from forgetjax.training.budget import BudgetConfig
from forgetjax.training.method import StepContext
from forgetjax.training.optim import OptimizerConfig
from forgetjax.training.step import _micro_batches
from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer
from forgetjax.verifiers.rewards import RewardDetail, RewardPool
from tiny_models import make_hf_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = 160
CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                 "{% if add_generation_prompt %}t5{% endif %}")


def toy_tokenizer():
    """Word-level tokenizer over t0..t159 (t0 pad/unk, t2 eos) with a toy chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class ParityRewards:
    """Scripted verifier: reward = fraction of even-numbered tokens in the completion text (varied, deterministic)."""

    @staticmethod
    def reward(text: str) -> float:
        words = text.split()
        return float(np.mean([int(w[1:]) % 2 == 0 for w in words])) if words else 0.0

    def submit_details(self, batch):
        future = Future()
        future.set_result([RewardDetail(domain, self.reward(text), self.reward(text) > 0.5, True, None, "scripted",
                                        False) for domain, text, _ in batch])
        return future


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, problems jsonl) of a tiny random Qwen2 and six toy problems (no words starting with t0/t2:
    the special tokens t0/t2 would split them)."""
    root = tmp_path_factory.mktemp("online")
    make_hf_model(root / "model", "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"t{10 + i} t{30 + i} t{50 + i}", "answer": f"t{40 + i}"})
                                + "\n" for i in range(6)))
    return root / "model", problems


def toy_domain(problems: Path) -> DomainConfig:
    return DomainConfig(name="math", source=str(problems), split="train", template="{question}")


def make_trainer(model_dir, method, out_dir, *, steps=1, batch_size=8, micro_batches=1, lr=1e-3, model=None):
    if model is None:
        model, _ = forgetjax.load(model_dir)
    cfg = TrainConfig(batch_size=batch_size, micro_batches=micro_batches, max_length=64,
                      budget=BudgetConfig("steps", steps), checkpoint=CheckpointConfig(every=100, keep=2),
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                      optimizer=OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=None), out_dir=str(out_dir))
    return Trainer(cfg, model, toy_tokenizer(), method, mesh=make_mesh(1, 1, 1, devices=[jax.devices()[0]]))


def context_for(trainer, step=0):
    return StepContext(current_model=trainer.current_model, step=step, rng=jax.random.key(100 + step),
                       mesh=trainer.mesh)


def recorded_generate(calls: list):
    """Sampler.generate_tokens, appending (prompts, Completions) of every call to `calls`."""
    original = Sampler.generate_tokens

    def record(self, prompts, params):
        out = original(self, prompts, params)
        calls.append((list(map(list, prompts)), out))
        return out

    return record


@pytest.fixture
def recorded(monkeypatch):
    """Every Completions the sampler returns, in call order."""
    calls = []
    monkeypatch.setattr(Sampler, "generate_tokens", recorded_generate(calls))
    return calls


def scripted_sampler(monkeypatch, texts_per_call, seen=None):
    """Replace sampling by fixed completions: the given texts, their toy-tokenizer ids, old log-probs -0.5. The
    prompt ids of every call are appended to ``seen`` when given."""
    calls = iter(texts_per_call)

    def generate(self, prompts, params):
        if seen is not None:
            seen.append([list(p) for p in prompts])
        texts = next(calls)
        assert len(texts) == len(prompts) * params.n
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"][:params.max_new_tokens] for text in texts]
        sizes = np.asarray([len(row) for row in ids])
        tokens = np.zeros((len(texts), params.max_new_tokens), np.int32)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = row
        logprobs = np.where(np.arange(params.max_new_tokens)[None] < sizes[:, None], -0.5, 0.0).astype(np.float32)
        return Completions(tokens=tokens, logprobs=logprobs, lengths=sizes, texts=list(texts),
                           finished=np.ones(len(texts), bool))

    monkeypatch.setattr(Sampler, "generate_tokens", generate)


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, group_size, micro", [(4, 3, 2), (6, 2, 3), (2, 4, 1), (4, 2, 4)])
def test_micro_batches_hold_whole_groups_in_order(groups, group_size, micro):
    rows = groups * group_size
    group_of_row = np.repeat(np.arange(groups), group_size)  # group-major rows, as the sampler returns them
    arranged = group_of_row[micro_batch_row_order(rows, micro)]
    micros = np.asarray(_micro_batches({"g": jnp.asarray(arranged)}, micro)["g"])
    per_micro = groups // micro
    for m in range(micro):
        expected = np.repeat(np.arange(m * per_micro, (m + 1) * per_micro), group_size)
        np.testing.assert_array_equal(micros[m], expected)
    if micro > 1:  # without the reordering the strided split tears groups apart
        torn = np.asarray(_micro_batches({"g": jnp.asarray(group_of_row)}, micro)["g"])
        assert any(len(set(torn[m][i:i + group_size])) > 1 for m in range(micro) for i in range(0, rows // micro,
                                                                                               group_size))


def test_frpo_loss_over_reordered_micro_batches_equals_full_batch():
    """FRPO's per-group objective summed over micro-batches (reordered rows) equals the full-batch value."""
    rng = np.random.default_rng(0)
    groups, group_size, micro, length = 4, 3, 2, 5
    rows = groups * group_size
    logp = jnp.asarray(rng.normal(-2, 0.3, (rows, length)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.1, (rows, length)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=rows), jnp.float32)
    mask = jnp.asarray(rng.random((rows, length)) < 0.8, jnp.float32)
    loss = jax.jit(lambda *xs: policy_loss(*xs[:2], None, *xs[2:], variant="frpo", group_size=group_size,
                                           frpo_lambda=2.0)[:2])
    full_sum, full_count = loss(logp, old, adv, mask)
    order = micro_batch_row_order(rows, micro)
    micros = _micro_batches({"logp": logp[order], "old": old[order], "adv": adv[order], "mask": mask[order]}, micro)
    total, count = 0.0, 0.0
    for m in range(micro):
        s, c = loss(micros["logp"][m], micros["old"][m], micros["adv"][m], micros["mask"][m])
        total, count = total + s, count + c
    assert float(count) == float(full_count) == rows
    np.testing.assert_allclose(float(total), float(full_sum), rtol=1e-5)


def test_rows_align_completion_tokens_across_contexts():
    """Prompts of different lengths end at one column; targets/old log-probs sit one column left of each token."""
    completions = np.asarray([[7, 8, 2, 0], [9, 2, 0, 0]], np.int32)
    lengths = np.asarray([3, 2])
    prompts = [[11, 12, 13], [14]]
    arrays = context_arrays(prompts, completions, lengths, width=4, total=8, pad_id=0)
    np.testing.assert_array_equal(arrays["input_ids"], [[0, 11, 12, 13, 7, 8, 2, 0], [0, 0, 0, 14, 9, 2, 0, 0]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(arrays["positions"], [[0, 0, 1, 2, 3, 4, 5, 5], [0, 0, 0, 0, 1, 2, 2, 2]])
    targets, loss_mask = completion_targets(completions, lengths, width=4, total=8, pad_id=0)
    np.testing.assert_array_equal(targets, [[0, 0, 0, 7, 8, 2, 0, 0], [0, 0, 0, 9, 2, 0, 0, 0]])
    np.testing.assert_array_equal(loss_mask, [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
    old = align_to_targets(np.asarray([[-1, -2, -3, 0], [-4, -5, 0, 0]], np.float32), lengths, 4, 8)
    np.testing.assert_array_equal(old, [[0, 0, 0, -1, -2, -3, 0, 0], [0, 0, 0, -4, -5, 0, 0, 0]])
    assert (row_length(4, 3), row_length(61, 3), row_length(62, 3), row_length(100, 100)) == (64, 64, 128, 256)
    # every target of a real token is the next real token of the row
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    on = loss_mask > 0
    assert np.array_equal(targets[:, :-1][on[:, :-1]], ids[:, 1:][on[:, :-1]]) and mask[:, 1:][on[:, :-1]].all()


# ---------------------------------------------------------------------------------------------------------------
# First update = REINFORCE with a group baseline
# ---------------------------------------------------------------------------------------------------------------


def sequence_logprobs(model, rows: list[tuple[list[int], list[int]]]) -> jax.Array:
    """sum_t log p(y_t | x, y_<t) per (x, y) row, from one forward of the rows right-padded (causal attention: the
    padding after a sequence cannot change it)."""
    width = max(len(x) + len(y) for x, y in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    gather = np.zeros((len(rows), width), np.float32)
    targets = np.zeros((len(rows), width), np.int32)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x) + len(y)] = x + y
        mask[i, :len(x) + len(y)] = True
        targets[i, len(x) - 1:len(x) + len(y) - 1] = y
        gather[i, len(x) - 1:len(x) + len(y) - 1] = 1.0
    logp = jax.nn.log_softmax(model(jnp.asarray(ids), jnp.asarray(mask)), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * gather, axis=1)


def reinforce_advantages(rewards: np.ndarray, group_size: int, variant: str, frpo_lambda: float) -> np.ndarray:
    """Per-sample REINFORCE weights of each variant's on-policy gradient, in float64 numpy."""
    r = rewards.reshape(-1, group_size).astype(np.float64)
    if variant == "drgrpo":
        return (r - r.mean(1, keepdims=True)).reshape(-1)
    a = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    if variant == "grpo":
        return a.reshape(-1)
    w = np.exp(-a / frpo_lambda)
    return (max(frpo_lambda, 1.0) * (1.0 - w / w.mean(1, keepdims=True))).reshape(-1)


@pytest.mark.parametrize("method_name, beta", [("on_rl_grpo", 0.1), ("on_rl_frpo", 0.0),
                                               pytest.param("on_rl_drgrpo", 0.0, marks=pytest.mark.slow)])
def test_first_update_gradient_is_reinforce_with_group_baseline(tiny, tmp_path, recorded, method_name, beta):
    model_dir, problems = tiny
    group, max_new = 4, 6
    args = {"group_size": group, "max_new_tokens": max_new, "beta": beta, "frpo_lambda": 3.0}
    method = build_method(method_name, args, toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=8, micro_batches=2)
    source = method.batch_source(trainer)
    batch = source.next_batch(context_for(trainer))
    (prompts, completions), = recorded
    assert ("ref_logp" in batch.arrays) == (beta > 0)

    model = trainer.current_model()
    tokenizer = trainer.tokenizer
    rows = [(prompts[i // group], completions.tokens[i, :completions.lengths[i]].tolist()) for i in range(2 * group)]
    for prompt, _ in rows:  # the sampled context is the chat-templated problem prompt
        text = tokenizer.decode(prompt)
        assert text.startswith("t3 t") and text.endswith("t4 t5"), text
    rewards = np.asarray([ParityRewards.reward(t) for t in completions.texts])
    weights = reinforce_advantages(rewards, group, method.variant, 3.0)
    assert np.abs(weights).max() > 0.1  # the check below is not vacuous
    counts = np.asarray([len(y) for _, y in rows], np.float64)
    normaliser = np.full_like(counts, max_new) if method.variant == "drgrpo" else counts

    graphdef, params = nnx.split(model)

    def reinforce_loss(state):
        m = nnx.merge(graphdef, state)
        logps = sequence_logprobs(m, rows)
        return -jnp.sum(jnp.asarray(weights / normaliser, jnp.float32) * logps) / len(rows), logps

    def method_loss(state):  # through the trainer's micro-batch split, summed and normalised once
        m = nnx.merge(graphdef, state)
        micros = _micro_batches({k: jnp.asarray(v) for k, v in batch.arrays.items()}, 2)
        sums, counts = zip(*[method.loss(m, jax.tree.map(lambda x: x[i], micros), jax.random.key(0))[:2]
                             for i in range(2)])
        return sum(sums) / sum(counts)

    expected, sequence_logps = jax.jit(jax.grad(reinforce_loss, has_aux=True))(params)
    expected = nnx.to_pure_dict(expected)
    actual = nnx.to_pure_dict(jax.jit(jax.grad(method_loss))(params))
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-3, atol=2e-4 * scale)

    # old log-probs (from the sampler) are the policy's log-probs of the sampled tokens: ratio 1 on the first update
    inverse = np.argsort(micro_batch_row_order(2 * group, 2))
    old = batch.arrays["old_logp"][inverse]
    np.testing.assert_allclose(old.sum(axis=1), np.asarray(sequence_logps), rtol=1e-4, atol=1e-4)


def test_train_decode_attention_reaches_the_rollouts(tiny, tmp_path, monkeypatch):
    """`train.decode_attention: paged` is set on the model before the Trainer takes its graph, so GRPO's rollouts
    decode through the TPU paged kernel (interpreted on CPU); their old log-probs stay the policy's (2e-3 per
    sequence for the kernel's bfloat16 keys and values; measured 2.2e-4). On a GPU the setting is refused, naming
    the field, before any model loads."""
    import forgetjax.methods.run as run_module
    from forgetjax.config import ConfigError
    from forgetjax.methods.run import RunConfig, run_training
    from forgetjax.models import decoder

    model_dir, problems = tiny
    taken = []

    class Taken(Exception):
        pass

    def take(cfg, model, *args, **kwargs):
        taken.append(model)
        raise Taken

    cfg = RunConfig(train=TrainConfig(model=str(model_dir), decode_attention="paged", out_dir=str(tmp_path / "run")),
                    method="on_rl_grpo", domain=toy_domain(problems))
    monkeypatch.setattr(run_module, "Trainer", take)
    with pytest.raises(Taken):
        run_training(cfg, mesh=make_mesh(1, 1, 1, devices=[jax.devices()[0]]))
    assert taken[0].decode_attention == "paged"
    monkeypatch.undo()
    recorded = []
    monkeypatch.setattr(Sampler, "generate_tokens", recorded_generate(recorded))

    traced = []
    paged = decoder.paged_decode_attention
    monkeypatch.setattr(decoder, "paged_decode_attention", lambda *a, **k: traced.append(1) or paged(*a, **k))
    method = build_method("on_rl_grpo", {"group_size": 4, "max_new_tokens": 6, "beta": 0.0}, toy_domain(problems))
    method.reward_pool = ParityRewards()
    model, _ = forgetjax.load(model_dir)
    model.decode_attention = "paged"
    trainer = make_trainer(model_dir, method, tmp_path / "direct", batch_size=8, model=model)
    batch = method.batch_source(trainer).next_batch(context_for(trainer))
    assert traced
    (prompts, completions), = recorded
    rows = [(prompts[i // 4], completions.tokens[i, :completions.lengths[i]].tolist()) for i in range(8)]
    old = batch.arrays["old_logp"].sum(axis=1)[np.argsort(micro_batch_row_order(8, 1))]
    np.testing.assert_allclose(old, np.asarray(sequence_logprobs(trainer.current_model(), rows)), atol=2e-3)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="train.decode_attention: paged decode attention is jax's TPU kernel"):
        run_training(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Rewards pipeline, reuse, resume, budgets
# ---------------------------------------------------------------------------------------------------------------


def test_reward_pipeline_scores_scripted_completions(tiny, tmp_path, monkeypatch):
    """Real math verifier on scripted completions -> rewards, group advantages, pass rates, FLOPs."""
    model_dir, _ = tiny
    problems = tmp_path / "math.jsonl"
    problems.write_text("".join(json.dumps({"question": f"t{10 + i}", "answer": str(answer)}) + "\n"
                                for i, answer in enumerate([4, 12])))
    texts = [["So the answer is \\boxed{4}.", "It is 5.", "\\boxed{4}", "I do not know"],
             ["\\boxed{12}", "\\boxed{12.0}", "The total is 12", "\\boxed{13}"]]
    method = build_method("on_rl_grpo", {"group_size": 4, "max_new_tokens": 16}, toy_domain(problems))
    trainer = make_trainer(model_dir, method, tmp_path / "out", batch_size=8, micro_batches=2)
    source = method.batch_source(trainer)
    first = source.problem_at(0)
    ordered = texts if first.reference == "4" else texts[::-1]
    scripted_sampler(monkeypatch, [ordered[0] + ordered[1]])
    batch = source.next_batch(context_for(trainer))

    expected_rewards = np.asarray([1, 0, 1, 0, 1, 1, 1, 0] if first.reference == "4" else [1, 1, 1, 0, 1, 0, 1, 0],
                                  np.float64)
    inverse = np.argsort(micro_batch_row_order(8, 2))
    np.testing.assert_array_equal(batch.arrays["rewards"][inverse], expected_rewards)
    grouped = expected_rewards.reshape(2, 4)
    advantages = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(batch.arrays["advantages"][inverse], advantages.reshape(-1), rtol=1e-5)
    assert batch.info["reward_mean"] == pytest.approx(0.625)
    assert batch.info["pass_rate"] == pytest.approx(0.625)
    assert batch.info["group_pass_rate"] == 1.0
    lengths = np.asarray([len(trainer.tokenizer(t, add_special_tokens=False)["input_ids"])
                          for t in ordered[0] + ordered[1]])
    assert lengths.max() <= 16
    assert batch.info["response_length"] == pytest.approx(lengths.mean())
    prompt_lengths = [len(trainer.tokenizer.apply_chat_template(
        [{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=True)["input_ids"])
        for p in (source.problem_at(0), source.problem_at(1)) for _ in range(4)]
    flops = sum((p + n) * trainer.model_config.flops_per_token(p + n) for p, n in zip(prompt_lengths, lengths))
    assert batch.extra_flops == {"rollout": pytest.approx(flops)}  # beta = 0: no reference model
    assert batch.tokens == sum(prompt_lengths) + lengths.sum()
    assert isinstance(source.reward_pool, RewardPool)
    source.reward_pool.close()


def test_updates_per_batch_reuse_the_rollout_and_resume_inside_a_cycle(tiny, tmp_path, monkeypatch):
    model_dir, problems = tiny
    args = {"group_size": 2, "max_new_tokens": 4, "updates_per_batch": 2}
    method = build_method("on_rl_grpo", args, toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4)
    source = method.batch_source(trainer)
    scripted_sampler(monkeypatch, [["t6", "t7", "t8 t9", "t10"], ["t2", "t4", "t5", "t7"]])
    first = source.next_batch(context_for(trainer, 0))
    state = source.get_state()
    second = source.next_batch(context_for(trainer, 1))
    assert first.extra_total > 0 and second.extra_flops == {}
    for name in first.arrays:
        np.testing.assert_array_equal(first.arrays[name], second.arrays[name])
    resumed = method.batch_source(trainer)
    resumed.set_state(json.loads(json.dumps(state)))
    again = resumed.next_batch(context_for(trainer, 1))
    for name in first.arrays:
        np.testing.assert_array_equal(first.arrays[name], again.arrays[name])
    third = source.next_batch(context_for(trainer, 2))  # a fresh rollout on the next problems
    assert third.extra_total > 0 and source.get_state()["next_problem"] == 4
    np.testing.assert_array_equal(third.arrays["rewards"], [1, 1, 0, 0])


def test_bad_settings_name_the_field(tiny, tmp_path):
    model_dir, problems = tiny
    with pytest.raises(ValueError, match="micro_batches=4 must divide"):
        method = build_method("on_rl_grpo", {"group_size": 4}, toy_domain(problems))
        method.batch_source(make_trainer(model_dir, method, tmp_path, batch_size=8, micro_batches=4))
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of method_args.group_size=4"):
        method = build_method("on_rl_frpo", {"group_size": 4}, toy_domain(problems))
        method.batch_source(make_trainer(model_dir, method, tmp_path, batch_size=6))
    with pytest.raises(ValueError, match="method_args.alpha"):
        build_method("pi_distill", {"alpha": 1.5}, toy_domain(problems))
    with pytest.raises(ValueError, match="method_args.beta"):
        build_method("on_rl_grpo", {"beta": -1.0}, toy_domain(problems))
    with pytest.raises(ValueError, match="privileged_template"):
        build_method("pi_distill", {"privileged_template": "{prompt} only"}, toy_domain(problems))


@pytest.mark.parametrize("name", ["on_rl_grpo", "on_rl_drgrpo", "on_rl_frpo", "pi_distill", "self_sdft_online"])
def test_method_configs_load_and_build(name):
    cfg = load_run_config(REPO / "configs" / "methods" / f"{name}.yaml")
    assert cfg.method == name
    method = build_method(cfg.method, cfg.method_args, cfg.domain)
    assert method.trim == "none"
    assert cfg.train.batch_size % cfg.method_args["group_size"] == 0


# ---------------------------------------------------------------------------------------------------------------
# π-Distill
# ---------------------------------------------------------------------------------------------------------------


def test_pi_distill_rows_share_completions_and_differ_by_the_privileged_context(tiny, tmp_path, monkeypatch):
    model_dir, problems = tiny
    args = {"group_size": 2, "max_new_tokens": 4, "privileged_template": "{prompt} t9 {answer}"}
    method = build_method("pi_distill", args, toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4)
    source = method.batch_source(trainer)
    scripted_sampler(monkeypatch, [["t6", "t7", "t8 t9", "t10"]])
    arrays = source.next_batch(context_for(trainer)).arrays
    decode = trainer.tokenizer.decode
    completions = ["t6", "t7", "t8 t9", "t10"]
    for row in range(4):
        problem = source.problem_at(row // 2)
        question, answer = problem.metadata["question"], problem.reference
        teacher = decode(arrays["input_ids"][row][arrays["attention_mask"][row]])
        student = decode(arrays["student_input_ids"][row][arrays["student_attention_mask"][row]])
        assert teacher == f"t3 {question} t9 {answer} t4 t5 {completions[row]}"
        assert student == f"t3 {question} t4 t5 {completions[row]}"
        on = arrays["loss_mask"][row] > 0
        assert decode(arrays["targets"][row][on]) == completions[row]
        for prefix in ("", "student_"):  # both contexts predict the same targets at the same columns
            np.testing.assert_array_equal(arrays[f"{prefix}input_ids"][row][1:][on[:-1]],
                                          arrays["targets"][row][:-1][on[:-1]])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_pi_distill_trains_a_step_for_each_alpha(tiny, tmp_path, alpha):
    model_dir, problems = tiny
    args = {"group_size": 2, "max_new_tokens": 4, "alpha": alpha, "beta": 0.05,
            "privileged_template": "{prompt} t9 {answer}"}
    method = build_method("pi_distill", args, toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4, micro_batches=2)
    before = jax.tree.map(np.array, nnx.to_pure_dict(trainer.state.trainable))
    result = trainer.fit()
    after = jax.tree.map(np.array, nnx.to_pure_dict(trainer.state.trainable))
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert result.steps == 1 and np.isfinite(logged["loss"]) and logged["grad_norm"] > 0
    assert {"teacher_objective", "student_objective", "kl_teacher_student", "reward_mean", "rollout_s"} <= set(logged)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ---------------------------------------------------------------------------------------------------------------
# Online SELF
# ---------------------------------------------------------------------------------------------------------------


def toy_ids(text: str) -> list[int]:
    """The toy tokenizer's ids of a text of words t<i>, written out: word t<i> is id i."""
    return [int(word[1:]) for word in text.split()]


def test_self_online_batch_trains_only_verified_samples_or_rewrites(tiny, tmp_path, monkeypatch):
    """Prompt A has one correct sample (its only target); prompt B none, so it is rewritten from the reference and
    its one correct rewrite is its only target. Every array equals the batch built by hand from the token ids."""
    model_dir, problems = tiny
    args = {"group_size": 2, "max_new_tokens": 4, "rewrite_template": "{question} t9 {reference}"}
    method = build_method("self_sdft_online", args, toy_domain(problems))
    method.reward_pool = ParityRewards()  # correct = more than half of the words even
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4)
    source = method.batch_source(trainer)
    source.problems = [dataclasses.replace(p, metadata={**p.metadata, "solution": "t61 t63"})
                       for p in source.problems]
    seen = []
    scripted_sampler(monkeypatch, [["t6 t8", "t7", "t9", "t11 t13"], ["t40 t42", "t41"]], seen)
    batch = source.next_batch(context_for(trainer))
    a, b = source.problem_at(0), source.problem_at(1)
    prompt = {p.id: [3, *toy_ids(p.prompt), 4, 5] for p in (a, b)}
    assert seen[0] == [prompt[a.id], prompt[b.id]]
    assert len(seen[1]) == 1 and seen[1][0][:len(toy_ids(b.prompt)) + 3] == [3, *toy_ids(b.prompt), 9, 61]
    targets = [("t6 t8", a), (None, a), ("t40 t42", b), (None, b)]
    width, total = max(len(p) for p in prompt.values()), 64
    expected_ids = np.zeros((4, total), np.int32)
    expected_mask = np.zeros((4, total), np.float32)
    expected_targets = np.zeros((4, total), np.int32)
    for row, (target, problem) in enumerate(targets):
        ids = prompt[problem.id]
        completion = toy_ids(target) if target else []
        expected_ids[row, width - len(ids):width + len(completion)] = ids + completion
        expected_mask[row, width - 1:width - 1 + len(completion)] = 1.0
        expected_targets[row, width - 1:width - 1 + len(completion)] = completion
    np.testing.assert_array_equal(batch.arrays["input_ids"], expected_ids)
    np.testing.assert_array_equal(batch.arrays["loss_mask"], expected_mask)
    np.testing.assert_array_equal(batch.arrays["targets"], expected_targets)
    np.testing.assert_array_equal(batch.arrays["attention_mask"], expected_ids > 0)
    assert batch.tokens == (expected_ids > 0).sum() and batch.examples == 4
    assert batch.info["target_rate"] == 0.5 and batch.info["rewrite_target_rate"] == 0.25
    assert batch.info["pass_rate"] == 0.25
    flops = trainer.model_config.flops_per_token
    sampled = [len(prompt[p.id]) + n for p, n in ((a, 2), (a, 1), (b, 1), (b, 2))]
    rewritten = [len(seen[1][0]) + n for n in (2, 1)]
    assert set(batch.extra_flops) == {"rollout"}  # sampling with the policy, rewrites included (budget components)
    assert batch.extra_flops["rollout"] == pytest.approx(sum(n * flops(n) for n in sampled + rewritten))


def test_self_online_without_rewrites_leaves_failing_prompts_untrained(tiny, tmp_path, monkeypatch):
    model_dir, problems = tiny
    method = build_method("self_sdft_online", {"group_size": 2, "max_new_tokens": 4, "rewrite": False},
                          toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4)
    seen = []
    scripted_sampler(monkeypatch, [["t7", "t9", "t11", "t6 t8 t10"]], seen)
    batch = method.batch_source(trainer).next_batch(context_for(trainer))
    assert len(seen) == 1  # no rewrite call
    np.testing.assert_array_equal(batch.arrays["loss_mask"].sum(axis=1), [0, 0, 0, 3])


@pytest.mark.parametrize("name, domain", [  # CI runs each method and each domain; the slow set every pair
    ("pi_distill", "code"), ("self_sdft_online", "math"), ("self_sdft_online", "qa"),
    pytest.param("pi_distill", "math", marks=pytest.mark.slow),
    pytest.param("pi_distill", "qa", marks=pytest.mark.slow),
    pytest.param("self_sdft_online", "code", marks=pytest.mark.slow)])
def test_online_method_trains_in_every_domain(tmp_path_factory, data_dir, name, domain):
    """Two steps on real training problems of each domain with the real verifiers (code: the sandbox), on a tiny
    random chat model with a byte-level tokenizer; self_sdft_online's rewrites are forced by random completions."""
    from tiny_models import make_tiny_chat_model

    model_dir = tmp_path_factory.getbasetemp() / "tiny_chat"
    if not model_dir.exists():
        make_tiny_chat_model(model_dir)
    source = {"math": "gsm8k", "code": "mbpp", "qa": "efficientqa"}[domain]
    config = DomainConfig(name=domain, source=source, limit=4, data_dir=str(data_dir))
    method = build_method(name, {"group_size": 2, "max_new_tokens": 8, "reward_workers": 1}, config)
    model, tokenizer = forgetjax.load(model_dir)
    out = tmp_path_factory.mktemp(f"{name}_{domain}")
    cfg = TrainConfig(batch_size=4, micro_batches=1, max_length=2048, budget=BudgetConfig("steps", 2),
                      checkpoint=CheckpointConfig(every=100, keep=1),
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                      optimizer=OptimizerConfig(lr=1e-3, schedule="constant", max_grad_norm=None), out_dir=str(out))
    trainer = Trainer(cfg, model, tokenizer, method, mesh=make_mesh(1, 1, 1, devices=[jax.devices()[0]]))
    result = trainer.fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(np.isfinite(row["loss"]) for row in logged)
    assert logged[0]["skipped_prompts"] == 0
    if name == "self_sdft_online":
        assert logged[0]["rewrite_prompts"] == 2  # random bytes solve nothing


# ---------------------------------------------------------------------------------------------------------------
# Learning on SmolLM2-135M-Instruct (slow)
# ---------------------------------------------------------------------------------------------------------------

ADDITION_TEMPLATE = "{question} Put the final answer in \\boxed{}."


def addition_problems(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        a, b = (int(v) for v in rng.integers(1, 10, size=2))
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sampled_reward(model, tokenizer, problems, pool, *, samples: int, max_new_tokens: int, seed: int) -> float:
    """Mean verifier reward of `samples` temperature-1 completions per problem, prompted with the problem alone
    (the student's context for π-Distill)."""
    from forgetjax.sampling.sampler import SamplingParams

    sampler = Sampler(model, tokenizer)
    prompts = [sampler.encode_chat([{"role": "user", "content": p.prompt}]) for p in problems]
    out = sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                                          n=samples, seed=seed))
    refs = [p.reference for p in problems for _ in range(samples)]
    return float(np.mean(pool.score([("math", text, ref) for text, ref in zip(out.texts, refs)])))


MICRO_BATCHES = {"on_rl_grpo": 1, "pi_distill": 2}  # π-Distill runs two forward passes per row: half the rows each
LEARNING_SETTINGS = {
    "on_rl_grpo": {"group_size": 8, "max_new_tokens": 24, "temperature": 1.0, "beta": 0.0},
    "pi_distill": {"group_size": 8, "max_new_tokens": 24, "temperature": 1.0, "alpha": 0.5, "beta": 0.0},
}


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("method_name", ["on_rl_grpo", "pi_distill"])
def test_online_method_raises_reward_of_smollm2_on_single_digit_addition(tmp_path, method_name):
    """SmolLM2-135M-Instruct answers 'What is a + b? Answer with just the number.' correctly in a minority of
    temperature-1 samples; a few steps of GRPO (or π-Distill, whose teacher is told the answer) must raise the
    reward of prompt-only samples on the training problems, for two seeds."""
    from forgetjax.envs import load_problems

    path = tmp_path / "addition.jsonl"
    rng = np.random.default_rng(0)
    rows = [{"question": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)}
            for a, b in rng.integers(1, 10, size=(64, 2)).tolist()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    domain = DomainConfig(name="math", source=str(path), split="train", template="{question}")
    problems = load_problems("math", str(path), split="train", template="{question}")
    steps = int(os.environ.get("FORGETJAX_ONLINE_LEARNING_STEPS", "8"))
    evaluate = dict(samples=4, max_new_tokens=24, seed=1234)
    report = {}
    with RewardPool(2) as pool:
        model, tokenizer = forgetjax.load("smollm2-135m-instruct")
        before = sampled_reward(model, tokenizer, problems[:32], pool, **evaluate)
        print(f"\nstep-0 reward of prompt-only samples: {before:.3f}", flush=True)
        for seed in (0, 1):
            model, tokenizer = forgetjax.load("smollm2-135m-instruct")
            method = build_method(method_name, LEARNING_SETTINGS[method_name], domain)
            cfg = TrainConfig(batch_size=16, micro_batches=MICRO_BATCHES[method_name], max_length=128, seed=seed,
                              budget=BudgetConfig("steps", steps), checkpoint=CheckpointConfig(every=1000, keep=1),
                              log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                              optimizer=OptimizerConfig(lr=1e-5, schedule="constant", max_grad_norm=1.0),
                              out_dir=str(tmp_path / f"{method_name}-{seed}"))
            trainer = Trainer(cfg, model, tokenizer, method, mesh=make_mesh(1, 1, 1, devices=[jax.devices()[0]]))
            trainer.fit()
            after = sampled_reward(trainer.current_model(), tokenizer, problems[:32], pool, **evaluate)
            logged = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
            report[seed] = {"before": before, "after": after, "train_rewards": [m["reward_mean"] for m in logged]}
    print(f"\n{method_name} learning check ({steps} steps): {json.dumps(report)}")
    assert 0.05 <= before <= 0.8, f"step-0 reward {before} is outside the informative range"
    for seed, numbers in report.items():
        assert numbers["after"] > before + 0.05, f"seed {seed}: reward {before:.3f} -> {numbers['after']:.3f}"
