"""GRPO / Dr.GRPO / FRPO losses against independent float64 NumPy references (explicit loops)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetjax.losses import policy_gradient, token
from forgetjax.losses.token import finalize
from jit_helpers import jit_call

jax.config.update("jax_enable_x64", False)

clipped_surrogate = jit_call(policy_gradient.clipped_surrogate)
group_advantages = jit_call(policy_gradient.group_advantages)
k3_kl = jit_call(policy_gradient.k3_kl)
policy_loss = jit_call(policy_gradient.policy_loss)
token_logprobs = jit_call(token.token_logprobs)

RTOL = 1e-5
ATOL = 1e-6


def ragged_mask(rng: np.random.Generator, rows: int, width: int, empty_rows: tuple[int, ...] = (1,)) -> np.ndarray:
    """Completion masks with random start/end per row; ``empty_rows`` are fully masked (padding rows)."""
    mask = np.zeros((rows, width), dtype=bool)
    for row in range(rows):
        if row in empty_rows:
            continue
        start = rng.integers(0, width // 2)
        end = rng.integers(start + 1, width + 1)
        mask[row, start:end] = True
    return mask


def make_batch(
    seed: int, rows: int = 8, width: int = 9, off_policy: float = 0.3, empty_rows: tuple[int, ...] = (1,)
):
    rng = np.random.default_rng(seed)
    logp = -rng.gamma(2.0, 1.0, size=(rows, width))
    old_logp = logp + rng.normal(0.0, off_policy, size=(rows, width))
    ref_logp = logp + rng.normal(0.0, 0.5, size=(rows, width))
    advantages = rng.normal(0.0, 1.0, size=rows)
    mask = ragged_mask(rng, rows, width, empty_rows)
    return logp, old_logp, ref_logp, advantages, mask


def np_k3(logp: float, ref: float) -> float:
    return np.exp(ref - logp) - (ref - logp) - 1.0


def np_token_objective(logp: float, old: float, adv: float, clip_low: float, clip_high: float) -> float:
    ratio = np.exp(logp - old)
    return min(ratio * adv, min(max(ratio, 1 - clip_low), 1 + clip_high) * adv)


def np_grpo_like(logp, old, ref, adv, mask, beta, clip_low, clip_high, budget=None):
    """GRPO (budget None) or Dr.GRPO loss sum and counted rows, token by token."""
    total, rows = 0.0, 0
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not tokens:
            continue
        rows += 1
        row_sum = 0.0
        for t in tokens:
            row_sum += -np_token_objective(logp[i, t], old[i, t], adv[i], clip_low, clip_high)
            if beta:
                row_sum += beta * np_k3(logp[i, t], ref[i, t])
        total += row_sum / (len(tokens) if budget is None else budget)
    return total, rows


def np_frpo(logp, old, ref, adv, mask, group_size, lam, jackknife, beta, clip_low, clip_high):
    """FRPO loss sum and counted rows, written out group by group."""
    rows = logp.shape[0]
    surrogate = np.zeros(rows)
    kl_mean = np.zeros(rows)
    valid = mask.sum(axis=1) > 0
    for i in range(rows):
        tokens = np.nonzero(mask[i])[0]
        if len(tokens) == 0:
            continue
        ratio = np.exp(logp[i, tokens] - old[i, tokens])
        surrogate[i] = np.mean(np.minimum(ratio, np.clip(ratio, 1 - clip_low, 1 + clip_high)))
        kl_mean[i] = np.mean([np_k3(logp[i, t], ref[i, t]) for t in tokens])
    total = 0.0
    for start in range(0, rows, group_size):
        members = [i for i in range(start, start + group_size) if valid[i]]
        n = len(members)
        if n == 0:
            continue
        weights = np.exp(-adv[members] / lam)
        terms = weights * surrogate[members]
        robust = np.log(np.mean(terms))
        if jackknife and n >= 2:
            leave_one_out = [np.log((terms.sum() - terms[k]) / (n - 1)) for k in range(n)]
            robust = n * np.log(np.mean(terms)) - (n - 1) * np.mean(leave_one_out)
        total += n * max(lam, 1.0) * (robust - np.mean(surrogate[members]) + 1.0)
    total += beta * kl_mean[valid].sum()
    return total, int(valid.sum())


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------- advantages


def test_group_advantages_grpo_population_std():
    rewards = np.random.default_rng(0).normal(size=12)
    out = np.asarray(group_advantages(f32(rewards), 4, "grpo", eps=1e-6))
    for g in range(3):
        block = rewards[4 * g : 4 * g + 4]
        expected = (block - block.mean()) / (np.sqrt(np.mean((block - block.mean()) ** 2)) + 1e-6)
        np.testing.assert_allclose(out[4 * g : 4 * g + 4], expected, rtol=RTOL, atol=ATOL)


def test_group_advantages_drgrpo_and_constant_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(group_advantages(f32(rewards), 4, "drgrpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(group_advantages(f32(rewards), 4, "grpo")[4:], np.zeros(4))
    np.testing.assert_allclose(group_advantages(f32(rewards), 4, "grpo")[:4], [1, -1, -1, 1], rtol=1e-5)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(f32(np.zeros(6)), 4)
    with pytest.raises(ValueError, match="mode"):
        group_advantages(f32(np.zeros(4)), 4, "ppo")


# ----------------------------------------------------------------------------------------------- KL / surrogate


def test_k3_non_negative_zero_at_equality_and_matches_formula():
    rng = np.random.default_rng(1)
    logp = rng.normal(0, 3, size=1000)
    ref = logp + rng.normal(0, 2, size=1000) * (rng.random(1000) < 0.8)
    out = np.asarray(k3_kl(f32(logp), f32(ref)))
    assert np.all(out >= 0)
    np.testing.assert_array_equal(np.asarray(k3_kl(f32(logp), f32(logp))), np.zeros(1000))
    small = np.abs(ref - logp) < 3
    as_f32 = [x.astype(np.float32).astype(np.float64) for x in (logp, ref)]
    expected = np.array([np_k3(a, b) for a, b in zip(*as_f32)])
    np.testing.assert_allclose(out[small], expected[small], rtol=1e-4, atol=1e-7)


def test_k3_is_unbiased_kl_estimate_on_samples():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    samples = rng.choice(6, size=200_000, p=p)
    estimate = float(jnp.mean(k3_kl(f32(np.log(p)[samples]), f32(np.log(q)[samples]))))
    exact = float(np.sum(p * np.log(p / q)))
    assert abs(estimate - exact) < 0.02 * max(exact, 0.1)


def test_clipped_surrogate_matches_loops():
    logp, old, _, adv, _ = make_batch(3, off_policy=0.4)
    objective, clipped = clipped_surrogate(f32(logp), f32(old), f32(adv), 0.2, 0.28)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            ratio = np.exp(logp[i, t] - old[i, t])
            expected = np_token_objective(logp[i, t], old[i, t], adv[i], 0.2, 0.28)
            assert objective[i, t] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            binding = (ratio > 1.28 and adv[i] > 0) or (ratio < 0.8 and adv[i] < 0)
            assert bool(clipped[i, t]) == binding


# ----------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_matches_reference(beta):
    logp, old, ref, adv, mask = make_batch(4)
    loss_sum, count, metrics = policy_loss(
        f32(logp), f32(old), f32(ref), f32(adv), mask, variant="grpo", beta=beta, clip_low=0.2, clip_high=0.28
    )
    expected, rows = np_grpo_like(logp, old, ref, adv, mask, beta, 0.2, 0.28)
    assert float(count) == rows == mask.shape[0] - 1
    np.testing.assert_allclose(float(loss_sum), expected, rtol=RTOL, atol=ATOL)
    tokens = mask.sum()
    ratios = np.exp(logp - old)[mask]
    np.testing.assert_allclose(float(finalize(*metrics["ratio"])), ratios.mean(), rtol=RTOL)
    np.testing.assert_allclose(float(finalize(*metrics["entropy_proxy"])), -logp[mask].mean(), rtol=RTOL)
    kl_expected = np.mean([np_k3(a, b) for a, b in zip(logp[mask], ref[mask])])
    np.testing.assert_allclose(float(finalize(*metrics["kl"])), kl_expected, rtol=1e-4)
    adv_rows = adv[mask.sum(1) > 0]
    np.testing.assert_allclose(float(finalize(*metrics["advantage"])), adv_rows.mean(), rtol=1e-4, atol=ATOL)
    np.testing.assert_allclose(float(finalize(*metrics["advantage_sq"])), np.mean(adv_rows**2), rtol=RTOL)
    assert float(metrics["tokens"][0]) == tokens


def test_grpo_without_ref_when_beta_zero_and_requires_ref_otherwise():
    logp, old, _, adv, mask = make_batch(5)
    loss_sum, _, metrics = policy_loss(f32(logp), f32(old), None, f32(adv), mask, beta=0.0)
    assert "kl" not in metrics and np.isfinite(float(loss_sum))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(f32(logp), f32(old), None, f32(adv), mask, beta=0.1)


def test_drgrpo_divides_by_constant_budget():
    logp, old, ref, adv, mask = make_batch(6)
    results = {}
    for budget in (16, 32):
        loss_sum, count, _ = policy_loss(
            f32(logp), f32(old), f32(ref), f32(adv), mask, variant="drgrpo", beta=0.02, generation_budget=budget
        )
        expected, rows = np_grpo_like(logp, old, ref, adv, mask, 0.02, 0.2, 0.2, budget=budget)
        np.testing.assert_allclose(float(loss_sum), expected, rtol=RTOL, atol=ATOL)
        assert float(count) == rows
        results[budget] = float(loss_sum)
    np.testing.assert_allclose(results[16], 2 * results[32], rtol=1e-6)
    with pytest.raises(ValueError, match="generation_budget"):
        policy_loss(f32(logp), f32(old), None, f32(adv), mask, variant="drgrpo")


@pytest.mark.parametrize(
    "lam, jackknife, empty_rows",
    [
        (0.5, False, (1,)),
        (2.0, True, (1,)),
        (0.5, True, (0, 1, 2, 6)),
        (2.0, False, (0, 1, 2, 6)),
        (2.0, True, (4, 5, 6, 7)),
    ],
)
def test_frpo_matches_reference(lam, jackknife, empty_rows):
    logp, old, ref, adv, mask = make_batch(7, empty_rows=empty_rows)
    loss_sum, count, _ = policy_loss(
        f32(logp), f32(old), f32(ref), f32(adv), mask, variant="frpo", beta=0.03, clip_low=0.2, clip_high=0.28,
        frpo_lambda=lam, frpo_jackknife=jackknife, group_size=4,
    )
    expected, rows = np_frpo(logp, old, ref, adv, mask, 4, lam, jackknife, 0.03, 0.2, 0.28)
    assert float(count) == rows
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5, atol=1e-5)


def test_frpo_rejects_partial_groups():
    logp, old, _, adv, mask = make_batch(8)
    with pytest.raises(ValueError, match="group_size"):
        policy_loss(f32(logp), f32(old), None, f32(adv), mask, variant="frpo", group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        policy_loss(f32(logp), f32(old), None, f32(adv), mask, variant="frpo")


# ----------------------------------------------------------------------------------------------- gradients


def logits_batch(seed: int, rows: int = 8, width: int = 6, vocab: int = 7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(rows, width, vocab))
    targets = rng.integers(0, vocab, size=(rows, width))
    mask = ragged_mask(rng, rows, width, empty_rows=(2,))
    return logits, targets, mask


def np_reinforce_grad(logits, targets, mask, advantages):
    """d/dlogits of -(1/N) sum_i A_i (1/T_i) sum_t log p(y_it): REINFORCE with per-sequence token means."""
    grad = np.zeros_like(logits)
    rows = [i for i in range(logits.shape[0]) if mask[i].any()]
    for i in rows:
        tokens = np.nonzero(mask[i])[0]
        for t in tokens:
            shifted = logits[i, t] - logits[i, t].max()
            probs = np.exp(shifted) / np.exp(shifted).sum()
            onehot = np.eye(logits.shape[2])[targets[i, t]]
            grad[i, t] = -advantages[i] * (onehot - probs) / (len(tokens) * len(rows))
    return grad


def mean_loss_grad(logits, targets, mask, advantages, **kwargs):
    def loss(z):
        logp = token_logprobs(z, jnp.asarray(targets))
        loss_sum, count, _ = policy_loss(logp, None, None, f32(advantages), mask, **kwargs)
        return loss_sum / count

    return np.asarray(jax.grad(loss)(f32(logits)))


def test_grpo_first_update_gradient_is_reinforce_with_group_baseline():
    logits, targets, mask = logits_batch(9)
    rewards = np.random.default_rng(10).integers(0, 2, size=logits.shape[0]).astype(float)
    advantages = np.asarray(group_advantages(f32(rewards), 4, "grpo"), dtype=np.float64)
    expected = np_reinforce_grad(logits, targets, mask, advantages)
    got = mean_loss_grad(logits, targets, mask, advantages, variant="grpo")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

    explicit_old = token_logprobs(f32(logits), jnp.asarray(targets))

    def loss_with_old(z):
        logp = token_logprobs(z, jnp.asarray(targets))
        loss_sum, count, _ = policy_loss(logp, explicit_old, None, f32(advantages), mask)
        return loss_sum / count

    np.testing.assert_allclose(np.asarray(jax.grad(loss_with_old)(f32(logits))), expected, rtol=1e-4, atol=1e-6)


def test_drgrpo_first_update_gradient_uses_budget():
    logits, targets, mask = logits_batch(11)
    advantages = np.random.default_rng(12).normal(size=logits.shape[0])
    budget = 10
    expected = np.zeros_like(logits)
    rows = [i for i in range(logits.shape[0]) if mask[i].any()]
    for i in rows:
        for t in np.nonzero(mask[i])[0]:
            probs = np.exp(logits[i, t]) / np.exp(logits[i, t]).sum()
            onehot = np.eye(logits.shape[2])[targets[i, t]]
            expected[i, t] = -advantages[i] * (onehot - probs) / (budget * len(rows))
    got = mean_loss_grad(logits, targets, mask, advantages, variant="drgrpo", generation_budget=budget)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_off_policy_gradient_vanishes_on_clipped_tokens():
    logp, old, _, adv, mask = make_batch(13, off_policy=0.5)

    def loss(lp):
        loss_sum, count, _ = policy_loss(lp, f32(old), None, f32(adv), mask, clip_low=0.2, clip_high=0.2)
        return loss_sum / count

    got = np.asarray(jax.grad(loss)(f32(logp)))
    expected = np.zeros_like(logp)
    rows = [i for i in range(logp.shape[0]) if mask[i].any()]
    for i in rows:
        tokens = np.nonzero(mask[i])[0]
        for t in tokens:
            ratio = np.exp(logp[i, t] - old[i, t])
            binding = (ratio > 1.2 and adv[i] > 0) or (ratio < 0.8 and adv[i] < 0)
            expected[i, t] = 0.0 if binding else -ratio * adv[i] / (len(tokens) * len(rows))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_frpo_on_policy_gradient_is_reinforce_with_derived_baseline():
    logits, targets, mask = logits_batch(14)
    advantages = np.random.default_rng(15).normal(size=logits.shape[0])
    lam, group = 2.0, 4
    valid = mask.any(axis=1)
    effective = np.zeros(logits.shape[0])
    for start in range(0, logits.shape[0], group):
        members = [i for i in range(start, start + group) if valid[i]]
        weights = np.exp(-advantages[members] / lam)
        effective[members] = max(lam, 1.0) * (1.0 - weights / weights.mean())
    expected = np_reinforce_grad(logits, targets, mask, effective)
    got = mean_loss_grad(logits, targets, mask, advantages, variant="frpo", frpo_lambda=lam, group_size=group)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_frpo_large_lambda_recovers_grpo():
    logits, targets, mask = logits_batch(16)
    rewards = np.random.default_rng(17).normal(size=logits.shape[0])
    advantages = np.zeros_like(rewards)
    for start in range(0, len(rewards), 4):
        members = [i for i in range(start, start + 4) if mask[i].any()]
        advantages[members] = rewards[members] - rewards[members].mean()
    grpo = mean_loss_grad(logits, targets, mask, advantages, variant="grpo")
    frpo = mean_loss_grad(logits, targets, mask, advantages, variant="frpo", frpo_lambda=1e3, group_size=4)
    np.testing.assert_allclose(frpo, grpo, atol=5e-3 * np.abs(grpo).max())
    robust = mean_loss_grad(logits, targets, mask, advantages, variant="frpo", frpo_lambda=0.3, group_size=4)
    assert np.abs(robust - grpo).max() > 0.05 * np.abs(grpo).max()

    logp = token_logprobs(f32(logits), jnp.asarray(targets))
    grpo_value = finalize(*policy_loss(logp, None, None, f32(advantages), mask)[:2])
    frpo_value = finalize(
        *policy_loss(logp, None, None, f32(advantages), mask, variant="frpo", frpo_lambda=1e3, group_size=4)[:2]
    )
    assert abs(float(frpo_value) - float(grpo_value)) < 1e-2


def test_frpo_jackknife_gradient_matches_finite_differences():
    logp, old, ref, adv, mask = make_batch(18, rows=8, width=5, off_policy=0.1)
    settings = dict(group_size=4, lam=0.7, jackknife=True, beta=0.05, clip_low=0.2, clip_high=0.2)

    def reference(lp):
        total, rows = np_frpo(lp, old, ref, adv, mask, settings["group_size"], settings["lam"],
                              settings["jackknife"], settings["beta"], settings["clip_low"], settings["clip_high"])
        return total / rows

    def loss(lp):
        loss_sum, count, _ = policy_loss(
            lp, f32(old), f32(ref), f32(adv), mask, variant="frpo", beta=0.05, frpo_lambda=0.7,
            frpo_jackknife=True, group_size=4,
        )
        return loss_sum / count

    got = np.asarray(jax.grad(loss)(f32(logp)))
    expected = np.zeros_like(logp)
    step = 1e-6
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            up, down = logp.copy(), logp.copy()
            up[i, t] += step
            down[i, t] -= step
            expected[i, t] = (reference(up) - reference(down)) / (2 * step)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    assert np.all(got[~mask] == 0)


# ----------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="grpo", beta=0.04),
        dict(variant="drgrpo", beta=0.04, generation_budget=12),
        dict(variant="frpo", beta=0.04, frpo_lambda=1.5, group_size=4),
        dict(variant="frpo", beta=0.0, frpo_lambda=0.8, frpo_jackknife=True, group_size=4),
    ],
)
def test_two_micro_batches_accumulate_to_full_batch(kwargs):
    logp, old, ref, adv, mask = make_batch(19)
    args = [f32(logp), f32(old), f32(ref), f32(adv), jnp.asarray(mask)]
    full_sum, full_count, full_metrics = policy_loss(*args, **kwargs)
    parts = [policy_loss(*[a[rows] for a in args], **kwargs) for rows in (slice(0, 4), slice(4, 8))]
    accumulated = (parts[0][0] + parts[1][0]) / (parts[0][1] + parts[1][1])
    np.testing.assert_allclose(float(accumulated), float(full_sum / full_count), rtol=1e-6, atol=1e-7)
    for name, (total, count) in full_metrics.items():
        summed = parts[0][2][name][0] + parts[1][2][name][0]
        counted = parts[0][2][name][1] + parts[1][2][name][1]
        if name in ("tokens", "sequences"):
            assert float(summed) == float(total), name
            continue
        np.testing.assert_allclose(float(finalize(summed, counted)), float(finalize(total, count)),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_policy_loss_is_jittable_and_float32_for_bf16_inputs():
    logp, old, ref, adv, mask = make_batch(20)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old, ref)]

    @jax.jit
    def run(lp, ol, rf, ad, mk):
        return policy_gradient.policy_loss(lp, ol, rf, ad, mk, variant="frpo", beta=0.1, group_size=4,
                                           frpo_jackknife=True)

    loss_sum, count, _ = run(*bf16, f32(adv), jnp.asarray(mask))
    assert loss_sum.dtype == jnp.float32
    eager = policy_loss(*bf16, f32(adv), jnp.asarray(mask), variant="frpo", beta=0.1, group_size=4,
                        frpo_jackknife=True)
    np.testing.assert_allclose(float(loss_sum), float(eager[0]), rtol=1e-5)
    assert float(count) == mask.any(axis=1).sum()
