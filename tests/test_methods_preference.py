"""OFF-RL DPO and SELF-SPIN: pair formation, reference log-prob caching, the DPO loss through the Trainer against a
numpy DPO on log-probs from HF torch models, SPIN's per-iteration regeneration from the updated model, and (slow)
learning checks on SmolLM2-135M-Instruct."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.special import expit, log_softmax

import forgetjax
from forgetjax.envs import Problem
from forgetjax.methods import pairs as P
from forgetjax.methods.dpo import DPOArgs, OffRLDPO, build_pair_records
from forgetjax.methods.run import DomainConfig
from forgetjax.methods.spin import RealExample, SelfSPIN, SPINArgs
from forgetjax.sampling.sampler import Sampler, SamplingParams
from forgetjax.sharding import make_mesh
from forgetjax.tasks.word_problems import word_problems
from forgetjax.training.budget import BudgetConfig
from forgetjax.training.optim import OptimizerConfig
from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer
from tiny_models import hf_logits, make_hf_model

VOCAB = 160
SPECIALS = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>")  # ids 0-4; words t5 ... t159 are the others
USER, END, ASSISTANT = 3, 2, 4  # toy chat format: "<user> prompt <eos> <assistant> completion <eos>"
TOY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant> {{ m['content'] }} <eos> "
                "{% else %}<user> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")


def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                        additional_special_tokens=["<user>", "<assistant>"])
    tokenizer.chat_template = TOY_TEMPLATE
    return tokenizer


def ids_of(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


def torch_sequence_logp(torch_model, prompt: str, completion: str) -> float:
    """log p(completion + end | prompt) in the toy chat format, from HF torch logits and numpy log-softmax."""
    prompt_ids = [USER, *ids_of(prompt), END, ASSISTANT]
    ids = np.asarray([prompt_ids + ids_of(completion) + [END]], np.int32)
    logp = log_softmax(hf_logits(torch_model, ids)[0].astype(np.float64), axis=-1)
    positions = np.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(logp[positions, ids[0, positions + 1]].sum())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two different tiny random models (policy A, reference B): directories and their torch twins."""
    root = tmp_path_factory.mktemp("tiny_pref")
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=VOCAB)
    torch_a = make_hf_model(root / "a", "qwen2", seed=0, **shape)
    torch_b = make_hf_model(root / "b", "qwen2", seed=1, **shape)
    return {"a": root / "a", "b": root / "b", "torch_a": torch_a, "torch_b": torch_b}


def one_device():
    return make_mesh(1, 1, 1, devices=[jax.devices()[0]])


def train_cfg(out_dir, steps, batch_size=8, lr=1e-3, max_length=32):
    return TrainConfig(batch_size=batch_size, max_length=max_length, budget=BudgetConfig("steps", steps),
                       checkpoint=CheckpointConfig(every=1, keep=3),
                       log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                       optimizer=OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=None),
                       out_dir=str(out_dir))


def metrics_rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Pair formation
# ---------------------------------------------------------------------------------------------------------------


def math_problem(pid: str, answer: str) -> Problem:
    return Problem(id=pid, domain="math", prompt=f"question {pid}", reference=answer, metadata={})


def test_pairs_from_verified_scripted_math_completions():
    """The real math verifier decides correctness; pairs follow the documented rule; prompts without a correct or
    without an incorrect sample give none; unfinished samples are skipped when required."""
    boxed = lambda x: f"Some steps. The final answer is $\\boxed{{{x}}}$."  # noqa: E731
    problems = [math_problem("a", "72"), math_problem("b", "5"), math_problem("c", "9"), math_problem("d", "1/2")]
    scripted = {
        "a": [(boxed(72), True), (boxed(70), True), (boxed(72), True), (boxed(71), False)],
        "b": [(boxed(5), True), (boxed("5.0"), True)],
        "c": [(boxed(8), True), ("no answer here", True)],
        "d": [(boxed("0.5"), True), (boxed("2/4"), True), (boxed(3), True), (boxed(4), True), (boxed(5), True)],
    }
    samples = [[P.Sample(text, finished, 10) for text, finished in scripted[p.id]] for p in problems]
    flat = [s.text for group in samples for s in group]
    verdicts_flat = P.pool_verifier(workers=1)([p for p, g in zip(problems, samples) for _ in g], flat)
    verdicts, start = [], 0
    for group in samples:
        verdicts.append(verdicts_flat[start:start + len(group)])
        start += len(group)
    assert verdicts[0] == [True, False, True, False] and verdicts[1] == [True, True]
    assert verdicts[2] == [False, False] and verdicts[3] == [True, True, False, False, False]

    records, counts = build_pair_records(problems, samples, verdicts, max_pairs=2, require_finished=True)
    got = [(r["id"], r["chosen"], r["rejected"]) for r in records]
    assert got == [("a", boxed(72), boxed(70)),
                   ("d", boxed("0.5"), boxed(3)), ("d", boxed("2/4"), boxed(4))]
    assert all(r["prompt"] == f"question {r['id']}" for r in records)
    assert counts["prompts_with_pairs"] == 2 and counts["pairs"] == 3 and counts["samples"] == 13
    assert counts["finished"] == 12 and counts["prompts_with_correct"] == 3 and counts["prompts_with_incorrect"] == 3

    more, _ = build_pair_records(problems[3:], samples[3:], verdicts[3:], max_pairs=10, require_finished=True)
    assert [(r["chosen"], r["rejected"]) for r in more] == [
        (boxed("0.5"), boxed(3)), (boxed("2/4"), boxed(4)), (boxed("0.5"), boxed(5))]
    # Without the finished requirement the unfinished incorrect sample of "a" is a second rejected candidate.
    loose, _ = build_pair_records(problems[:1], samples[:1], verdicts[:1], max_pairs=2, require_finished=False)
    assert [(r["chosen"], r["rejected"]) for r in loose] == [(boxed(72), boxed(70)), (boxed(72), boxed(71))]


def test_reference_fallback_pairs_only_prompts_without_a_correct_sample():
    """chosen_fallback=reference: a prompt whose samples are all incorrect is paired with the reference completion as
    chosen (written out by hand); prompts with a correct sample, or with no incorrect one, are unchanged."""
    problems = [math_problem("a", "3"), math_problem("b", "4"), math_problem("c", "5")]
    samples = [[P.Sample("wrong 1", True, 5), P.Sample("wrong 2", True, 5)],
               [P.Sample("right", True, 5), P.Sample("wrong", True, 5)],
               [P.Sample("unsure", True, 5)]]
    verdicts = [[False, False], [True, False], [None]]
    reference = lambda problem: f"REF {problem.id}"  # noqa: E731
    records, counts = build_pair_records(problems, samples, verdicts, max_pairs=2, require_finished=True,
                                         reference_chosen=reference)
    assert [(r["id"], r["chosen"], r["rejected"], r["chosen_source"]) for r in records] == [
        ("a", "REF a", "wrong 1", "reference"), ("a", "REF a", "wrong 2", "reference"),
        ("b", "right", "wrong", "self")]
    assert counts["reference_pairs"] == 2 and counts["pairs"] == 3 and counts["prompts_with_pairs"] == 2
    plain, plain_counts = build_pair_records(problems, samples, verdicts, max_pairs=2, require_finished=True)
    assert [(r["id"], r["chosen"]) for r in plain] == [("b", "right")] and plain_counts["reference_pairs"] == 0
    with pytest.raises(ValueError, match="chosen_fallback"):
        DPOArgs(chosen_fallback="teacher").validate()


def test_distillation_keeps_unverified_samples_only_when_asked():
    from forgetjax.methods.distill import select_kept

    rows = [{"prompt_index": 0, "text": "a", "correct": False, "finished": True},
            {"prompt_index": 0, "text": "b", "correct": True, "finished": True},
            {"prompt_index": 1, "text": "c", "correct": False, "finished": False},
            {"prompt_index": 1, "text": "c", "correct": False, "finished": True}]
    assert [r["text"] for r in select_kept(rows, require_finished=True, dedupe=True, max_per_prompt=None)] == ["b"]
    kept = select_kept(rows, require_finished=True, dedupe=True, max_per_prompt=None, keep_unverified=True)
    assert [(r["prompt_index"], r["text"]) for r in kept] == [(0, "a"), (0, "b"), (1, "c")]
    loose = select_kept(rows, require_finished=False, dedupe=True, max_per_prompt=1, keep_unverified=True)
    assert [(r["prompt_index"], r["text"]) for r in loose] == [(0, "a"), (1, "c")]


def test_pairing_skips_unverifiable_blank_and_duplicate_samples():
    assert P.pair_correct_incorrect(["x", "y", "y", " ", "z"], [True, None, False, False, False], 5) == [
        ("x", "y"), ("x", "z")]
    assert P.pair_correct_incorrect(["x", "y"], [True, True], 3) == []
    assert P.pair_correct_incorrect(["x", "y"], [None, False], 3) == []
    with pytest.raises(ValueError, match="max_pairs"):
        P.pair_correct_incorrect(["x"], [True], 0)
    with pytest.raises(ValueError, match="same length"):
        P.pair_correct_incorrect(["x"], [True, False], 1)


def test_heldout_split_is_by_prompt_and_never_everything():
    ids = [f"p{i}" for i in range(10) for _ in range(2)]
    held = P.heldout_prompt_ids(ids, 0.2, seed=3)
    assert len(held) == 2 and held <= set(ids)
    assert P.heldout_prompt_ids(ids, 0.2, seed=3) == held
    assert P.heldout_prompt_ids(["a", "b"], 0.9, seed=0) in ({"a"}, {"b"})
    assert P.heldout_prompt_ids(ids, 0.0, seed=0) == set()


def test_spin_ground_truth_comes_from_the_worked_solutions(data_dir):
    examples = SelfSPIN(SPINArgs(), DomainConfig(limit=3, data_dir=str(data_dir))).examples()
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert len(examples) == 3
    for example in examples:
        row = rows[int(example.id.rsplit("-", 1)[1])]
        answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["question"] in example.prompt and "\\boxed{}" in example.prompt
        assert example.completion.endswith(f"\\boxed{{{answer}}}.") and "<<" not in example.completion


def test_args_are_validated_with_field_names():
    from forgetjax.methods.registry import build_method

    with pytest.raises(ValueError, match="label_smoothing"):
        build_method("off_rl_dpo", {"label_smoothing": 0.5}, DomainConfig())
    with pytest.raises(ValueError, match="samples_per_prompt"):
        build_method("off_rl_dpo", {"samples_per_prompt": 1}, DomainConfig())
    with pytest.raises(ValueError, match="iterations"):
        build_method("self_spin", {"iterations": 0}, DomainConfig())
    with pytest.raises(Exception, match="no_such_arg"):
        build_method("self_spin", {"no_such_arg": 1}, DomainConfig())


# ---------------------------------------------------------------------------------------------------------------
# DPO through the Trainer on a tiny model
# ---------------------------------------------------------------------------------------------------------------


def toy_problems(n: int) -> list[Problem]:
    rng = np.random.default_rng(7)
    return [Problem(f"toy/{i}", "math", " ".join(f"t{t}" for t in rng.integers(5, VOCAB, 3)), "0", {})
            for i in range(n)]


def parity_verifier(problems, completions):
    """Scripted: a completion is correct when its first token id is even."""
    return [bool(text.split()) and ids_of(text)[0] % 2 == 0 for text in completions]


def refusing(*args, **kwargs):
    raise AssertionError("cached pair data must be reused, not rebuilt")


DPO_ARGS = dict(beta=0.5, label_smoothing=0.1, samples_per_prompt=4, temperature=1.0, max_new_tokens=6,
                max_pairs_per_prompt=1, require_finished=False, heldout_fraction=0.34, prompts_per_call=6,
                reference_batch=4, seed=1)


def test_dpo_cached_reference_and_first_step_loss_match_numpy(tiny, tmp_path, monkeypatch):
    """Pairs are built and scored by reference model B and cached; a Trainer on policy A reuses the cache (nothing
    regenerated or rescored) and its first logged loss and reward metrics equal a numpy DPO on sequence log-probs
    of A and B computed with HF torch."""
    tok = toy_tokenizer()
    problems = toy_problems(6)
    model_b, _ = forgetjax.load(tiny["b"])
    method_b = OffRLDPO(DPOArgs(**DPO_ARGS), DomainConfig(), problems=problems, verifier=parity_verifier)
    cfg = train_cfg(tmp_path, steps=1)
    method_b.batch_source(Trainer(cfg, model_b, tok, method_b, mesh=one_device()))
    cache = tmp_path / "data" / "off_rl_dpo"
    stats = json.loads((cache / "stats.json").read_text())
    train = [json.loads(line) for line in (cache / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (cache / "heldout.jsonl").read_text().splitlines()]
    assert stats["samples"] == 24 and stats["train_pairs"] == len(train) >= 2 and stats["heldout_pairs"] == len(
        heldout) >= 1
    assert stats["prepare_flops"] > 0 and not {r["id"] for r in train} & {r["id"] for r in heldout}
    prompts = {p.id: p.prompt for p in problems}
    for r in train + heldout:
        assert r["prompt"] == prompts[r["id"]]
        assert parity_verifier(None, [r["chosen"], r["rejected"]]) == [True, False]
        assert r["ref_chosen_logp"] == pytest.approx(torch_sequence_logp(tiny["torch_b"], r["prompt"], r["chosen"]),
                                                     abs=2e-4)
        assert r["ref_rejected_logp"] == pytest.approx(
            torch_sequence_logp(tiny["torch_b"], r["prompt"], r["rejected"]), abs=2e-4)

    for name in ("generate_samples", "with_reference_logps"):
        monkeypatch.setattr(P, name, refusing)
    model_a, _ = forgetjax.load(tiny["a"])
    method_a = OffRLDPO(DPOArgs(**DPO_ARGS, heldout_every=1), DomainConfig(), problems=problems, verifier=refusing)
    trainer = Trainer(cfg, model_a, tok, method_a, mesh=one_device())
    result = trainer.fit()
    assert result.steps == 1
    logged = metrics_rows(tmp_path)[0]

    policy = np.array([[torch_sequence_logp(tiny["torch_a"], r["prompt"], r[side]) for side in ("chosen",
                                                                                             "rejected")]
                       for r in train])
    reference = np.array([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in train])
    beta, eps = DPO_ARGS["beta"], DPO_ARGS["label_smoothing"]
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    loss = -(1 - eps) * np.log(expit(margin)) - eps * np.log(expit(-margin))
    assert abs(margin).max() > 0.05  # A and B differ, so the check is not the trivial log 2
    assert logged["loss"] == pytest.approx(loss.mean(), abs=2e-4)
    assert logged["reward_margin"] == pytest.approx(margin.mean(), abs=2e-4)
    assert logged["reward_accuracy"] == pytest.approx((margin > 0).mean())
    assert logged["chosen_logp"] == pytest.approx(policy[:, 0].mean(), abs=2e-4)
    assert logged["pairs"] == len(train) and logged["examples"] == len(train)
    chosen_tokens = sum(len(ids_of(r["prompt"])) + 3 + len(ids_of(r["chosen"])) + 1 for r in train)
    rejected_tokens = sum(len(ids_of(r["prompt"])) + 3 + len(ids_of(r["rejected"])) + 1 for r in train)
    assert logged["tokens"] == chosen_tokens + rejected_tokens
    train_flops = 3.0 * model_a.config.flops_per_token(cfg.max_length) * logged["tokens"]
    assert result.usage["flops"] == pytest.approx(train_flops + stats["prepare_flops"], rel=1e-9)

    # The held-out margins (logged with heldout_every=1: measured on A before the first update) against numpy.
    report = {k.removeprefix("heldout_"): v for k, v in logged.items() if k.startswith("heldout_")}
    held_policy = np.array([[torch_sequence_logp(tiny["torch_a"], r["prompt"], r[s]) for s in ("chosen", "rejected")]
                            for r in heldout])
    held_ref = np.array([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in heldout])
    logp_margin = held_policy[:, 0] - held_policy[:, 1]
    reward = beta * (logp_margin - (held_ref[:, 0] - held_ref[:, 1]))
    assert report["pairs"] == len(heldout)
    assert report["logp_margin"] == pytest.approx(logp_margin.mean(), abs=2e-4)
    assert report["reference_logp_margin"] == pytest.approx((held_ref[:, 0] - held_ref[:, 1]).mean(), abs=1e-5)
    assert report["reward_margin"] == pytest.approx(reward.mean(), abs=2e-4)
    assert report["reward_accuracy"] == pytest.approx((reward > 0).mean())


def test_dpo_rollouts_survive_a_kill_and_other_settings_are_an_error(tiny, tmp_path, monkeypatch):
    tok = toy_tokenizer()
    problems = toy_problems(6)
    model, _ = forgetjax.load(tiny["b"])
    cfg = train_cfg(tmp_path, steps=1)
    method = OffRLDPO(DPOArgs(**DPO_ARGS), DomainConfig(), problems=problems, verifier=parity_verifier)
    method.batch_source(Trainer(cfg, model, tok, method, mesh=one_device()))
    cache = tmp_path / "data" / "off_rl_dpo"
    pairs = (cache / "train.jsonl").read_text()
    (cache / "stats.json").unlink()  # killed after sampling, before the dataset was complete
    monkeypatch.setattr(P, "generate_samples", refusing)
    rebuilt = OffRLDPO(DPOArgs(**DPO_ARGS), DomainConfig(), problems=problems, verifier=parity_verifier)
    rebuilt.batch_source(Trainer(cfg, model, tok, rebuilt, mesh=one_device()))
    assert (cache / "train.jsonl").read_text() == pairs and (cache / "stats.json").is_file()
    loss_only = OffRLDPO(DPOArgs(**{**DPO_ARGS, "beta": 0.2, "epochs": 3}), DomainConfig(), problems=problems,
                         verifier=refusing)
    loss_only.batch_source(Trainer(cfg, model, tok, loss_only, mesh=one_device()))  # same data: cache reused
    changed = OffRLDPO(DPOArgs(**{**DPO_ARGS, "temperature": 0.7}), DomainConfig(), problems=problems,
                       verifier=parity_verifier)
    with pytest.raises(ValueError, match="other settings"):
        changed.batch_source(Trainer(cfg, model, tok, changed, mesh=one_device()))


# ---------------------------------------------------------------------------------------------------------------
# SPIN iteration boundary
# ---------------------------------------------------------------------------------------------------------------


SPIN_EXAMPLES = [RealExample(f"ex{i}", f"t{5 + i} t{20 + i} t{40 + i}", f"t{60 + i} t{61 + i} t{62 + i} t{63 + i}")
                 for i in range(4)]
SPIN_ARGS = dict(beta=0.5, iterations=2, epochs_per_iteration=1, temperature=0.0, max_new_tokens=5,
                 prompts_per_call=4, reference_batch=4)


def greedy_texts(model, tok, examples) -> list[str]:
    sampler = Sampler(model, tok, mesh=one_device())
    prompts = [sampler.encode_chat([{"role": "user", "content": e.prompt}]) for e in examples]
    return sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=5, temperature=0.0)).texts


def read_iteration(out_dir, t):
    directory = Path(out_dir) / "data" / "self_spin" / f"iter_{t:03d}"
    return [json.loads(line) for line in (directory / "train.jsonl").read_text().splitlines()]


def test_spin_regenerates_from_the_updated_model_at_iteration_boundaries(tiny, tmp_path, monkeypatch):
    """Iteration 1's pairs are generated and scored by the model after iteration 0's two steps (p_1, restored
    independently from the step-2 checkpoint and checked with HF torch); a resumed run reads them from the cache."""
    import shutil

    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from forgetjax.training.checkpointing import TrainCheckpointer

    tok = toy_tokenizer()
    method = SelfSPIN(SPINArgs(**SPIN_ARGS), DomainConfig(), examples=SPIN_EXAMPLES)
    cfg = train_cfg(tmp_path, steps=3, batch_size=2, lr=3e-2)
    cfg.checkpoint = CheckpointConfig(every=1, keep=5)
    trainer = Trainer(cfg, forgetjax.load(tiny["a"])[0], tok, method, mesh=one_device())
    trainer.fit()
    first_run = metrics_rows(tmp_path)
    assert [row["spin_iteration"] for row in first_run] == [0.0, 0.0, 1.0]

    shutil.rmtree(tmp_path / "checkpoints" / "3")
    step, trainable, _, _ = TrainCheckpointer(tmp_path / "checkpoints").restore_latest(trainer.state.trainable,
                                                                                      trainer.state.opt_state)
    assert step == 2
    p1 = nnx.merge(trainer.graphdef, trainable, trainer.state.frozen)
    gen0 = greedy_texts(forgetjax.load(tiny["a"])[0], tok, SPIN_EXAMPLES)
    gen1 = greedy_texts(p1, tok, SPIN_EXAMPLES)
    assert gen0 != gen1  # the update changed the model's generations, so the checks below can tell them apart
    forgetjax.export_hf(p1, None, tmp_path / "p1_hf")
    torch_p1 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p1_hf"), dtype=torch.float32).eval()

    iter0, iter1 = read_iteration(tmp_path, 0), read_iteration(tmp_path, 1)
    by_id = {e.id: (e, g0, g1) for e, g0, g1 in zip(SPIN_EXAMPLES, gen0, gen1)}
    assert sorted(r["id"] for r in iter0) == sorted(r["id"] for r in iter1) == sorted(by_id)
    for row in iter0:
        example, g0, _ = by_id[row["id"]]
        assert (row["chosen"], row["rejected"]) == (example.completion, g0)
        assert row["ref_rejected_logp"] == pytest.approx(
            torch_sequence_logp(tiny["torch_a"], example.prompt, g0), abs=2e-4)
    for row in iter1:
        example, _, g1 = by_id[row["id"]]
        assert (row["chosen"], row["rejected"]) == (example.completion, g1)
        for side, text in (("chosen", example.completion), ("rejected", g1)):
            assert row[f"ref_{side}_logp"] == pytest.approx(torch_sequence_logp(torch_p1, example.prompt, text),
                                                            abs=2e-4)
    assert json.loads((tmp_path / "data" / "self_spin" / "iter_001" / "stats.json").read_text())["iteration"] == 1

    # Resume from step 2 (the boundary): iteration 1 comes from its cache (generating would fail) and replays step 3
    # identically; after K = 2 iterations the data is exhausted.
    monkeypatch.setattr(P, "generate_samples", refusing)
    trainer.cfg.budget = BudgetConfig("steps", 10)
    resumed = trainer.fit()
    assert resumed.resumed_from == 2 and resumed.steps == 4 and resumed.status == "data_exhausted"
    rows = metrics_rows(tmp_path)
    assert [row["spin_iteration"] for row in rows] == [0.0, 0.0, 1.0, 1.0]
    assert rows[2]["loss"] == first_run[2]["loss"]


# ---------------------------------------------------------------------------------------------------------------
# Slow: SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------


def fresh_smollm2():
    """A SmolLM2 of its own: the Trainer donates the parameters it starts from, so never the shared fixture's."""
    return forgetjax.load("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.real_model
def test_dpo_on_smollm2_word_problems_raises_heldout_margin(tmp_path):
    """12 DPO steps raise the held-out chosen-minus-rejected log-prob margin over the reference's on the same pairs
    by more than 2 standard errors of the per-pair change (paired; a method that does not learn passes with
    probability ~2%), besides the mean margin and implicit reward improving."""
    model, tok = fresh_smollm2()
    # SmolLM2-135M-Instruct solves ~2% of GSM8K, too few verified-correct rollouts to form pairs in minutes on a
    # CPU; it solves ~6% of sampled answers to the generated one-step word problems (64 prompts x 6 samples: 20
    # prompts with a pair, 40 pairs). Half of those prompts are held out: with a quarter (5 prompts) the held-out
    # margin is dominated by which prompts were drawn (measured on the same rollouts: 44.59 -> 44.01 with 5 held-out
    # prompts, 30.77 -> 30.93 with 10). The effect is small at this scale (+0.16 nats after 12 steps) but monotone.
    one_step = [row for row in word_problems("train") if "\n" not in row["answer"].split("\n####")[0]][:64]
    source = tmp_path / "one_step_word_problems.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in one_step))
    domain = DomainConfig(name="math", source=str(source), split="train")
    args = DPOArgs(beta=0.1, samples_per_prompt=6, temperature=0.8, max_new_tokens=160, max_pairs_per_prompt=2,
                   heldout_fraction=0.5, prompts_per_call=8, reference_batch=8, seed=0, epochs=4)
    method = OffRLDPO(args, domain)
    cfg = TrainConfig(batch_size=8, micro_batches=4, max_length=384, budget=BudgetConfig("steps", 12),
                      checkpoint=CheckpointConfig(every=100, keep=1),
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                      optimizer=OptimizerConfig(lr=5e-6, schedule="constant", max_grad_norm=1.0),
                      out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, model, tok, method, mesh=one_device())
    trainer.fit()
    report = method.on_train_end(trainer)
    stats = json.loads((tmp_path / "run" / "data" / "off_rl_dpo" / "stats.json").read_text())
    print("DPO data stats", json.dumps(stats), "held-out", json.dumps(report))
    print("train metrics", [(r["step"], round(r["loss"], 4), round(r["reward_margin"], 4)) for r in
                            metrics_rows(tmp_path / "run")])
    heldout = method.data.heldout
    kept, chosen, rejected, _ = P.score_pairs(trainer.current_model(), tok, heldout, max_length=cfg.max_length,
                                              batch_rows=8)
    change = np.asarray([chosen[j] - rejected[j] - (heldout[i]["ref_chosen_logp"] - heldout[i]["ref_rejected_logp"])
                         for j, i in enumerate(kept)], np.float64)
    standard_error = change.std(ddof=1) / np.sqrt(len(change))
    print(f"held-out margin change per pair {change.mean():.4f} +- {standard_error:.4f} (s.e., {len(change)} pairs)")
    assert stats["heldout_prompts"] >= 8
    assert report["heldout_logp_margin"] > report["heldout_reference_logp_margin"]
    assert change.mean() > 2 * standard_error
    assert report["heldout_reward_margin"] > 0


@pytest.mark.slow
@pytest.mark.real_model
def test_spin_runs_one_iteration_end_to_end_on_smollm2(data_dir, tmp_path):
    from forgetjax.config import load_config
    from forgetjax.methods.run import RunConfig, run_training

    model, tok = fresh_smollm2()
    cfg = load_config(RunConfig, Path(__file__).parents[1] / "configs" / "methods" / "self_spin.yaml",
                      [f"train.out_dir={tmp_path}", "train.budget.value=1000", "method_args.iterations=1",
                       "domain.limit=8", "method_args.max_new_tokens=96", "train.batch_size=4",
                       f"domain.data_dir={data_dir}", "train.log.progress=false"])
    result = run_training(cfg, model=model, tokenizer=tok, mesh=one_device())
    stats = json.loads((tmp_path / "data" / "self_spin" / "iter_000" / "stats.json").read_text())
    pairs = read_iteration(tmp_path, 0)
    final, _ = forgetjax.load(tmp_path / "final")
    report = P.margin_report(final, tok, pairs, beta=cfg.method_args["beta"], max_length=cfg.train.max_length,
                             batch_rows=4)
    print("SPIN stats", json.dumps(stats), "metrics", [(r["step"], round(r["loss"], 4)) for r in
                                                       metrics_rows(tmp_path)], "margins", json.dumps(report))
    assert result.status == "data_exhausted" and result.steps == -(-stats["pairs"] // 4)
    assert report["pairs"] == stats["pairs"] and report["reward_margin"] > 0
