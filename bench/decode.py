"""KV-cache decoding speed of our `generate` against Hugging Face's `generate`: greedy, batch 1,
the same prompt and the same number of new tokens, identical weights.

    uv run python -m bench.decode                    # GPT-2 tiny preset, fp32 CPU, ~20 s
    uv run python -m bench.decode --model llama31
    uv run python -m bench.decode --quick            # a few-second smoke run

Ours: `model.generate(prompt, n, temperature=0)`, which prefills the prompt into a KVCache and
then feeds one token per step. Theirs: `generate(do_sample=False, use_cache=True)` with its
default dynamic cache and "sdpa" attention (--hf-attn eager for its explicit softmax), no
end-of-sequence token so both produce exactly n tokens. Tokens/s counts new tokens over the
whole call, prefill included. The script prints whether both produced the same tokens
(tests/test_bench.py asserts they do); calls alternate ours / theirs and the medians are
compared; the timings are never asserted.
"""

import argparse

import torch

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

TARGET = 1.5  # the decoding speed-up over transformers we aim for on CPU


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    add_comparison_args(parser, repeats=5, what="generate calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 8, 16, 3
    device = setup(args)

    from transformers import GenerationConfig

    ours, theirs = (m.eval() for m in ours_and_twin(args, device))
    cfg, n = ours.cfg, args.new_tokens
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    prompt = prompt.to(device)
    gen_cfg = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    mask = torch.ones_like(prompt)
    out = {}

    def run_ours():
        out["ours"] = ours.generate(prompt, n, temperature=0)

    def run_theirs():
        with torch.no_grad():
            out["HF"] = theirs.generate(prompt, attention_mask=mask, generation_config=gen_cfg)

    times = interleaved({"ours": run_ours, "HF": run_theirs}, args.repeats, warmup=1, device=device)
    print(
        f"{summary(args, ours)}, batch 1, prompt {args.prompt_len} + {n} new tokens, greedy, "
        f"{placement(ours, device)}; HF attention: {args.hf_attn}, dynamic cache"
    )
    a, b = out["ours"], out["HF"]
    if a.shape == b.shape and torch.equal(a, b):
        print(f"tokens match: yes (all {n} new tokens identical)")
    else:
        same = (a[0, : b.size(1)] == b[0, : a.size(1)]).int()
        first = int(same.argmin()) - args.prompt_len if not same.all() else min(a.size(1), b.size(1))
        print(f"tokens match: NO (first difference at new token {first}; shapes {tuple(a.shape)} vs {tuple(b.shape)})")
    print(f"generate, median of {args.repeats} interleaved calls:")
    for name, ts in times.items():
        q1, med, q3 = quartiles(ts)
        print(
            f"  {name:<5} {n / med:>10,.1f} new tokens/s   {1e3 * med / n:7.2f} ms/token "
            f"(p25 {1e3 * q1 / n:.2f} .. p75 {1e3 * q3 / n:.2f})"
        )
    return report_ratio("decode tokens/s ours / HF", times["ours"], times["HF"], TARGET)


if __name__ == "__main__":
    main()
