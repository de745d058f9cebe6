"""Direct Preference Optimization (DPO): fit a policy to pairs of completions (chosen preferred to
rejected) without a reward model or sampling, by a logistic loss on the difference of the two
completions' log-likelihood ratios to a frozen reference model (Rafailov et al. 2023, "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7).

Variants, selected by loss_type, as TRL's DPOTrainer (trl 1.16, trl/trainer/dpo_trainer.py) names them:
- sigmoid: the DPO loss itself, -log sigmoid(beta * margin) (Rafailov et al. eq. 7);
- hinge: the SLiC hinge, relu(1 - beta * margin) (Zhao et al. 2023, eq. 10);
- ipo: IPO's squared loss (Azar et al. 2023, eq. 17) on per-token (length-normalised) log-ratios;
- robust: the unbiased loss under label noise of rate label_smoothing (Chowdhury et al. 2024, eq. 9).

    python posttrain/dpo.py                  # from out/sft (`python posttrain/sft.py` first), CPU, a few minutes
    python posttrain/dpo.py --init-from none # a fresh small model: the pairs need no SFT
    torchrun --nproc_per_node 2 posttrain/dpo.py --parallel ddp        # or fsdp; gloo on CPU
    python posttrain/dpo.py --model llama31 --init-from path/to/hf_dir --data prefs.jsonl --device cuda

Data: TRL's standard preference format, prompt/chosen/rejected text columns in a .jsonl/.parquet file
or a hub dataset (ref_chosen_logps/ref_rejected_logps columns, as TRL's precompute_ref_logps writes
them, replace the reference model); by default pairs built from a toy task, the right answer chosen and
the answer with one word changed rejected. Logged: TRL's rewards/accuracies (the chosen completion's
implicit reward beta * log(pi/pi_ref) above the rejected one's) and rewards/margins, on the training
batch and on held-out pairs, and the greedy exact-match reward before and after.

The loss is checked against TRL's DPOTrainer on identical tensors in tests/test_posttrain_losses.py.
"""

from __future__ import annotations  # the losses name torch.Tensor, imported below

import math

from posttrain.cli import check_args, common_parser, run_main

# -----------------------------------------------------------------------------
# Loss

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean preference loss over a batch of B pairs.

    Every *_logps is (B,): a completion's log-probability summed over its tokens, under the policy or
    the reference. chosen_lengths / rejected_lengths (B,) count completion tokens; only 'ipo' reads
    them (required there). label_smoothing is the assumed probability that a label is flipped; only
    'robust' reads it, as in TRL 1.16, so any other loss type refuses a non-zero value.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if label_smoothing != 0.0 and loss_type != "robust":
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} applies to loss_type='robust' only")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    # The implicit rewards of eq. 5 (up to beta): log pi(y|x) - log pi_ref(y|x), (B,)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)  # eq. 7
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type='ipo' needs chosen_lengths and rejected_lengths")
        # Summed log-ratios grow with length; IPO's authors (via TRL) divide by the token count so
        # that beta (tau in eq. 17) means the same at every length. An empty completion counts as 1.
        per_token_margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(
            min=1
        )
        losses = (per_token_margin - 1 / (2 * beta)) ** 2  # eq. 17, tau = beta
    else:  # robust: eq. 9, the loss whose expectation under flips of rate eps is the clean loss
        eps = label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(beta * margin) - eps * -F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    return losses.mean()


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = common_parser(__doc__)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference (tau for ipo)")
    g.add_argument("--loss-type", default="sigmoid", choices=DPO_LOSS_TYPES, help="see the module docstring")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="robust only: the assumed rate of flipped labels")
    # the SFT run's output, as DPO usually follows SFT; --init-from none trains a fresh model
    p.set_defaults(init_from="out/sft", steps=60, batch_size=32, lr=5e-4, out_dir="out/dpo")
    args = p.parse_args(argv)
    rules = [
        ("beta", lambda v: 0 < v < math.inf, "a positive number"),
        ("label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ]
    check_args(args, p, rules)
    if args.label_smoothing and args.loss_type != "robust":
        p.error(f"--label-smoothing {args.label_smoothing}: only --loss-type robust reads it")
    return args


if __name__ == "__main__":  # run as a script: the arguments are checked before the imports below
    ARGS = run_main(parse_args)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from posttrain.common import (  # noqa: E402
    Metrics,
    Throughput,
    all_sum,
    due,
    finish,
    frozen_reference,
    load_policy,
    make_optimizer,
    open_tokenizer,
    optimizer_step,
    report_reward,
    save,
    sequence_logps,
    start,
    wrap_policy,
)
from posttrain.tasks import REF_COLUMNS, Preferences, collate, encode_pairs  # noqa: E402

# -----------------------------------------------------------------------------
# Update loop


def train(args):
    rank, world_size, device, log = start(args)
    tokenizer = open_tokenizer(args)
    examples = Preferences(args)
    if len(examples.eval_pairs) < world_size:  # every process scores a share of them in one forward
        raise SystemExit(f"--eval-prompts {args.eval_prompts}: fewer held-out pairs than the {world_size} processes")
    model, source = load_policy(args, tokenizer, examples, log)
    # precomputed reference log-probs in the data replace the reference model
    reference = None if REF_COLUMNS[0] in examples.eval_pairs[0] else frozen_reference(model, args, device)
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    log(f"policy: {source}, {model.num_params():,} parameters | {world_size} process(es), {args.parallel} | {device}")
    log(f"reference: {'the frozen initial policy' if reference else 'log-probs precomputed in --data'}")
    metrics = Metrics(args, rank)

    def evaluate(step):
        held_out = report_preferences(wrapped, reference, examples, tokenizer, args, rank, world_size, device)
        log(f"step {step:4d} | held-out preference accuracy {held_out[0]:.3f} | reward margin {held_out[1]:.4f}")
        metrics.record(step=step, eval_accuracy=held_out[0], eval_margin=held_out[1])
        return (
            *held_out,
            *report_reward(model, examples, tokenizer, args, rank, world_size, step, metrics.record, log),
        )

    before = evaluate(0)
    after, throughput = before, Throughput()
    for step in range(args.steps):
        pairs = examples.batch(args.batch_size)[rank::world_size]  # every process draws the same global batch
        loss, chosen_rewards, rejected_rewards, n_tokens = dpo_batch(wrapped, reference, pairs, tokenizer, args, device)
        loss.backward()  # DDP and FSDP average over processes: equal shares, so the global batch mean
        grad_norm, lr = optimizer_step(model, optimizer, step, args)
        train_loss = all_sum(loss.detach()).item() / world_size
        if not math.isfinite(train_loss):
            raise SystemExit(f"loss is {train_loss} at step {step + 1}: stopping without saving")
        accuracy, margin = global_pair_means(chosen_rewards, rejected_rewards, world_size)
        throughput.add(all_sum(torch.tensor(n_tokens)).item())
        row = dict(step=step + 1, loss=train_loss, accuracy=accuracy, margin=margin, lr=lr, grad_norm=grad_norm)
        if due(args.log_every, step, args):
            row["tokens_per_s"] = throughput.read()
            log(
                f"step {step + 1:4d} | loss {train_loss:.4f} | accuracy {accuracy:.3f} | margin {margin:.4f} | "
                f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {row['tokens_per_s']:,.0f} tok/s"
            )
        metrics.record(**row)
        if due(args.eval_every, step, args):
            after = evaluate(step + 1)
    names = ("accuracy", "margin", "exact_match", "reward")
    extra = {name: {"before": b, "after": a} for name, b, a in zip(names, before, after)}
    save(model, optimizer, args, rank, args.steps, extra, log, tokenizer, method="dpo")
    log(
        f"on {len(examples.eval_pairs)} held-out pairs: preference accuracy {before[0]:.3f} -> {after[0]:.3f}, "
        f"reward margin {before[1]:.4f} -> {after[1]:.4f}; exact match {before[2]:.3f} -> {after[2]:.3f}"
    )
    finish(metrics)
    return metrics.history


def dpo_batch(policy, reference, pairs, tokenizer, args, device):
    """One forward of the policy over the chosen rows then the rejected rows (B pairs -> 2B sequences),
    the reference's log-probs (its forward, or the data's), and dpo_loss. Returns the loss, the implicit
    rewards beta * (log pi - log pi_ref) of the chosen and rejected completions (B,) each, detached, and
    the number of tokens."""
    prompts, chosen = encode_pairs(tokenizer, [(pair["prompt"], pair["chosen"]) for pair in pairs])
    _, rejected = encode_pairs(tokenizer, [(pair["prompt"], pair["rejected"]) for pair in pairs])
    ids, mask = collate(prompts + prompts, chosen + rejected, tokenizer.eot_id, device)  # (2B, L)
    block_size = (policy.module if hasattr(policy, "module") else policy).cfg.block_size
    if ids.size(1) - 1 > block_size:
        raise SystemExit(f"a prompt + completion of {ids.size(1)} tokens exceeds the policy's block_size {block_size}")
    logps = sequence_logps(policy, ids, mask).sum(dim=1)  # (2B,) summed over each completion's tokens
    if reference is None:
        ref_logps = torch.tensor([pair[c] for c in REF_COLUMNS for pair in pairs], device=device)
    else:
        with torch.no_grad():
            ref_logps = sequence_logps(reference, ids, mask).sum(dim=1)
    (chosen_logps, rejected_logps), (ref_chosen, ref_rejected) = logps.chunk(2), ref_logps.chunk(2)
    lengths = mask.sum(dim=1)
    loss = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=args.beta,
        loss_type=args.loss_type,
        label_smoothing=args.label_smoothing,
        chosen_lengths=lengths[: len(pairs)],
        rejected_lengths=lengths[len(pairs) :],
    )
    rewards = args.beta * (logps.detach() - ref_logps)  # the implicit reward of DPO eq. 5, up to a constant
    return loss, *rewards.chunk(2), ids.numel()


def global_pair_means(chosen_rewards, rejected_rewards, world_size):
    """(preference accuracy, mean reward margin) over the pairs of all processes (equal shares), TRL's
    rewards/accuracies (chosen's reward strictly higher) and rewards/margins."""
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    margin = (chosen_rewards - rejected_rewards).float().mean()
    means = all_sum(torch.stack([accuracy, margin])) / world_size
    return means[0].item(), means[1].item()


@torch.no_grad()
def report_preferences(wrapped, reference, examples, tokenizer, args, rank, world_size, device):
    """(accuracy, margin) on the held-out pairs, each process scoring its share in one forward."""
    pairs = examples.eval_pairs[rank::world_size]
    wrapped.eval()
    _, chosen_rewards, rejected_rewards, _ = dpo_batch(wrapped, reference, pairs, tokenizer, args, device)
    wrapped.train()
    counts = all_sum(
        torch.stack(
            [
                (chosen_rewards > rejected_rewards).double().sum(),
                (chosen_rewards - rejected_rewards).double().sum(),
            ]
        )
    )
    return counts[0].item() / len(examples.eval_pairs), counts[1].item() / len(examples.eval_pairs)


# -----------------------------------------------------------------------------
# Main


def main(argv=None, args=None):
    """Train, from argv or from arguments parsed already; a user's mistake ends it in one line (SystemExit)."""
    return train(args or parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(args=ARGS))
