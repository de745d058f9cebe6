"""Supervised fine-tuning (SFT) on prompt/completion pairs, the loss on completion tokens only: the
step that gives a small model a non-zero reward before reinforcement learning (InstructGPT, Ouyang
et al. 2022, sec. 3.5), for every model of shared/models.py.

    python posttrain/sft.py                                # toy task 'reverse', CPU, a few minutes
    torchrun --nproc_per_node 2 posttrain/sft.py --parallel ddp        # or fsdp; gloo on CPU
    python posttrain/sft.py --model llama31 --init-from path/to/hf_dir --data pairs.jsonl --device cuda

The policy starts from --init-from: a train.py run (e.g. out/llama31 after `python llama31/train.py`),
an earlier post-training run (out/sft), or a Hugging Face directory (config.json). Without it, the
model's train.py out dir is used if it holds a checkpoint, else a fresh small model: the toy tasks need
no pretraining. Reward on held-out prompts (greedy, exact match) is measured before and after.

Each method file (sft.py, dpo.py, grpo.py, ppo.py) reads loss, arguments, update loop, main; what they
share is posttrain/cli.py (arguments, checked before torch is imported), posttrain/common.py
(distributed set-up, policy, generation, metrics, checkpoint) and posttrain/tasks.py (toy tasks, rewards,
data, batches).
"""

import math

from posttrain.cli import check_args, common_parser, run_main

# -----------------------------------------------------------------------------
# Loss: cross-entropy of the completion tokens only, as TRL's SFTTrainer with completion_only_loss


def completion_targets(ids, mask):
    """Next-token targets (B, L-1) for inputs ids[:, :-1]: ids[:, 1:] where that token is a completion
    token, -100 (ignored by the loss) on prompt and padding."""
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


def sft_loss(wrapped, inputs, targets, num_items):
    """Sum of the completion tokens' cross-entropy / num_items, the number of completion tokens in the
    whole batch over all processes: so the gradient is the global token mean on any number of ranks.
    The model's forward gives the mean over this process's tokens without materialising the logits."""
    n_local = (targets != -100).sum()
    return wrapped(inputs, targets)[1] * n_local / num_items


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = common_parser(__doc__)
    # no --init-from: out/<model> from the model's train.py if there, else a fresh model (the toy tasks need no pretraining)
    # a fresh model of the registry's small config (2 layers, 32 wide) unless out/<model> holds a train.py run
    p.set_defaults(init_from=None, steps=600, batch_size=32, lr=1e-2, out_dir="out/sft")
    args = p.parse_args(argv)
    check_args(args, p)
    return args


if __name__ == "__main__":  # run as a script: the arguments are checked before the imports below
    ARGS = run_main(parse_args)

import torch  # noqa: E402

from posttrain.common import (  # noqa: E402
    Metrics,
    Throughput,
    all_sum,
    due,
    finish,
    load_policy,
    make_optimizer,
    open_tokenizer,
    optimizer_step,
    report_reward,
    reward_summary,
    save,
    start,
    wrap_policy,
)
from posttrain.tasks import Examples, collate, encode_pairs  # noqa: E402

# -----------------------------------------------------------------------------
# Update loop


def train(args):
    rank, world_size, device, log = start(args)
    tokenizer = open_tokenizer(args)
    examples = Examples(args)
    model, source = load_policy(args, tokenizer, examples, log)
    wrapped = wrap_policy(model, args, device)
    optimizer = make_optimizer(model, args, device)
    log(f"policy: {source}, {model.num_params():,} parameters | {world_size} process(es), {args.parallel} | {device}")
    metrics = Metrics(args, rank)
    before = report_reward(model, examples, tokenizer, args, rank, world_size, 0, metrics.record, log)
    after, throughput = before, Throughput()
    for step in range(args.steps):
        pairs = examples.batch(args.batch_size)[rank::world_size]  # every process draws the same global batch
        ids, mask = collate(*encode_pairs(tokenizer, pairs), tokenizer.eot_id, device)
        inputs, targets = ids[:, :-1], completion_targets(ids, mask)
        num_items = all_sum((targets != -100).sum())
        loss = sft_loss(wrapped, inputs, targets, num_items)
        (loss * world_size).backward()  # DDP and FSDP average gradients over processes; the loss is a global sum
        grad_norm, lr = optimizer_step(model, optimizer, step, args)
        train_loss = all_sum(loss.detach()).item()
        if not math.isfinite(train_loss):
            raise SystemExit(f"loss is {train_loss} at step {step + 1}: stopping without saving")
        throughput.add(all_sum(torch.tensor(ids.numel())).item())
        row = dict(step=step + 1, loss=train_loss, lr=lr, grad_norm=grad_norm, completion_tokens=num_items.item())
        if due(args.log_every, step, args):
            row["tokens_per_s"] = throughput.read()
            log(
                f"step {step + 1:4d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{row['tokens_per_s']:,.0f} tok/s"
            )
        metrics.record(**row)
        if due(args.eval_every, step, args):
            after = report_reward(model, examples, tokenizer, args, rank, world_size, step + 1, metrics.record, log)
    extra = {name: {"before": b, "after": a} for name, b, a in zip(("exact_match", "reward"), before, after)}
    save(model, optimizer, args, rank, args.steps, extra, log, tokenizer, method="sft")
    log(reward_summary(examples, args, before, after))
    finish(metrics)
    return metrics.history


# -----------------------------------------------------------------------------
# Main


def main(argv=None, args=None):
    """Train, from argv or from arguments parsed already; a user's mistake ends it in one line (SystemExit)."""
    return train(args or parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(args=ARGS))
