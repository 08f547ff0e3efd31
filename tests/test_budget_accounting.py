"""Budget accounting: FLOPs by component (train step, rollout, reference, teacher) against the per-token formula
written out from a tiny model's shape; epochs over a finite dataset and the max_epochs / exhausted-data flags."""
import json

import pytest

import forgetjax
from forgetjax.methods.dpo import DPOArgs, OffRLDPO
from forgetjax.methods.registry import build_method
from forgetjax.methods.run import DomainConfig
from forgetjax.training.budget import DATA_EXHAUSTED, EXCEEDED_MAX_EPOCHS, BudgetConfig, BudgetUsage, data_flags
from forgetjax.training.trainer import Trainer
from test_methods_online import VOCAB, ParityRewards, make_trainer, scripted_sampler, toy_domain, toy_tokenizer
from test_methods_preference import one_device, parity_verifier, toy_problems, train_cfg
from test_methods_preference import toy_tokenizer as pair_tokenizer
from tiny_models import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, problems jsonl): a tiny random Qwen2 over the toy vocabularies and six toy problems."""
    root = tmp_path_factory.mktemp("budget")
    make_hf_model(root / "model", "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"t{10 + i} t{30 + i} t{50 + i}", "answer": f"t{40 + i}"})
                                + "\n" for i in range(6)))
    return root / "model", problems


def written_out_forward_flops(config, n: int) -> float:
    """PaLM-style forward FLOPs of one n-token sequence, from the model's shape: 2 x (q, k, v, o and three MLP
    weights per layer + LM head) per token, plus 4 x layers x heads x head_dim x n per token for attention."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    weights = layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + config.vocab_size * d
    return n * (2.0 * weights + 4.0 * layers * q * n)


def test_grpo_step_charges_train_rollout_and_reference_flops(tiny, tmp_path, monkeypatch):
    """One GRPO step with a reference model (beta > 0) on scripted completions of known lengths: the run's FLOPs are
    3 x forward per training token at max_length + the rollout's forward over prompt + completion + the reference
    model's forward over the same sequences, and each lands in its component."""
    model_dir, problems = tiny
    method = build_method("on_rl_grpo", {"group_size": 2, "max_new_tokens": 8, "beta": 0.1}, toy_domain(problems))
    method.reward_pool = ParityRewards()
    trainer = make_trainer(model_dir, method, tmp_path, batch_size=4)
    texts = ["t6", "t7 t8 t9", "t10 t12", "t11 t13 t15 t17 t19"]
    scripted_sampler(monkeypatch, [texts])
    result = trainer.fit()

    source = method.batch_source(trainer)  # the same shuffled problem order the run drew from
    tok = toy_tokenizer()
    prompt_lengths = [len(tok.apply_chat_template([{"role": "user", "content": source.problem_at(i).prompt}],
                                                  add_generation_prompt=True, tokenize=True)["input_ids"])
                      for i in (0, 1) for _ in range(2)]
    sequence_lengths = [p + len(t.split()) for p, t in zip(prompt_lengths, texts)]
    config = trainer.model_config
    rollout = sum(written_out_forward_flops(config, n) for n in sequence_lengths)
    per_token_at_max = written_out_forward_flops(config, 64) / 64
    train = 3.0 * per_token_at_max * sum(sequence_lengths)
    assert result.usage["tokens"] == sum(sequence_lengths)
    assert result.usage["flops_by_component"] == pytest.approx(
        {"train": train, "rollout": rollout, "reference": rollout, "teacher": 0.0})
    assert result.usage["flops"] == pytest.approx(train + 2 * rollout)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["rollout_flops"] == pytest.approx(rollout) and logged["reference_flops"] == pytest.approx(rollout)
    assert result.data == {"unique": 2, "size": 6, "epochs": pytest.approx(2 / 6)} and result.flags == []


def sft_method(tmp_path, epochs):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"t{10 + i} t{20 + i}", "completion": f"t{30 + i} t{40 + i}"})
                            + "\n" for i in range(3)))
    return build_method("gt_sft", {"records": [str(path)], "epochs": epochs, "chat": False}, DomainConfig())


@pytest.mark.parametrize("epochs, budget, max_epochs, expected", [
    (None, 8, 2.0, {"examples": 8, "epochs": 8 / 3, "flags": [EXCEEDED_MAX_EPOCHS], "status": "budget_reached"}),
    (None, 8, 3.0, {"examples": 8, "epochs": 8 / 3, "flags": [], "status": "budget_reached"}),
    (1, 100, None, {"examples": 3, "epochs": 1.0, "flags": [DATA_EXHAUSTED], "status": "data_exhausted"}),
])
def test_sft_epochs_over_a_finite_dataset_are_counted_and_flagged(tiny, tmp_path, epochs, budget, max_epochs,
                                                                  expected):
    """3 records in batches of 2 (2, then 1 + a filler row, per epoch): 8 examples are 8/3 epochs, flagged above
    max_epochs 2 and not above 3; a one-epoch dataset under a 100-example budget ends early, flagged exhausted."""
    model_dir, _ = tiny
    trainer = make_trainer(model_dir, sft_method(tmp_path, epochs), tmp_path / "run", batch_size=2)
    trainer.cfg.budget = BudgetConfig("examples", budget, max_epochs=max_epochs)
    result = trainer.fit()
    assert result.usage["examples"] == expected["examples"] and result.status == expected["status"]
    assert result.data == {"unique": 3, "size": 3, "epochs": pytest.approx(expected["epochs"])}
    assert result.flags == expected["flags"]
    saved = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert saved["flags"] == expected["flags"] and saved["data"]["epochs"] == pytest.approx(expected["epochs"])


def test_dpo_running_out_of_pairs_is_flagged_with_usage_below_the_budget(tiny, tmp_path):
    """DPO over one epoch of its few pairs under a large token budget stops when the pairs end: every pair was seen
    once, the tokens used stay below the budget and the run is flagged as having exhausted its data."""
    model, _ = forgetjax.load(tiny[0])
    args = DPOArgs(samples_per_prompt=4, temperature=1.0, max_new_tokens=6, max_pairs_per_prompt=1,
                   require_finished=False, heldout_fraction=0.0, prompts_per_call=6, reference_batch=4, seed=1,
                   epochs=1)
    method = OffRLDPO(args, DomainConfig(), problems=toy_problems(6), verifier=parity_verifier)
    cfg = train_cfg(tmp_path, steps=1, batch_size=2)
    cfg.budget = BudgetConfig("tokens", 10_000_000, max_epochs=4)
    result = Trainer(cfg, model, pair_tokenizer(), method, mesh=one_device()).fit()
    pairs = len((tmp_path / "data" / "off_rl_dpo" / "train.jsonl").read_text().splitlines())
    assert pairs >= 2 and result.status == "data_exhausted" and result.usage["tokens"] < 10_000_000
    assert result.usage["examples"] == pairs and result.steps == -(-pairs // 2)
    assert result.data == {"unique": pairs, "size": pairs, "epochs": 1.0} and result.flags == [DATA_EXHAUSTED]
    stats = json.loads((tmp_path / "data" / "off_rl_dpo" / "stats.json").read_text())
    components = result.usage["flops_by_component"]
    assert components["rollout"] == pytest.approx(stats["generation_flops"]) and components["teacher"] == 0.0
    assert components["reference"] == pytest.approx(stats["reference_flops"])


def test_usage_sums_components_and_rejects_unknown_ones():
    usage = BudgetUsage()
    usage.add(10, 2, 30.0, {"rollout": 5.0})
    usage.add(4, 1, 12.0, {"teacher": 1.5, "reference": 2.0})
    assert (usage.steps, usage.tokens, usage.examples) == (2, 14, 3)
    assert usage.flops_by_component == {"train": 42.0, "rollout": 5.0, "teacher": 1.5, "reference": 2.0}
    assert usage.flops == 50.5
    with pytest.raises(ValueError, match="judge"):
        usage.add(1, 1, 1.0, {"judge": 1.0})


def test_data_flags():
    cfg = BudgetConfig("tokens", 100, max_epochs=2)
    assert data_flags(cfg, 2.0, False) == [] and data_flags(cfg, 2.5, False) == [EXCEEDED_MAX_EPOCHS]
    assert data_flags(cfg, 0.5, True) == [DATA_EXHAUSTED]
    assert data_flags(BudgetConfig("tokens", 100), 50.0, False) == []  # no limit set
    assert data_flags(cfg, None, False) == []  # the source does not know its data
    with pytest.raises(ValueError, match="max_epochs"):
        BudgetConfig("tokens", 100, max_epochs=0).validate()


@pytest.mark.parametrize("budget, expected_share", [(2, 2 / 3), (3, 1.0), (8, 1.0)])
def test_shared_teacher_flops_are_charged_pro_rata_to_the_distinct_examples_drawn(tiny, tmp_path, budget,
                                                                                     expected_share):
    """A teacher stage's FLOPs (shared by cells) cost a cell the share of its examples the cell draws: 2 of 3 records
    pay two thirds, the whole set pays it once however many epochs follow; a cell's own preparation (rollout here)
    is charged in full on the first batch."""
    model_dir, _ = tiny
    method = sft_method(tmp_path, None)
    prepare = method.prepare

    def prepare_with_flops(trainer):
        prepared = prepare(trainer)
        prepared.prorated_flops = {"teacher": 300.0}
        prepared.extra_flops = {"rollout": 7.0}
        return prepared

    method.prepare = prepare_with_flops
    trainer = make_trainer(model_dir, method, tmp_path / "run", batch_size=2)
    trainer.cfg.budget = BudgetConfig("examples", budget)
    result = trainer.fit()
    components = result.usage["flops_by_component"]
    assert components["teacher"] == pytest.approx(300.0 * expected_share)
    assert components["rollout"] == pytest.approx(7.0)
