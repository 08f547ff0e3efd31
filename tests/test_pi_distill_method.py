"""π-Distill's method loss on a tiny random model: which role (teacher = prompt + privileged information, student =
prompt only) receives gradient at alpha 0 and 1, and the loss at an intermediate alpha against the paper's objective
written out in NumPy (arXiv 2602.04942: -(alpha J_teacher + (1 - alpha) J_student), PPO-clipped per-token ratios,
k3 estimates of KL(teacher || student))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from forgetjax.methods.registry import build_method
from forgetjax.models.config import config_from_hf
from forgetjax.models.decoder import CausalLM
from forgetjax.methods.run import DomainConfig

VOCAB, ROWS, WIDTH, COMPLETION = 64, 4, 8, 4
TEACHER_TOKENS = np.arange(4, 30)  # the two roles read disjoint token ids, so their embedding rows are disjoint
STUDENT_TOKENS = np.arange(34, 60)
CLIP = 0.2


@pytest.fixture(scope="module")
def setup():
    config = config_from_hf({"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "tie_word_embeddings": False})
    model = CausalLM(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    ones = np.ones((ROWS, WIDTH), bool)
    context = {"attention_mask": ones, "positions": np.tile(np.arange(WIDTH, dtype=np.int32), (ROWS, 1)),
               "segment_ids": ones.astype(np.int32)}
    loss_mask = np.zeros((ROWS, WIDTH), np.float32)
    loss_mask[:, -COMPLETION:] = 1.0
    loss_mask[0, -1] = 0.0
    batch = {"input_ids": rng.choice(TEACHER_TOKENS, (ROWS, WIDTH)).astype(np.int32), **context,
             "student_input_ids": rng.choice(STUDENT_TOKENS, (ROWS, WIDTH)).astype(np.int32),
             **{f"student_{k}": v for k, v in context.items()},
             "targets": rng.integers(0, VOCAB, (ROWS, WIDTH)).astype(np.int32), "loss_mask": loss_mask,
             "advantages": np.array([1.0, -0.7, 0.4, -1.2], np.float32)}
    teacher_logp = np_logp(model, batch, "")
    batch["old_logp"] = (teacher_logp + rng.normal(0, 0.3, teacher_logp.shape)).astype(np.float32)
    return model, {k: jnp.asarray(v) for k, v in batch.items()}


@nnx.jit
def forward(model, ids, mask, positions, segments):
    return model(ids, mask, positions, segments)


def np_logp(model, batch, prefix: str) -> np.ndarray:
    """log p(target) of every position under one role's context, from the model's logits (float64 log-softmax)."""
    logits = np.asarray(forward(model, *(jnp.asarray(batch[prefix + k]) for k in
                                         ("input_ids", "attention_mask", "positions", "segment_ids"))), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]


def method_loss(alpha: float, beta: float = 0.0):
    return build_method("pi_distill", {"alpha": alpha, "beta": beta, "clip_low": CLIP, "clip_high": CLIP,
                                       "student_clip_low": CLIP, "student_clip_high": CLIP}, DomainConfig()).loss


def test_alpha_one_trains_the_teacher_only_and_alpha_zero_the_student_only(setup):
    """d loss / d embedding rows of the teacher's and of the student's input tokens, exactly zero for the role
    whose weight is zero."""
    model, batch = setup
    graphdef, state = nnx.split(model)
    losses = [method_loss(alpha, beta=0.1) for alpha in (1.0, 0.0)]

    @jax.jit
    def embedding_grads(state, batch):
        grad = jax.grad(lambda s, loss: loss(nnx.merge(graphdef, s), batch, jax.random.key(0))[0])
        return [nnx.to_pure_dict(grad(state, loss))["embed_tokens"]["embedding"] for loss in losses]

    teacher_rows = np.unique(np.asarray(batch["input_ids"]))
    student_rows = np.unique(np.asarray(batch["student_input_ids"]))
    alpha_one, alpha_zero = (np.asarray(g) for g in embedding_grads(state, batch))
    assert np.all(alpha_one[student_rows] == 0) and np.abs(alpha_one[teacher_rows]).max() > 0
    assert np.all(alpha_zero[teacher_rows] == 0) and np.abs(alpha_zero[student_rows]).max() > 0


def ppo(ratio: np.ndarray, advantage: np.ndarray) -> np.ndarray:
    return np.minimum(ratio * advantage, np.clip(ratio, 1 - CLIP, 1 + CLIP) * advantage)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_intermediate_alpha_matches_the_papers_objective(setup, beta):
    model, batch = setup
    alpha = 0.3
    teacher, student = np_logp(model, batch, ""), np_logp(model, batch, "student_")
    advantage = np.asarray(batch["advantages"], np.float64)[:, None]
    j_teacher = ppo(np.exp(teacher - np.asarray(batch["old_logp"])), advantage)
    j_student = ppo(np.exp(student - teacher), advantage)
    kl = np.exp(student - teacher) - (student - teacher) - 1.0
    per_token = -alpha * (j_teacher - beta * kl) - (1 - alpha) * (j_student - beta * kl)
    mask = np.asarray(batch["loss_mask"]) > 0
    graphdef, state = nnx.split(model)
    loss = method_loss(alpha, beta)
    loss_sum, count = jax.jit(lambda s, b: loss(nnx.merge(graphdef, s), b, jax.random.key(0))[:2])(state, batch)
    assert float(count) == mask.sum()
    assert float(loss_sum) == pytest.approx(per_token[mask].sum(), rel=1e-4, abs=1e-5)
    swapped = -(1 - alpha) * (j_teacher - beta * kl) - alpha * (j_student - beta * kl)
    assert abs(swapped[mask].sum() - per_token[mask].sum()) > 1e-2  # the data tell the two weightings apart


# ---------------------------------------------------------------------------------------------------------------
# Privileged information per domain
# ---------------------------------------------------------------------------------------------------------------

def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("domain", ["math", "code", "qa"])
def test_default_privileged_context_holds_the_domains_ground_truth(data_dir, domain):
    """The teacher's default message is the student's prompt plus what the data file itself gives as ground truth:
    GSM8K's final answer (after ####), MBPP's reference program, EfficientQA's gold answers."""
    from forgetjax.envs import load_training_problems
    from forgetjax.methods.pi_distill import privileged_prompt

    source = {"math": "gsm8k", "code": "mbpp", "qa": "efficientqa"}[domain]
    config = DomainConfig(name=domain, source=source, limit=3, data_dir=str(data_dir))
    method = build_method("pi_distill", {}, config)
    for problem in load_training_problems(config):
        teacher = privileged_prompt(method.privileged_template, problem)
        assert teacher.startswith(problem.prompt + "\n\n")
        item = problem.metadata["item_id"]
        if domain == "math":
            row = _rows(data_dir / "gsm8k" / "train.jsonl")[int(item.split("-")[1])]
            answer = row["answer"].split("####")[-1].strip().replace(",", "")
            assert teacher.endswith(f"The correct final answer is {answer}.")
        elif domain == "code":
            row = next(r for r in _rows(data_dir / "mbpp" / "mbpp.jsonl") if str(r["task_id"]) == item)
            assert teacher.endswith("```python\n" + row["code"].replace("\r\n", "\n").strip() + "\n```")
        else:
            part, index = item.split("-")
            row = _rows(data_dir / "nq_open" / f"NQ-open.efficientqa.{part}.1.1.jsonl")[int(index)]
            assert teacher.endswith("The correct answer is " + " or ".join(f'"{a}"' for a in row["answer"]) + ".")


def test_code_tests_placeholder_and_domain_checks(data_dir):
    """{tests} writes the MBPP asserts; a placeholder the domain cannot fill is refused when the method is built."""
    from forgetjax.envs import load_training_problems
    from forgetjax.methods.pi_distill import privileged_prompt

    code = DomainConfig(name="code", source="mbpp", limit=2, data_dir=str(data_dir))
    method = build_method("pi_distill", {"privileged_template": "{prompt}\nTests:\n{tests}"}, code)
    problem = load_training_problems(code)[0]
    row = next(r for r in _rows(data_dir / "mbpp" / "mbpp.jsonl") if str(r["task_id"]) == problem.metadata["item_id"])
    assert privileged_prompt(method.privileged_template, problem) == (
        problem.prompt + "\nTests:\n" + "\n".join(row["test_list"]))
    with pytest.raises(ValueError, match=r"privileged_template uses \['\{answer\}'\].*'code'.*\{solution\} or \{tests\}"):
        build_method("pi_distill", {"privileged_template": "{prompt} {answer}"}, code)
    with pytest.raises(ValueError, match=r"\['\{solution\}'\].*'qa'"):
        build_method("pi_distill", {"privileged_template": "{prompt} {solution}"}, DomainConfig(name="qa"))
    with pytest.raises(ValueError, match="must contain the privileged information of domain 'math'"):
        build_method("pi_distill", {"privileged_template": "{prompt} only"}, DomainConfig(name="math"))
