"""Group Relative Policy Optimization (GRPO) and Group Sequence Policy Optimization (GSPO): sample
G completions per prompt, score them, and use each completion's reward relative to its group as
the advantage of every one of its tokens, so no value model is needed (Shao et al. 2024,
"DeepSeekMath", sec. 4.1, eq. 3). The update is PPO's clipped surrogate (Schulman et al. 2017) with
an optional k3 KL penalty to a frozen reference.

- GSPO (Zheng et al. 2025, eq. 7) clips one importance ratio per sequence, the geometric mean of
  its token ratios, instead of one per token: importance_sampling_level="sequence".
- DAPO (Yu et al. 2025) clips asymmetrically (epsilon_high > epsilon_low, "clip-higher", sec. 3.1)
  and averages over all tokens of the batch (sec. 3.3, eq. 12): loss_type="dapo".
- Dr. GRPO (Liu et al. 2025, sec. 3.2) divides by a constant, B x max_completion_length, so neither
  length nor reward spread biases the update, and may skip the std scaling (scale_rewards="none").

Conventions (advantage scaling, clipping, KL, the four aggregations) are TRL's GRPOTrainer (trl 1.16,
trl/trainer/grpo_trainer.py), checked on identical tensors in tests/test_posttrain_losses.py.
"""

import torch

# -----------------------------------------------------------------------------
# Loss

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Advantages (N,) of N = groups x group_size rewards laid out group by group.

    Each reward minus its group's mean (eq. 3's baseline), then divided by the std (unbiased) + 1e-4
    of its group ('group', the paper), of the whole batch ('batch', more robust to groups whose rewards
    barely differ), or not at all ('none', Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"group_advantages: scale_rewards {scale_rewards!r} is not one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)  # (groups, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else 0.0
        return advantages / (std + 1e-4)
    if scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else 0.0
        return advantages / (std + 1e-4)
    return advantages


def masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): mean over each row's completion tokens (an empty row counts one token)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Clipped policy-gradient loss of a batch of B completions, T tokens each (right-padded).

    logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens under the policy being
    trained, the policy that sampled them (None: on-policy, the same values detached) and the
    reference (read only when beta > 0). advantages: (B,) (or (B, T)). mask: (B, T) 0/1.
    max_completion_length: dr_grpo's constant (default T). num_items_in_batch: dapo's token count
    over the whole generation batch, all ranks (default: this batch's mask.sum()).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type {loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"grpo_loss: importance_sampling_level {importance_sampling_level!r} is not one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage for every token of a completion
    if old_logps is None:
        old_logps = logps.detach()  # on-policy: ratio 1 in value, its gradient that of logps
    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "sequence":
        # GSPO eq. 7: s = (pi/pi_old of the whole sequence)^(1/|y|) = exp(mean token log-ratio), (B, 1)
        log_ratio = masked_sequence_mean(log_ratio, mask).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    # PPO's clipped surrogate (GRPO eq. 3), two-sided with DAPO's decoupled bounds (eq. 10)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # (B, T) or (B, 1)
    if beta != 0.0:
        # k3 estimator of KL(pi || pi_ref) (GRPO eq. 4): exp(r) - r - 1 with r = log pi_ref - log pi, >= 0
        ref_log_ratio = ref_logps - logps
        per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1
        if use_bias_correction_kl:
            # the samples come from pi_old, so weigh the estimate by pi/pi_old to make it unbiased
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
    return aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: torch.Tensor | float | None,
) -> torch.Tensor:
    """Reduce (B, T) (or (B, 1), broadcast over the mask) to a scalar as each method prescribes."""
    masked = per_token_loss * mask  # (B, T)
    if loss_type == "grpo":  # eq. 3: mean over each sequence's tokens, then over sequences
        return masked_sequence_mean(per_token_loss, mask).mean()
    if loss_type == "bnpo":  # mean over all tokens of this batch
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":  # a constant denominator: B x the longest completion allowed
        length = mask.size(1) if max_completion_length is None else max_completion_length
        return masked.sum() / (per_token_loss.size(0) * length)
    # dapo, eq. 12: mean over all tokens of the generation batch, however it is split into micro-batches
    items = (
        mask.sum()
        if num_items_in_batch is None
        else torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device)
    )
    return masked.sum() / items.clamp(min=1.0)
