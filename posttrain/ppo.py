"""Proximal Policy Optimization (PPO) for language models, as in RLHF: sample completions, score each
with a reward, turn the score into per-token rewards shaped by a KL penalty to the frozen reference
policy (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
eq. 2; Ziegler et al. 2019), estimate advantages with a learned value head and GAE (Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16), then run
several epochs of the clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", eq. 7) and a clipped value loss on minibatches.

    python posttrain/ppo.py                  # from out/sft (`python posttrain/sft.py` first), CPU, a few minutes
    torchrun --nproc_per_node 2 posttrain/ppo.py --parallel ddp        # or fsdp; gloo on CPU
    python posttrain/ppo.py --model llama31 --init-from path/to/hf_dir --device cuda

Conventions are those of TRL's PPOTrainer (trl 1.12, trl/experimental/ppo/ppo_trainer.py; PPO left
TRL in 1.13): the score lands on the position after the last completion token (where the value head
sees the finished sequence), whitening uses the unbiased variance, returns come from the unwhitened
advantages, losses are token means, the value loss is 0.5 x the clipped squared error, and the
value-side tensors cover one more position than the completion (TRL's padding_mask_p1). Checked in
tests/test_posttrain_losses.py.
"""

from __future__ import annotations  # the losses name torch.Tensor, imported below

import math
from pathlib import Path

from posttrain.cli import check_args, common_parser, run_main

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


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = common_parser(__doc__)
    g = p.add_argument_group("PPO")
    g.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch (TRL's num_ppo_epochs)")
    g.add_argument(
        "--minibatches", type=int, default=4, help="updates per pass: the batch is shuffled and cut into this many"
    )
    g.add_argument("--kl-coef", type=float, default=0.05, help="per-token KL penalty to the frozen initial policy")
    g.add_argument("--kl-estimator", default="k1", choices=("k1", "k3"), help="k1: log-ratio; k3: unbiased, >= 0")
    g.add_argument("--cliprange", type=float, default=0.2, help="epsilon of the clipped policy ratio")
    g.add_argument("--cliprange-value", type=float, default=0.2, help="how far a value may move from its rollout's")
    g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss beside the policy loss")
    g.add_argument("--gamma", type=float, default=1.0, help="discount (1: the score counts wholly at every token)")
    g.add_argument(
        "--lam",
        type=float,
        default=1.0,
        help="GAE's lambda: bias (0) to variance (1); 1, the sampled return less the value: the value head "
        "starts at zero, and a lower lambda would lean on its early guesses (TRL: 0.95)",
    )
    # the SFT run's output: PPO needs a policy whose samples already earn some reward
    p.set_defaults(init_from="out/sft", steps=250, batch_size=128, lr=1e-3, reward="partial", out_dir="out/ppo")
    args = p.parse_args(argv)
    rules = [
        ("ppo_epochs", lambda v: v >= 0, "0 or more"),
        ("minibatches", lambda v: v >= 1, "at least 1"),
        ("kl_coef cliprange cliprange_value vf_coef", lambda v: 0 <= v < math.inf, "0 or more"),
        ("gamma lam", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ]
    check_args(args, p, rules)
    if args.batch_size % args.minibatches:
        p.error(f"--batch-size {args.batch_size} does not split into --minibatches {args.minibatches}")
    # the ratios and the KL use the policy's own log-probs (sequence_logps): the samples must come from it
    if args.temperature != 1.0 or args.top_k is not None:
        p.error("PPO samples from the policy itself: leave --temperature at 1 and --top-k unset")
    return args


if __name__ == "__main__":  # run as a script: the arguments are checked before the imports below
    ARGS = run_main(parse_args)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from posttrain.common import (  # noqa: E402
    Metrics,
    Throughput,
    all_max,
    all_sum,
    clip_gradients,
    completion_part,
    due,
    finish,
    frozen_reference,
    gather_rows,
    load_policy,
    lr_at,
    make_optimizer,
    open_tokenizer,
    report_reward,
    reward_summary,
    rollout,
    save,
    sequence_logps,
    set_lr,
    start,
    wrap_policy,
    write_file,
)
from posttrain.tasks import Examples  # noqa: E402

# -----------------------------------------------------------------------------
# Update loop


def train(args):
    rank, world_size, device, log = start(args)
    if (args.batch_size // args.minibatches) % world_size:
        raise SystemExit(
            f"a minibatch of {args.batch_size // args.minibatches} sequences does not split over {world_size} processes"
        )
    tokenizer = open_tokenizer(args)
    examples = Examples(args)
    model, source = load_policy(args, tokenizer, examples, log)
    reference = frozen_reference(model, args, device) if args.kl_coef > 0 else None
    value_head = ValueHead(model.cfg.n_embd).to(device)
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    value_optimizer = torch.optim.AdamW(value_head.parameters(), lr=args.lr, betas=(0.9, 0.95))
    log(
        f"policy: {source}, {model.num_params():,} parameters + a value head | {world_size} process(es), "
        f"{args.parallel} | {device} | {args.batch_size} completions per step, {args.ppo_epochs} epoch(s) x "
        f"{args.minibatches} minibatch(es)"
    )
    metrics = Metrics(args, rank)
    before = report_reward(model, examples, tokenizer, args, rank, world_size, 0, metrics.record, log)
    after, throughput = before, Throughput()
    for step in range(args.steps):
        ids, mask, scores = rollout_batch(model, examples, tokenizer, step, args, rank, world_size)
        batch = score_rollouts(wrapped, model, value_head, reference, ids, mask, scores, args)
        lr = lr_at(step, args)
        for opt in (optimizer, value_optimizer):
            set_lr(opt, lr)
        stats = []
        for epoch in range(args.ppo_epochs):
            for rows in minibatches(args, step, epoch):
                stats.append(ppo_update(wrapped, model, value_head, batch, rows, rank, world_size, args))
                grad_norm = clip_gradients(model, args)
                for opt in (optimizer, value_optimizer):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        row = dict(step=step + 1, lr=lr, **rollout_stats(batch), **average_update_stats(stats))
        if stats:
            row["grad_norm"] = grad_norm
        if not all(math.isfinite(v) for v in row.values()):
            raise SystemExit(f"a non-finite loss or statistic at step {step + 1}: stopping without saving")
        throughput.add(batch["ids"].numel())  # every process holds the whole batch: this is the global count
        if due(args.log_every, step, args):
            row["tokens_per_s"] = throughput.read()
            log(
                f"step {step + 1:4d} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
                f"policy loss {row.get('policy_loss', 0):.4f} | value loss {row.get('value_loss', 0):.4f} | "
                f"kl {row['kl']:.4f} | clip {row.get('clip_fraction', 0):.3f} | entropy {row['entropy']:.3f} | "
                f"length {row['completion_length']:.2f} | {row['tokens_per_s']:,.0f} tok/s"
            )
        metrics.record(**row)
        if due(args.eval_every, step, args):
            after = report_reward(model, examples, tokenizer, args, rank, world_size, step + 1, metrics.record, log)
    extra = {name: {"before": b, "after": a} for name, b, a in zip(("exact_match", "reward"), before, after)}
    save(model, optimizer, args, rank, args.steps, extra, log, tokenizer, method="ppo")
    save_value_head(value_head, args, rank)
    log(reward_summary(examples, args, before, after))
    finish(metrics)
    return metrics.history


class ValueHead(torch.nn.Module):
    """V(s): a scalar from the policy's final hidden state (after its last norm), one per position. It shares
    the policy's trunk (one model, two heads), as InstructGPT's value function is a copy of the reward model
    and TRL's a separate network initialised from it: sharing halves the memory and the forwards, at the
    cost of the value loss also moving the trunk (--vf-coef weighs it). Zero at first: no reward model to
    start from, and a random head would only add noise to the first advantages."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = torch.nn.Linear(n_embd, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        return self.proj(hidden.float()).squeeze(-1)  # (B, L-1, n_embd) -> (B, L-1)


def logps_and_values(wrapped, model, value_head, ids, mask):
    """One forward of the policy -> the sampled tokens' log-probs (B, L) (0 where mask is 0) and the value
    (B, L) of the state each token was drawn in (the hidden state one position earlier, as the logits).

    The hidden states come from a forward hook on the model's final norm: the models' forward returns
    logits only, and a hook reads what it computes anyway without touching model.py or running the
    blocks a second time. It sees the same tensor under DDP and FSDP (both call the module's forward)."""
    captured = {}
    handle = model.norm.register_forward_hook(lambda module, inputs, output: captured.update(hidden=output))
    try:
        logps = sequence_logps(wrapped, ids, mask)
    finally:
        handle.remove()
    values = F.pad(value_head(captured["hidden"]), (1, 0))  # (B, L): position 0 is never a completion token
    return logps, values


def rollout_batch(model, examples, tokenizer, step, args, rank, world_size):
    """One sampled completion of each of this process's prompts (common.rollout) -> ids (n, L), mask (n, L)
    and the scores (n,). Every process's ids have the same L, with at least one padding column after the
    longest completion: the value of the state after a completion's last token is read there."""
    _, ids, mask, _, scores = rollout(model, examples, tokenizer, step, args, rank, world_size)
    width = all_max(ids.size(1)) + 1
    ids = F.pad(ids, (0, width - ids.size(1)), value=tokenizer.eot_id)
    return ids, F.pad(mask, (0, width - mask.size(1))), scores


@torch.no_grad()
def score_rollouts(wrapped, model, value_head, reference, ids, mask, scores, args):
    """The rollout policy's log-probs and values, the reference's log-probs, the KL-shaped token rewards,
    and GAE's advantages and returns, all fixed through the updates. Each process computes its rows,
    then every process gathers the whole batch (rows in global order): the advantages are whitened over
    all of it, and any minibatch can be cut from it, as in one process.

    Layout (TRL's): (B, T+1), each completion from column 0; cmask marks its tokens. One column more
    than the longest completion, so that every score lands after its completion's last token, where
    the value head has seen the whole sequence (TRL's width, the longest completion, puts the longest
    rows' score on their last token instead)."""
    logps, values = logps_and_values(wrapped, model, value_head, ids, mask)
    ref_logps = sequence_logps(reference, ids, mask) if reference is not None else logps
    ids, mask, logps, values, ref_logps, scores = map(gather_rows, (ids, mask, logps, values, ref_logps, scores))
    mask_p1 = (mask + F.pad(mask[:, :-1], (1, 0))).clamp(max=1.0)  # (B, L): one more position per row
    cmask = completion_part(mask, mask_p1)  # (B, T+1)
    old_logps, ref = completion_part(logps, mask_p1), completion_part(ref_logps, mask_p1)
    old_values = completion_part(values, mask_p1)
    rewards = ppo_token_rewards(old_logps, ref, scores, cmask, args.kl_coef, args.kl_estimator)
    advantages, returns = gae(rewards, old_values, cmask, args.gamma, args.lam)
    return dict(
        ids=ids, mask=mask, mask_p1=mask_p1, cmask=cmask, old_logps=old_logps, ref_logps=ref,
        old_values=old_values, scores=scores, rewards=rewards, advantages=advantages, returns=returns,
    )  # fmt: skip


def minibatches(args, step, epoch):
    """The epoch's shuffle of the global batch (the same on every process), cut into --minibatches."""
    order = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(args.seed + 7919 * step + epoch))
    return order.view(args.minibatches, -1)


def ppo_update(wrapped, model, value_head, batch, rows, rank, world_size, args):
    """Backward of the clipped policy loss + vf_coef x the clipped value loss on this process's share of
    the minibatch `rows`, each loss weighted by the share's part of the minibatch's tokens, so that the
    processes' gradients average to the minibatch's token means in one process. Returns the minibatch's
    statistics (policy loss, value loss, clipped tokens, tokens), summed over processes."""
    mine = rows[rank::world_size]
    logps, values = logps_and_values(wrapped, model, value_head, batch["ids"][mine], batch["mask"][mine])
    mask_p1 = batch["mask_p1"][mine]
    logps, values = completion_part(logps, mask_p1), completion_part(values, mask_p1)  # (b, t+1)
    # the batch's (B, T+1) tensors, cut to these rows and to the t+1 columns they fill
    cmask, old_logps, old_values, advantages, returns = (
        batch[k][mine, : logps.size(1)] for k in ("cmask", "old_logps", "old_values", "advantages", "returns")
    )
    policy_loss = ppo_policy_loss(logps, old_logps, advantages, cmask, args.cliprange)
    value_loss = ppo_value_loss(values, old_values, returns, cmask, args.cliprange_value)
    policy_loss = policy_loss * cmask.sum() / batch["cmask"][rows].sum()
    value_loss = value_loss * value_mask(cmask).sum() / value_mask(batch["cmask"][rows]).sum()
    loss = policy_loss + args.vf_coef * value_loss
    (loss * world_size).backward()  # DDP and FSDP average gradients over processes; the loss is a global sum
    for p in value_head.parameters():  # the value head is not wrapped: average its gradients here
        p.grad = all_sum(p.grad) / world_size
    with torch.no_grad():  # TRL's clip fraction: tokens whose clipped term is the larger loss
        ratio = torch.exp(logps - old_logps)
        clipped = advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange) < advantages * ratio
        stats = torch.stack([policy_loss, value_loss, (clipped * cmask).sum(), cmask.sum()]).detach()
    return all_sum(stats)


@torch.no_grad()
def rollout_stats(batch):
    """The rollout batch's score mean/std, KL to the reference (k1, summed over each completion), entropy
    (estimated by the sampled tokens' -log p, per token) and completion length."""
    cmask, scores = batch["cmask"], batch["scores"]
    kl = ((batch["old_logps"] - batch["ref_logps"]) * cmask).sum(1).mean()
    return dict(
        reward=scores.mean().item(),
        reward_std=scores.std().item() if scores.numel() > 1 else 0.0,
        kl=kl.item(),
        entropy=(-(batch["old_logps"] * cmask).sum() / cmask.sum()).item(),
        completion_length=cmask.sum(1).mean().item(),
    )


def average_update_stats(stats):
    """Per-minibatch sums over processes -> means over the step's updates (nothing when there were none)."""
    if not stats:
        return {}
    policy_loss, value_loss, clipped, n_tokens = torch.stack(stats).sum(0).tolist()
    return dict(
        policy_loss=policy_loss / len(stats), value_loss=value_loss / len(stats), clip_fraction=clipped / n_tokens
    )


def save_value_head(value_head, args, rank):
    """value_head.pt beside ckpt.pt: the policy's checkpoint stays the plain model train.py reads."""
    if rank == 0:
        write_file(Path(args.out_dir) / "value_head.pt", value_head.state_dict())


# -----------------------------------------------------------------------------
# Main


def main(argv=None, args=None):
    """Train, from argv or from arguments parsed already; a user's mistake ends it in one line (SystemExit)."""
    return train(args or parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(args=ARGS))
