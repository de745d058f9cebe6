"""DeepSeek-V3: the 671B-parameter mixture-of-experts decoder of the "DeepSeek-V3 Technical Report"
(DeepSeek-AI, 2024, arXiv 2412.19437), 37B parameters active per token. Attention is multi-head
latent attention (MLA, DeepSeek-V2 report sec. 2.1): keys and values are decompressed from one
small latent per token, which is all the KV cache holds besides one shared RoPE key. The MLP of
all but the first layers is DeepSeekMoE: many fine-grained routed experts plus shared experts,
balanced by a per-expert bias instead of an auxiliary loss (sec. 2.1.2). Training adds a
multi-token-prediction module that also predicts the token after next (sec. 2.2).

Checked against Hugging Face `transformers.DeepseekV3ForCausalLM` (tests/test_parity.py): logits
agree to 1e-4 in fp32 both ways; the router against `DeepseekV3TopkRouter` and the absorbed
attention against the naive one (tests/test_deepseek3.py). The Hugging Face format lives in hf.py.

Changes from qwen3/model.py:
- Config: MLA's ranks and head dims replace n_kv_heads / head_dim; DeepSeekMoE's shared experts,
  expert groups, scoring and scaling; the balancing and MTP coefficients; presets tiny, tiny_moe,
  deepseek_v3 and deepseek_v3_16b (torchtitan's); layer i is MoE iff i >= first_k_dense_replace;
- RoPE on the qk_rope_head_dim decoupled dims only, in DeepSeek's interleaved pair layout (2i, 2i+1);
  YaRN's attention factor from DeepSeek's mscale / mscale_all_dim pair, which also scales the softmax;
- `Attention` is MLA: low-rank query (q_lora_rank) and key/value (kv_lora_rank) projections with
  RMSNorm on the latents, one RoPE key shared by all heads, v_head_dim != the query/key head dim.
  Without a cache it runs the naive expanded form; with one, the weight-absorbed form over the
  latent `KVCache` (W_uk folded into the query, W_uv applied after attention);
- `Router`: sigmoid affinities, a selection-only bias (e_score_correction_bias), group-limited
  top-k, weights normalised and scaled by routed_scaling_factor; `MoE` adds shared experts;
- the sequence-wise balance loss (eq. 17-20) replaces the Switch loss;
- `MTP`: one multi-token-prediction depth (eq. 21-25), its loss added in training only;
  `num_params` counts the main model (as the published 671B), `flops_per_token` MTP too.

Not here: the FP8 training recipe, DualPipe and expert parallelism (sec. 3), node-limited routing.
"""

import functools
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    vocab_size: int = 129280  # DeepSeek-V3's byte-level BPE: 128K tokens, padded
    block_size: int = 163840  # longest sequence: the 4K pre-training context extended 40x by YaRN (sec. 4.3)
    n_layer: int = 61  # transformer blocks
    n_head: int = 128  # attention heads
    n_embd: int = 7168  # residual stream width
    intermediate_size: int = 18432  # SwiGLU hidden width of the dense MLP (the first_k_dense_replace layers)
    norm_eps: float = 1e-6  # RMSNorm epsilon of the residual-stream norms (MLA's latent norms: LATENT_NORM_EPS)
    tie_embeddings: bool = False  # lm_head shares the token-embedding matrix
    # multi-head latent attention (DeepSeek-V2 sec. 2.1, V3 sec. 2.1.1)
    q_lora_rank: int | None = 1536  # d_c': the query's compressed width; None = one full wq (16B / Lite sizes)
    kv_lora_rank: int = 512  # d_c: the latent keys and values are decompressed from; the cache stores it
    qk_nope_head_dim: int = 128  # d_h: per-head query/key dims that carry no position
    qk_rope_head_dim: int = 64  # d_h^R: the decoupled RoPE dims; one such key is shared by all heads
    v_head_dim: int = 128  # per-head value width
    rope_theta: float = 10000.0  # RoPE base
    rope_factor: float | None = 40.0  # RoPE scaling: context extension factor s; None = plain RoPE
    rope_type: str = "yarn"  # the scaling rope_factor selects: "yarn" (YaRN), the one DeepSeek-V3 uses
    rope_original_block_size: int = 4096  # the pre-training context, before long-context training
    rope_beta_fast: float = 32.0  # yarn: frequencies turning more often than this in the original context: kept
    rope_beta_slow: float = 1.0  # yarn: turning less often than this: divided by rope_factor; a ramp between
    rope_mscale: float = 1.0  # yarn: cos, sin times mscale(s, rope_mscale) / mscale(s, rope_mscale_all_dim); 0: unset
    rope_mscale_all_dim: float = 1.0  # yarn: the softmax scale times mscale(s, rope_mscale_all_dim)^2; 0: unset
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole frequency indices (transformers' default)
    # DeepSeekMoE (sec. 2.1.2); n_experts = 0 is a dense model
    n_experts: int = 256  # routed experts in each MoE layer
    n_experts_per_tok: int = 8  # top-k: routed experts each token runs through
    moe_intermediate_size: int = 2048  # SwiGLU hidden width of one expert
    n_shared_experts: int = 1  # experts every token runs through (one MLP of n times the expert width)
    first_k_dense_replace: int = 3  # the first k layers keep a dense MLP
    scoring_func: str = "sigmoid"  # affinity s = sigmoid(logit) (V3) or softmax over experts (V2, 16B)
    n_group: int = 8  # experts form n_group groups; a token picks only from ...
    topk_group: int = 4  # ... the topk_group groups with the highest sum of their top-2 affinities
    norm_topk_prob: bool = True  # renormalise the k chosen affinities to sum to 1 (eq. 13)
    routed_scaling_factor: float = 2.5  # multiplies the routed experts' weights
    bias_update_speed: float = 0.001  # gamma: the expert bias moves this much per step (sec. 2.1.2)
    seq_aux_loss_coef: float = 0.0001  # alpha: weight of the sequence-wise balance loss (eq. 17)
    # multi-token prediction (sec. 2.2)
    n_mtp: int = 1  # D: MTP depths, 0 or 1 (the released model has 1)
    mtp_loss_weight: float = 0.3  # lambda: weight of the MTP loss (eq. 25; 0.3 for the first 10T tokens)
    moe_impl: str = "grouped"  # "grouped" (tokens sorted by expert, grouped matmuls) or "loop" (the reference)
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit softmax, the reference)
    init_std: float = 0.02  # std of the normal initialisation

    def __post_init__(self):
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "intermediate_size")
        positive += ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        positive += ("n_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group", "rope_original_block_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_experts", "n_shared_experts", "first_k_dense_replace"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"Config.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"Config.q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"Config.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"Config.attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"Config.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_factor is not None and not self.rope_factor > 0:
            raise ValueError(f"Config.rope_factor must be > 0 or None (no scaling), got {self.rope_factor!r}")
        if self.rope_type != "yarn":
            raise ValueError(f"Config.rope_type must be 'yarn', got {self.rope_type!r}")
        if not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise ValueError(
                f"Config.rope_beta_slow ({self.rope_beta_slow}) must be > 0 and at most "
                f"Config.rope_beta_fast ({self.rope_beta_fast})"
            )
        for name in ("rope_mscale", "rope_mscale_all_dim", "routed_scaling_factor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Config.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.n_experts:
            self.check_routing()
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"Config.scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        for name in ("bias_update_speed", "seq_aux_loss_coef", "mtp_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Config.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.n_mtp not in (0, 1):
            raise ValueError(f"Config.n_mtp must be 0 or 1 (one MTP depth, as released), got {self.n_mtp!r}")
        if self.moe_impl not in ("grouped", "loop"):
            raise ValueError(f"Config.moe_impl must be 'grouped' or 'loop', got {self.moe_impl!r}")

    def check_routing(self):
        if self.n_experts % self.n_group != 0:
            raise ValueError(
                f"Config.n_experts ({self.n_experts}) must be divisible by Config.n_group ({self.n_group})"
            )
        if self.n_group > 1 and self.n_experts // self.n_group < 2:
            raise ValueError(f"Config.n_group ({self.n_group}) must leave at least 2 experts per group (top-2 score)")
        if self.topk_group > self.n_group:
            raise ValueError(f"Config.topk_group ({self.topk_group}) must be at most Config.n_group ({self.n_group})")
        reachable = self.topk_group * (self.n_experts // self.n_group)
        if self.n_experts_per_tok > reachable:
            raise ValueError(
                f"Config.n_experts_per_tok ({self.n_experts_per_tok}) must be at most the {reachable} experts "
                f"of Config.topk_group ({self.topk_group}) groups"
            )

    def is_moe_layer(self, i):
        # Hugging Face's DeepseekV3DecoderLayer rule; i = n_layer is the MTP module's block
        return self.n_experts > 0 and i >= self.first_k_dense_replace

    # --- presets: looked up by exact name, never fuzzy-matched ---
    # fmt: off

    @classmethod
    def tiny(cls):  # the CPU default: gpt2's tiny, with the byte tokenizer's 257 ids, dense
        return cls(vocab_size=257, block_size=256, n_layer=4, n_head=4, n_embd=128, intermediate_size=384,
                   tie_embeddings=True, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                   v_head_dim=32, rope_factor=None, n_experts=0)

    @classmethod
    def tiny_moe(cls):  # tiny with layers 1-3 DeepSeekMoE: 8 routed experts in 2 groups, 2 per token, 1 shared
        return cls(**{**asdict(cls.tiny()), "n_experts": 8, "n_experts_per_tok": 2, "moe_intermediate_size": 96,
                      "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1})

    @classmethod
    def deepseek_v3(cls):  # 671B, 37B active, as deepseek-ai/DeepSeek-V3's config.json (the defaults)
        return cls()

    @classmethod
    def deepseek_v3_16b(cls):  # torchtitan's "16B" (DeepSeek-V2-Lite's shape): 15.7B, 2.4B active
        return cls(vocab_size=102400, block_size=16384, n_layer=27, n_head=16, n_embd=2048, intermediate_size=10944,
                   q_lora_rank=None, rope_mscale=0.70, rope_mscale_all_dim=0.70, n_experts=64, n_experts_per_tok=6,
                   moe_intermediate_size=1408, n_shared_experts=2, first_k_dense_replace=1, scoring_func="softmax",
                   n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_mtp=0)

    PRESETS = ("tiny", "tiny_moe", "deepseek_v3", "deepseek_v3_16b")
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
# Rotary position embedding (RoFormer, Su et al., 2021) on MLA's decoupled dims


def precompute_rope(cfg: Config):
    """cos and sin of the rotation angle m * theta_i for every position m < block_size and pair i of
    the qk_rope_head_dim dims, both times YaRN's attention factor (1 for plain RoPE)."""
    d = cfg.qk_rope_head_dim  # diff vs qwen3: only the decoupled dims rotate
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,) eq. 15
    attention_factor = 1.0
    if cfg.rope_factor is not None and cfg.rope_type == "yarn":
        inv_freq, attention_factor = yarn_scaling(inv_freq, cfg)
    # diff vs qwen3: (block_size, d/2), one angle per interleaved pair (2i, 2i+1)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def yarn_mscale(s, mscale):
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (sec. 3.4), with DeepSeek's multiplier on the log."""
    return 0.1 * mscale * math.log(s) + 1.0 if s > 1 else 1.0


def yarn_scaling(inv_freq, cfg: Config):
    """YaRN (Peng et al., 2023): inv_freq (d/2,) -> (scaled inv_freq, attention factor on cos and sin).

    NTK-by-parts (sec. 3.2): frequency i turns r_i = L / wavelength_i times over the original context
    L. Those with r_i > beta_fast are kept (extrapolated), those with r_i < beta_slow are divided by
    the factor s (interpolated, as position interpolation does), and between the two the result
    blends linearly in the index i, as the reference implementation does. Attention temperature:
    DeepSeek splits it into a factor mscale(s, mscale) / mscale(s, mscale_all_dim) on cos and sin
    and mscale(s, mscale_all_dim)^2 on the softmax scale (softmax_scale); with the two equal, as
    released, all of it goes to the softmax and so also to the dims without RoPE."""
    d, L, s = cfg.qk_rope_head_dim, cfg.rope_original_block_size, cfg.rope_factor  # diff vs qwen3: rope dims

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
    # diff vs qwen3: DeepSeek's mscale pair; either unset (0) gives YaRN's own 0.1 ln(s) + 1, as transformers
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = yarn_mscale(s, cfg.rope_mscale) / yarn_mscale(s, cfg.rope_mscale_all_dim)
    else:
        attention_factor = yarn_mscale(s, 1.0)
    return inv_freq, attention_factor


def softmax_scale(cfg: Config):
    """1 / sqrt(query/key head dim), times YaRN's mscale(s, mscale_all_dim)^2 when RoPE is scaled."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_factor is not None and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def apply_rope(x, cos, sin):
    """Rotate x: (B, n_heads, T, d) by RoFormer eq. 34, each pair of neighbours (2i, 2i+1) by the
    angle of row cos[:, i], sin[:, i] (T, d/2): the layout of DeepSeek's published weights."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # a no-op unless autocast made x lower precision
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, n_heads, T, d/2) each
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)  # (B, n_heads, T, d)


# -----------------------------------------------------------------------------
# KV cache: allocated only for generation, written at `pos`

# MLA's latent norms (q_norm, kv_norm) use this epsilon at every size, whatever norm_eps says, as
# DeepSeek's inference code and transformers do
LATENT_NORM_EPS = 1e-6


class KVCache(nn.Module):
    """diff vs qwen3: MLA's latent cache, kv_lora_rank + qk_rope_head_dim numbers per token and layer
    (576 in DeepSeek-V3) instead of 2 * n_kv_heads * head_dim: the normalised latent c^KV (eq. 1)
    and the roped key k^R shared by all heads (eq. 3), side by side in one buffer [c^KV; k^R], the
    layout FlashMLA reads and the absorbed attention's single key head."""

    def __init__(self, batch_size, max_seq_len, kv_lora_rank, qk_rope_head_dim):
        super().__init__()
        self.max_seq_len = max_seq_len
        # rows rounded up to whole pages of FlashMLA's paged cache, which its kernel then reads in place
        rows = -(-max_seq_len // FLASH_MLA_PAGE) * FLASH_MLA_PAGE
        self.shape = (batch_size, rows, kv_lora_rank + qk_rope_head_dim)
        # allocated by the first update, in the dtype and on the device of the latents it is given: what
        # attention computes in (bf16 under autocast or FSDP's mixed precision), not the stored weights' fp32
        self.register_buffer("kv", None, persistent=False)

    def update(self, pos, latent, k_rope):
        # latent: (B, T, kv_lora_rank), k_rope: (B, T, qk_rope_head_dim) for positions pos .. pos+T-1
        T, rank = latent.size(1), latent.size(2)
        if pos + T > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; cannot write {T} at pos={pos}")
        if self.kv is None:
            self.kv = latent.new_zeros(self.shape)
        self.kv[:, pos : pos + T, :rank] = latent
        self.kv[:, pos : pos + T, rank:] = k_rope
        return self.kv[:, : pos + T]  # (B, pos+T, kv_lora_rank + qk_rope_head_dim)


# -----------------------------------------------------------------------------
# Attention


def causal_attention(q, k, v, pos, impl, scale):
    """softmax(q k^T * scale + causal mask) v, for queries at positions pos .. pos+T-1.

    q: (B, n_head, T, d); k: (B, n_kv_heads, pos+T, d), v: (B, n_kv_heads, pos+T, d_v). With grouped-query
    attention each key/value head serves n_head // n_kv_heads query heads (MLA's absorbed form: one).
    """
    # diff vs qwen3: scale is given (YaRN's mscale), and v's head dim may differ from q's
    T, S = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if impl == "sdpa" and T == S:  # no cache prefix: the fused kernel builds the causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    # query i (at position pos + i) sees keys 0 .. pos + i; one new token sees every key: no mask
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if impl == "sdpa":  # the kernel shares k/v heads itself, without copying the cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
    if gqa:
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, n_head, S, d)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, n_head, T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v  # (B, n_head, T, d_v)


def latent_attention(q, kv, rank, pos, impl, scale):
    """Attention.absorbed's multi-query attention in torch: queries q (B, n_head, T, rank + rope) at
    positions pos .. pos+T-1 against one key head kv (B, pos+T, rank + rope), [c; k^R], and one value
    head, its first `rank` columns c. Returns (B, n_head, T, rank).

    With a single key/value head every head scores the same keys, so the heads fold into the query
    length, n_head * T queries of one head, as FlashMLA does (its q_seq_per_hk). Passed as n_head
    query heads over one kv head instead, SDPA's grouped-query fallback (its math path, which CPUs
    and, at head dims above 256, CUDA take) copies the whole cache n_head times at every step."""
    B, H, T, D = q.shape
    S = kv.size(1)
    q = q.reshape(B, 1, H * T, D)  # (B, 1, n_head * T, rank + rope): row h * T + i is head h's query i
    k, v = kv.unsqueeze(1), kv[..., :rank].unsqueeze(1)  # (B, 1, S, rank + rope), (B, 1, S, rank)
    # query i (at position pos + i) sees keys 0 .. pos + i in every head: causal_attention's (T, S) mask,
    # once per head; one new token sees every key: no mask
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T).repeat(H, 1)
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        att = (q @ k.transpose(-2, -1)) * scale  # (B, 1, n_head * T, S)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        y = F.softmax(att.float(), dim=-1).to(q.dtype) @ v
    return y.view(B, H, T, rank)  # (B, n_head, T, rank)


class Attention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1; V3 sec. 2.1.1, eq. 1-11). Each head's key is
    [k^C; k^R]: k^C decompressed from the token's latent c^KV by W_uk, k^R one roped key shared by
    all heads; values come from the same latent through W_uv. wkv_b stacks W_uk and W_uv per head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.attn_impl = cfg.n_head, cfg.attn_impl
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_direct = cfg.kv_lora_rank, cfg.q_lora_rank is None
        self.scale = softmax_scale(cfg)
        qk_dim = cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        if self.q_direct:
            self.wq = nn.Linear(cfg.n_embd, qk_dim, bias=False)
        else:  # eq. 6-7: the query is compressed too, which saves activation memory in training
            self.wq_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, qk_dim, bias=False)  # W^UQ and W^QR
        self.wkv_a = nn.Linear(cfg.n_embd, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # W^DKV and W^KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_head * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.v_head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.wq(x) if self.q_direct else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, n_head * qk dim)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)  # eq. 8
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, rank), (B, T, rope)
        # eq. 1, c^KV, kept in the projection's dtype: under autocast the norm's fp32 gain would promote it,
        # a cache twice the size that attention reads in bf16 anyway, and one FlashMLA (same dtypes) refuses
        latent = self.kv_norm(latent).to(k_rope.dtype)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, rope) eq. 3: one key for all heads
        if cache is None:
            y = self.naive(q_nope, q_rope, latent, k_rope, pos)
        else:
            y = self.absorbed(q_nope, q_rope, cache.update(pos, latent, k_rope), pos)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * v_dim)
        return self.wo(y)  # eq. 11

    def naive(self, q_nope, q_rope, latent, k_rope, pos):
        """Decompress every key and value (eq. 2, 4-5) and run ordinary multi-head attention: the
        cheaper form when the queries are as many as the keys (training, prefill)."""
        B, S, _ = latent.shape
        kv = self.wkv_b(latent).view(B, S, self.n_head, -1).transpose(1, 2)  # (B, n_head, S, nope + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, self.n_head, -1, -1)], dim=-1)  # (B, n_head, S, qk)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, n_head, T, qk)
        return causal_attention(q, k, v, pos, self.attn_impl, self.scale)  # (B, n_head, T, v_dim)

    def absorbed(self, q_nope, q_rope, kv, pos):
        """The same attention without decompressing the cache (DeepSeek-V2 sec. 2.1.2): q_nope . (W_uk c)
        = (W_uk^T q_nope) . c, so W_uk folds into the query, and sum_s p_s W_uv c_s = W_uv sum_s p_s c_s,
        so W_uv applies after attention. What remains is multi-query attention with one key head
        [c; k^R] and one value head c, all of width kv_lora_rank (+ rope dims). kv: (B, S, rank + rope),
        the cache's [c; k^R] of positions 0 .. pos+T-1."""
        w = self.wkv_b.weight.view(self.n_head, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # (n_head, nope, rank), (n_head, v_dim, rank)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, n_head, T, rank)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, n_head, T, rank + rope)
        if flash_mla_usable(q, kv, self.kv_lora_rank):  # DeepSeek's kernel on H100-class GPUs; else the reference:
            y = flash_mla_attention(q, kv, self.kv_lora_rank, pos, self.scale)  # (B, n_head, T, rank)
        else:
            y = latent_attention(q, kv, self.kv_lora_rank, pos, self.attn_impl, self.scale)  # (B, n_head, T, rank)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # (B, n_head, T, v_dim)


# -----------------------------------------------------------------------------
# FlashMLA (github.com/deepseek-ai/FlashMLA): DeepSeek's fused kernel for the absorbed form's attention,
# used where it is installed (`uv sync --extra flash-mla` builds it on a CUDA machine) and can run;
# the torch path in Attention.absorbed is the reference it is tested against

FLASH_MLA_PAGE = 64  # tokens per page of the kernel's paged cache, the only page size it supports
FLASH_MLA_WIDTHS = (512, 64)  # (kv_lora_rank, qk_rope_head_dim): the one shape its kernels are built for


@functools.cache
def flash_mla_module():
    """The flash_mla package, or None where it is not installed (imported once, not per layer and step)."""
    try:
        import flash_mla
    except ImportError:
        return None
    return flash_mla


def flash_mla_usable(q, kv, rank):
    """Whether FlashMLA's dense decoding kernel can run Attention.absorbed's attention: an SM90 GPU
    (H100, H200, H800: its only target), bf16 or fp16, DeepSeek-V3's widths, and a cache buffer of
    whole pages for kv to be read in place."""
    width = sum(FLASH_MLA_WIDTHS)
    return (
        q.is_cuda
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and q.dtype in (torch.bfloat16, torch.float16)
        and kv.dtype == q.dtype
        and (rank, kv.size(-1) - rank) == FLASH_MLA_WIDTHS
        and kv.stride()[1:] == (width, 1)
        and kv.stride(0) % (FLASH_MLA_PAGE * width) == 0
        and flash_mla_module() is not None
    )


def flash_mla_attention(q, kv, rank, pos, scale):
    """Attention.absorbed's multi-query attention by FlashMLA's kernel, for queries q (B, n_head, T,
    rank + rope) at positions pos .. pos+T-1 over kv (B, pos+T, rank + rope), a slice of a KVCache
    buffer of S positions per sequence, S a whole number of pages. Returns (B, n_head, T, rank)."""
    flash_mla = flash_mla_module()
    B, H, T, D = q.shape
    S = kv.stride(0) // D
    # the whole buffer as the kernel's pages, no copy: sequence b owns pages b*S/64 .. (b+1)*S/64 - 1, in order
    pages = kv.as_strided((B * S // FLASH_MLA_PAGE, FLASH_MLA_PAGE, 1, D), (FLASH_MLA_PAGE * D, D, D, 1))
    block_table = torch.arange(pages.size(0), dtype=torch.int32, device=q.device).view(B, -1)  # (B, S / 64)
    lengths = torch.full((B,), pos + T, dtype=torch.int32, device=q.device)  # keys of each sequence
    # (lengths, queries per key head, key heads): what older releases schedule from; newer ones ignore them
    metadata = flash_mla.get_mla_metadata(lengths, T * H, 1)
    # causal: query i sees keys up to pos + i (the mask aligned to the last key), as causal_attention's;
    # values are the first `rank` columns of each key row, the latent c^KV
    y, _ = flash_mla.flash_mla_with_kvcache(
        q.transpose(1, 2).contiguous(), pages, block_table, lengths, rank, *metadata, softmax_scale=scale, causal=True
    )  # (B, T, n_head, rank)
    return y.transpose(1, 2)


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
    """DeepSeekMoE's gate (sec. 2.1.2, eq. 13-16): affinities s = sigmoid(u . e_i) (softmax in V2); a
    per-expert bias b_i shifts which experts win the top-k (auxiliary-loss-free balancing: train.py
    raises b_i of under-loaded experts) but never the weights, which are the chosen unbiased s,
    normalised and scaled. Group-limited routing first keeps the topk_group of n_group expert groups
    with the highest sum of their two best biased affinities, as the released model does."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.n_experts_per_tok, cfg.norm_topk_prob
        self.n_group, self.topk_group, self.scoring_func = cfg.n_group, cfg.topk_group, cfg.scoring_func
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))
        # a Parameter (so meta init, checkpoints and FSDP treat it like the rest) that no gradient
        # moves; fp32, as the published checkpoint: its steps of gamma = 0.001 vanish in bf16 near 1
        self.bias = nn.Parameter(torch.zeros(cfg.n_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        # x: (N, n_embd) -> weights (N, k) in x's dtype, experts (N, k) ids, affinities (N, n_experts) float32
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits: near-tied experts rank the same in bf16
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)  # eq. 15
        biased = scores + self.bias  # eq. 16: for the choice only
        if self.n_group > 1:
            N, E = biased.shape
            group_score = biased.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
            keep = group_score.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, n_group)
            biased = biased.masked_fill(~allowed.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        experts = biased.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)  # (N, k) eq. 13: unbiased
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # the epsilon of transformers
        return (weights * self.routed_scaling_factor).to(x.dtype), experts, scores


class MoE(nn.Module):
    """DeepSeekMoE (Dai et al., 2024; V3 report eq. 12): each token runs through the shared experts
    and its top-k routed experts, the routed outputs weighted by the router, all summed."""

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
        # diff vs qwen3: the shared experts, one MLP as wide as all of them together
        shared = replace(cfg, intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.shared_experts = MLP(shared) if cfg.n_shared_experts else None

    def forward(self, x):
        """x: (B, T, n_embd) -> output (B, T, n_embd), affinities (B*T, n_experts), chosen experts (B*T, k)."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D): routing is per token
        weights, experts, scores = self.router(x)  # (N, k), (N, k), (N, E)
        run = self.experts_loop if self.impl == "loop" else self.experts_grouped
        y = run(x, weights, experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, D), scores, experts

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


def sequence_balance_loss(scores, experts, batch_size):
    """The complementary sequence-wise balance loss (report eq. 17-20) of one MoE layer, averaged over
    the sequences: sum_i f_i P_i, with f_i = E / (k T) * (tokens of the sequence routed to expert i)
    and P_i the mean over its tokens of the affinities normalised to sum to 1, s_i / sum_j s_j.
    Even routing scores 1. scores: (B*T, E) the router's affinities, experts: (B*T, k) its choice."""
    E, k = scores.size(-1), experts.size(-1)
    s = scores.view(batch_size, -1, E)  # (B, T, E)
    T = s.size(1)
    P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E) eq. 19-20
    picks = experts.view(batch_size, -1)  # (B, T*k)
    counts = picks.new_zeros(batch_size, E).scatter_add_(1, picks, torch.ones_like(picks)).float()  # (B, E)
    f = counts * E / (k * T)  # (B, E) eq. 18
    return (f * P).sum(dim=-1).mean()


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
# Multi-token prediction (report sec. 2.2)


class MTP(nn.Module):
    """One MTP depth (D = 1): at position i it combines the main model's final hidden state h_i with
    the embedding of token i+1 (eq. 21), runs one more Block over the sequence (eq. 22), and the
    shared lm_head predicts token i+2 (eq. 23). The embedding and head are the main model's, passed in."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.enorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)  # M_k of eq. 21
        self.block = Block(cfg, moe=cfg.is_moe_layer(cfg.n_layer))  # numbered after the main layers, as published
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, h, next_emb, cos, sin):
        # h, next_emb: (B, T, n_embd) -> (B, T, n_embd) normalised for the head, and the block's routing
        # as Block returns it (None, None if dense), so its MoE layer is balanced as the main ones are
        # [embedding; hidden] in this order, as the published eh_proj expects (eq. 21 writes the reverse)
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))
        x, scores, experts = self.block(x, cos, sin)
        return self.norm(x), scores, experts


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
        self.mtp = nn.ModuleList(MTP(cfg) for _ in range(cfg.n_mtp))  # diff vs qwen3: multi-token prediction
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
        # aux: None, or a dict this call fills with training statistics of this forward
        self.check_input(idx, pos, training_step=self.training and targets is not None)
        x = self.tok_emb(idx)  # (B, T, n_embd); positions enter only through RoPE in attention
        T = idx.size(1)
        # (T, qk_rope_head_dim / 2) each: the rows of these positions, sliced once for all layers
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        scores, experts = [], []  # per MoE layer, the affinities (B*T, n_experts) and the chosen (B*T, k)
        for i, layer in enumerate(self.layers):
            x, layer_scores, layer_experts = layer(x, cos, sin, None if cache is None else cache[i], pos)
            if layer_scores is not None:
                scores.append(layer_scores)
                experts.append(layer_experts)
        # with targets: (None, loss), the logits never materialised (LMHead's chunked cross-entropy, a
        # () float32 mean over the targets that are not -100); without: (logits (B, T, vocab_size), None)
        x = self.norm(x)
        logits, loss = (self.lm_head(x), None) if targets is None else (None, self.lm_head(x, targets))
        # diff vs qwen3: MTP and the balance loss regularise training only, so eval loss stays the
        # cross-entropy, comparable with other models and transformers'
        if loss is not None and self.training and self.mtp and T > 1:
            mtp_loss, mtp_scores, mtp_experts = self.mtp_loss(x, idx, targets, cos, sin)
            loss = loss + self.cfg.mtp_loss_weight * mtp_loss  # eq. 25
            if aux is not None:
                aux["mtp_loss"] = mtp_loss.detach()
            if mtp_scores is not None:  # the MTP block's MoE layer is balanced too, after the main layers
                scores.append(mtp_scores)
                experts.append(mtp_experts)
        add_balance = loss is not None and self.training and self.cfg.seq_aux_loss_coef > 0
        if scores and (add_balance or aux is not None):
            # eq. 17 per MoE layer, summed over the layers; every token counts, ignore_index ones included
            balance = sum(sequence_balance_loss(s, e, idx.size(0)) for s, e in zip(scores, experts))
            if add_balance:
                loss = loss + self.cfg.seq_aux_loss_coef * balance
            if aux is not None:  # in any mode; detached, so a logger never holds on to the graph
                aux["load_balancing_loss"] = balance.detach()  # unweighted: the loss adds coef times this
                # (rows, E), one row per MoE layer that ran: the main model's in layer order, then the MTP
                # block's when a training forward ran it (eval and target-free forwards report fewer rows)
                aux["expert_load"] = torch.stack([expert_load(e, self.cfg.n_experts) for e in experts])
        return logits, loss

    def mtp_loss(self, h, idx, targets, cos, sin):
        """Cross-entropy of the MTP depth (eq. 24): position i sees h_i (after the final norm) and token
        i+1, and predicts targets[:, i+1], the token after that; the last position has no such target.
        Token i+1 is read from idx, not targets, so an ignored (-100) target never reaches the embedding.
        Returns the loss and the MTP block's routing (scores, experts) over B*(T-1) tokens, or None, None."""
        h, scores, experts = self.mtp[0](h[:, :-1], self.tok_emb(idx[:, 1:]), cos[:-1], sin[:-1])
        return self.lm_head(h, targets[:, 1:]), scores, experts

    def make_cache(self, batch_size, max_seq_len=None):
        cfg = self.cfg
        max_seq_len = max_seq_len or cfg.block_size
        return [KVCache(batch_size, max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim) for _ in range(cfg.n_layer)]

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
        # diff vs qwen3: the main model only; the MTP module, a training aid skipped at inference, is
        # left out, as in the published 671B (685B with it)
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("mtp."))  # tied: once
        if non_embedding:
            # the embedding lookup does no matmul; an untied lm_head does, so it stays counted
            # (the convention of torchtitan's FLOP count; tied, the one matrix is the embedding)
            n -= self.tok_emb.weight.numel()
        if active:  # a token runs through only k of each MoE layer's routed experts
            n -= self.idle_expert_params(self.layers)
        return n

    def idle_expert_params(self, module):
        """Parameters of the routed experts one token skips, in the MoE layers under module."""
        moes = [m for m in module.modules() if isinstance(m, MoE)]
        return sum((self.cfg.n_experts - self.cfg.n_experts_per_tok) * m.w1[0].numel() * 3 for m in moes)

    def flops_per_token(self, seq_len):
        # 6N for the matmuls (forward 2N + backward 4N) plus attention's q k^T and att v:
        # 2 * n_layer * seq_len * n_head * (qk head dim + v_head_dim) forward, x3 with backward
        # (Kaplan et al. 2020, table 1; PaLM appendix B). The output projection is a matmul even
        # when it shares its matrix with the embedding lookup, so a tied lm_head counts too.
        cfg = self.cfg
        n_matmul = self.num_params(non_embedding=True, active=True) + (
            self.lm_head.weight.numel() if cfg.tie_embeddings else 0
        )
        attn_layers = cfg.n_layer
        if cfg.n_mtp:  # diff vs qwen3: training also runs the MTP block and a second pass through lm_head
            mtp = sum(p.numel() for p in self.mtp.parameters()) - self.idle_expert_params(self.mtp)
            n_matmul += mtp + self.lm_head.weight.numel()
            attn_layers += cfg.n_mtp
        head_dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return 6 * n_matmul + 6 * attn_layers * cfg.n_head * head_dims * seq_len

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

if __name__ == "__main__":  # smoke check: python deepseek3/model.py
    for preset in ("tiny", "tiny_moe"):
        torch.manual_seed(0)
        model = Transformer(Config.from_preset(preset))
        idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
        logits, loss = model(idx)[0], model(idx, idx)[1]
        print(
            f"{preset} DeepSeek-V3: {model.num_params():,} params ({model.num_params(active=True):,} active), "
            f"logits {tuple(logits.shape)}, loss {loss.item():.3f} (ln vocab = {math.log(model.cfg.vocab_size):.3f})"
        )
        print("generated ids:", model.generate(idx[:1, :4], 8, temperature=0).tolist())
