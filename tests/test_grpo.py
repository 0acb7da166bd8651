"""GRPO's pure functions against hand-computed numbers and closed forms.

Every expected value below is worked out in the comments (small arithmetic on chosen inputs),
not copied from a run of the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.train import grpo
from nanoseek.train.grpo import AggregationNorm

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-4  # group_advantages' default epsilon in the denominator
F64 = torch.float64


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_group_scale_hand_computed():
    # G = 4. Group 1: rewards [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
    # sample variance (0.5625 + 3 * 0.0625) / (4 - 1) = 0.25, std 0.5.
    # Group 2: rewards [2, 2, 2, 2]: deviations 0, std 0 -> 0 / (0 + eps) = 0 (no signal, no NaN).
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    s = 0.5 + EPS
    expected = torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "group"), expected, rtol=0, atol=1e-12)

    # G = 2: rewards (a, b) give +-|a - b| / 2 over the sample std |a - b| / sqrt(2).
    rewards = torch.tensor([3.0, 1.0, 0.5, 0.5], dtype=F64)
    s = 2 / math.sqrt(2) + EPS
    expected = torch.tensor([1.0 / s, -1.0 / s, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, "group"), expected, rtol=0, atol=1e-12)


def test_group_advantages_batch_and_none_hand_computed():
    # Two groups of 4: [1, 0, 0, 0] (mean 0.25) and [1, 1, 1, 0] (mean 0.75).
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75], dtype=F64)
    # 'none' (Dr. GRPO): only the group mean is subtracted.
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "none"), centred, rtol=0, atol=1e-12)
    # 'batch': divided by the std of all 8 rewards: mean 0.5, every deviation +-0.5,
    # sample variance 8 * 0.25 / 7 = 2/7.
    s = math.sqrt(2 / 7) + EPS
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "batch"), centred / s, rtol=0, atol=1e-12)


def test_group_advantages_bad_inputs_raise():
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(torch.zeros(4), 3, "group")


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert grpo.zero_variance_groups(rewards, 2).tolist() == [True, False, True, True]
    assert grpo.zero_variance_groups(rewards, 4).tolist() == [False, False]


# ----------------------------------------------------------------------------- small estimators
def test_soft_overlong_penalty_closed_form():
    # DAPO: 0 while length <= L - B; (L - B - length) / B on (L - B, L]; -1 beyond. L = 16, B = 4.
    lengths = torch.tensor([0, 12, 13, 14, 15, 16, 20])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(grpo.soft_overlong_penalty(lengths, 16, 4), expected, rtol=0, atol=1e-7)
    assert grpo.soft_overlong_penalty(lengths, 16, 0).tolist() == [0.0] * 7


def test_kl_k3_nonnegative_zero_at_equality_and_unbiased():
    torch.manual_seed(0)
    logp, ref = torch.randn(1000, dtype=F64) - 2, torch.randn(1000, dtype=F64) - 2
    assert (grpo.kl_k3(logp, ref) >= 0).all()
    assert grpo.kl_k3(logp, logp).abs().max() == 0
    # One token: policy 0.5, reference 0.25: r = log(0.25 / 0.5), k3 = 0.5 - log(0.5) - 1.
    k3 = grpo.kl_k3(torch.tensor(math.log(0.5), dtype=F64), torch.tensor(math.log(0.25), dtype=F64))
    assert float(k3) == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-15)
    # k3 is an unbiased estimator: E_{x~p}[k3(x)] = sum_x q(x) - sum_x p log(q/p) - 1 = KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    kl = float((p * (p / q).log()).sum())
    assert float((p * grpo.kl_k3(p.log(), q.log())).sum()) == pytest.approx(kl, abs=1e-12)


def test_truncated_is_weights_capped():
    # trainer / engine probabilities: 0.5 / 0.25 = 2, 0.2 / 0.4 = 0.5, 0.9 / 0.1 = 9 -> capped at 3.
    trainer = torch.tensor([0.5, 0.2, 0.9], dtype=F64).log()
    engine = torch.tensor([0.25, 0.4, 0.1], dtype=F64).log()
    torch.testing.assert_close(
        grpo.truncated_is_weights(trainer, engine, 3.0), torch.tensor([2.0, 0.5, 3.0], dtype=F64), rtol=0, atol=1e-12
    )


def test_token_logprobs_closed_form():
    # logits [0, ln 3] -> probabilities [1/4, 3/4]; at temperature 2 -> [1, sqrt 3] / (1 + sqrt 3).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    targets = torch.tensor([[1, 0]])
    torch.testing.assert_close(
        grpo.token_logprobs(logits, targets), torch.tensor([[math.log(0.75), math.log(0.25)]]), rtol=0, atol=1e-6
    )
    r3 = math.sqrt(3.0)
    torch.testing.assert_close(
        grpo.token_logprobs(logits, targets, temperature=2.0),
        torch.tensor([[math.log(r3 / (1 + r3)), math.log(1 / (1 + r3))]]),
        rtol=0,
        atol=1e-6,
    )
    # Entropy of [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4).
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(grpo.token_entropy(logits)[0, 0], torch.tensor(h), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the clipped loss
# A two-group toy batch: P = 2 prompts, G = 2 samples, T = 4 positions, clip range [0.8, 1.28].
#
#   seq  A     mask        ratios (masked ones in brackets)   -min(r A, clip(r) A) per token        sum    mean
#   s0   +1    1 1 1 0     1.0  1.1  0.9  [5.0]              -1.0  -1.1  -0.9                      -3.0   -1.0
#   s1   -1    1 0 0 0     1.2  [7]  [7]  [7]                 1.2                                   1.2    1.2
#   s2   +0.5  1 1 1 1     1.0  1.5  0.5  1.0                -0.5  -0.64 -0.25 -0.5                 -1.89  -0.4725
#   s3   -0.5  1 1 0 0     0.7  1.0  [x]  [x]                 0.4   0.5                             0.9    0.45
#
# s2 at 1.5 is clipped high: min(0.75, 1.28 * 0.5 = 0.64) = 0.64. s2 at 0.5 is below the range but
# with A > 0 the unclipped term is the smaller one: min(0.25, 0.4) = 0.25 (not counted as clipped).
# s3 at 0.7 is clipped low: min(-0.35, 0.8 * -0.5 = -0.4) = -0.4. The masked 5.0 (A > 0) would count
# as clipped high if the mask were ignored. 10 tokens in all; max_new_tokens = 5.
#
#   token-mean = (-3.0 + 1.2 - 1.89 + 0.9) / 10        = -0.279
#   seq-mean   = (-1.0 + 1.2 - 0.4725 + 0.45) / 4      =  0.044375
#   dr-grpo    = (-3.0 + 1.2 - 1.89 + 0.9) / (4 * 5)   = -0.1395
TOY_RATIOS = [[1.0, 1.1, 0.9, 5.0], [1.2, 7.0, 7.0, 7.0], [1.0, 1.5, 0.5, 1.0], [0.7, 1.0, 3.0, 3.0]]
TOY_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
TOY_ADV = [1.0, -1.0, 0.5, -0.5]
TOY_EXPECTED = {"token-mean": -0.279, "seq-mean": 0.044375, "dr-grpo": -0.1395}
TOY_NORM = AggregationNorm(total_tokens=10.0, n_sequences=4, max_new_tokens=5)


def toy_batch():
    torch.manual_seed(0)
    old = -torch.rand(4, 4, dtype=F64) - 0.5  # any old log-probs; the ratios are what matter
    logp = old + torch.tensor(TOY_RATIOS, dtype=F64).log()
    return logp, old, torch.tensor(TOY_ADV, dtype=F64), torch.tensor(TOY_MASK, dtype=F64)


@pytest.mark.parametrize("mode", grpo.LOSS_AGGREGATIONS)
def test_policy_loss_aggregations_hand_computed(mode):
    logp, old, adv, mask = toy_batch()
    parts = grpo.policy_loss(logp, old, adv, mask, TOY_NORM, epsilon_low=0.2, epsilon_high=0.28, loss_agg=mode)
    assert float(parts.loss) == pytest.approx(TOY_EXPECTED[mode], abs=1e-12)
    assert float(parts.clipped_low) == 1 and float(parts.clipped_high) == 1
    assert float(parts.kl) == 0


@pytest.mark.parametrize("mode", grpo.LOSS_AGGREGATIONS)
def test_micro_batches_sum_to_the_whole_batch_loss(mode):
    logp, old, adv, mask = toy_batch()
    pieces = [
        grpo.policy_loss(logp[rows], old[rows], adv[rows], mask[rows], TOY_NORM, loss_agg=mode)
        for rows in (slice(0, 1), slice(1, 3), slice(3, 4))  # uneven splits, uneven token counts
    ]
    assert float(sum(p.loss for p in pieces)) == pytest.approx(TOY_EXPECTED[mode], abs=1e-12)
    assert sum(float(p.clipped_low) for p in pieces) == 1 and sum(float(p.clipped_high) for p in pieces) == 1


def test_aggregation_bad_mode_raises():
    logp, old, adv, mask = toy_batch()
    with pytest.raises(ValueError, match="loss_agg"):
        grpo.policy_loss(logp, old, adv, mask, TOY_NORM, loss_agg="sum")


def test_importance_weights_and_kl_terms_hand_computed():
    logp, old, adv, mask = toy_batch()
    # Weights of 2 on every token double the token-mean loss: 2 * -0.279.
    parts = grpo.policy_loss(logp, old, adv, mask, TOY_NORM, is_weights=torch.full_like(logp, 2.0))
    assert float(parts.loss) == pytest.approx(-0.558, abs=1e-12)
    # A reference equal to the policy adds nothing; one that puts every token at half the policy's
    # probability adds beta * k3 = beta * (0.5 - ln 0.5 - 1) per token (before the mean over tokens).
    same = grpo.policy_loss(logp, old, adv, mask, TOY_NORM, ref_logp=logp.clone(), beta=0.1)
    assert float(same.loss) == pytest.approx(-0.279, abs=1e-12) and float(same.kl) == 0
    k3 = 0.5 - math.log(0.5) - 1
    half = grpo.policy_loss(logp, old, adv, mask, TOY_NORM, ref_logp=logp + math.log(0.5), beta=0.1)
    assert float(half.loss) == pytest.approx(-0.279 + 0.1 * k3, abs=1e-12)
    assert float(half.kl) == pytest.approx(10 * k3, abs=1e-12)  # summed over the 10 unmasked tokens


def test_clipped_tokens_have_zero_gradient_inside_the_range_a_times_ratio():
    # One token per case, token-mean over the 6 tokens (so d loss / d logp = -A * ratio / 6 where the
    # gradient flows); range [0.8, 1.28]. d ratio / d logp = ratio, since ratio = exp(logp - old).
    cases = [  # (advantage, ratio, gradient flows?)
        (2.0, 1.5, False),  # above 1 + eps_high with A > 0: the clipped (constant) term is the minimum
        (-2.0, 0.5, False),  # below 1 - eps_low with A < 0: likewise
        (2.0, 1.1, True),  # inside the range
        (-1.0, 0.9, True),  # inside the range
        (2.0, 0.5, True),  # below the range but A > 0: the unclipped term is the minimum
        (-2.0, 1.5, True),  # above the range but A < 0: likewise
    ]
    adv = torch.tensor([[a] for a, _, _ in cases], dtype=F64)[:, 0]
    ratio = torch.tensor([[r] for _, r, _ in cases], dtype=F64)
    old = torch.full_like(ratio, -1.3)
    logp = (old + ratio.log()).requires_grad_(True)
    mask = torch.ones_like(ratio)
    parts = grpo.policy_loss(logp, old, adv, mask, AggregationNorm(6.0, 6, 1), epsilon_low=0.2, epsilon_high=0.28)
    parts.loss.backward()
    expected = [-a * r / 6 if flows else 0.0 for a, r, flows in cases]
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    assert float(parts.clipped_high) == 1 and float(parts.clipped_low) == 1
