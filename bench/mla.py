"""Multi-head latent attention (DeepSeek-V2 sec. 2.1; DeepSeek-V3 sec. 2.1.1), measured: how much
its latent KV cache saves, and how fast the weight-absorbed form decodes against the naive one.

    uv run python -m bench.mla                                  # both tables; decode on CPU, fp32, ~1 min
    uv run python -m bench.mla --device cuda --dtype bfloat16 --preset deepseek_v3_16b --set n_layer=2
    uv run python -m bench.mla --quick                          # a few-second smoke run

(a) KV-cache bytes per token. MLA caches, per token and layer, the normalised latent c^KV
(kv_lora_rank numbers, eq. 1) and one roped key k^R shared by all heads (qk_rope_head_dim, eq. 3):
576 numbers in DeepSeek-V3. Grouped-query attention (Llama 3.1, Qwen 3) caches keys and values of
n_kv_heads heads, 2 * n_kv_heads * head_dim; MLA with its keys and values expanded per head (the
naive cache) would hold n_head * (qk_nope + qk_rope + v_head_dim). Each figure is measured on the
preset's own cache: one attention layer built on the meta device writes one token, nothing is
allocated, and the bytes it would hold (bf16) are checked against those formulas.

(b) Decode speed, same weights both ways. Absorbed: the model's own latent cache and
`Attention.absorbed`, W_uk folded into the query and W_uv applied after attention. Naive: a cache
of each head's expanded keys and values, decompressed from a token's latent once when it is
written, and ordinary multi-head attention over them (`ExpandedKVCache`). Greedy decoding of
--new-tokens after a --prompt-len prompt; only the decoding steps are timed (the prefill is not),
the two forms alternate and medians are compared. The naive form is fed the absorbed form's
greedy tokens, so both score the same sequences: their logits must agree to rounding and their
greedy choices must be the same (printed; tests/test_bench.py asserts both in fp32). The absorbed form does more arithmetic per cached token (every
head scores the whole latent) and reads far fewer bytes (576 numbers per token and layer instead
of 40,960 at DeepSeek-V3's widths), so it gains where reading the cache dominates a step (many
heads, long contexts, large batches); with few heads (the tiny presets), or where kernel launches
dominate (a 2-layer model on a GPU), the two forms run about even.
"""

import argparse
import contextlib
import importlib
import statistics
import time

import torch

from bench.common import build_ours, placement, quartiles, ratio_spread, setup, summary, sync
from deepseek3.model import causal_attention, flash_mla_usable

# (model, attention and what its cache holds, package, preset, form) of table (a)
CACHE_ROWS = [
    ("DeepSeek-V3 671B", "MLA, latent cache", "deepseek3", "deepseek_v3", "latent"),
    ("DeepSeek-V3 671B", "MLA, keys/values expanded per head", "deepseek3", "deepseek_v3", "expanded"),
    ("DeepSeek-V3 16B", "MLA, latent cache", "deepseek3", "deepseek_v3_16b", "latent"),
    ("Llama 3.1 8B", "GQA, 8 kv heads", "llama31", "llama31_8b", "gqa"),
    ("Llama 3.1 70B", "GQA, 8 kv heads", "llama31", "llama31_70b", "gqa"),
    ("Llama 3.1 405B", "GQA, 8 kv heads", "llama31", "llama31_405b", "gqa"),
    ("Qwen3-235B-A22B", "GQA, 4 kv heads", "qwen3", "qwen3_235b_a22b", "gqa"),
]
# Config overrides for table (a)'s one-layer meta model: deepseek3's first layer dense and no MTP module
ONE_LAYER = {"deepseek3": dict(n_layer=1, first_k_dense_replace=1, n_mtp=0)}
CONTEXT = 131072  # the 128K-token sequence of the table's GiB column
COLUMNS = ["model", "attention: what the cache holds", "numbers / token / layer", "bytes / token / layer", "layers"]
COLUMNS += ["KiB / token", "GiB / 128K-token sequence", "x DeepSeek-V3 MLA"]
# what bench/gpu_check_deepseek3.py runs on a GPU: the 16B's attention (16 heads, latent 512 + 64) on
# 2 dense layers, a batch of 8 and a 1,024-token prompt
GPU_ARGS = ["--preset", "deepseek_v3_16b", "--set", "n_layer=2", "--set", "first_k_dense_replace=2"]
GPU_ARGS += ["--set", "vocab_size=4096", "--batch-size", "8", "--prompt-len", "1024", "--new-tokens", "64"]
SUMMARY_PREFIXES = ("cache bytes", "attention path", "logits, the same", "greedy choices", "decode tokens/s absorbed")

# -----------------------------------------------------------------------------
# The naive form with a cache


class ExpandedKVCache:
    """MLA decoded as ordinary multi-head attention: each token's per-head keys [k^C; k^R] and values
    (eq. 2-5) decompressed from its latent once, when written, and cached. Installed in place of one
    layer's `Attention.naive`, which the layer's forward calls when it is given no latent cache."""

    def __init__(self, attn, batch_size, max_seq_len):
        self.attn = attn
        self.shapes = [(batch_size, attn.n_head, max_seq_len, d) for d in (attn.nope_dim + attn.rope_dim, attn.v_dim)]
        self.k = self.v = None  # allocated by the first call, in the dtype and on the device of the latents

    def __call__(self, q_nope, q_rope, latent, k_rope, pos):  # Attention.naive's signature, for T new tokens
        a, (B, T, _) = self.attn, latent.shape
        kv = a.wkv_b(latent).view(B, T, a.n_head, -1).transpose(1, 2)  # (B, n_head, T, nope + v)
        k_nope, v = kv.split([a.nope_dim, a.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, a.n_head, -1, -1)], dim=-1)  # (B, n_head, T, qk)
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shapes[0]), v.new_zeros(self.shapes[1])
        self.k[:, :, pos : pos + T], self.v[:, :, pos : pos + T] = k, v
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, n_head, T, qk)
        k, v = self.k[:, :, : pos + T], self.v[:, :, : pos + T]  # (B, n_head, pos+T, qk), (.., v_dim)
        return causal_attention(q, k, v, pos, a.attn_impl, a.scale)  # (B, n_head, T, v_dim)


@contextlib.contextmanager
def expanded_caches(model, batch_size, max_seq_len):
    """Within: the model's forward without a cache decodes from expanded per-head caches."""
    caches = [ExpandedKVCache(layer.attn, batch_size, max_seq_len) for layer in model.layers]
    for layer, cache in zip(model.layers, caches):
        layer.attn.naive = cache  # an instance attribute, in front of the method
    try:
        yield caches
    finally:
        for layer in model.layers:
            del layer.attn.naive


# -----------------------------------------------------------------------------
# (a) cache bytes per token


def formula(cfg, form):
    """Numbers one token adds to one layer's cache."""
    if form == "latent":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if form == "expanded":
        return cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 2 * cfg.n_kv_heads * cfg.head_dim


def measured_bytes(package, preset, form, dtype=torch.bfloat16, slots=128):
    """Bytes per token of one layer's cache of `preset` in `dtype`: one attention layer built on the
    meta device writes one token into a cache of `slots` positions; nothing is allocated."""
    Config, Transformer = (getattr(importlib.import_module(f"{package}.model"), n) for n in ("Config", "Transformer"))
    cfg = Config.from_preset(preset, **ONE_LAYER.get(package, dict(n_layer=1)))
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    x = torch.empty(1, 1, cfg.n_embd, device="meta", dtype=dtype)
    cos, sin = model.rope_cos[:1], model.rope_sin[:1]
    if form == "expanded":
        with expanded_caches(model, 1, slots) as caches:
            model.layers[0].attn(x, cos, sin)
        buffers = [caches[0].k, caches[0].v]
    else:
        cache = model.make_cache(1, slots)[0]
        model.layers[0].attn(x, cos, sin, cache, 0)
        buffers = list(cache.buffers())
    return sum(b.numel() * b.element_size() for b in buffers) // slots, Config.from_preset(preset)


def cache_table():
    print("(a) KV-cache bytes per token, bf16, measured on each preset's own cache (meta device)\n")
    print("| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|")
    mismatches, reference = [], None
    for model, attention, package, preset, form in CACHE_ROWS:
        per_layer, cfg = measured_bytes(package, preset, form)
        if per_layer != 2 * formula(cfg, form):
            mismatches.append(f"{preset} {form}: {per_layer} bytes, formula {2 * formula(cfg, form)}")
        per_token = per_layer * cfg.n_layer
        reference = reference or per_token  # the first row, DeepSeek-V3's latent cache
        print(
            f"| {model} | {attention} | {per_layer // 2:,} | {per_layer:,} | {cfg.n_layer} | {per_token / 1024:,.1f} "
            f"| {per_token * CONTEXT / 2**30:,.1f} | {per_token / reference:.1f}x |"
        )
    verdict = "yes" if not mismatches else "NO: " + "; ".join(mismatches)
    print(
        f"\ncache bytes equal the formulas (latent rank + rope; 2 x kv heads x head dim; heads x (qk + v)): {verdict}"
    )


# -----------------------------------------------------------------------------
# (b) decode speed, absorbed against naive


def decode(model, prompt, new_tokens, form, feed=None):
    """Greedy decoding in `form`, or with the tokens `feed` (B, new_tokens) fed back in place of its own
    choices -> (its choices (B, new_tokens), each step's last logits (B, new_tokens, vocab), seconds of
    the decoding steps, the prefill excluded)."""
    B, P = prompt.shape
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if form == "absorbed":
            cache = model.make_cache(B, P + new_tokens)
        else:
            stack.enter_context(expanded_caches(model, B, P + new_tokens))
            cache = None
        logits = [model(prompt, cache=cache, pos=0)[0][:, -1]]  # (B, vocab) each
        choices = [logits[-1].argmax(-1, keepdim=True)]  # (B, 1) each
        sync(prompt.device)
        t0 = time.perf_counter()
        for step in range(new_tokens - 1):
            fed = choices[-1] if feed is None else feed[:, step : step + 1]
            logits.append(model(fed, cache=cache, pos=P + step)[0][:, -1])
            choices.append(logits[-1].argmax(-1, keepdim=True))
        sync(prompt.device)
        return torch.cat(choices, dim=1), torch.stack(logits, dim=1).float(), time.perf_counter() - t0


def attention_path(model, cache):
    """Which kernel attends in the absorbed form with this (filled) latent cache: FlashMLA's or torch's."""
    cfg, kv = model.cfg, cache[0].kv[:, :1]  # (B, 1, rank + rope): a slice, as Attention.absorbed sees it
    q = kv.new_empty(1, cfg.n_head, 1, kv.size(-1))
    return "FlashMLA" if flash_mla_usable(q, kv, cfg.kv_lora_rank) else "torch"


def decode_speed(args, device, dtype):
    model = build_ours(args, preset=args.preset).to(device, dtype).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=g).to(device)
    times = {"absorbed": [], "naive": []}
    for i in range(1 + args.repeats):  # a warm-up round, then the forms in turn
        tokens, logits, seconds = decode(model, prompt, args.new_tokens, "absorbed")
        # the naive form is fed the absorbed form's tokens, so both score the same sequences
        naive_choices, naive_logits, naive_seconds = decode(model, prompt, args.new_tokens, "naive", feed=tokens)
        if i:
            times["absorbed"].append(seconds)
            times["naive"].append(naive_seconds)
    with torch.inference_mode():
        cache = model.make_cache(1, 1)
        model(prompt[:1, :1], cache=cache, pos=0)
    n = args.batch_size * (args.new_tokens - 1)
    print(
        f"\n(b) decode, {summary(args, model)}; {cfg.n_head} heads, latent {cfg.kv_lora_rank} + rope "
        f"{cfg.qk_rope_head_dim}; batch {args.batch_size}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"greedy, {placement(model, device)}"
    )
    print(f"attention path of the absorbed form: {attention_path(model, cache)}")
    diff, scale = (naive_logits - logits).abs().max().item(), logits.abs().max().item()
    print(f"logits, the same tokens fed to both forms: max |absorbed - naive| {diff:.3g} (max |logit| {scale:.3g})")
    agree = int((naive_choices == tokens).all(dim=0).sum())
    n_new = args.new_tokens
    verdict = f"yes (all {n_new} new tokens of every sequence)" if agree == n_new else f"NO ({agree} of {n_new})"
    if agree < n_new and dtype != torch.float32:  # the forms round differently: a near tie may flip
        verdict += f" in {dtype}: judge by the logit difference against the logits' size"
    print(f"greedy choices agree: {verdict}")
    print(f"decoding steps (prefill not timed), median of {args.repeats} alternating runs:")
    for form, ts in times.items():
        q1, med, q3 = (1e3 * t / n for t in quartiles(ts))  # ms per token
        print(f"  {form:<8} {1e3 / med:>10,.1f} tokens/s   {med:7.3f} ms/token (p25 {q1:.3f} .. p75 {q3:.3f})")
    ratio = statistics.median(times["naive"]) / statistics.median(times["absorbed"])
    q1, _, q3 = ratio_spread(times["naive"], times["absorbed"])
    print(f"decode tokens/s absorbed / naive: {ratio:.2f}x (per-run ratios p25 {q1:.2f}x .. p75 {q3:.2f}x)")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run on a toy config")
    parser.add_argument("--preset", help="a deepseek3 Config preset for (b) (default: the CPU benchmark config)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config overrides for (b)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and caches")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed decoding runs per form (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 is torch's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.model = "deepseek3"  # bench.common.build_ours reads the registry entry of args.model
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 16), min(args.new_tokens, 8), 2
    device = setup(args)
    cache_table()
    return decode_speed(args, device, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
