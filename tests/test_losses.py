"""Token, distillation, preference and pi-Distill losses against independent float64 NumPy/SciPy references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import softmax as sp_softmax
from scipy.stats import entropy as sp_entropy

from forgetjax.losses import distill, pi_distill, preference, token
from forgetjax.losses.token import add_metrics, finalize, finalize_metrics
from jit_helpers import jit_call

jax.config.update("jax_enable_x64", False)

forward_kl_loss = jit_call(distill.forward_kl_loss)
generalized_jsd_loss = jit_call(distill.generalized_jsd_loss)
pi_distill_loss = jit_call(pi_distill.pi_distill_loss)
dpo_loss = jit_call(preference.dpo_loss)
spin_loss = jit_call(preference.spin_loss)
cross_entropy_loss = jit_call(token.cross_entropy_loss)
entropy = jit_call(token.entropy)
masked_mean = jit_call(token.masked_mean)
masked_sum_count = jit_call(token.masked_sum_count)
sequence_logprob = jit_call(token.sequence_logprob)
token_logprobs = jit_call(token.token_logprobs)

RTOL = 1e-5
ATOL = 1e-6


def f32(x):
    return jnp.asarray(x, jnp.float32)


def ragged_mask(rng: np.random.Generator, rows: int, width: int, empty_rows: tuple[int, ...] = (1,)) -> np.ndarray:
    """Completion masks with a random span per row; ``empty_rows`` are fully masked."""
    mask = np.zeros((rows, width), dtype=bool)
    for row in range(rows):
        if row in empty_rows:
            continue
        start = rng.integers(0, width // 2)
        mask[row, start : rng.integers(start + 1, width + 1)] = True
    return mask


def logits_batch(seed: int, rows: int = 5, width: int = 7, vocab: int = 13, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, size=(rows, width, vocab))
    targets = rng.integers(0, vocab, size=(rows, width))
    return logits, targets, ragged_mask(rng, rows, width)


def np_log_softmax(row: np.ndarray) -> np.ndarray:
    """log softmax of one logit vector, written out with the max shift."""
    shifted = row - row.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def np_kl(log_p: np.ndarray, log_q: np.ndarray) -> float:
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def np_log_sigmoid(x: float) -> float:
    return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------------------------- token.py


def test_token_logprobs_matches_loop_and_is_float32_for_bf16():
    logits, targets, _ = logits_batch(0)
    got = np.asarray(token_logprobs(f32(logits), jnp.asarray(targets)))
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            assert got[b, t] == pytest.approx(np_log_softmax(logits[b, t])[targets[b, t]], rel=RTOL, abs=ATOL)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    out = token_logprobs(bf16, jnp.asarray(targets))
    assert out.dtype == jnp.float32
    rounded = np.asarray(bf16.astype(jnp.float32), dtype=np.float64)
    expected = np.take_along_axis(sp_log_softmax(rounded, axis=-1), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=1e-5)


def test_token_logprobs_rejects_misaligned_targets():
    logits, targets, _ = logits_batch(1)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(f32(logits), jnp.asarray(targets[:, :-1]))


@pytest.mark.parametrize("as_float", [False, True])
def test_masked_sum_count_and_mean(as_float):
    rng = np.random.default_rng(2)
    values = rng.normal(size=(4, 6))
    mask = ragged_mask(rng, 4, 6)
    values[~mask] = np.nan
    given_mask = mask.astype(np.float32) if as_float else mask
    total, count = masked_sum_count(f32(values), jnp.asarray(given_mask))
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total), np.nansum(np.where(mask, values, 0.0)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(masked_mean(f32(values), given_mask)), values[mask].mean(), rtol=RTOL)
    assert float(masked_mean(f32(values), np.zeros((4, 6), bool))) == 0.0
    with pytest.raises(ValueError, match="mask"):
        masked_sum_count(f32(values), mask[:, :-1])


def np_cross_entropy_sum(logits, targets, mask):
    return sum(-np_log_softmax(logits[b, t])[targets[b, t]] for b, t in zip(*np.nonzero(mask)))


def test_cross_entropy_loss_matches_loops_with_empty_row():
    logits, targets, mask = logits_batch(3)
    loss_sum, count, metrics = cross_entropy_loss(f32(logits), jnp.asarray(targets), mask)
    nll, correct, tokens = 0.0, 0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                nll -= np_log_softmax(logits[b, t])[targets[b, t]]
                correct += int(np.argmax(logits[b, t]) == targets[b, t])
                tokens += 1
    assert float(count) == tokens
    np.testing.assert_allclose(float(loss_sum), nll, rtol=RTOL)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(float(means["nll"]), nll / tokens, rtol=RTOL)
    np.testing.assert_allclose(float(means["accuracy"]), correct / tokens, rtol=RTOL)
    assert float(metrics["tokens"][0]) == tokens


def test_entropy_matches_scipy():
    logits, _, mask = logits_batch(4)
    total, count = entropy(f32(logits), mask)
    expected = sum(sp_entropy(sp_softmax(logits[b, t])) for b, t in zip(*np.nonzero(mask)))
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total), expected, rtol=RTOL)


def test_sequence_logprob_sums_masked_tokens_only():
    rng = np.random.default_rng(5)
    token_logps = -rng.gamma(1.0, 1.0, size=(4, 6))
    mask = ragged_mask(rng, 4, 6)
    got = np.asarray(sequence_logprob(f32(token_logps), mask))
    expected = [sum(token_logps[b, t] for t in range(6) if mask[b, t]) for b in range(4)]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert got[1] == 0.0


def test_finalize_and_add_metrics():
    assert float(finalize(jnp.float32(3.0), jnp.float32(0.0))) == 0.0
    merged = add_metrics({"a": (f32(1.0), f32(2.0))}, {"a": (f32(3.0), f32(2.0))})
    assert float(finalize(*merged["a"])) == 1.0
    with pytest.raises(ValueError, match="metric keys"):
        add_metrics({"a": (f32(1.0), f32(1.0))}, {"b": (f32(1.0), f32(1.0))})


# ----------------------------------------------------------------------------------------------- distill.py


def np_forward_kl(student, teacher, mask, temperature):
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        total += np_kl(np_log_softmax(teacher[b, t] / temperature), np_log_softmax(student[b, t] / temperature))
    return total


def np_gjsd(student, teacher, mask, beta, temperature):
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        p = np.exp(np_log_softmax(teacher[b, t] / temperature))
        q = np.exp(np_log_softmax(student[b, t] / temperature))
        m = beta * p + (1 - beta) * q
        total += beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m))
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_reference_and_stops_teacher_gradient(temperature):
    student, targets, mask = logits_batch(6)
    teacher = logits_batch(7)[0]
    loss_sum, count, metrics = forward_kl_loss(f32(student), f32(teacher), mask, temperature)
    np.testing.assert_allclose(float(loss_sum), np_forward_kl(student, teacher, mask, temperature), rtol=RTOL)
    assert float(count) == mask.sum()
    teacher_grad = jax.grad(lambda t: forward_kl_loss(f32(student), t, mask, temperature)[0])(f32(teacher))
    assert np.all(np.asarray(teacher_grad) == 0)


def test_forward_kl_gradient_matches_softmax_difference():
    student, _, mask = logits_batch(8)
    teacher = logits_batch(9)[0]
    got = np.asarray(jax.grad(lambda s: forward_kl_loss(s, f32(teacher), mask)[0])(f32(student)))
    expected = np.zeros_like(student)
    for b, t in zip(*np.nonzero(mask)):
        expected[b, t] = sp_softmax(student[b, t]) - sp_softmax(teacher[b, t])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_reference(beta):
    student, _, mask = logits_batch(10)
    teacher = logits_batch(11)[0]
    loss_sum, count, _ = generalized_jsd_loss(f32(student), f32(teacher), mask, beta=beta, temperature=1.5)
    np.testing.assert_allclose(float(loss_sum), np_gjsd(student, teacher, mask, beta, 1.5), rtol=RTOL)
    assert float(count) == mask.sum()


def test_generalized_jsd_endpoints_and_limits_are_the_two_kls():
    student, _, mask = logits_batch(12, scale=1.0)
    teacher = logits_batch(13, scale=1.0)[0]
    forward = np_forward_kl(student, teacher, mask, 1.0)
    reverse = np_forward_kl(teacher, student, mask, 1.0)
    np.testing.assert_allclose(float(generalized_jsd_loss(f32(student), f32(teacher), mask, beta=0.0)[0]), forward,
                               rtol=RTOL)
    np.testing.assert_allclose(float(generalized_jsd_loss(f32(student), f32(teacher), mask, beta=1.0)[0]), reverse,
                               rtol=RTOL)
    small = 1e-3
    near_zero = float(generalized_jsd_loss(f32(student), f32(teacher), mask, beta=small)[0]) / small
    near_one = float(generalized_jsd_loss(f32(student), f32(teacher), mask, beta=1 - small)[0]) / small
    np.testing.assert_allclose(near_zero, forward, rtol=0.02)
    np.testing.assert_allclose(near_one, reverse, rtol=0.02)
    assert abs(forward - reverse) > 0.05 * forward
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(f32(student), f32(teacher), mask, beta=1.5)


def test_distill_rejects_vocab_mismatch():
    student, _, mask = logits_batch(14)
    with pytest.raises(ValueError, match="teacher_logits"):
        forward_kl_loss(f32(student), f32(student[..., :-1]), mask)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl_loss(f32(student), f32(student), mask, temperature=0.0)


# ----------------------------------------------------------------------------------------------- preference.py


def preference_batch(seed: int, pairs: int = 6):
    rng = np.random.default_rng(seed)
    return [-rng.gamma(5.0, 4.0, size=pairs) for _ in range(4)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_matches_reference(label_smoothing):
    pc, pr, rc, rr = preference_batch(15)
    beta = 0.2
    loss_sum, count, metrics = dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=beta, label_smoothing=label_smoothing)
    expected, margins, chosen, rejected = 0.0, [], [], []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected += -(1 - label_smoothing) * np_log_sigmoid(beta * h) - label_smoothing * np_log_sigmoid(-beta * h)
        margins.append(beta * h)
        chosen.append(beta * (pc[i] - rc[i]))
        rejected.append(beta * (pr[i] - rr[i]))
    assert float(count) == len(pc)
    np.testing.assert_allclose(float(loss_sum), expected, rtol=RTOL)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(float(means["reward_margin"]), np.mean(margins), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(means["reward_accuracy"]), np.mean(np.array(margins) > 0), rtol=RTOL)
    np.testing.assert_allclose(float(means["chosen_reward"]), np.mean(chosen), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(means["rejected_reward"]), np.mean(rejected), rtol=1e-4, atol=1e-5)


def test_dpo_hand_computed_cases():
    zero = f32(np.zeros(1))
    for eps in (0.0, 0.25):
        assert float(dpo_loss(zero, zero, zero, zero, beta=0.5, label_smoothing=eps)[0]) == pytest.approx(np.log(2))
    chosen = f32([-1.0])
    rejected = f32([-3.0])
    value = float(dpo_loss(chosen, rejected, zero, zero, beta=1.0, label_smoothing=0.1)[0])
    assert value == pytest.approx(0.9 * np.log1p(np.exp(-2.0)) + 0.1 * np.log1p(np.exp(2.0)), rel=1e-6)


def test_dpo_gradient_and_pair_mask():
    pc, pr, rc, rr = preference_batch(16)
    beta, eps = 0.3, 0.1
    pair_mask = np.array([1, 1, 0, 1, 1, 0], bool)
    grad = jax.grad(lambda c: dpo_loss(c, f32(pr), f32(rc), f32(rr), beta, eps, pair_mask)[0])(f32(pc))
    for i in range(len(pc)):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        sigma = 1 / (1 + np.exp(-z))
        expected = beta * (-(1 - eps) * (1 - sigma) + eps * sigma) if pair_mask[i] else 0.0
        assert float(grad[i]) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert float(dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta, eps, pair_mask)[1]) == 4


def test_dpo_rejects_bad_arguments():
    pc, pr, rc, rr = preference_batch(17)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr[:-1]))


def test_spin_matches_reference():
    real, generated, ref_real, ref_generated = preference_batch(18)
    beta = 0.1
    loss_sum, count, metrics = spin_loss(f32(real), f32(generated), f32(ref_real), f32(ref_generated), beta)
    expected = sum(
        -np_log_sigmoid(beta * ((real[i] - ref_real[i]) - (generated[i] - ref_generated[i]))) for i in range(len(real))
    )
    np.testing.assert_allclose(float(loss_sum), expected, rtol=RTOL)
    assert float(count) == len(real)
    np.testing.assert_allclose(float(finalize(*metrics["real_reward"])), beta * np.mean(real - ref_real), rtol=1e-4)
    np.testing.assert_allclose(
        float(finalize(*metrics["generated_reward"])), beta * np.mean(generated - ref_generated), rtol=1e-4
    )


# ----------------------------------------------------------------------------------------------- pi_distill.py


def pi_batch(seed: int, rows: int = 6, width: int = 8):
    rng = np.random.default_rng(seed)
    teacher = -rng.gamma(2.0, 1.0, size=(rows, width))
    student = teacher + rng.normal(0, 0.4, size=(rows, width))
    old_teacher = teacher + rng.normal(0, 0.2, size=(rows, width))
    advantages = rng.normal(size=rows)
    return teacher, student, old_teacher, advantages, ragged_mask(rng, rows, width)


def np_ppo_term(logp, old, adv, low, high):
    """(objective, d objective / d logp) of min(r A, clip(r) A) for one token."""
    ratio = np.exp(logp - old)
    clipped = min(max(ratio, 1 - low), 1 + high) * adv
    if clipped < ratio * adv:
        return clipped, 0.0
    return ratio * adv, ratio * adv


def np_k3_and_grads(p, ref):
    """k3(p, ref) and its derivatives with respect to p and ref."""
    d = ref - p
    return np.exp(d) - d - 1, 1 - np.exp(d), np.exp(d) - 1


def np_pi_distill(teacher, student, old, adv, mask, alpha, beta, clip, student_clip):
    """Loss sum, token count and gradients w.r.t. teacher_logp and student_logp, token by token."""
    total, tokens = 0.0, int(mask.sum())
    grad_teacher = np.zeros_like(teacher)
    grad_student = np.zeros_like(student)
    for b, t in zip(*np.nonzero(mask)):
        o_t, do_t = np_ppo_term(teacher[b, t], old[b, t], adv[b], *clip)
        o_s, do_s = np_ppo_term(student[b, t], teacher[b, t], adv[b], *student_clip)
        kl, dkl_dp, dkl_dref = np_k3_and_grads(teacher[b, t], student[b, t])
        total += -alpha * (o_t - beta * kl) - (1 - alpha) * (o_s - beta * kl)
        grad_teacher[b, t] = -alpha * (do_t - beta * dkl_dp) / tokens
        grad_student[b, t] = -(1 - alpha) * (do_s - beta * dkl_dref) / tokens
    return total, tokens, grad_teacher, grad_student


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_pi_distill_matches_reference_values_and_gradients(alpha, beta):
    teacher, student, old, adv, mask = pi_batch(19)
    clip, student_clip = (0.2, 0.28), (0.2, 0.2)

    def mean_loss(t, s):
        loss_sum, count, _ = pi_distill_loss(t, s, f32(old), f32(adv), mask, alpha=alpha, beta=beta,
                                             clip_low=clip[0], clip_high=clip[1],
                                             student_clip_low=student_clip[0], student_clip_high=student_clip[1])
        return loss_sum / count

    total, tokens, grad_t, grad_s = np_pi_distill(teacher, student, old, adv, mask, alpha, beta, clip, student_clip)
    loss_sum, count, _ = pi_distill_loss(f32(teacher), f32(student), f32(old), f32(adv), mask, alpha=alpha, beta=beta,
                                         clip_low=0.2, clip_high=0.28)
    assert float(count) == tokens
    np.testing.assert_allclose(float(loss_sum), total, rtol=RTOL, atol=1e-5)
    got_t, got_s = jax.grad(mean_loss, argnums=(0, 1))(f32(teacher), f32(student))
    np.testing.assert_allclose(np.asarray(got_t), grad_t, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_s), grad_s, rtol=1e-4, atol=1e-7)
    if alpha == 0.0:
        assert np.all(np.asarray(got_t) == 0)
    if alpha == 1.0:
        assert np.all(np.asarray(got_s) == 0)


def test_pi_distill_unclipped_student_ratio_and_metrics():
    teacher, student, old, adv, mask = pi_batch(20)
    loss_sum, count, metrics = pi_distill_loss(
        f32(teacher), f32(student), None, f32(adv), mask, alpha=0.0, student_clip_low=None, student_clip_high=None
    )
    ratios = np.exp(student - teacher)
    expected = -sum(ratios[b, t] * adv[b] for b, t in zip(*np.nonzero(mask)))
    np.testing.assert_allclose(float(loss_sum), expected, rtol=RTOL, atol=1e-5)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(float(means["student_ratio"]), ratios[mask].mean(), rtol=RTOL)
    np.testing.assert_allclose(float(means["teacher_ratio"]), 1.0, rtol=RTOL)
    kl = np.mean([np_k3_and_grads(teacher[b, t], student[b, t])[0] for b, t in zip(*np.nonzero(mask))])
    np.testing.assert_allclose(float(means["kl_teacher_student"]), kl, rtol=1e-4)
    assert float(means["student_clip_fraction"]) == 0.0


def test_pi_distill_rejects_bad_arguments():
    teacher, student, old, adv, mask = pi_batch(21)
    with pytest.raises(ValueError, match="alpha"):
        pi_distill_loss(f32(teacher), f32(student), f32(old), f32(adv), mask, alpha=1.5)
    with pytest.raises(ValueError, match="student_logp"):
        pi_distill_loss(f32(teacher), f32(student[:, :-1]), f32(old), f32(adv), mask)
    with pytest.raises(ValueError, match="student_clip_low"):
        pi_distill_loss(f32(teacher), f32(student), f32(old), f32(adv), mask, student_clip_low=1.0)


# ----------------------------------------------------------------------------------------------- accumulation


def assert_accumulates(loss_fn, full_args, split_args):
    """Summing (sum, count) and metric pairs over two micro-batches reproduces the full-batch means."""
    full_sum, full_count, full_metrics = loss_fn(*full_args)
    parts = [loss_fn(*args) for args in split_args]
    np.testing.assert_allclose(
        float((parts[0][0] + parts[1][0]) / (parts[0][1] + parts[1][1])), float(full_sum / full_count), rtol=1e-6
    )
    merged = add_metrics(parts[0][2], parts[1][2])
    for name, (total, count) in full_metrics.items():
        if name in ("tokens", "sequences", "pairs"):
            assert float(merged[name][0]) == float(total), name
        else:
            np.testing.assert_allclose(float(finalize(*merged[name])), float(finalize(total, count)),
                                       rtol=1e-5, atol=1e-6, err_msg=name)


def split_rows(arrays, cut):
    return [[a[:cut] for a in arrays], [a[cut:] for a in arrays]]


def test_micro_batch_accumulation_for_token_and_distill_losses():
    logits, targets, mask = logits_batch(22, rows=6)
    teacher = logits_batch(23, rows=6)[0]
    args = [f32(logits), jnp.asarray(targets), jnp.asarray(mask)]
    assert_accumulates(cross_entropy_loss, args, split_rows(args, 3))
    kd_args = [f32(logits), f32(teacher), jnp.asarray(mask)]
    assert_accumulates(forward_kl_loss, kd_args, split_rows(kd_args, 3))
    assert_accumulates(lambda s, t, m: generalized_jsd_loss(s, t, m, 0.3), kd_args, split_rows(kd_args, 3))


def test_micro_batch_accumulation_for_dpo_and_pi_distill():
    pref_args = [f32(x) for x in preference_batch(24)]
    assert_accumulates(lambda *a: dpo_loss(*a, beta=0.1, label_smoothing=0.1), pref_args, split_rows(pref_args, 3))
    teacher, student, old, adv, mask = pi_batch(25)
    pi_args = [f32(teacher), f32(student), f32(old), f32(adv), jnp.asarray(mask)]
    assert_accumulates(lambda *a: pi_distill_loss(*a, alpha=0.5, beta=0.1), pi_args, split_rows(pi_args, 3))


def test_losses_are_jittable():
    logits, targets, mask = logits_batch(26)
    jitted = jax.jit(token.cross_entropy_loss)(f32(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(jitted[0]), float(np_cross_entropy_sum(logits, targets, mask)), rtol=1e-5)
    teacher, student, old, adv, pmask = pi_batch(27)
    run = jax.jit(lambda *a: pi_distill.pi_distill_loss(*a, alpha=0.5, beta=0.05))
    expected = np_pi_distill(teacher, student, old, adv, pmask, 0.5, 0.05, (0.2, 0.2), (0.2, 0.2))[0]
    np.testing.assert_allclose(float(run(f32(teacher), f32(student), f32(old), f32(adv), pmask)[0]), expected,
                               rtol=1e-5, atol=1e-5)
