"""Preference losses from log-probabilities, one value per pair (or per example for KTO).

The inputs are what a forward pass gives: `answer_logps` sums each sequence's log-probabilities
over its trained (answer) tokens and counts them. Every loss here is the published formula,
written the way TRL computes it, so the same log-probabilities give the same numbers:

- DPO (Rafailov et al. 2023), Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
  `sigmoid`: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) (ε = `label_smoothing`, the conservative DPO);
  `hinge`: max(0, 1 − βΔ);
  `ipo` (Azar et al. 2023): (Δc/|c| − Δr/|r| − 1/(2β))², the log-ratios averaged per answer
  token, as TRL does with the IPO authors' agreement.
- SimPO (Meng et al. 2024), reference-free, length-normalised: −log σ(β(ℓc − ℓr) − γ), with ℓ
  the mean log-probability per answer token.
- ORPO (Hong et al. 2024), reference-free: the chosen answer's mean negative log-likelihood per
  token, minus β·log σ(log odds(c) − log odds(r)), log odds(y) = ℓ − log(1 − exp ℓ).
- KTO (Ethayarajh et al. 2024), unpaired: z = max(0, mean KL estimate) (no gradient);
  desirable examples lose w_d·(1 − σ(β(ρ − z))), undesirable w_u·(1 − σ(β(z − ρ))), with ρ the
  policy/reference log-ratio.
- Bradley–Terry reward model: −log σ(r(c) − r(r) − m), m an optional margin.

The implicit rewards β·(log π − log π_ref) give the validation metrics (`preference_metrics`):
reward accuracy (the share of pairs whose chosen reward is higher) and the mean margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def answer_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's trained tokens, their count): logits (B, T, V)
    predict labels (B, T) shifted by one, as causal language models do; `ignore_index`
    marks tokens that do not count (prompt, padding)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    picked = torch.gather(
        F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)
    ).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per pair DPO loss (see the module) from summed log-probabilities; `ipo` needs the
    answers' token counts."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / (
            rejected_tokens.clamp(min=1)
        )
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")


def simpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """Per pair SimPO loss from summed log-probabilities and token counts."""
    margin = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Per pair ORPO loss: the chosen answer's mean NLL per token minus β·log σ(log odds
    ratio), from summed log-probabilities and token counts."""
    mean_chosen = chosen / chosen_tokens.clamp(min=1)
    mean_rejected = rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
    return -mean_chosen - beta * F.logsigmoid(log_odds)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per example KTO loss, the KL estimate z): `desirable` is a bool per example;
    `kl_logps`/`ref_kl_logps` are log-probabilities of mismatched prompt/answer pairs, whose
    mean log-ratio estimates the KL term (clamped at 0, no gradient)."""
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), kl


def reward_loss(
    chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Per pair Bradley–Terry loss of a reward model's scalar scores."""
    return -F.logsigmoid(chosen_reward - rejected_reward - margin)


def preference_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict:
    """Reward accuracy (ties count as wrong, as TRL counts them), mean margin and the mean
    rewards of a batch of pairs."""
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return {
        "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
        "reward_margin": float((chosen_reward - rejected_reward).mean()),
        "reward_chosen": float(chosen_reward.mean()),
        "reward_rejected": float(rejected_reward.mean()),
    }
