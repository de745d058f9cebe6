"""Proximal Policy Optimization (PPO) for language models, as in RLHF: sample completions, score each
with a reward, turn the score into per-token rewards shaped by a KL penalty to the frozen reference
policy (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
eq. 2; Ziegler et al. 2019), estimate advantages with a learned value head and GAE (Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16), then run
several epochs of the clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", eq. 7) and a clipped value loss on minibatches.

Conventions are those of TRL's PPOTrainer (trl 1.12, trl/experimental/ppo/ppo_trainer.py; PPO left
TRL in 1.13): the score lands on the position after the last completion token (where the value head
sees the finished sequence), whitening uses the unbiased variance, returns come from the unwhitened
advantages, losses are token means, the value loss is 0.5 x the clipped squared error, and the
value-side tensors cover one more position than the completion (TRL's padding_mask_p1). Checked in
tests/test_posttrain_losses.py.
"""

import torch

# -----------------------------------------------------------------------------
# Loss

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the positions where mask is 1."""
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8), mean and unbiased variance over the masked positions.

    shift_mean=False adds the mean back (rescale only). Every position is transformed; callers zero
    the padding themselves.
    """
    count = mask.sum()
    if count < 2:
        raise ValueError(f"masked_whiten: needs at least 2 masked values for an unbiased variance, got {int(count)}")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1)  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each right-padded row's last completion token (-1 for an empty row)."""
    return mask.sum(dim=1).long() - 1


def value_mask(mask: torch.Tensor) -> torch.Tensor:
    """The completion mask extended by one position: the value of the finished sequence, where the
    score is paid, is trained too (TRL's padding_mask_p1)."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (positions <= last_token_index(mask).unsqueeze(1) + 1).to(mask.dtype)


def ppo_token_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """(B, T) rewards: -kl_coef x KL(pi || pi_ref) per completion token (InstructGPT eq. 2's penalty,
    spread over tokens), plus each sequence's score (B,) on the position after its last token, or on
    the last token itself when the completion fills all T positions.

    k1 estimates KL by log pi - log pi_ref; k3 by exp(r) - 1 - r with r = log pi_ref - log pi (unbiased
    and never negative, http://joschu.net/blog/kl-approx.html).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"ppo_token_rewards: kl_estimator {kl_estimator!r} is not one of {KL_ESTIMATORS}")
    log_ratio = ref_logps - logps  # (B, T)
    kl = -log_ratio if kl_estimator == "k1" else torch.expm1(log_ratio) - log_ratio
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    score_position = torch.where(last + 1 < mask.size(1), last + 1, last)
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, score_position] += scores
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (GAE eq. 16) over (B, T) rewards and value predictions.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}, with V = 0 past the value
    mask and past T. Returns (advantages, returns): returns = A + V from the unwhitened A (the value
    head's regression target); the advantages are then whitened over the completion tokens (if whiten)
    and zeroed on padding.
    """
    values = values * value_mask(mask)
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> torch.Tensor:
    """PPO's clipped surrogate (eq. 7), negated for descent, averaged over completion tokens."""
    ratio = torch.exp(logps - old_logps)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> torch.Tensor:
    """0.5 x the larger of the squared errors of the new value and of the new value clipped to within
    cliprange_value of the old one, averaged over the value mask (mask plus one position)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    squared_error = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, value_mask(mask))
