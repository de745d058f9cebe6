"""Training throughput of our model against its Hugging Face twin: tokens per second of a full
step (forward, cross-entropy, backward, AdamW) with identical weights on identical batches.

    uv run python -m bench.train_throughput                  # GPT-2 tiny preset, fp32 CPU, ~20 s
    uv run python -m bench.train_throughput --model llama31
    uv run python -m bench.train_throughput --quick          # a few-second smoke run

The twin is loaded from our save_pretrained checkpoint, so the first step's losses agree (the
script prints both). Both sides use PyTorch's scaled_dot_product_attention (transformers'
"sdpa" attention; --hf-attn eager for its explicit softmax) and the same F.cross_entropy on the
logits (plus a mixture of experts' load-balancing loss), so the comparison is of the model code
around the same kernels. Steps alternate ours / theirs and the medians are compared; the timings
are never asserted (tests/test_bench.py checks the first-step losses agree).
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.common import (
    add_common_args,
    add_comparison_args,
    interleaved,
    ours_and_twin,
    placement,
    quartiles,
    report_ratio,
    setup,
    summary,
)

TARGET = 1.2  # the speed-up over transformers we aim for on CPU


def make_step(model, batches, loss_fn, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    batch = itertools.cycle(batches)

    def step():
        x, y = next(batch)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    # our loss, not transformers' (which shifts labels by one itself): the same work on both sides,
    # a mixture of experts' load-balancing loss included, which ours adds in training
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    out = model(input_ids=x, output_router_logits=True) if coef else model(input_ids=x)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())  # logits: (B, T, vocab_size)
    return loss + coef * out.aux_loss if coef else loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    add_comparison_args(parser, repeats=20, what="steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.repeats = 2, 32, 3
    device = setup(args)

    ours, theirs = (m.train() for m in ours_and_twin(args, device))
    cfg = ours.cfg
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, cfg.vocab_size, (2, args.batch_size, args.seq_len), generator=g).to(device) for _ in range(4)
    ]  # (x, y) pairs, reused cyclically by both models

    steps = {"ours": make_step(ours, batches, ours_loss, args.lr), "HF": make_step(theirs, batches, hf_loss, args.lr)}
    first = {name: step().item() for name, step in steps.items()}  # also the warm-up
    print(
        f"{summary(args, ours)}, batch {args.batch_size} x {args.seq_len} tokens, {placement(ours, device)}; "
        f"HF attention: {args.hf_attn}"
    )
    print(
        f"first-step loss: ours {first['ours']:.5f}, HF {first['HF']:.5f} "
        f"(|diff| {abs(first['ours'] - first['HF']):.1e}; same weights, same batch)"
    )

    times = interleaved(steps, args.repeats, warmup=1, device=device)
    tokens = args.batch_size * args.seq_len
    print(f"forward + backward + AdamW, median of {args.repeats} interleaved steps:")
    for name, ts in times.items():
        q1, med, q3 = quartiles(ts)
        print(
            f"  {name:<5} {tokens / med:>10,.0f} tokens/s   {1e3 * med:8.1f} ms/step "
            f"(p25 {1e3 * q1:.1f} .. p75 {1e3 * q3:.1f})"
        )
    return report_ratio("train tokens/s ours / HF", times["ours"], times["HF"], TARGET)


if __name__ == "__main__":
    main()
