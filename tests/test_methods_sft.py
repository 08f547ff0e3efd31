"""GT-SFT, SF-SFT / CF-SFT and SELF-SDFT: GSM8K solution formatting on real items (hand-written expectations), the
SFT loss through the Trainer against a numpy masked cross-entropy, teacher filtering and SDFT fallback with scripted
completions, cross-family re-tokenisation, the sparse top-k KD term against numpy, and the data cache on resume.
Tiny random Llama models with toy byte-level BPE tokenizers (ChatML template); real SmolLM2 runs are `slow`."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import forgetjax
from forgetjax.methods.registry import build_method
from forgetjax.methods.run import DomainConfig
from forgetjax.sampling.sampler import Completions, Sampler
from forgetjax.sharding import make_mesh
from forgetjax.training.budget import BudgetConfig
from forgetjax.training.optim import OptimizerConfig
from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer
from tiny_models import make_hf_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
MAX_LENGTH = 512


# ----------------------------------------------------------------------------------------------- fixtures / helpers


def gsm8k_rows(data_dir: Path, n: int) -> list[dict]:
    with open(data_dir / "gsm8k" / "train.jsonl") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def toy_tokenizer(corpus: list[str] | None, vocab_size: int):
    """A ChatML byte-level BPE tokenizer: trained merges on `corpus`, or none at all (pure bytes) when None."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus or ["x"], vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny(directory: Path, tokenizer, seed: int) -> Path:
    make_hf_model(directory, "llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def models(data_dir, tmp_path_factory):
    """Directories of tiny models: the student and a same-tokenizer teacher (BPE trained on GSM8K text), and a
    cross-family teacher with a pure byte-level tokenizer."""
    root = tmp_path_factory.mktemp("sft_models")
    corpus = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(data_dir, 1000)]
    bpe = toy_tokenizer(corpus, 1000)
    byte = toy_tokenizer(None, 300)
    return SimpleNamespace(student=save_tiny(root / "student", bpe, 0), same=save_tiny(root / "same", bpe, 1),
                           cross=save_tiny(root / "cross", byte, 2))


def single_device_mesh():
    return make_mesh(1, 1, 1, devices=[jax.devices()[0]])


def train_config(out_dir: Path, steps: int, batch_size: int = 4, remat: str = "auto") -> TrainConfig:
    return TrainConfig(batch_size=batch_size, max_length=MAX_LENGTH, budget=BudgetConfig("steps", steps),
                       checkpoint=CheckpointConfig(every=1, keep=2),
                       log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                       optimizer=OptimizerConfig(lr=1e-3, schedule="constant"), out_dir=str(out_dir), remat=remat)


def fake_trainer(model_dir: Path, out_dir: Path, batch_size: int = 4):
    """What batch sources use of a Trainer, without compiling a train step."""
    model, tokenizer = forgetjax.load(model_dir)
    return SimpleNamespace(cfg=train_config(out_dir, 1, batch_size), tokenizer=tokenizer, out_dir=Path(out_dir),
                           mesh=None, model_config=model.config, current_model=lambda: model)


def math_domain(data_dir: Path, limit: int = 3) -> DomainConfig:
    return DomainConfig(name="math", source="gsm8k", split="train", limit=limit, data_dir=str(data_dir), seed=0)


def problems_of(domain: DomainConfig):
    from forgetjax.envs import load_problems

    return load_problems(domain.name, domain.source, domain.data_dir, domain.split, domain.limit, domain.seed)


class ScriptedGeneration:
    """Stands in for Sampler.generate_tokens: the samples of a prompt are looked up by a key found in its decoded
    text; `calls` counts invocations."""

    def __init__(self, script: dict[str, list[tuple[str, bool]]]):
        self.script = script
        self.calls = 0
        self.prompts: list[str] = []

    def __call__(self, sampler, prompts, params) -> Completions:
        self.calls += 1
        rows = []
        for prompt in prompts:
            text = sampler.tokenizer.decode(prompt)
            self.prompts.append(text)
            key = next(k for k in self.script if k in text)
            assert len(self.script[key]) == params.n
            rows.extend(self.script[key])
        encoded = [sampler.tokenizer(t, add_special_tokens=False)["input_ids"] for t, _ in rows]
        width = max(len(e) for e in encoded) + 1
        tokens = np.zeros((len(rows), width), np.int32)
        for i, ids in enumerate(encoded):
            tokens[i, :len(ids)] = ids
        lengths = np.asarray([len(e) + finished for e, (_, finished) in zip(encoded, rows)], np.int32)
        return Completions(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32), lengths=lengths,
                           texts=[t for t, _ in rows], finished=np.asarray([f for _, f in rows]))


def install(monkeypatch, script) -> ScriptedGeneration:
    scripted = ScriptedGeneration(script)
    monkeypatch.setattr(Sampler, "generate_tokens", lambda self, prompts, params: scripted(self, prompts, params))
    return scripted


def key_of(problem) -> str:
    return problem.metadata["question"][:40]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_FORWARD = jax.jit(lambda model, ids, mask: model(ids, mask))


def logprobs_alone(model, sequences: list[list[int]], width: int = MAX_LENGTH) -> list[np.ndarray]:
    """numpy log-softmax [L, V] of each sequence's logits computed on its own (right padding cannot change causal
    logits at real positions; one compiled shape for all calls)."""
    ids = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = sequence
        mask[row, :len(sequence)] = True
    logits = np.asarray(_FORWARD(model, ids, mask))
    return [log_softmax(logits[row, :len(sequence)]) for row, sequence in enumerate(sequences)]


def chatml(prompt: str) -> str:
    """The toy ChatML template written out by hand (user turn + generation prompt)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def first_batch(method, trainer):
    return method.batch_source(trainer).next_batch(None)


def completions_in_batch(arrays: dict, tokenizer) -> list[str]:
    """Decoded loss-masked target tokens of every segment (what the batch teaches), special tokens kept."""
    texts = []
    for row in range(arrays["input_ids"].shape[0]):
        for segment in sorted(set(arrays["segment_ids"][row]) - {0}):
            where = (arrays["segment_ids"][row] == segment) & (arrays["loss_mask"][row] > 0)
            texts.append(tokenizer.decode(arrays["targets"][row][where]))
    return texts


# ----------------------------------------------------------------------------------------------- ground truth


def test_gsm8k_solutions_are_formatted_for_the_eval_prompt(data_dir):
    from forgetjax.methods.sft import format_gsm8k_solution, ground_truth_completion
    from forgetjax.verifiers.math import extract_answer

    rows = gsm8k_rows(data_dir, 300)
    assert format_gsm8k_solution(rows[0]["answer"]) == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is \\boxed{72}.")
    assert format_gsm8k_solution(rows[1]["answer"]) == (
        "Weng earns 12/60 = $0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $10.\n"
        "The answer is \\boxed{10}.")
    for row in rows:
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        text = format_gsm8k_solution(row["answer"])
        assert "<<" not in text and ">>" not in text and "####" not in text
        assert text.splitlines()[-1] == f"The answer is \\boxed{{{final}}}."
        assert extract_answer(text) == final
    problem = problems_of(DomainConfig(source="gsm8k", limit=None, data_dir=str(data_dir)))[1]
    assert ground_truth_completion(problem) == format_gsm8k_solution(rows[1]["answer"])


def test_ground_truth_of_code_and_qa(data_dir, tmp_path):
    from forgetjax.envs import load_problems
    from forgetjax.methods.sft import ground_truth_completion

    raw = {row["task_id"]: row["code"] for row in map(json.loads, open(data_dir / "mbpp" / "mbpp.jsonl"))}
    mbpp = load_problems("code", "mbpp", data_dir, "train", limit=2)
    for problem in mbpp:
        code = raw[problem.metadata["task_id"]].replace("\r\n", "\n").strip()
        assert ground_truth_completion(problem) == "```python\n" + code + "\n```"
    qa = load_problems("qa", "efficientqa", data_dir, "train", limit=2)
    for problem in qa:
        assert ground_truth_completion(problem) == problem.reference[0]
    with pytest.raises(ValueError, match="held out"):
        build_method("gt_sft", {}, DomainConfig(source="gsm8k", split="test", limit=2, data_dir=str(data_dir))
                     ).prepare(SimpleNamespace(out_dir=tmp_path))


# ----------------------------------------------------------------------------------------------- the SFT loss


def test_sft_loss_equals_numpy_masked_ce_padded_and_packed_through_the_trainer(models, tmp_path):
    """The masked CE of the first batch = sum of completion-token NLLs / their count, from numpy log-softmax of
    each example's logits computed alone: padded (the method's loss on its batch) and packed (step 1's logged loss
    of a Trainer run, computed before the update, with the three examples packed into one row)."""
    records = [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."},
               {"prompt": "Name a colour.", "completion": "Blue"},
               {"prompt": "Count to three, please.", "completion": "One, two, three!"}]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"]}) + "\n" for r in records))
    model, tokenizer = forgetjax.load(models.student)
    expected_sum, expected_count = 0.0, 0
    prompts = [tokenizer(chatml(r["prompt"]), add_special_tokens=False)["input_ids"] for r in records]
    fulls = [tokenizer(chatml(r["prompt"]) + r["completion"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
             for r in records]
    for prompt_ids, full_ids, logp in zip(prompts, fulls, logprobs_alone(model, fulls)):
        assert full_ids[:len(prompt_ids)] == prompt_ids
        for position in range(len(prompt_ids) - 1, len(full_ids) - 1):
            expected_sum -= logp[position, full_ids[position + 1]]
            expected_count += 1

    def method(packing):
        return build_method("gt_sft", {"records": [str(path)], "fields": {"q": "prompt", "a": "completion"},
                                       "packing": packing}, DomainConfig())

    padded = method(False)
    batch = first_batch(padded, fake_trainer(models.student, tmp_path / "padded"))
    assert sorted(batch.arrays["segment_ids"].max(axis=1).tolist()) == [0, 1, 1, 1] and batch.examples == 3
    assert batch.tokens == sum(map(len, fulls)) == batch.arrays["attention_mask"].sum()
    total, count, _ = jax.jit(padded.loss)(model, batch.arrays, jax.random.key(0))
    assert float(count) == expected_count
    assert float(total) / float(count) == pytest.approx(expected_sum / expected_count, rel=2e-5)

    packed = method(True)
    assert first_batch(packed, fake_trainer(models.student, tmp_path / "packed")).arrays["segment_ids"].max() == 3
    trainer = Trainer(train_config(tmp_path / "run", 1), model, tokenizer, packed, mesh=single_device_mesh())
    result = trainer.fit()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected_sum / expected_count, rel=2e-5)
    assert result.usage["examples"] == 3 and result.usage["tokens"] == sum(map(len, fulls))


def test_rematerialisation_gives_the_same_gradients_and_training(models, tmp_path):
    """remat="full" recomputes every layer in the backward pass instead of keeping its activations, "dots" keeps only
    the matmul outputs: under both the GT-SFT loss's gradient equals the one without remat (float32, every leaf
    within 1e-5 of its largest entry), and three packed Trainer steps log the same losses and gradient norms (1e-5
    relative), so `train.remat: auto` may pick any of them without changing a run's results."""
    from flax import nnx

    rows = [{"q": f"What is {a} + {b}?", "a": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a, b in [(2, 3), (7, 5), (11, 4), (9, 9), (6, 1), (8, 2), (3, 12), (10, 10)]]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def method():
        return build_method("gt_sft", {"records": [str(path)], "fields": {"q": "prompt", "a": "completion"},
                                       "packing": True}, DomainConfig())

    batch = first_batch(method(), fake_trainer(models.student, tmp_path / "batch", batch_size=2))

    def mean_loss(model):
        total, count, _ = method().loss(model, batch.arrays, jax.random.key(0))
        return total / count

    gradients, logged = {}, {}
    for remat in ("none", "dots", "full"):
        model, tokenizer = forgetjax.load(models.student, remat=remat)
        grads = nnx.jit(nnx.grad(mean_loss))(model)
        gradients[remat] = [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
        out = tmp_path / remat
        result = Trainer(train_config(out, 3, batch_size=2, remat=remat), model, tokenizer, method(),
                         mesh=single_device_mesh()).fit()
        assert result.remat == remat
        logged[remat] = [(m["loss"], m["grad_norm"]) for m in map(json.loads, (out / "metrics.jsonl").read_text()
                                                                 .splitlines()) if "loss" in m]
    assert all(np.abs(g).max() > 0 for g in gradients["none"])
    assert len(logged["none"]) == 3
    for remat in ("dots", "full"):
        assert len(gradients[remat]) == len(gradients["none"]) > 0
        for plain, rematerialised in zip(gradients["none"], gradients[remat]):
            np.testing.assert_allclose(rematerialised, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
        np.testing.assert_allclose(logged[remat], logged["none"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- teacher data


def teacher_script(problems) -> tuple[dict, list[list[str]]]:
    """Per problem five samples: correct, wrong, correct but cut off, the correct one again, no answer; and the
    texts a correct filter must keep (the first correct finished one; its duplicate is dropped)."""
    script, keep = {}, []
    for problem in problems:
        good = f"We compute it step by step. The answer is \\boxed{{{problem.reference}}}."
        wrong = f"Guessing. The answer is \\boxed{{{int(float(problem.reference)) + 1}}}."
        cut = f"Working on it... so far \\boxed{{{problem.reference}}} and then"
        script[key_of(problem)] = [(good, True), (wrong, True), (cut, False), (good, True), ("I do not know.", True)]
        keep.append([good])
    return script, keep


def test_teacher_filter_keeps_exactly_the_verified_samples(models, data_dir, tmp_path, monkeypatch):
    domain = math_domain(data_dir)
    problems = problems_of(domain)
    script, keep = teacher_script(problems)
    scripted = install(monkeypatch, script)
    method = build_method("sf_sft", {"teacher": str(models.same), "n_samples": 5, "prompts_per_chunk": 2}, domain)
    trainer = fake_trainer(models.student, tmp_path)
    batch = first_batch(method, trainer)
    assert scripted.calls == 2  # 3 prompts in chunks of 2
    records = [json.loads(line) for line in (tmp_path / "data" / "sf_sft" / "records.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in records] == [text for texts in keep for text in texts]
    assert [r["prompt"] for r in records] == [p.prompt for p in problems]
    stats = json.loads((tmp_path / "data" / "sf_sft" / "stats.json").read_text())
    assert (stats["samples"], stats["correct"], stats["finished"], stats["kept"]) == (15, 9, 12, 3)
    assert stats["keep_rate"] == pytest.approx(3 / 15) and stats["prompt_coverage"] == 1.0
    assert sorted(completions_in_batch(batch.arrays, trainer.tokenizer)) == sorted(
        text + "<|im_end|>" for texts in keep for text in texts)
    lengths = [len(trainer.tokenizer(chatml(p.prompt), add_special_tokens=False)["input_ids"])
               + len(trainer.tokenizer(t, add_special_tokens=False)["input_ids"]) + f
               for p in problems for t, f in script[key_of(p)]]
    expected_flops = sum(n * trainer.model_config.flops_per_token(n) for n in lengths)  # teacher: same shapes
    assert batch.extra_flops == {"teacher": pytest.approx(expected_flops)} and expected_flops == pytest.approx(
        stats["generation_flops"])


def test_cross_family_teacher_samples_are_retokenised_for_the_student(models, data_dir, tmp_path, monkeypatch):
    domain = math_domain(data_dir, limit=2)
    problems = problems_of(domain)
    script, keep = teacher_script(problems)
    scripted = install(monkeypatch, script)
    trainer = fake_trainer(models.student, tmp_path)
    teacher_tokenizer = forgetjax.load(models.cross)[1]
    assert len(teacher_tokenizer) != len(trainer.tokenizer)
    with pytest.raises(ValueError, match="different tokenizer.*use cf_sft"):
        first_batch(build_method("sf_sft", {"teacher": str(models.cross), "n_samples": 5}, domain), trainer)
    with pytest.raises(ValueError, match="kd_weight > 0 needs a same-family teacher"):
        build_method("cf_sft", {"teacher": str(models.cross), "kd_weight": 0.5}, domain)
    batch = first_batch(build_method("cf_sft", {"teacher": str(models.cross), "n_samples": 5}, domain),
                        fake_trainer(models.student, tmp_path / "cf"))
    # The teacher saw prompts rendered with its own tokenizer; the student trains on its own tokenisation.
    assert any(p.metadata["question"] in text for p in problems for text in scripted.prompts)
    arrays = batch.arrays
    taught = 0
    for row in range(arrays["input_ids"].shape[0]):
        where = arrays["loss_mask"][row] > 0
        if not where.any():
            continue
        text = next(t for texts in keep for t in texts if t in trainer.tokenizer.decode(arrays["targets"][row][where]))
        expected = trainer.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert arrays["targets"][row][where].tolist() == expected
        assert expected != teacher_tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        taught += 1
    assert taught == 2


# ----------------------------------------------------------------------------------------------- sparse KD


def numpy_sparse_jsd(student_logits, ids, teacher_logp, mask, beta, temperature):
    """The documented sparse KD written out in numpy: both distributions restricted to the teacher's top-k ids and
    renormalised, then beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta p + (1 - beta) q (KLs at the ends)."""
    s = np.take_along_axis(student_logits.astype(np.float64), ids, axis=-1) / temperature
    q = np.exp(s - s.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    t = teacher_logp.astype(np.float64) / temperature
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), axis=-1)  # noqa: E731
    if beta == 0:
        per = kl(p, q)
    elif beta == 1:
        per = kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        per = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return float((per * mask).sum() / mask.sum())


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_sparse_kd_matches_numpy(beta, temperature):
    from forgetjax.methods.distill import sparse_kd_loss

    rng = np.random.default_rng(0)
    b, t, v, k = 2, 5, 30, 6
    student = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    teacher_full = log_softmax(rng.normal(size=(b, t, v)) * 2)
    ids = np.argsort(-teacher_full, axis=-1)[..., :k].astype(np.int32)
    teacher_logp = np.take_along_axis(teacher_full, ids, axis=-1).astype(np.float32)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    total, count, metrics = sparse_kd_loss(student, ids, teacher_logp, mask, beta=beta, temperature=temperature)
    assert float(count) == mask.sum()
    assert float(total) / float(count) == pytest.approx(
        numpy_sparse_jsd(student, ids, teacher_logp, mask, beta, temperature), rel=1e-5, abs=1e-7)
    mass = np.exp(teacher_logp.astype(np.float64)).sum(-1)
    assert float(metrics["kd_teacher_mass"][0]) / float(count) == pytest.approx((mass * mask).sum() / mask.sum(),
                                                                                rel=1e-5)


def test_kd_batches_align_teacher_topk_and_loss_matches_numpy(models, data_dir, tmp_path, monkeypatch):
    """Each position's cached top-k is the teacher's own top-k on the example alone (numpy log-softmax of its
    logits), placed where targets holds the predicted token; the method loss = CE + kd_weight * sparse KD."""
    domain = math_domain(data_dir, limit=2)
    script, _ = teacher_script(problems_of(domain))
    install(monkeypatch, script)
    k, weight = 5, 0.5
    method = build_method("sf_sft", {"teacher": str(models.same), "n_samples": 5, "kd_weight": weight,
                                     "kd_top_k": k, "kd_beta": 0.0}, domain)
    trainer = fake_trainer(models.student, tmp_path)
    batch = first_batch(method, trainer).arrays
    teacher, _ = forgetjax.load(models.same)
    student = trainer.current_model()
    ce_sum = kd_sum = count = 0.0
    rows = [row for row in range(batch["input_ids"].shape[0]) if batch["loss_mask"][row].any()]
    sequences = [batch["input_ids"][row, :int(batch["attention_mask"][row].sum())].tolist() for row in rows]
    assert len(rows) == 2 and all(batch["segment_ids"][row].max() == 1 for row in rows)
    for row, length, teacher_logp, student_logp in zip(rows, map(len, sequences), logprobs_alone(teacher, sequences),
                                                       logprobs_alone(student, sequences)):
        mask = batch["loss_mask"][row] > 0
        for position in np.flatnonzero(mask):
            top = np.argsort(-teacher_logp[position])[:k]
            assert set(batch["kd_ids"][row, position].tolist()) == set(top.tolist())
            np.testing.assert_allclose(batch["kd_logprobs"][row, position], teacher_logp[position][
                batch["kd_ids"][row, position]], rtol=1e-5, atol=1e-5)
            ce_sum -= student_logp[position, batch["targets"][row, position]]
            p = np.exp(teacher_logp[position, top] - np.log(np.exp(teacher_logp[position, top]).sum()))
            q_logits = student_logp[position, top]
            log_q = q_logits - np.log(np.exp(q_logits).sum())
            kd_sum += np.sum(p * (np.log(p) - log_q))
            count += 1
        assert not batch["loss_mask"][row, length - 1]
    total, n, metrics = method.loss(student, {key: np.asarray(v) for key, v in batch.items()}, jax.random.key(0))
    assert float(n) == count
    assert float(total) / float(n) == pytest.approx((ce_sum + weight * kd_sum) / count, rel=1e-5)
    assert float(metrics["kd"][0]) / count == pytest.approx(kd_sum / count, rel=1e-5)
    assert (tmp_path / "data" / "sf_sft" / "topk" / "topk.npz").is_file()


# ----------------------------------------------------------------------------------------------- SDFT


def test_sdft_keeps_clean_verified_rewrites_and_falls_back_otherwise(models, data_dir, tmp_path, monkeypatch):
    from forgetjax.methods.sdft import find_leak
    from forgetjax.methods.sft import ground_truth_completion

    assert find_leak("As the Reference Solution shows, 5.") == "reference solution"
    assert find_leak("Following the provided solution we get 5") == "provided solution"
    assert find_leak("We add 2 and 3 to get 5.") is None
    domain = math_domain(data_dir, limit=4)
    problems = problems_of(domain)
    answers = [p.reference for p in problems]
    rewrites = [f"First we read the problem carefully. So the total is \\boxed{{{answers[0]}}}.",
                f"As in the reference solution, the answer is \\boxed{{{answers[1]}}}.",
                f"I think it is \\boxed{{{int(float(answers[2])) + 7}}}.",
                f"Adding everything up gives \\boxed{{{answers[3]}}} and"]
    finished = [True, True, True, False]
    scripted = install(monkeypatch, {key_of(p): [(r, f)] for p, r, f in zip(problems, rewrites, finished)})
    method = build_method("self_sdft", {}, domain)
    batch = first_batch(method, fake_trainer(models.student, tmp_path))
    records = [json.loads(line) for line in (tmp_path / "data" / "self_sdft" / "records.jsonl").read_text()
               .splitlines()]
    originals = [ground_truth_completion(p) for p in problems]
    assert [r["completion"] for r in records] == [rewrites[0]] + originals[1:]
    assert [r["origin"] for r in records] == ["rewrite", "original", "original", "original"]
    assert [r["prompt"] for r in records] == [p.prompt for p in problems]
    for problem, original, text in zip(problems, originals, scripted.prompts):
        assert problem.prompt in text and original in text  # the rewrite prompt shows the reference
    stats = json.loads((tmp_path / "data" / "self_sdft" / "stats.json").read_text())
    assert stats["rewrite_keep_rate"] == pytest.approx(0.25)
    assert stats["reasons"] == {"kept": 1, "leak": 1, "incorrect": 1, "unfinished": 1}
    tokenizer = forgetjax.load(models.student)[1]
    for row in range(batch.arrays["input_ids"].shape[0]):
        if batch.arrays["loss_mask"][row].any():
            prompt_text = tokenizer.decode(batch.arrays["input_ids"][row][batch.arrays["loss_mask"][row] == 0])
            assert "For reference" not in prompt_text


# ----------------------------------------------------------------------------------------------- cache + resume


def test_generated_data_is_cached_and_reused_on_resume(models, data_dir, tmp_path, monkeypatch):
    domain = math_domain(data_dir, limit=2)
    script, _ = teacher_script(problems_of(domain))
    scripted = install(monkeypatch, script)
    args = {"teacher": "self", "n_samples": 5, "prompts_per_chunk": 1}

    def run(steps):
        model, tokenizer = forgetjax.load(models.student)
        trainer = Trainer(train_config(tmp_path, steps, batch_size=2), model, tokenizer,
                          build_method("sf_sft", args, domain), mesh=single_device_mesh())
        return trainer, trainer.fit()

    trainer, first = run(1)
    assert scripted.calls == 2 and first.resumed_from is None
    stats = json.loads((tmp_path / "data" / "sf_sft" / "stats.json").read_text())
    per_token = 3.0 * trainer.model_config.flops_per_token(MAX_LENGTH)
    assert first.usage["flops"] == pytest.approx(first.usage["tokens"] * per_token + stats["generation_flops"])
    _, second = run(2)
    assert scripted.calls == 2 and second.resumed_from == 1
    assert second.usage["flops"] == pytest.approx(second.usage["tokens"] * per_token + stats["generation_flops"])
    # A run killed after generating chunks but before writing the records regenerates nothing.
    for name in ("records.jsonl", "stats.json"):
        (tmp_path / "data" / "sf_sft" / name).unlink()
    first_batch(build_method("sf_sft", args, domain), fake_trainer(models.student, tmp_path))
    assert scripted.calls == 2
    with pytest.raises(ValueError, match=r"different settings \(changed: generation\)"):
        first_batch(build_method("sf_sft", dict(args, temperature=0.3), domain), fake_trainer(models.student,
                                                                                              tmp_path))


def test_configs_load_as_run_configs():
    from forgetjax.methods.run import load_run_config

    repo = Path(__file__).resolve().parents[1]
    for name in ("gt_sft", "sf_sft", "cf_sft", "self_sdft"):
        cfg = load_run_config(repo / "configs" / "methods" / f"{name}.yaml")
        assert cfg.method == name
        method = build_method(cfg.method, cfg.method_args, cfg.domain)
        assert method.name == name and method.trim == "tokens"


def test_bad_method_args_name_the_field():
    from forgetjax.config import ConfigError

    with pytest.raises(ConfigError, match="n_sample"):
        build_method("sf_sft", {"n_sample": 3}, DomainConfig())
    with pytest.raises(ConfigError, match="rewrite_template must contain the placeholder {reference}"):
        build_method("self_sdft", {"rewrite_template": "{question} only"}, DomainConfig())
    with pytest.raises(ConfigError, match="kd_beta"):
        build_method("sf_sft", {"kd_beta": 2.0}, DomainConfig())


# ----------------------------------------------------------------------------------------------- real SmolLM2 (slow)


def heldout_nll(model, tokenizer, data_dir, n=64) -> tuple[np.ndarray, np.ndarray]:
    """Per-item (summed NLL, token count) of formatted GSM8K test solutions under the chat prompt used for training,
    from a float32 log-softmax of the model's logits (items in a fixed order)."""
    import jax.numpy as jnp

    from forgetjax.data import ExampleEncoder, collate_rows
    from forgetjax.envs import load_problems
    from forgetjax.methods.sft import ground_truth_completion

    problems = load_problems("math", "gsm8k", data_dir, "test", limit=n, seed=0)
    encoder = ExampleEncoder(tokenizer, max_length=512)
    examples = encoder.encode_many([{"prompt": p.prompt, "completion": ground_truth_completion(p)} for p in problems])
    examples = sorted(examples, key=len)

    @jax.jit
    def per_row(m, b):
        logits = m(b["input_ids"], b["attention_mask"], b["positions"], b["segment_ids"]).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["targets"][..., None], axis=-1)[..., 0]
        mask = b["loss_mask"].astype(jnp.float32)
        return -(logp * mask).sum(axis=1), mask.sum(axis=1)

    sums, counts = [], []
    for start in range(0, len(examples), 8):
        group = examples[start:start + 8]
        width = -(-max(map(len, group)) // 128) * 128
        s, c = per_row(model, collate_rows([[e] for e in group], width, tokenizer.pad_token_id))
        sums.append(np.asarray(s, np.float64)[:len(group)])
        counts.append(np.asarray(c, np.float64)[:len(group)])
    return np.concatenate(sums), np.concatenate(counts)


@pytest.mark.slow
@pytest.mark.real_model
def test_gt_sft_lowers_heldout_gsm8k_loss(data_dir, tmp_path):
    """16 GT-SFT steps on 64 GSM8K train items lower the token-mean NLL of 64 held-out GSM8K test solutions by more
    than 0.02 nats, and the per-item improvement (paired: the same items before and after) is more than 3 standard
    errors above zero, which a method that does not learn meets by chance with probability ~0.1%."""
    from forgetjax.methods.run import RunConfig, run_training

    model, tokenizer = forgetjax.load("smollm2-135m-instruct")
    before_sums, before_counts = heldout_nll(model, tokenizer, data_dir)
    cfg = RunConfig(train=TrainConfig(batch_size=4, max_length=384, budget=BudgetConfig("steps", 16),
                                      optimizer=OptimizerConfig(lr=3e-5, warmup_ratio=0.1),
                                      checkpoint=CheckpointConfig(every=100), log=LogConfig(progress=False,
                                                                                            tensorboard=False),
                                      out_dir=str(tmp_path)),
                    method="gt_sft", domain=DomainConfig(source="gsm8k", limit=64, data_dir=str(data_dir)))
    run_training(cfg, model=model, tokenizer=tokenizer, mesh=single_device_mesh())
    tuned, _ = forgetjax.load(tmp_path / "final")
    after_sums, after_counts = heldout_nll(tuned, tokenizer, data_dir)
    np.testing.assert_array_equal(before_counts, after_counts)
    before, after = before_sums.sum() / before_counts.sum(), after_sums.sum() / after_counts.sum()
    gain = (before_sums - after_sums) / before_counts
    standard_error = gain.std(ddof=1) / np.sqrt(len(gain))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"GT-SFT train loss by step: {[round(x, 3) for x in losses]}")
    print(f"GT-SFT held-out GSM8K test loss (64 items): {before:.4f} -> {after:.4f}; per-item gain "
          f"{gain.mean():.4f} +- {standard_error:.4f} (s.e.)")
    assert after < before - 0.02
    assert gain.mean() > 3 * standard_error


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("method, args", [
    ("self_sdft", {"max_new_tokens": 256, "prompts_per_chunk": 8}),
    ("sf_sft", {"teacher": "smollm2-135m-instruct", "n_samples": 8, "temperature": 0.7, "max_new_tokens": 320,
                "prompts_per_chunk": 8, "kd_weight": 0.5, "kd_top_k": 8}),
])
def test_generating_methods_run_end_to_end_on_smollm2(data_dir, tmp_path, method, args):
    from forgetjax.methods.run import RunConfig, run_training

    model, tokenizer = forgetjax.load("smollm2-135m-instruct")
    cfg = RunConfig(train=TrainConfig(batch_size=2, max_length=512, budget=BudgetConfig("steps", 2),
                                      optimizer=OptimizerConfig(lr=1e-5), checkpoint=CheckpointConfig(every=100),
                                      log=LogConfig(progress=False, tensorboard=False), out_dir=str(tmp_path)),
                    method=method, method_args=args, domain=DomainConfig(source="gsm8k", limit=16,
                                                                         data_dir=str(data_dir)))
    result = run_training(cfg, model=model, tokenizer=tokenizer, mesh=single_device_mesh())
    stats = json.loads((tmp_path / "data" / method / "stats.json").read_text())
    print(f"{method}: {json.dumps(stats)}; final metrics {result.final_metrics}")
    assert result.steps == 2 and (tmp_path / "final" / "forgetjax.json").is_file()
    assert np.isfinite(result.final_metrics["loss"])
    assert stats["samples"] == 16 * args.get("n_samples", 1)
