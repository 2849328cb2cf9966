"""Preference losses (`objectives/losses.py`) against the published formulas, worked by hand
on scalars with `math`, and where the gradient goes."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.objectives.losses import (
    answer_logps,
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_metrics,
    reward_loss,
    simpo_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:  # −log σ(−x)
    return math.log1p(math.exp(x))


def test_answer_logps_sums_the_trained_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    total, count = answer_logps(logits, labels)
    logp = torch.log_softmax(logits, -1)
    first = logp[0, 1, 3] + logp[0, 2, 4]
    second = logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]
    want = [first, second]
    assert torch.allclose(total, torch.stack(want))
    assert count.tolist() == [2, 4]


# chosen −10 and rejected −12 under the policy, −11 and −11 under the reference: Δ = 1 − (−1) = 2
PAIR = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))


def test_dpo_sigmoid_hinge_and_ipo():
    beta = 0.1
    assert float(dpo_loss(*PAIR, beta=beta)) == pytest.approx(softplus(-0.2))
    smoothed = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)  # conservative DPO, ε = 0.1
    assert float(dpo_loss(*PAIR, beta=beta, label_smoothing=0.1)) == pytest.approx(smoothed)
    assert float(dpo_loss(*PAIR, beta=beta, loss_type="hinge")) == pytest.approx(0.8)
    # IPO per answer token: chosen ratio 1 over 4 tokens, rejected −1 over 2: (0.25 + 0.5 − 5)²
    ipo = dpo_loss(*PAIR, beta=beta, loss_type="ipo", chosen_tokens=t(4), rejected_tokens=t(2))
    assert float(ipo) == pytest.approx((0.75 - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="loss_type 'kto' is not one of sigmoid, ipo, hinge"):
        dpo_loss(*PAIR, loss_type="kto")


def test_simpo_and_orpo_are_length_normalised_and_need_no_reference():
    chosen, rejected, nc, nr = t(-4.0), t(-6.0), t(4), t(2)  # means −1 and −3
    assert float(simpo_loss(chosen, rejected, nc, nr, beta=2.0, gamma=0.5)) == pytest.approx(
        softplus(-(2.0 * 2 - 0.5))
    )
    log_odds = (-1 - -3) - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-3)))
    want = 1.0 + 0.1 * softplus(-log_odds)  # mean NLL of chosen − β·log σ(log odds ratio)
    assert float(orpo_loss(chosen, rejected, nc, nr, beta=0.1)) == pytest.approx(want)
    # the odds stay finite for near-certain answers (log-probability close to 0)
    assert torch.isfinite(orpo_loss(t(-1e-7), t(-5.0), t(1), t(1))).all()


def test_kto_weights_desirable_and_undesirable_around_the_kl_estimate():
    logps, ref = t(-5.0, -6.0), t(-6.0, -5.0)  # ratios +1 (desirable) and −1 (undesirable)
    desirable = torch.tensor([True, False])
    kl_logps, ref_kl = t(-7.0, -8.0), t(-7.5, -8.1)  # mean log-ratio 0.3
    loss, kl = kto_loss(logps, ref, desirable, kl_logps, ref_kl, beta=0.5, undesirable_weight=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(kl) == pytest.approx(0.3)
    assert loss.tolist() == pytest.approx(
        [1 - sigmoid(0.5 * (1 - 0.3)), 2.0 * (1 - sigmoid(0.5 * (0.3 + 1)))]
    )
    _, clamped = kto_loss(logps, ref, desirable, ref_kl, kl_logps)  # a negative estimate is 0
    assert float(clamped) == 0.0


def test_reward_loss_and_metrics():
    chosen, rejected = t(1.5, -0.5, 0.2), t(0.5, 0.5, 0.2)
    assert reward_loss(chosen, rejected).tolist() == pytest.approx(
        [softplus(-1.0), softplus(1.0), softplus(0.0)]
    )
    assert float(reward_loss(t(1.0), t(0.0), margin=1.0)) == pytest.approx(math.log(2))
    metrics = preference_metrics(chosen, rejected)
    assert metrics["reward_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["reward_margin"] == pytest.approx(0.0)


def test_the_gradient_reaches_the_policy_only():
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    ref_chosen, ref_rejected = t(-11.0), t(-11.0)
    dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).sum().backward()
    s = 1 / (1 + math.exp(0.2))  # d/dΔ of −log σ(βΔ) is −β·σ(−βΔ)
    assert float(chosen.grad) == pytest.approx(-0.1 * s)
    assert float(rejected.grad) == pytest.approx(0.1 * s)
    kl_logps = t(-7.0).requires_grad_()
    logps = t(-5.0).requires_grad_()
    loss, _ = kto_loss(logps, t(-6.0), torch.tensor([True]), kl_logps, t(-7.5))
    loss.sum().backward()
    assert kl_logps.grad is None and float(logps.grad) < 0  # the KL estimate carries no gradient
