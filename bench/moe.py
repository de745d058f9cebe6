"""Speed of Qwen 3's MoE layer: the grouped path (tokens sorted by expert, one grouped matmul per
projection) against the readable per-expert loop, and both against transformers'
Qwen3MoeSparseMoeBlock holding the same weights (its eager loop, its grouped_mm path).

    uv run python -m bench.moe                       # CPU, 1 thread, about half a minute
    uv run python -m bench.moe --device cuda --dtype bfloat16 --tokens 16384 --n-embd 2048 --hidden 768

Contenders run in turn (A B A B ..., bench/common.py) and medians are compared; the bracket is
the spread (p25..p75) of the per-repetition ratios. Nothing is asserted: tests/test_moe.py
proves the paths equal. On CPU, torch's grouped_mm is itself a loop of matmuls, so the gain is
the per-expert indexing and dispatch the grouped path removes: large when each expert gets few
tokens (many experts, small batches, decoding), about 1x once the matmuls dominate.
"""

import argparse
import statistics

import torch

from bench.common import interleaved, ratio_spread
from qwen3.model import Config, MoE

TARGET = 3.0  # grouped over loop, forward, at 64 experts on CPU


def make_moe(args, n_experts, top_k):
    cfg = Config.from_preset(
        "tiny_moe", n_embd=args.n_embd, n_experts=n_experts, n_experts_per_tok=top_k, moe_intermediate_size=args.hidden
    )
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)  # routing spread over the experts, as in a trained router
    return moe.to(args.device, getattr(torch, args.dtype))


def hf_block(moe, experts_implementation):
    """transformers' block holding the same weights, or None without transformers."""
    try:
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    E, H, D = moe.w1.shape
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=D,
        moe_intermediate_size=H,
        num_experts=E,
        num_experts_per_tok=moe.router.top_k,
        norm_topk_prob=moe.router.norm_topk_prob,
        experts_implementation=experts_implementation,
    )
    block = Qwen3MoeSparseMoeBlock(cfg).to(moe.w1.device, moe.w1.dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        block.experts.down_proj.copy_(moe.w2)
    return block


def ratio(times, slow, fast):
    """'2.41x [2.30-2.55]': median ratio slow/fast and the spread of per-repetition ratios."""
    if slow not in times or fast not in times:
        return "n/a"
    q1, _, q3 = ratio_spread(times[slow], times[fast])
    return f"{statistics.median(times[slow]) / statistics.median(times[fast]):.2f}x [{q1:.2f}-{q3:.2f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="8,64,128", help="comma-separated expert counts")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (capped at n_experts / 4)")
    parser.add_argument("--tokens", default="128,2048", help="comma-separated tokens per batch (batch * seq_len)")
    parser.add_argument("--n-embd", type=int, default=128, help="model width")
    parser.add_argument("--hidden", type=int, default=64, help="moe_intermediate_size of one expert")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of each contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps ratios stable on a shared machine, 0 is torch's default",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"n_embd {args.n_embd}, expert hidden {args.hidden}, {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} thread(s); median ms of {args.repeats} interleaved rounds"
    )
    header = (
        "tokens",
        "experts",
        "k",
        "loop",
        "grouped",
        "grouped speed-up",
        "fwd+bwd speed-up",
        "ours vs HF eager",
        "ours vs HF grouped_mm",
    )
    print(" | ".join(header))
    for n_tokens, n_experts in ((int(t), int(e)) for t in args.tokens.split(",") for e in args.experts.split(",")):
        top_k = max(1, min(args.top_k, n_experts // 4))
        moe = make_moe(args, n_experts, top_k)
        x = torch.randn(1, n_tokens, args.n_embd, device=args.device, dtype=moe.w1.dtype)
        x_grad = x.clone().requires_grad_()

        # defaults bind this round's moe and inputs (the closures run within the round anyway)
        def forward(impl, moe=moe, x=x):
            moe.impl = impl
            with torch.no_grad():
                moe(x)

        def forward_backward(impl, moe=moe, x_grad=x_grad):
            moe.impl = impl
            moe(x_grad)[0].square().sum().backward()

        fwd = {impl: (lambda impl=impl: forward(impl)) for impl in ("loop", "grouped")}
        for hf_impl in ("eager", "grouped_mm"):
            block = hf_block(moe, hf_impl)
            if block is not None:
                fwd["HF " + hf_impl] = lambda block=block, x=x: block(x)
        with torch.no_grad():
            t = interleaved(fwd, args.repeats, device=args.device)
        t_bwd = interleaved(
            {impl: (lambda impl=impl: forward_backward(impl)) for impl in ("loop", "grouped")},
            args.repeats,
            device=args.device,
        )
        t_bwd = {k + " bwd": v for k, v in t_bwd.items()}
        t.update(t_bwd)
        ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
        print(
            " | ".join(
                (
                    f"{n_tokens}",
                    f"{n_experts}",
                    f"{top_k}",
                    f"{ms['loop']:.2f}",
                    f"{ms['grouped']:.2f}",
                    ratio(t, "loop", "grouped"),
                    ratio(t, "loop bwd", "grouped bwd"),
                    ratio(t, "HF eager", "loop"),
                    ratio(t, "HF grouped_mm", "grouped"),
                )
            )
        )
        if n_experts == 64:
            speedup = statistics.median(t["loop"]) / statistics.median(t["grouped"])
            print(f"  target: grouped >= {TARGET}x the loop at 64 experts: {'met' if speedup >= TARGET else 'not met'}")
    print(
        "speed-up = loop time / grouped time; 'ours vs HF' = transformers' time / ours (above 1x: ours is faster; "
        "HF eager against our loop, HF grouped_mm against our grouped path)"
    )


if __name__ == "__main__":
    main()
