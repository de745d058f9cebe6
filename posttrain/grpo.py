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

    python posttrain/sft.py && python posttrain/grpo.py      # SFT, then GRPO from out/sft: CPU, minutes
    python posttrain/grpo.py --importance-sampling-level sequence --epsilon 3e-4 --epsilon-high 4e-4 --beta 0  # GSPO
    torchrun --nproc_per_node 2 posttrain/grpo.py --parallel fsdp          # whole groups per process

The trainer is sft.py's skeleton on posttrain/common.py's plumbing: each step samples --group-size
completions of --batch-size prompts with the KV cache, scores them, and makes --num-iterations clipped
updates on that batch, the rollout policy's log-probs as old_logps. Reward on held-out prompts
(greedy) is measured before and after.
"""

from __future__ import annotations  # the losses name torch.Tensor, imported below

import math

from posttrain.cli import check_args, common_parser, run_main

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
    max_completion_length: dr_grpo's constant (default T). num_items_in_batch: dapo's denominator,
    the loss being this batch's masked sum / num_items_in_batch (default: this batch's mask.sum()).
    For the token mean over a generation batch split across P ranks whose gradients DDP averages,
    pass its token count / P, as TRL 1.16 divides num_items_in_batch by num_processes.
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


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = common_parser(__doc__)
    g = p.add_argument_group("GRPO / GSPO")
    g.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    g.add_argument(
        "--num-iterations",
        type=int,
        default=2,
        help="mu: clipped updates per rollout batch (GRPO's mu, TRL's num_iterations; 1: on-policy, no clipping)",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=0.04,
        help="KL coefficient to the frozen initial policy (the GRPO paper's 0.04; 0: no reference model, as TRL's default)",
    )
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range below 1 (and above, unless --epsilon-high)")
    g.add_argument("--epsilon-high", type=float, help="clip range above 1 (DAPO's clip-higher: 0.28)")
    g.add_argument(
        "--importance-sampling-level",
        default="token",
        choices=("token", "sequence"),
        help="sequence: GSPO (Zheng et al. 2025; their settings: --epsilon 3e-4 --epsilon-high 4e-4 --beta 0)",
    )
    g.add_argument("--loss-type", default="dapo", choices=("grpo", "bnpo", "dr_grpo", "dapo"), help="as TRL's")
    g.add_argument("--scale-rewards", default="group", choices=("group", "batch", "none"), help="advantage std")
    g.add_argument("--log-completions", action="store_true", help="write every rollout to completions.jsonl")
    # the SFT run's output: GRPO needs a policy whose samples already earn some reward. The dense reward
    # ('partial') tells a near miss from a far one, where exact match gives a group of misses no advantage
    p.set_defaults(init_from="out/sft", steps=300, batch_size=32, lr=1e-3, reward="partial", out_dir="out/grpo")
    args = p.parse_args(argv)
    rules = [
        ("group_size", lambda v: v >= 2, "at least 2 (advantages compare a group's completions)"),
        ("num_iterations", lambda v: v >= 1, "at least 1"),
        ("beta epsilon", lambda v: 0 <= v < math.inf, "0 or more"),
        ("epsilon_high", lambda v: v is None or 0 <= v < math.inf, "0 or more"),
    ]
    check_args(args, p, rules)
    if args.temperature == 0:
        p.error("--temperature 0: greedy completions of a prompt are all the same, and their advantages 0")
    return args


if __name__ == "__main__":  # run as a script: the arguments are checked before the imports below
    ARGS = run_main(parse_args)

import torch  # noqa: E402

from posttrain.common import (  # noqa: E402
    Metrics,
    Throughput,
    all_gather,
    all_sum,
    completion_logps,
    completion_part,
    due,
    finish,
    frozen_reference,
    load_policy,
    local_part,
    make_optimizer,
    open_tokenizer,
    optimizer_step,
    report_reward,
    reward_summary,
    rollout,
    save,
    start,
    wrap_policy,
)
from posttrain.tasks import Examples  # noqa: E402

# -----------------------------------------------------------------------------
# Update loop


def train(args):
    rank, world_size, device, log = start(args)
    G = args.group_size  # completions per prompt
    tokenizer = open_tokenizer(args)
    examples = Examples(args)
    model, source = load_policy(args, tokenizer, examples, log)
    reference = frozen_reference(model, args, device) if args.beta > 0 else None
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    log(
        f"policy: {source}, {model.num_params():,} parameters | {world_size} process(es), {args.parallel} | {device} | "
        f"{args.batch_size} prompts x {G} completions per step, {args.num_iterations} update(s) each"
    )
    metrics = Metrics(args, rank)
    before = report_reward(model, examples, tokenizer, args, rank, world_size, 0, metrics.record, log)
    after, throughput = before, Throughput()
    for step in range(args.steps):
        prompts, ids, mask, texts, rewards = rollout(model, examples, tokenizer, step, args, rank, world_size, G)
        advantages = local_part(group_advantages(all_gather(rewards), G, args.scale_rewards), rank)
        cmask = completion_part(mask, mask)  # (N, T): TRL's layout, completions from column 0
        num_items = all_sum(cmask.sum()) / world_size  # TRL's dapo normaliser: global tokens / processes
        with torch.no_grad():  # the rollout policy's and the reference's logprobs, fixed through the updates
            old = completion_logps(model, ids, mask, args.temperature) if args.num_iterations > 1 else None
            ref = completion_logps(reference, ids, mask, args.temperature) if reference is not None else None
        stats = []
        for _ in range(args.num_iterations):
            logps = completion_logps(wrapped, ids, mask, args.temperature)
            loss = grpo_loss(
                logps,
                old,
                ref,
                advantages,
                cmask,
                beta=args.beta,
                epsilon_low=args.epsilon,
                epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                importance_sampling_level=args.importance_sampling_level,
                loss_type=args.loss_type,
                max_completion_length=args.max_new_tokens,
                num_items_in_batch=num_items,
            )
            loss.backward()  # DDP and FSDP average the processes' gradients: each loss is a process's share
            grad_norm, lr = optimizer_step(model, optimizer, step, args)
            stats.append(update_stats(loss.detach(), logps.detach(), old, ref, advantages, cmask, args))
        row = dict(step=step + 1, lr=lr, grad_norm=grad_norm) | average_stats(stats, world_size) | reward_stats(rewards)
        if not math.isfinite(row["loss"]):
            raise SystemExit(f"loss is {row['loss']} at step {step + 1}: stopping without saving")
        metrics.record_completions(step + 1, prompts, ids, mask, texts, rewards, advantages, G)
        throughput.add(all_sum(torch.tensor(ids.numel())).item())
        if due(args.log_every, step, args):
            row["tokens_per_s"] = throughput.read()
            log(
                f"step {step + 1:4d} | loss {row['loss']:.4f} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
                f"kl {row['kl']:.4f} | clip {row['clip_fraction']:.3f} | entropy {row['entropy']:.3f} | "
                f"length {row['completion_length']:.2f} | {row['tokens_per_s']:,.0f} tok/s"
            )
        metrics.record(**row)
        if due(args.eval_every, step, args):
            after = report_reward(model, examples, tokenizer, args, rank, world_size, step + 1, metrics.record, log)
    extra = {name: {"before": b, "after": a} for name, b, a in zip(("exact_match", "reward"), before, after)}
    save(model, optimizer, args, rank, args.steps, extra, log, tokenizer, method="grpo")
    log(reward_summary(examples, args, before, after))
    sampled = [row["reward"] for row in metrics.history if "reward" in row]
    k = max(1, len(sampled) // 5)  # the first and last fifths of the run: one step's reward is noisy
    log(
        f"rollout reward (sampled), first {k} -> last {k} steps: {sum(sampled[:k]) / k:.3f} -> {sum(sampled[-k:]) / k:.3f}"
    )
    finish(metrics)
    return metrics.history


@torch.no_grad()
def update_stats(loss, logps, old, ref, advantages, cmask, args):
    """Sums over this process's completion tokens (or sequences): KL to the reference (k3, Schulman 2020),
    the clipped share of importance ratios (clipped where the clip binds: ratio below 1 - eps with a
    negative advantage, above 1 + eps_high with a positive one, as TRL counts), and the entropy estimated
    by the sampled tokens' -log p (its Monte-Carlo estimate at temperature 1)."""
    n_tokens = cmask.sum()
    kl = ((ref - logps).exp() - (ref - logps) - 1) * cmask if ref is not None else torch.zeros_like(logps)
    log_ratio = (logps - old) * cmask if old is not None else torch.zeros_like(logps)
    if args.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, from the mean token log-ratio
        log_ratio = (log_ratio.sum(-1) / cmask.sum(-1).clamp(min=1))[:, None].expand_as(logps) * cmask
    ratio, high = log_ratio.exp(), args.epsilon if args.epsilon_high is None else args.epsilon_high
    adv = advantages[:, None]
    clipped = ((ratio < 1 - args.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return torch.stack(
        [loss, kl.sum(), (clipped * cmask).sum(), -(logps * cmask).sum(), n_tokens, cmask.sum(-1).mean()]
    )


def average_stats(stats, world_size):
    """Per-update sums -> the step's means over all processes and updates."""
    loss, kl, clipped, neg_logp, n_tokens, length = all_sum(torch.stack(stats).sum(0)).tolist()
    n_updates = len(stats) * world_size
    return dict(
        loss=loss / n_updates,
        kl=kl / n_tokens,
        clip_fraction=clipped / n_tokens,
        entropy=neg_logp / n_tokens,
        completion_length=length / n_updates,
    )


def reward_stats(rewards):
    everyone = all_gather(rewards)
    return dict(reward=everyone.mean().item(), reward_std=everyone.std().item() if everyone.numel() > 1 else 0.0)


# -----------------------------------------------------------------------------
# Main


def main(argv=None, args=None):
    """Train, from argv or from arguments parsed already; a user's mistake ends it in one line (SystemExit)."""
    return train(args or parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(args=ARGS))
