"""Each preference loss equals TRL's own implementation on the same log-probabilities: TRL's
code is called, not re-typed (DPOTrainer._compute_loss with a stand-in model that returns the
given per-token log-probabilities, ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss for SimPO,
RewardTrainer's loss lines). KTO's loss is inline in TRL's trainer with its KL pass; it is
checked against its formula in test_losses.py."""

from __future__ import annotations

import collections
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from tunesmith.objectives import find_objective
from tunesmith.objectives.rows import Rows


def trl_module(name: str):
    """TRL's module, or a skip naming why (TRL is a test-only dependency: `.[dev]`)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # an ImportError, or a TRL that does not import with this stack
        pytest.skip(f"TRL cannot be imported here ({type(err).__name__}: {err})")


def logps_of(pairs: int, seed: int):
    """Summed answer log-probabilities and per-token ones that add up to them: chosen rows
    first then rejected (TRL's order), with answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    width = 9
    lengths = torch.randint(2, width, (2 * pairs,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    per_token = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 3 * mask
    return per_token, mask, per_token.sum(-1), lengths


def trl_dpo(loss_type: str, beta: float, policy, ref, mask):
    dpo = trl_module("trl.trainer.dpo_trainer")
    n, width = policy.shape
    per_token = torch.cat([torch.zeros(n, 1, dtype=policy.dtype), policy], 1)[:, 1:]
    completion = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], 1)
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, width),
        mean_logits=torch.zeros(n, width),
        is_top1=torch.zeros(n, width, dtype=torch.bool),
    )
    ident = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=ident, gather=ident),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_sums = ref.sum(-1)
    inputs = {
        "input_ids": torch.zeros(n, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, width + 1, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_sums[: n // 2],
        "ref_rejected_logps": ref_sums[n // 2 :],
    }
    loss = dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    metrics = trainer._metrics["train"]
    return float(loss), metrics["rewards/accuracies"][0], metrics["rewards/chosen"][0]


def ours(name: str, policy_sums, lengths, ref_sums=None, **settings):
    """tunesmith's loss through the objective registry, rows interleaved (chosen, rejected)."""
    objective = find_objective(name)
    config = objective.config(**settings)
    n = len(policy_sums) // 2

    def rows(values):
        out = torch.empty_like(values)
        out[0::2], out[1::2] = values[:n], values[n:]
        counts = torch.empty_like(lengths)
        counts[0::2], counts[1::2] = lengths[:n], lengths[n:]
        return Rows(out, counts)

    reference = rows(ref_sums) if ref_sums is not None else None
    per_pair, metrics = objective.impl.loss(config, rows(policy_sums), reference)
    return float(per_pair.mean()), {k: float(s) / c for k, (s, c) in metrics.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_equals_trls_dpo_trainer(loss_type):
    policy, mask, sums, lengths = logps_of(6, seed=1)
    ref, _, ref_sums, _ = logps_of(6, seed=2)
    ref = ref * mask  # the reference scores the same tokens
    ref_sums = ref.sum(-1)
    expected, accuracy, chosen_reward = trl_dpo(loss_type, 0.3, policy, ref, mask)
    got, metrics = ours("dpo", sums, lengths, ref_sums, beta=0.3, loss_type=loss_type)
    assert math.isclose(got, expected, rel_tol=1e-6)
    assert math.isclose(metrics["reward_accuracy"], accuracy, rel_tol=1e-6)
    assert 0 < accuracy < 1  # the fixture has pairs won and lost
    n = len(sums) // 2
    assert math.isclose(0.3 * float((sums[:n] - ref_sums[:n]).mean()), chosen_reward, rel_tol=1e-6)


def test_orpo_equals_trls_odds_ratio_loss():
    orpo = trl_module("trl.experimental.orpo.orpo_trainer")
    _, _, sums, _ = logps_of(5, seed=3)
    lengths = torch.full((10,), 4)  # equal lengths: TRL's SFT term averages the batch's tokens
    mean = sums / lengths
    trainer = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, chosen_rewards, _, _, _ = orpo.ORPOTrainer.odds_ratio_loss(
        trainer, mean[:5], mean[5:]
    )
    nll = -float(mean[:5].mean())  # the chosen tokens' mean NLL (equal lengths)
    expected = nll - float(ratio_losses.mean())
    got, metrics = ours("orpo", sums, lengths, beta=0.2)
    assert math.isclose(got, expected, rel_tol=1e-6)
    assert math.isclose(metrics["nll"], nll, rel_tol=1e-6)
    wins = float((chosen_rewards > 0.2 * mean[5:]).float().mean())
    assert math.isclose(metrics["reward_accuracy"], wins, rel_tol=1e-6)


def test_simpo_equals_trls_cpo_loss():
    cpo = trl_module("trl.experimental.cpo.cpo_trainer")
    _, _, sums, lengths = logps_of(5, seed=4)
    mean = sums / lengths
    trainer = SimpleNamespace(
        beta=2.0,
        simpo_gamma=0.5,
        alpha=0.0,  # AlphaPO's reward shaping off: SimPO
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    losses, _, _ = cpo.CPOTrainer.cpo_loss(trainer, mean[:5], mean[5:])
    got, _ = ours("simpo", sums, lengths, beta=2.0, gamma=0.5)
    assert math.isclose(got, float(losses.mean()), rel_tol=1e-6)


def test_reward_loss_equals_trls_reward_trainer():
    import inspect

    reward = trl_module("trl.trainer.reward_trainer")
    source = inspect.getsource(reward.RewardTrainer)
    # the two lines of TRL's loss, as it writes them (checked here, so a change in TRL shows)
    assert "-nn.functional.logsigmoid(rewards_chosen - rewards_rejected).mean()" in source
    assert "torch.mean((rewards_chosen + rewards_rejected) ** 2)" in source
    scores = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    chosen, rejected = scores[:6], scores[6:]
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    expected = expected + 0.01 * torch.mean((chosen + rejected) ** 2)
    got, metrics = ours("reward", scores, torch.ones(12, dtype=torch.long), center_rewards=0.01)
    assert math.isclose(got, float(expected), rel_tol=1e-9)
    assert math.isclose(metrics["reward_accuracy"], 5 / 6)  # one pair of six is lost
