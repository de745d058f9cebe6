"""Qwen 3: the dense and mixture-of-experts decoders of the "Qwen3 Technical Report" (Yang et al.,
2025), 0.6B to 32B dense and 30B-A3B / 235B-A22B MoE. The architecture is Llama's with QK-Norm
(Dehghani et al., 2023) in attention and, in the MoE models, top-k routed SwiGLU experts
(Shazeer et al., 2017; Fedus et al., 2021) in place of the dense MLP.

Checked against Hugging Face `transformers.Qwen3ForCausalLM` and `Qwen3MoeForCausalLM`
(tests/test_parity.py): logits agree to 1e-4 in fp32, and checkpoints load both ways; the MoE
layer is also checked against `Qwen3MoeSparseMoeBlock` and its loss against
`load_balancing_loss_func` (tests/test_moe.py). The Hugging Face format lives in hf.py.

Changes from llama31/model.py:
- QK-Norm: RMSNorm over head_dim on every query and key head, before RoPE (report sec. 2);
- head_dim is a Config field (128 at every size), no longer n_embd // n_head;
- RoPE base 1,000,000; YaRN (Peng et al., 2023) in place of Llama 3.1's frequency scaling, off as
  released and set in config.json for contexts beyond 32K, as Qwen's model cards describe;
- `Router` and `MoE` (no shared expert; top-k probabilities renormalised), used in every layer
  picked by `decoder_sparse_step` and not in `mlp_only_layers`, as Hugging Face does. `MoE` runs
  either a readable loop over experts or grouped matmuls over tokens sorted by expert
  (`moe_impl`); tests/test_moe.py proves them equal;
- the Switch Transformer load-balancing loss, added to the loss in training mode and reported
  with the expert load through forward's `aux`; `num_params(active=True)` counts the parameters
  one token runs through;
- Block returns its router logits and chosen experts beside x; hf.py maps both checkpoint kinds.

Not here: Qwen 3's "global-batch" balancing (Qiu et al., 2025), which pools expert counts over
all data-parallel ranks and micro-batches (this loss pools over the layers of one micro-batch, as
transformers does); sliding-window attention (off in every release).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    vocab_size: int = 151936  # Qwen's byte-level BPE, 151,643 tokens + control tokens, padded
    block_size: int = 40960  # longest sequence as released: 32,768 generated + 8,192 prompt tokens
    n_layer: int = 36  # transformer blocks
    n_head: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads, each shared by n_head // n_kv_heads query heads
    n_embd: int = 4096  # residual stream width
    head_dim: int = 128  # width of one attention head; n_head * head_dim need not equal n_embd
    intermediate_size: int = 12288  # SwiGLU hidden width of the dense MLP
    norm_eps: float = 1e-6  # RMSNorm epsilon, also of QK-Norm
    tie_embeddings: bool = False  # lm_head shares the token-embedding matrix (0.6B, 1.7B, 4B)
    rope_theta: float = 1000000.0  # RoPE base, raised from 10,000 by ABF (Xiong et al., 2023) for long context
    rope_factor: float | None = None  # RoPE scaling: context extension factor s; None = plain RoPE
    rope_type: str = "yarn"  # the scaling rope_factor selects: "yarn" (YaRN), the one Qwen 3 uses
    rope_original_block_size: int = 32768  # the pre-training context, before long-context training
    rope_beta_fast: float = 32.0  # yarn: frequencies turning more often than this in the original context: kept
    rope_beta_slow: float = 1.0  # yarn: turning less often than this: divided by rope_factor; a ramp between
    rope_attention_factor: float | None = None  # yarn: multiplies cos and sin; None = 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole frequency indices (transformers' default)
    # mixture of experts (Qwen3-MoE); n_experts = 0 is a dense model
    n_experts: int = 0  # routed experts in each MoE layer
    n_experts_per_tok: int = 8  # top-k: experts each token runs through
    moe_intermediate_size: int = 768  # SwiGLU hidden width of one expert
    norm_topk_prob: bool = True  # renormalise the k chosen router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in the training loss
    moe_impl: str = "grouped"  # "grouped" (tokens sorted by expert, grouped matmuls) or "loop" (the reference)
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit softmax, the reference)
    init_std: float = 0.02  # std of the normal initialisation

    def __post_init__(self):
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_heads", "n_embd", "head_dim")
        positive += ("intermediate_size", "n_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
        positive += ("rope_original_block_size",)
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_heads != 0:
            raise ValueError(
                f"Config.n_head ({self.n_head}) must be divisible by Config.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"Config.head_dim ({self.head_dim}) must be even for RoPE")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"Config.attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_factor is not None and not self.rope_factor > 0:
            raise ValueError(f"Config.rope_factor must be > 0 or None (no scaling), got {self.rope_factor!r}")
        if self.rope_type != "yarn":  # diff vs llama31: no Llama 3.1 scaling
            raise ValueError(f"Config.rope_type must be 'yarn', got {self.rope_type!r}")
        if not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise ValueError(
                f"Config.rope_beta_slow ({self.rope_beta_slow}) must be > 0 and at most "
                f"Config.rope_beta_fast ({self.rope_beta_fast})"
            )
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            raise ValueError(f"Config.rope_attention_factor must be > 0 or None, got {self.rope_attention_factor!r}")
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ValueError(f"Config.n_experts must be an integer >= 0 (0: dense), got {self.n_experts!r}")
        if self.n_experts and self.n_experts_per_tok > self.n_experts:
            raise ValueError(
                f"Config.n_experts_per_tok ({self.n_experts_per_tok}) must be at most "
                f"Config.n_experts ({self.n_experts})"
            )
        if not all(isinstance(i, int) and 0 <= i < self.n_layer for i in self.mlp_only_layers):
            raise ValueError(
                f"Config.mlp_only_layers must hold layer indices in [0, {self.n_layer}), got {self.mlp_only_layers!r}"
            )
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"Config.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}")
        if self.moe_impl not in ("grouped", "loop"):
            raise ValueError(f"Config.moe_impl must be 'grouped' or 'loop', got {self.moe_impl!r}")

    def is_moe_layer(self, i):
        # Hugging Face's Qwen3MoeDecoderLayer rule
        return self.n_experts > 0 and (i + 1) % self.decoder_sparse_step == 0 and i not in self.mlp_only_layers

    # --- presets: looked up by exact name, never fuzzy-matched ---
    # fmt: off

    @classmethod
    def tiny(cls):  # the CPU default: gpt2's tiny, with the byte tokenizer's 257 ids
        return cls(vocab_size=257, block_size=256, n_layer=4, n_head=4, n_kv_heads=2, n_embd=128, head_dim=32,
                   intermediate_size=384, tie_embeddings=True)

    @classmethod
    def tiny_moe(cls):  # tiny with 8 experts, 2 per token, each a quarter of the dense MLP
        return cls(**{**asdict(cls.tiny()), "n_experts": 8, "n_experts_per_tok": 2, "moe_intermediate_size": 96})

    # as in each model's config.json on the Hugging Face hub (Qwen/Qwen3-*)
    @classmethod
    def qwen3_0_6b(cls):  # 0.6B
        return cls(n_layer=28, n_head=16, n_kv_heads=8, n_embd=1024, intermediate_size=3072, tie_embeddings=True)

    @classmethod
    def qwen3_1_7b(cls):  # 1.7B
        return cls(n_layer=28, n_head=16, n_kv_heads=8, n_embd=2048, intermediate_size=6144, tie_embeddings=True)

    @classmethod
    def qwen3_4b(cls):  # 4.0B
        return cls(n_layer=36, n_head=32, n_kv_heads=8, n_embd=2560, intermediate_size=9728, tie_embeddings=True)

    @classmethod
    def qwen3_8b(cls):  # 8.2B
        return cls(n_layer=36, n_head=32, n_kv_heads=8, n_embd=4096, intermediate_size=12288)

    @classmethod
    def qwen3_14b(cls):  # 14.8B
        return cls(n_layer=40, n_head=40, n_kv_heads=8, n_embd=5120, intermediate_size=17408)

    @classmethod
    def qwen3_32b(cls):  # 32.8B
        return cls(n_layer=64, n_head=64, n_kv_heads=8, n_embd=5120, intermediate_size=25600)

    @classmethod
    def qwen3_30b_a3b(cls):  # 30.5B, 3.3B active
        return cls(n_layer=48, n_head=32, n_kv_heads=4, n_embd=2048, intermediate_size=6144, n_experts=128,
                   n_experts_per_tok=8, moe_intermediate_size=768)

    @classmethod
    def qwen3_235b_a22b(cls):  # 235B, 22B active
        return cls(n_layer=94, n_head=64, n_kv_heads=4, n_embd=4096, intermediate_size=12288, n_experts=128,
                   n_experts_per_tok=8, moe_intermediate_size=1536)

    PRESETS = ("tiny", "tiny_moe", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
               "qwen3_30b_a3b", "qwen3_235b_a22b")
    # fmt: on

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**asdict(getattr(cls, name)()), **overrides})


# -----------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
    # LayerNorm without the mean subtraction and the bias (Zhang & Sennrich, 2019): x / RMS(x) * g
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as Hugging Face does, so bf16 matches
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# -----------------------------------------------------------------------------
# Rotary position embedding (RoFormer, Su et al., 2021)


def precompute_rope(cfg: Config):
    """cos and sin of the rotation angle m * theta_i for every position m < block_size, both times
    YaRN's attention factor (1 for other RoPE)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (head_dim/2,) eq. 15
    attention_factor = 1.0
    if cfg.rope_factor is not None and cfg.rope_type == "yarn":
        inv_freq, attention_factor = yarn_scaling(inv_freq, cfg)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim): dim i pairs with i + head_dim/2
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def yarn_scaling(inv_freq, cfg: Config):
    """YaRN (Peng et al., 2023): inv_freq (head_dim/2,) -> (scaled inv_freq, attention factor).

    NTK-by-parts (sec. 3.2): frequency i turns r_i = L / wavelength_i times over the original context
    L. Those with r_i > beta_fast are kept (extrapolated), those with r_i < beta_slow are divided by
    the factor s (interpolated, as position interpolation does), and between the two the result
    blends linearly in the index i, as the reference implementation does. Attention temperature
    (sec. 3.4): logits are scaled by 1/t with sqrt(1/t) = 0.1 ln(s) + 1, applied as a factor on both
    cos and sin, hence on q and k."""
    d, L, s = cfg.head_dim, cfg.rope_original_block_size, cfg.rope_factor

    def index_turning(r):  # the (fractional) i with r_i = r: L / (2 pi theta^(2i/d)) = r
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))

    lo, hi = index_turning(cfg.rope_beta_fast), index_turning(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    # clamped as the reference does, hi to d - 1 rather than d/2 - 1 (were lo itself past d - 1, the ramp
    # would invert; no real config comes near: the slowest frequency would turn > beta_fast times in L)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001  # as the reference: keeps the ramp a step, not a division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)  # 0: kept ... 1: divided by s
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / s) * ramp
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, attention_factor


def apply_rope(x, cos, sin):
    """Rotate x: (B, n_heads, T, head_dim) by RoFormer eq. 34, x * cos + rotate_half(x) * sin, with
    cos, sin: (T, head_dim) the rows of x's positions. Dim i pairs with i + head_dim/2 rather than
    the paper's neighbours 2i, 2i+1: the layout of Hugging Face's Llama weights, so they load unpermuted."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # a no-op unless autocast made x lower precision
    x1, x2 = x.chunk(2, dim=-1)  # (B, n_heads, T, head_dim/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -----------------------------------------------------------------------------
# KV cache: allocated only for generation, written at `pos`


class KVCache(nn.Module):
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim):
        super().__init__()
        self.shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # allocated by the first update, in the dtype and on the device of the keys it is given: what
        # attention computes in (bf16 under autocast or FSDP's mixed precision), not the stored weights' fp32
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)

    def update(self, pos, k, v):
        # k, v: (B, n_kv_heads, T, head_dim) for positions pos .. pos+T-1
        T = k.size(2)
        if pos + T > self.shape[2]:
            raise ValueError(f"KV cache holds {self.shape[2]} positions; cannot write {T} at pos={pos}")
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]  # (B, n_kv_heads, pos+T, head_dim)


# -----------------------------------------------------------------------------
# Attention


def causal_attention(q, k, v, pos, impl):
    """softmax(q k^T / sqrt(d) + causal mask) v, for queries at positions pos .. pos+T-1.

    q: (B, n_head, T, head_dim); k, v: (B, n_kv_heads, pos+T, head_dim). With grouped-query
    attention each key/value head serves n_head // n_kv_heads query heads.
    """
    T, S = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if impl == "sdpa" and T == S:  # no cache prefix: the fused kernel builds the causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # query i (at position pos + i) sees keys 0 .. pos + i; one new token sees every key: no mask
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if impl == "sdpa":  # the kernel shares k/v heads itself, without copying the cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, n_head, S, head_dim)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, n_head, T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v  # (B, n_head, T, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)  # diff vs llama31: head_dim is free
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        # diff vs llama31: QK-Norm, one gain vector over head_dim shared by all heads; it bounds the
        # attention logits, which otherwise grow and destabilise training (Dehghani et al., 2023)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        # diff vs llama31: QK-Norm on each head's vector, before RoPE
        q = self.q_norm(self.wq(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate before caching
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, n_kv_heads, pos+T, head_dim)
        y = causal_attention(q, k, v, pos, self.attn_impl)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.wo(y)


# -----------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)  # down
        self.w3 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # up

    def forward(self, x):
        # SwiGLU (Shazeer, 2020, eq. 6): a SiLU-activated gate times a linear "up" projection
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# -----------------------------------------------------------------------------
# Mixture of experts


class Router(nn.Module):
    """Token-choice top-k gating: softmax over all experts, keep the k largest. Renormalised
    (norm_topk_prob), that is Shazeer et al.'s softmax over the top-k logits (2017, eq. 3-5,
    without the noise); raw, the weights sum to less than 1, as in Switch (Fedus et al., 2021)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.n_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))

    def forward(self, x):
        # x: (N, n_embd) -> weights (N, k) in x's dtype, experts (N, k) ids, logits (N, n_experts)
        logits = F.linear(x, self.weight)
        # softmax over all experts before top-k, in fp32 so near-tied experts rank the same in bf16
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts, logits


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts (Shazeer et al. 2017; Qwen3 technical report sec. 2):
    each token runs through its top-k experts and their outputs are summed, weighted by the
    router. Qwen 3 has no shared expert (unlike Qwen2-MoE and DeepSeek-V3)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.impl = cfg.moe_impl
        self.router = Router(cfg)
        E, D, H = cfg.n_experts, cfg.n_embd, cfg.moe_intermediate_size
        # expert e computes w2[e] (silu(w1[e] x) * w3[e] x); stacked (E, out, in) so that one
        # grouped matmul runs every expert at once
        self.w1 = nn.Parameter(torch.empty(E, H, D))  # gate
        self.w2 = nn.Parameter(torch.empty(E, D, H))  # down
        self.w3 = nn.Parameter(torch.empty(E, H, D))  # up

    def forward(self, x):
        """x: (B, T, n_embd) -> output (B, T, n_embd), router logits (B*T, n_experts), chosen experts (B*T, k)."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D): routing is per token
        weights, experts, logits = self.router(x)  # (N, k), (N, k), (N, E)
        run = self.experts_loop if self.impl == "loop" else self.experts_grouped
        return run(x, weights, experts).view(B, T, D), logits, experts

    def experts_loop(self, x, weights, experts):
        """The reference: per expert, gather its tokens, run its MLP, scatter-add the weighted result.
        Idle experts still run (on 0 tokens) so every parameter gets a gradient, as DDP requires."""
        out = torch.zeros_like(x)  # (N, D)
        for e, (w1, w2, w3) in enumerate(zip(self.w1, self.w2, self.w3)):  # one unbind: cheap backward
            token, slot = torch.where(experts == e)  # tokens routed to e, and which of their k picks
            h = x[token]  # (n_e, D)
            h = F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)  # (n_e, D)
            out.index_add_(0, token, h * weights[token, slot, None])
        return out

    def experts_grouped(self, x, weights, experts):
        """The fast path (as in MegaBlocks, Gale et al. 2022): sort the N*k (token, pick) pairs by
        expert so each expert's rows are contiguous, then one grouped matmul per projection."""
        N, k = experts.shape
        ids = experts.flatten()  # (N*k,) the expert of each (token, pick) pair
        order = ids.argsort(stable=True)  # (N*k,) pairs, sorted by expert
        # pairs per expert, counted by scatter_add_ rather than bincount: a static shape, no torch.compile graph break
        counts = ids.new_zeros(self.w1.size(0)).scatter_add_(0, ids, torch.ones_like(ids))  # (E,)
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        # index_select is x[...] for one index tensor, several times faster on CPU
        h = x.index_select(0, order // k)  # (N*k, D): pair p belongs to token p // k
        h = grouped_mm(F.silu(grouped_mm(h, self.w1, offs)) * grouped_mm(h, self.w3, offs), self.w2, offs)
        # back to (token, pick) order with the inverse permutation, a scatter (cheaper than argsort)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=order.device))
        h = h.index_select(0, inverse).view(N, k, -1)  # (N, k, D)
        return (h * weights.unsqueeze(-1)).sum(dim=1)  # (N, D): a sum, not index_add_, so CUDA is deterministic


# -----------------------------------------------------------------------------
# MoE performance path: MoE.experts_grouped's grouped matmul and its device, alignment and autocast handling


def grouped_mm(x, w, offs):
    """Row block g of x times w[g]^T: x (S, in) sorted by group, w (G, out, in), offs (G,) int32
    end row of each group -> (S, out). One kernel for all groups where torch has one for this
    device and dtype (CPU; CUDA sm80+ in bf16) and the rows are 16-byte aligned, as it requires;
    else a zero-padded batched matmul."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm ignores autocast: cast as F.linear would be
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    # a compiled graph has no data pointers to read: its intermediates are fresh (aligned) allocations
    if not torch.compiler.is_compiling():
        aligned = aligned and x.data_ptr() % 16 == w.data_ptr() % 16 == 0
    cuda_ok = (
        x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )
    usable = hasattr(F, "grouped_mm") and x.dtype == w.dtype and aligned and (x.device.type == "cpu" or cuda_ok)
    if usable:
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return padded_bmm(x, w, offs)


def padded_bmm(x, w, offs):
    """grouped_mm as one bmm: scatter each group's rows into a (G, max rows, in) zero-padded batch."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()  # (G,) rows per group
    group = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)  # (S,)
    row = torch.arange(x.size(0), device=x.device) - (offs.long() - counts)[group]  # (S,) row within its group
    batch = x.new_zeros(w.size(0), int(counts.max()) if len(counts) else 0, x.size(1))  # (G, max rows, in)
    batch[group, row] = x
    return torch.bmm(batch, w.transpose(1, 2).to(batch.dtype))[group, row]  # (S, out)


# -----------------------------------------------------------------------------
# Load balancing: the auxiliary loss and the expert-load statistic, from the routing MoE returns


def expert_load(experts, n_experts):
    """experts: (N, k) expert ids -> (n_experts,) float32, the (token, pick) pairs each expert received."""
    ids = experts.flatten()  # (N*k,); scatter_add_, not bincount: a static shape, no torch.compile graph break
    return ids.new_zeros(n_experts).scatter_add_(0, ids, torch.ones_like(ids)).float()


def load_balancing_loss(router_logits, experts):
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) for top-k routing, pooled
    over all MoE layers as in Hugging Face's `load_balancing_loss_func`:
        n_experts * sum_i f_i * P_i,
    f_i the fraction of (token, layer) rows whose top-k holds expert i, P_i the mean router
    probability of expert i. f sums to k, so perfectly even routing scores k; only P is
    differentiable. router_logits, experts: one (N, n_experts) and one (N, k) tensor per MoE layer,
    the router's logits and the experts it chose (reused, not picked again by a second top-k)."""
    logits = torch.cat(router_logits)  # (rows, E), rows = n_moe_layers * N
    E = logits.size(-1)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    # a row's k picks are distinct, so the picks of expert i count the rows whose top-k holds i
    f = expert_load(torch.cat(experts), E) / logits.size(0)  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return E * (f * P).sum()


# -----------------------------------------------------------------------------
# Block


class Block(nn.Module):
    def __init__(self, cfg: Config, moe=False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg)  # diff vs llama31: the MoE variant

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        # diff vs llama31: an MoE layer also returns its routing (None, None if dense) for the balancing loss
        if isinstance(self.mlp, MoE):
            y, router_logits, experts = self.mlp(self.mlp_norm(x))
        else:
            y, router_logits, experts = self.mlp(self.mlp_norm(x)), None, None
        return x + y, router_logits, experts


# -----------------------------------------------------------------------------
# Output head and loss: cross-entropy without the (B*T, vocab_size) logits

# One chunk of the loss's fp32 logits holds at most this many elements (128 MiB): 256 rows at Llama 3's
# vocabulary of 128,256, 640 at GPT-2's padded 50,304. Large enough for matmuls that fill a GPU, small
# enough that a chunk is 1/16 of a 4,096-token sequence's logits. Logits that fit in one chunk are not chunked.
LOSS_CHUNK_ELEMENTS = 2**25


def loss_chunk_rows(vocab_rows):
    """Rows per chunk of the loss for a head of vocab_rows rows: the most whose fp32 logits fit in
    LOSS_CHUNK_ELEMENTS, in whole tiles of 128 rows (aligned matmuls), and at least one tile."""
    return max(128, LOSS_CHUNK_ELEMENTS // vocab_rows // 128 * 128)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets, a block of rows at a time.
    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits to get its
    gradient softmax - onehot(target), so no (N, vocab_size) tensor ever exists. The logits are
    computed in the dtype of x and weight and reduced in float32, as F.cross_entropy(logits.float()).
    Rows of weight past vocab_size are padding: their logits are left out, and they get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, ignore_index, vocab_size):
        # x: (N, n_embd), weight: (rows >= vocab_size, n_embd), targets: (N,) with ignore_index rows left out
        total, lse = torch.zeros((), dtype=torch.float32, device=x.device), []
        for s in range(0, x.size(0), chunk_rows):
            logits = (x[s : s + chunk_rows] @ weight.T)[:, :vocab_size].float()  # (C, vocab_size)
            t = targets[s : s + chunk_rows]
            lse.append(torch.logsumexp(logits, dim=-1))  # (C,)
            target_logit = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)  # (C,)
            total += torch.where(t != ignore_index, lse[-1] - target_logit, 0.0).sum()
        n_valid = (targets != ignore_index).sum()  # all ignored: 0 / 0 = nan, as F.cross_entropy
        ctx.save_for_backward(x, weight, targets, torch.cat(lse), n_valid)
        ctx.chunk_rows, ctx.ignore_index, ctx.vocab_size = chunk_rows, ignore_index, vocab_size
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, n_valid = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # accumulated chunk by chunk in place, in weight's dtype: exact in fp32; under bf16, one
        # rounding per chunk (a (vocab_size, n_embd) fp32 temporary per chunk would cost more memory)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        scale = grad_loss.float() / n_valid
        for s in range(0, x.size(0), ctx.chunk_rows):
            xc, t = x[s : s + ctx.chunk_rows], targets[s : s + ctx.chunk_rows]
            g = (xc @ weight.T).float()  # (C, rows): the logits again
            g.sub_(lse[s : s + ctx.chunk_rows, None]).exp_()  # softmax
            if ctx.vocab_size < g.size(1):
                g[:, ctx.vocab_size :] = 0.0  # the padding, never predicted, has no probability
            rows = torch.arange(t.size(0), device=t.device)
            g[rows, t.clamp(min=0)] -= 1.0  # d loss_i / d logits_i = softmax_i - onehot(t_i)
            g.mul_(torch.where(t != ctx.ignore_index, scale, 0.0)[:, None])
            g = g.to(x.dtype)
            if grad_x is not None:
                grad_x[s : s + ctx.chunk_rows] = g @ weight  # (C, n_embd)
            if grad_w is not None:
                grad_w.addmm_(g.T, xc)  # (rows, n_embd)
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_rows=None, ignore_index=-100, vocab_size=None):
    """F.cross_entropy(F.linear(x, weight)[..., :vocab_size].float().flatten(0, -2), targets.flatten(),
    ignore_index=-100) in value and gradients (for x and weight, tied or not), holding one chunk of
    logits at a time. x: (..., n_embd), targets: (...) -> () float32. Rows of weight past vocab_size
    (default: none) are padding for aligned matmuls, never predicted. Without chunk_rows, logits that fit
    in one chunk are computed at once by F.linear and F.cross_entropy, which compile to fused kernels and
    need no recomputation in backward; larger ones in chunks of loss_chunk_rows rows. Under autocast, x
    and weight enter in its dtype, as F.linear's would; the casts stay outside the Function, so their
    gradients flow back through them."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x, weight = x.to(torch.get_autocast_dtype(device)), weight.to(torch.get_autocast_dtype(device))
    x, targets, vocab_size = x.flatten(0, -2), targets.flatten(), vocab_size or weight.size(0)
    with torch.autocast(device, enabled=False):  # the backward runs without autocast too
        if chunk_rows is None and x.size(0) * weight.size(0) <= LOSS_CHUNK_ELEMENTS:
            logits = F.linear(x, weight)[:, :vocab_size].float()  # (N, vocab_size)
            return F.cross_entropy(logits, targets, ignore_index=ignore_index)
        chunk_rows = chunk_rows or loss_chunk_rows(weight.size(0))
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk_rows, ignore_index, vocab_size)


class LMHead(nn.Linear):
    """The output projection, bias-free. head(x) gives the logits; head(x, targets) gives the mean
    cross-entropy through linear_cross_entropy instead, never holding the logits. The loss is
    computed in this module's forward, not from its weight outside, so what wraps module calls
    (FSDP's all-gather of a sharded lm_head, its reshard and gradient reduction) sees it. A head of
    padded_vocab_size rows (aligned matmuls) predicts only the first vocab_size: the logits it returns
    and those the loss reduces leave the padding rows out."""

    def __init__(self, n_embd, vocab_size, padded_vocab_size=None):
        super().__init__(n_embd, padded_vocab_size or vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x, targets=None):
        if targets is None:
            return super().forward(x)[..., : self.vocab_size]  # (..., vocab_size)
        return linear_cross_entropy(x, self.weight, targets, vocab_size=self.vocab_size)


# -----------------------------------------------------------------------------
# Transformer


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self):
        """Tables computed from cfg, never saved, rebuilt after to_empty: RoPE's cos and sin."""
        cos, sin = precompute_rope(self.cfg)  # (block_size, head_dim) each
        device = self.tok_emb.weight.device  # built on the meta device, these are too
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def reset_parameters(self):
        for name, p in self.named_parameters():  # a tied matrix once, in a fixed order
            self.init_parameter(name, p)

    def init_parameter(self, name, p):
        """Write parameter `name`'s initial value into p, any tensor of its shape: train.py passes a
        full-size scratch tensor when each process holds only a shard of the parameter."""
        std = self.cfg.init_std
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight", "mlp.w2")):  # diff vs llama31: MoE's stacked w2
            # GPT-2 paper sec. 2.3: scale residual projections by 1/sqrt(N) so the
            # residual stream's variance does not grow with depth (2 per block)
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
        else:
            nn.init.normal_(p, mean=0.0, std=std)

    def check_input(self, idx, pos=0, training_step=False):
        """Fail with a message a user can act on, instead of an index error deep inside torch. In a
        training step (training mode, targets given) the token ids are checked without a host sync."""
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"idx must be an integer tensor of shape (batch, seq_len), got {tuple(idx.shape)} {idx.dtype}"
            )
        if pos + idx.size(1) > self.cfg.block_size:
            raise ValueError(
                f"sequence of {pos + idx.size(1)} tokens (pos={pos} + {idx.size(1)} new) is longer than "
                f"the model supports (block_size={self.cfg.block_size})"
            )
        outside = (idx < 0) | (idx >= self.cfg.vocab_size)
        if training_step or torch.compiler.is_compiling():
            # no host sync: the device checks the ids and fails without naming one. A training step's ids come
            # from the data loader, which checked each shard; a compiled graph cannot raise a ValueError
            torch._assert_async(~outside.any(), f"token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        elif outside.any():  # one host sync per forward; the details are read only on failure
            raise ValueError(f"token id {idx[outside][0].item()} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, idx, targets=None, *, cache=None, pos=0, aux=None):
        """idx: (B, T) token ids at positions pos .. pos+T-1; cache: list of KVCache, one per layer."""
        # aux: None, or a dict this call fills with training statistics of this forward (none in dense models)
        self.check_input(idx, pos, training_step=self.training and targets is not None)
        x = self.tok_emb(idx)  # (B, T, n_embd); positions enter only through RoPE in attention
        T = idx.size(1)
        # (T, head_dim) each: the rows of these positions, sliced once for all layers
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        router_logits, experts = [], []  # diff vs llama31: per MoE layer, (B*T, n_experts) and the chosen (B*T, k)
        for i, layer in enumerate(self.layers):
            x, layer_logits, layer_experts = layer(x, cos, sin, None if cache is None else cache[i], pos)
            if layer_logits is not None:
                router_logits.append(layer_logits)
                experts.append(layer_experts)
        # with targets: (None, loss), the logits never materialised (LMHead's chunked cross-entropy, a
        # () float32 mean over the targets that are not -100); without: (logits (B, T, vocab_size), None)
        x = self.norm(x)
        logits, loss = (self.lm_head(x), None) if targets is None else (None, self.lm_head(x, targets))
        # diff vs llama31: the load-balancing loss regularises training only, so eval loss stays the
        # cross-entropy, comparable with dense models and transformers' (without output_router_logits).
        # It counts every token, ignore_index ones included, as transformers does without an attention mask.
        add_balance = loss is not None and self.training and self.cfg.router_aux_loss_coef > 0
        if router_logits and (add_balance or aux is not None):
            balance = load_balancing_loss(router_logits, experts)  # () float32, once for both uses
            if add_balance:
                loss = loss + self.cfg.router_aux_loss_coef * balance
            if aux is not None:  # in any mode; detached, so a logger never holds on to the graph
                aux["load_balancing_loss"] = balance.detach()  # unweighted: the loss adds coef times this
                aux["expert_load"] = torch.stack([expert_load(e, self.cfg.n_experts) for e in experts])  # (n_moe, E)
        return logits, loss

    def make_cache(self, batch_size, max_seq_len=None):
        cfg = self.cfg
        max_seq_len = max_seq_len or cfg.block_size
        return [KVCache(batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layer)]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T); temperature 0 means greedy."""
        if idx.size(1) + max_new_tokens > self.cfg.block_size:
            raise ValueError(
                f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens exceeds block_size={self.cfg.block_size}"
            )
        # inference_mode, not no_grad: it also skips autograd's version counters and view tracking,
        # a per-op cost that dominates decoding small models one token at a time
        with torch.inference_mode():
            cache = self.make_cache(idx.size(0), idx.size(1) + max_new_tokens)
            logits, _ = self(idx, cache=cache, pos=0)  # prefill the whole prompt at once
            out = [idx]
            for step in range(max_new_tokens):
                next_id = sample(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
                out.append(next_id)
                if step + 1 < max_new_tokens:
                    logits, _ = self(next_id, cache=cache, pos=idx.size(1) + step)
        return torch.cat(out, dim=1)  # outside inference_mode: an ordinary tensor, fine to train on (RL)

    def num_params(self, non_embedding=False, active=False):
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        if non_embedding:
            # the embedding lookup does no matmul; an untied lm_head does, so it stays counted
            # (the convention of torchtitan's FLOP count; tied, the one matrix is the embedding)
            n -= self.tok_emb.weight.numel()
        if active:  # diff vs llama31: a token runs through only k of each MoE layer's experts
            for m in self.modules():
                if isinstance(m, MoE):
                    per_expert = m.w1[0].numel() + m.w2[0].numel() + m.w3[0].numel()
                    n -= (self.cfg.n_experts - self.cfg.n_experts_per_tok) * per_expert
        return n

    def flops_per_token(self, seq_len):
        # 6N for the matmuls (forward 2N + backward 4N) plus attention's q k^T and att v:
        # 2 * 2 * n_layer * seq_len * n_head * head_dim forward, x3 with backward
        # (Kaplan et al. 2020, table 1; PaLM appendix B). The output projection is a matmul even
        # when it shares its matrix with the embedding lookup, so a tied lm_head counts too.
        cfg = self.cfg
        # diff vs llama31: with MoE, only the active parameters do matmuls for a token
        n_matmul = self.num_params(non_embedding=True, active=True) + (
            self.lm_head.weight.numel() if cfg.tie_embeddings else 0
        )
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints: the format is in hf.py, imported late because it imports this file

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face directory (config.json + safetensors); overrides replace Config fields. A path
        without one (missing, a hub name not yet downloaded, another architecture's) raises hf.CheckpointError."""
        from . import hf

        return hf.load(path, **overrides)

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        """Save as a Hugging Face directory, in safetensors shards of at most max_shard_bytes."""
        from . import hf

        hf.save(self, path, max_shard_bytes)


def sample(logits, temperature, top_k, generator=None):
    """logits: (B, vocab_size) -> next ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # smoke check: python qwen3/model.py
    for preset in ("tiny", "tiny_moe"):
        torch.manual_seed(0)
        model = Transformer(Config.from_preset(preset))
        idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
        logits, loss = model(idx)[0], model(idx, idx)[1]
        print(
            f"{preset} Qwen 3: {model.num_params():,} params ({model.num_params(active=True):,} active), "
            f"logits {tuple(logits.shape)}, loss {loss.item():.3f} (ln vocab = {math.log(model.cfg.vocab_size):.3f})"
        )
        print("generated ids:", model.generate(idx[:1, :4], 8, temperature=0).tolist())
